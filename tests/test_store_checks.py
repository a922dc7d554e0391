"""The store is checked before it is trusted: an empty, foreign, truncated, corrupt, newer or misplaced store, a
state dir that cannot be made or written, and a full disk each end a command with one line naming the path and
a non-zero exit, with nothing sent; read-only commands never create a state dir."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from hipbatch import __version__, ops
from hipbatch.emulator import LocalBatchServer
from hipbatch.errors import StoreError
from hipbatch.migrations import migrations
from hipbatch.store import Store
from hipbatch.views import Out
from tests.conftest import cli, make_hip_dir

LATEST = migrations._migrations[-1].name  # the newest migration this hipbatch knows


def made_store(state: Path, hip_dir: Path) -> Path:
    """A real store with requests in it (a dry run records them), its WAL written back: returns hipbatch.db."""
    cli("--state-dir", state, "submit", hip_dir, "--dry-run")
    db = state / "hipbatch.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def zero_bytes(tmp: Path, hip_dir: Path) -> Path:
    state = tmp / "state"
    (state / "shards").mkdir(parents=True)
    (state / "hipbatch.db").write_bytes(b"")
    return state


def not_sqlite(tmp: Path, hip_dir: Path) -> Path:
    state = tmp / "state"
    state.mkdir()
    (state / "hipbatch.db").write_text("custom_id,state\nhb-1,succeeded\n" * 100)
    return state


def truncated(tmp: Path, hip_dir: Path) -> Path:
    db = made_store(tmp / "state", hip_dir)
    os.truncate(db, db.stat().st_size // 2)
    return db.parent


def corrupt(tmp: Path, hip_dir: Path) -> Path:
    db = made_store(tmp / "state", hip_dir)
    data = bytearray(db.read_bytes())
    data[4096 * 2 : 4096 * 5] = b"\x5a" * (4096 * 3)  # three pages of the tables overwritten, the header intact
    db.write_bytes(bytes(data))
    return db.parent


def newer(tmp: Path, hip_dir: Path) -> Path:
    db = made_store(tmp / "state", hip_dir)
    Database(db).table("_sqlite_migrations").insert(
        {"migration_set": "hipbatch", "name": "m999_from_the_future", "applied_at": "2030-01-01 00:00:00"}
    )
    return db.parent


def db_is_a_directory(tmp: Path, hip_dir: Path) -> Path:
    (tmp / "state" / "hipbatch.db").mkdir(parents=True)
    return tmp / "state"


def state_is_a_file(tmp: Path, hip_dir: Path) -> Path:
    (tmp / "state").write_text("not a folder")
    return tmp / "state"


def cannot_be_made(tmp: Path, hip_dir: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file" / "state"


#: (case, what the one line says)
BAD_STORES: list[tuple[Callable[[Path, Path], Path], str]] = [
    (zero_bytes, "is empty (0 bytes)"),
    (not_sqlite, "is not a SQLite database"),
    (truncated, "restore it from a backup"),
    (corrupt, "restore it from a backup"),
    (newer, f"m999_from_the_future, which hipbatch {__version__} does not know (it knows up to {LATEST}"),
    (db_is_a_directory, "is a directory, not a hipbatch store"),
    (state_is_a_file, "is not a directory"),
    (cannot_be_made, "cannot create the state dir"),
]
COMMANDS = [["submit", "{hip}"], ["collect"], ["retry"], ["cancel", "--yes"], ["status"], ["cost"], ["report"]]


def assert_one_line(stderr: str, path: Path, words: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and str(path) in lines[0] and words in lines[0], lines[0]
    assert "Traceback" not in stderr


def assert_nothing_sent(server: LocalBatchServer) -> None:
    assert server.stats.sent == {} and server.stats.batches_created == 0 and server.stats.files_uploaded == 0


#: Every command on every bad store, but a read-only command (and collect, which creates no store either) under a
#: path that cannot be a folder only says there is no state there (tested below).
CASES = [
    pytest.param(case, words, command, id=f"{case.__name__}-{command[0]}")
    for case, words in BAD_STORES
    for command in COMMANDS
    if not (case is cannot_be_made and command[0] in ("status", "cost", "report", "collect"))
]


@pytest.mark.parametrize(("case", "words", "command"), CASES)
def test_a_bad_store_is_one_line_and_nothing_sent(
    openai_env: LocalBatchServer,
    tmp_path: Path,
    hip_dir: Path,
    case: Callable[[Path, Path], Path],
    words: str,
    command: list[str],
) -> None:
    state = case(tmp_path, hip_dir)
    before = state.stat().st_size if state.is_file() else None
    args = [a.format(hip=hip_dir) for a in command]
    result = cli("--state-dir", state, *args, code=None)
    assert result.exit_code != 0
    assert_one_line(result.stderr, state, words)
    assert_nothing_sent(openai_env)
    assert before is None or state.stat().st_size == before  # nothing written over it


def test_an_empty_store_is_never_taken_for_a_new_one(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    sent = dict(openai_env.stats.sent)
    db = Path("state/hipbatch.db")
    for leftover in (db, db.with_name("hipbatch.db-wal"), db.with_name("hipbatch.db-shm")):
        leftover.unlink(missing_ok=True)
    db.write_bytes(b"")  # the ledger lost, its shards and the provider's batch still there
    result = cli("submit", hip_dir, code=1)
    assert "is empty (0 bytes)" in result.stderr and "restore it from a backup" in result.stderr
    assert dict(openai_env.stats.sent) == sent  # nothing resent


def test_a_new_store_appears_whole(tmp_path: Path) -> None:
    store = Store(tmp_path / "fresh")
    store.close()
    names = sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert "hipbatch.db.new" not in names and "hipbatch.db" in names
    assert {m["name"] for m in Database(tmp_path / "fresh" / "hipbatch.db")["_sqlite_migrations"].rows} >= {
        "m001_initial",
        "m004_batch_read_errors",
    }


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["cost"], ["cost", "--json"], ["report"]])
def test_read_only_commands_in_an_empty_folder_create_nothing(tmp_path: Path, command: list[str]) -> None:
    before = sorted(tmp_path.rglob("*"))
    result = cli(*command, code=2 if command[0] == "report" else 0)
    assert sorted(tmp_path.rglob("*")) == before
    assert f"no hipbatch state in {tmp_path / 'state'}" in result.stderr.lower()
    if command == ["status", "--json"]:
        assert result.stdout.strip() == "[]"
    if command == ["cost", "--json"]:
        assert '"rows": []' in result.stdout


def test_status_in_an_existing_state_dir_without_a_store_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "state" / "dry-run").mkdir(parents=True)
    cli("status")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["dry-run"]


# ---- read-only and full disks, for real (a tmpfs; needs root) or through SQLite's own page cap ----------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(path, option, ...) mounts a fresh tmpfs there (skips the test where mounting is not allowed);
    remount(path, option, ...) changes it. Everything mounted is unmounted at the end."""
    mounted: list[Path] = []

    def mount(path: Path, *options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        args = ["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=1m",)), "tmpfs", str(path)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, check=False)
        except OSError as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    mount.mounted = mounted  # type: ignore[attr-defined]
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, *options: str) -> None:
    subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(path)], check=True, capture_output=True)


