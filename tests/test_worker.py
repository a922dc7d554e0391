"""The second process that reads large results files (worker.py): the same items in the same order as reading
here, its errors raised here as themselves, a dead or abandoned child never hangs the caller or outlives it; and
collect through it (every file read in a child, applied to the ledger as it goes) keeps every guarantee: a
download found broken at its end leaves nothing applied, a whole one gives the same ledger and dataset."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hipbatch import collect as collect_mod
from hipbatch import worker
from hipbatch.emulator import LocalBatchServer
from hipbatch.errors import HipbatchError, UnreadableResults
from hipbatch.store import Store
from tests.conftest import cli, make_hip_dir, read_dataset
from tests.test_misbehaving_provider import FakeClock, batches, billed, collect, ledger_tokens
from tests.test_stats import assert_counts_agree

pytestmark = pytest.mark.skipif(not worker.usable(), reason="needs Linux and two CPUs")


def numbers(n: int, fail_at: int | None = None) -> Iterator[list[int]]:
    for i in range(n):
        if i == fail_at:
            raise UnreadableResults(f"batch b: results line {i} is not valid JSON")
        yield [i, os.getpid()]


def test_items_are_the_same_in_order_and_made_in_another_process() -> None:
    here = list(worker.items(lambda: numbers(500), child=False))
    there = list(worker.items(lambda: numbers(500)))
    assert [i for i, _ in there] == [i for i, _ in here] == list(range(500))
    assert os.getpid() not in {pid for _, pid in there}  # all made by the child
    assert {pid for _, pid in here} == {os.getpid()}


def test_an_error_in_the_child_is_raised_here_as_itself_after_its_items() -> None:
    seen: list[int] = []
    with pytest.raises(UnreadableResults, match="results line 7 is not valid JSON"):
        for i, _ in worker.items(lambda: numbers(20, fail_at=7)):
            seen.append(i)
    assert seen == list(range(7))


def test_an_unpicklable_error_still_arrives_as_one_line() -> None:
    class Odd(Exception):
        def __reduce__(self) -> str:
            raise TypeError("no")

    def produce() -> Iterator[int]:
        yield 1
        raise Odd("the reason")

    with pytest.raises(HipbatchError, match="Odd: the reason"):
        list(worker.items(produce))


def test_a_child_that_dies_is_an_error_not_a_hang() -> None:
    def produce() -> Iterator[int]:
        yield 1
        os._exit(3)

    start = time.monotonic()
    with pytest.raises(HipbatchError, match="stopped unexpectedly.*exit code 3"):
        list(worker.items(produce))
    assert time.monotonic() - start < 10


def test_a_caller_that_stops_early_ends_the_child() -> None:
    def produce() -> Iterator[int]:
        yield os.getpid()
        while True:  # would run forever
            yield 0

    items = worker.items(produce)
    child = next(items)
    assert child != os.getpid()
    items.close()  # the generator's finally: the child is killed and reaped
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def stats(state: Path) -> list[tuple[Any, ...]]:
    store = Store(state)
    try:
        return store.stats_rows()
    finally:
        store.close()


# ---- collect through the child ----------------------------------------------------------------------------


@pytest.fixture
def in_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every results file read in a child, two lines a chunk, applied to the ledger every two lines."""
    monkeypatch.setattr(collect_mod, "WORKER_MIN_BYTES", 0)
    monkeypatch.setattr(collect_mod, "CHUNK_ROWS", 2)
    monkeypatch.setattr(collect_mod, "APPLY_ROWS", 2)


