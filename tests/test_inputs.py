"""Bad input gets one clear line and a non-zero exit; one bad file never stops the others."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.files import DEFAULT_MAX_FILE_BYTES
from hipbatch.render import SkipFile, discover, read_source
from hipbatch.store import Store
from tests.conftest import cli, env_without_keys, make_hip_dir, read_dataset


def test_missing_input_dir(tmp_path: Path) -> None:
    out = cli("submit", tmp_path / "nope", "--dry-run", code=2)
    assert "INPUT_DIR" in out.stderr and "nope" in out.stderr and "no such folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_input_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.hip"
    f.write_text("x")
    out = cli("submit", f, "--dry-run", code=2)
    assert "not a folder" in out.stderr


def test_no_files_match(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = cli("submit", tmp_path / "empty", "--dry-run", code=2)
    assert "no files match" in out.stderr and "**/*.hip" in out.stderr


def test_bad_files_are_skipped_with_reasons(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    (hip_dir / "latin1.hip").write_bytes("// größe\n__global__ void k() {}\n".encode("latin-1"))
    (hip_dir / "empty.hip").write_text("  \n")
    (hip_dir / "binary.hip").write_bytes(b"\x7fELF\x00\x00\x01")
    out = cli("submit", hip_dir)
    assert "skipped latin1.hip: not UTF-8" in out.stderr
    assert "skipped empty.hip: empty" in out.stderr
    assert "skipped binary.hip: binary" in out.stderr
    assert openai_env.stats.batches_created == 1 and sum(openai_env.stats.sent.values()) == 6
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    assert summary["records"] == 6 and summary["skipped_files"] == 3
    skipped = {r["file_name"]: r["skip_reason"] for r in Store(Path("state")).skipped_files()}
    assert set(skipped) == {"latin1.hip", "empty.hip", "binary.hip"}


def test_non_ascii_source_round_trips(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = tmp_path / "intl"
    root.mkdir()
    (root / "k.hip").write_text(
        "// カーネル: größe\n__global__ void grosse(float* x) { x[0] = 1; }\n", encoding="utf-8"
    )
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.05")
    [record] = read_dataset(Path("data/generated_prompts.json"))
    assert "grosse" in record["english_prompt"]


def test_missing_openai_key_names_the_variable(
    server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
    out = cli("submit", hip_dir, code=2)
    assert "OPENAI_API_KEY is not set" in out.stderr
    assert server.stats.files_uploaded == 0
    assert not (Path("state") / "shards").exists()  # nothing written before the key check


def test_missing_anthropic_key_names_the_variable(
    server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.anthropic_base_url)
    out = cli("submit", hip_dir, "--provider", "anthropic", code=2)
    assert "ANTHROPIC_API_KEY is not set" in out.stderr
    assert server.stats.batches_created == 0


def test_unknown_provider(hip_dir: Path) -> None:
    out = cli("submit", hip_dir, "--provider", "mistral", code=2)
    assert "--provider" in out.stderr and "mistral" in out.stderr


def test_model_the_provider_rejects(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    out = cli("submit", hip_dir, "--provider", provider, "--model", "unknown-model-9", code=2)
    assert "--model unknown-model-9" in out.stderr and "does not know" in out.stderr
    assert server.stats.batches_created == 0 and server.stats.files_uploaded == 0
    assert Store(Path("state")).request_counts() == {}  # nothing half-submitted


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("user.j2", "{{ code }\n", "user.j2:1: template syntax error"),
        ("user.j2", "line one\n{{ code }} {{ nope }}\n", "user.j2:2: 'nope' is undefined"),
    ],
)
def test_template_errors_name_file_and_line(hip_dir: Path, tmp_path: Path, name: str, text: str, expected: str) -> None:
    template = tmp_path / "tpl"
    template.mkdir()
    (template / "system.j2").write_text("You are helpful.")
    (template / "user.j2").write_text("{{ code }}")
    (template / name).write_text(text)
    out = cli("submit", hip_dir, "--dry-run", "--model", "m", "--template-dir", template, code=2)
    assert expected in out.stderr


def test_status_failure_leaves_batch_as_it_was(
    openai_env: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("submit", hip_dir)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    out = cli("status", "--json")
    assert "status check failed" in out.stderr
    [batch] = json.loads(out.stdout)
    assert batch["status"] == "validating" and not batch["is_final"]


def test_help_starts_without_sdks() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from hipbatch.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "print(sorted(m for m in ('openai', 'anthropic', 'google.genai', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env_without_keys()
    )
    assert out.stdout.strip() == "[]"


def test_every_command_has_help_with_an_example() -> None:
    from hipbatch.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands if c.callback]
    assert {"submit", "status", "collect", "demo", "emulator"} <= set(names)
    for name in names:
        out = cli(name.replace("_", "-"), "--help")
        assert "Example:" in out.stdout, name


# ---- only regular files inside INPUT_DIR are read ------------------------------------------------------


@pytest.fixture
def deadline() -> Iterator[None]:
    """A read that blocks (a FIFO opened without O_NONBLOCK) fails the test instead of hanging the suite."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("reading the input folder blocked")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_special_files_are_skipped_with_reasons_and_the_rest_go_on(
    hip_dir: Path, tmp_path: Path, deadline: None
) -> None:
    secret = tmp_path / "outside" / "passwd.hip"
    secret.parent.mkdir()
    secret.write_text("root:SECRET-OUTSIDE:0:0\n")
    (hip_dir / "leak.hip").symlink_to(secret)
    (hip_dir / "zero.hip").symlink_to("/dev/zero")
    (hip_dir / "dangling.hip").symlink_to(hip_dir / "nowhere.hip")
    (hip_dir / "inside.hip").symlink_to(hip_dir / "k0001.hip")  # a link that stays inside is fine
    os.mkfifo(hip_dir / "pipe.hip")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(hip_dir / "sock.hip"))
    (hip_dir / "huge.hip").write_bytes(b"// x\n" * (DEFAULT_MAX_FILE_BYTES // 5 + 1))
    try:
        out = cli("submit", hip_dir, "--dry-run", "--json")
        shown = cli("submit", hip_dir, "--dry-run").stderr
    finally:
        listener.close()
    skipped = dict(json.loads(out.stdout)["prepare"]["skipped"])
    assert skipped["leak.hip"].startswith(f"symlink to {secret}, outside INPUT_DIR")
    assert skipped["zero.hip"].startswith("symlink to /dev/zero, outside INPUT_DIR")
    assert skipped["dangling.hip"].startswith("broken symlink")
    assert skipped["pipe.hip"] == "not a regular file (a FIFO (named pipe))"
    assert skipped["sock.hip"] == "not a regular file (a socket)"
    assert skipped["huge.hip"].startswith(f"too large ({DEFAULT_MAX_FILE_BYTES + 5 - DEFAULT_MAX_FILE_BYTES % 5:,}")
    assert "inside.hip" not in skipped and len(skipped) == 6
    assert json.loads(out.stdout)["prepare"]["requests"] == 7  # the 6 kernels and inside.hip (another name)
    for shard in (Path("state") / "dry-run").rglob("*.jsonl"):
        assert b"SECRET-OUTSIDE" not in shard.read_bytes()
    assert "skipped pipe.hip: not a regular file (a FIFO (named pipe))" in shown


def test_read_source_options(tmp_path: Path, deadline: None) -> None:
    root = tmp_path / "in"
    root.mkdir()
    outside = tmp_path / "out.hip"
    outside.write_text("__global__ void k() {}\n")
    (root / "link.hip").symlink_to(outside)
    (root / "zero.hip").symlink_to("/dev/zero")
    with pytest.raises(SkipFile, match="outside INPUT_DIR"):
        read_source(root / "link.hip", root=root)
    assert read_source(root / "link.hip", root=root, follow_symlinks=True) == outside.read_text()
    assert read_source(root / "link.hip") == outside.read_text()  # no root given: nothing to stay inside
    with pytest.raises(SkipFile, match=r"not a regular file \(a character device\)"):
        read_source(root / "zero.hip", root=root, follow_symlinks=True)  # followed, still never read
    with pytest.raises(SkipFile, match=r"too large \(23 bytes > 10"):
        read_source(outside, max_bytes=10)
    assert read_source(outside, max_bytes=23) == outside.read_text()


def test_a_file_longer_than_its_size_says_is_read_only_up_to_the_cap() -> None:
    # /proc files report size 0 but hold more: the cap holds against what is read, not only the stat.
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("no /proc on this system")
    assert os.stat(status).st_size == 0
    with pytest.raises(SkipFile, match="grew past 16 bytes"):
        read_source(status, max_bytes=16)


def test_linked_folders_are_entered_only_when_asked_and_never_loop(tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "tree", 3)
    (root / "sub" / "back").symlink_to(root)  # a loop: tree/sub/back -> tree
    other = make_hip_dir(tmp_path / "other", 1, start=7)
    (root / "more").symlink_to(other)
    assert discover(root) == ["k0001.hip", "k0002.hip", "sub/k0000.hip"]
    # `more` is entered; `sub/back` leads to a folder already on the way down, so it is not.
    assert discover(root, follow_symlinks=True) == ["k0001.hip", "k0002.hip", "more/k0007.hip", "sub/k0000.hip"]