def test_read_only_state_dir(openai_env: LocalBatchServer, tmp_path: Path, hip_dir: Path, tmpfs: Any) -> None:
    made = tmpfs(tmp_path / "rw", "size=4m")
    made_store(made, hip_dir)
    state = tmp_path / "ro"  # the same files seen through a read-only bind mount
    state.mkdir()
    subprocess.run(["mount", "--bind", str(made), str(state)], check=True, capture_output=True)
    tmpfs.mounted.append(state)  # type: ignore[attr-defined]
    remount(state, "bind", "ro")
    for command in (["submit", str(hip_dir)], ["collect"], ["status"], ["cost"]):
        result = cli("--state-dir", state, *command, code=1)
        assert_one_line(result.stderr, state, "read-only")
    empty = tmpfs(tmp_path / "ro-empty", "size=1m,ro")
    result = cli("--state-dir", empty, "submit", hip_dir, code=1)
    assert_one_line(result.stderr, empty, "is not writable")
    assert_nothing_sent(openai_env)


def test_full_disk_then_the_same_command_again(openai_env: LocalBatchServer, tmp_path: Path, tmpfs: Any) -> None:
    root = make_hip_dir(tmp_path / "many", 150)
    state = tmpfs(tmp_path / "small", "size=256k")
    result = cli("--state-dir", state, "submit", root, "--max-requests-per-batch", "50", code=None)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert_one_line(result.stderr, state, "")
    assert any(w in result.stderr for w in ("full", "No space left")), result.stderr
    assert_nothing_sent(openai_env)
    remount(state, "size=64m")
    cli("--state-dir", state, "submit", root, "--max-requests-per-batch", "50")
    summary = cli("--state-dir", state, "collect", "--wait", "--poll-interval", "0.02", "--json").stdout
    assert '"succeeded": 150' in summary
    assert len(openai_env.stats.sent) == 150 and set(openai_env.stats.sent.values()) == {1}


@dataclass(frozen=True)
class CappedContext(ops.Context):
    """A context whose store may grow only about `kb` more kilobytes (at least one page): SQLite itself then says
    "database or disk is full", the same error a full disk gives."""

    kb: int = 8

    def store(self) -> Store:
        store = super().store()
        db = store._db
        count, size = (int(db.execute(f"PRAGMA {p}").fetchone()[0]) for p in ("page_count", "page_size"))
        db.execute(f"PRAGMA max_page_count = {count + max(1, self.kb * 1024 // size)}")
        return store


def test_database_full_is_one_error_and_the_rerun_completes(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "many", 120)
    Store(Path("state")).close()
    opts = ops.SubmitOptions(ops.Files(root), max_requests_per_batch=40)
    with pytest.raises(StoreError, match="the disk is full") as failed:
        ops.submit(CappedContext(state_dir=Path("state"), kb=12), opts, Out(quiet=True))
    assert "state/hipbatch.db" in str(failed.value) and "run the same command again" in str(failed.value)
    # Shards are sent while the next ones render: what was recorded before the disk filled may have gone out.
    cli("submit", root, "--max-requests-per-batch", "40")  # the last committed state was intact: it goes on
    summary = cli("collect", "--wait", "--poll-interval", "0.02", "--json").stdout
    assert '"succeeded": 120' in summary
    assert len(openai_env.stats.sent) == 120 and set(openai_env.stats.sent.values()) == {1}