@pytest.mark.parametrize("kind", ["short", "conflict", "malformed"])
def test_a_download_broken_at_its_end_leaves_nothing_applied(
    in_child: None, provider: str, server: LocalBatchServer, tmp_path: Path, kind: str
) -> None:
    cli("submit", make_hip_dir(tmp_path / "kernels", 6), "--provider", provider, "--max-requests-per-batch", 6)
    server.config.download_fault = kind  # short and conflict are only seen once every line was read and applied
    clock = FakeClock()
    first = collect(clock)
    assert (first["succeeded"], first["pending"], first["failed"]) == (0, 6, 0)
    (batch,) = batches()
    assert not batch.collected and batch.read_error and batch.id in batch.read_error
    store = Store(Path("state"))
    try:
        assert store.request_counts() == {"submitted": 6}
    finally:
        store.close()
    assert_counts_agree()
    server.config.download_fault = None
    last = collect(clock)
    assert last["succeeded"] == 6 and last["records"] == 6
    assert ledger_tokens(clock) == billed(server) and server.stats.billed_twice() == []
    assert_counts_agree()


def test_the_ledger_and_dataset_are_those_of_reading_here(
    openai_env: LocalBatchServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 9)
    openai_env.config.forms = "mixed"  # tags, fences, labels, chatter: every extractor path
    openai_env.config.download_fault = "duplicate"  # a custom_id on two lines, in two parts
    cli("submit", root, "--max-requests-per-batch", 9)
    snapshot = tmp_path / "snapshot"
    shutil.copytree("state", snapshot)  # the same finished batch, collected twice below
    here = collect(FakeClock(), output_file=tmp_path / "here.json")
    ledger_here = stats(Path("state"))
    monkeypatch.setattr(collect_mod, "WORKER_MIN_BYTES", 0)
    monkeypatch.setattr(collect_mod, "CHUNK_ROWS", 2)
    monkeypatch.setattr(collect_mod, "APPLY_ROWS", 2)
    there = collect(FakeClock(), state=snapshot, output_file=tmp_path / "there.json")
    assert {k: v for k, v in here.items() if k != "output_file"} == {
        k: v for k, v in there.items() if k != "output_file"
    }
    assert read_dataset(tmp_path / "here.json") == read_dataset(tmp_path / "there.json")
    assert stats(snapshot) == ledger_here
    assert_counts_agree(snapshot)


def alive_with(marker: str) -> list[int]:
    """Processes (not zombies) whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sigkill_while_the_child_reads_loses_nothing_and_leaves_no_process(
    openai_env: LocalBatchServer, tmp_path: Path
) -> None:
    cli("submit", make_hip_dir(tmp_path / "kernels", 150), "--max-requests-per-batch", 150)
    marker = f"hipbatch-kill-trial-{os.getpid()}"
    flag = tmp_path / "reading"
    code = (  # the reading made slow (10 ms a chunk of two lines), and said when it starts, in the child
        f"# {marker}\n"
        "import time, pathlib\n"
        "import hipbatch.collect as c\n"
        "c.WORKER_MIN_BYTES, c.CHUNK_ROWS, c.APPLY_ROWS = 0, 2, 4\n"
        "read = c.read_chunks\n"
        "def slow(*args):\n"
        f"    pathlib.Path({str(flag)!r}).touch()\n"
        "    for chunk in read(*args):\n"
        "        time.sleep(0.01)\n"
        "        yield chunk\n"
        "c.read_chunks = slow\n"
        "from hipbatch.cli import main\n"
        "main()\n"
    )
    rng = random.Random(20261202)
    in_child = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "collect"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        flag.unlink(missing_ok=True)
        deadline = time.monotonic() + 30
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # until the child reads
        time.sleep(rng.uniform(0.0, 0.5))  # then a while into its reading (75 chunks, 0.75 s)
        in_child += len(alive_with(marker)) >= 2
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while alive_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive_with(marker) == []  # the child ends with its parent
    assert in_child >= 4  # most kills landed while the child was reading
    summary = collect(FakeClock())
    assert summary["succeeded"] == 150 and summary["records"] == 150 and summary["pending"] == 0
    assert all(n == 1 for n in openai_env.stats.sent.values()) and len(openai_env.stats.sent) == 150
    assert ledger_tokens(FakeClock()) == billed(openai_env)
    assert_counts_agree()
