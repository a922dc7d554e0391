"""Interrupt anywhere: a crash at any point of submit, collect or retry, then the same command again, ends
with no batch created twice, no request sent twice, no result lost and a complete dataset. Checked against
the local batch server's own counters."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hipbatch.config import load_config
from hipbatch.emulator import EmulatorConfig, LocalBatchServer
from hipbatch.emulator.trap import TrapServer
from hipbatch.prepare import Source, prepare
from hipbatch.providers import Provider, ProviderSettings, get_provider
from hipbatch.providers.registry import Adapters, provider_for_job
from hipbatch.render import load_template
from hipbatch.store import Store
from hipbatch.submit import feed
from tests.conftest import GEMINI_PORTED, cli, ledger_db, make_hip_dir, point_at, read_dataset

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--json")
STATE = Path("state")


class Killed(BaseException):
    """Stands in for SIGKILL at one exact point: nothing after it runs, no handler catches it."""


class CrashAt:
    """Wraps a real adapter (real SDK, real server) and dies at `point` on its n-th pass there."""

    def __init__(self, inner: Provider, point: str, nth: int = 1) -> None:
        self.inner, self.point, self.nth, self.seen = inner, point, nth, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _at(self, point: str) -> None:
        if point == self.point:
            self.seen += 1
            if self.seen == self.nth:
                raise Killed(point)

    def upload(self, path: Path) -> str | None:
        file_id = self.inner.upload(path)
        self._at("after_upload")
        return file_id

    def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> Any:
        self._at("before_create")
        info = self.inner.create(path, file_id, tag)
        self._at("after_create")
        return info

    def download(self, info: Any, dest: Path) -> int:
        lines = self.inner.download(info, dest)
        self._at("after_download")
        return lines

    def parse(self, line: dict[str, Any]) -> Any:
        self._at("parse")
        return self.inner.parse(line)


def crashing(point: str, nth: int = 1) -> Adapters:
    def factory(settings: ProviderSettings) -> Provider:
        return CrashAt(get_provider(settings), point, nth)  # type: ignore[return-value]

    return Adapters(load_config(None), factory)


def prepare_only(root: Path, provider: str, per_batch: int) -> None:
    """The render/pack/record half of `submit`, so the feed half can be run with a crashing adapter."""
    template = load_template(Path("templates/default"))
    adapter, model, params = provider_for_job(load_config(None), template, provider, None)
    store = Store(STATE)
    prepare(store, template, adapter, model, params, Source(root, "kernels"), max_requests_per_batch=per_batch)
    store.close()


def ledger() -> dict[str, dict[str, Any]]:
    store = Store(STATE)
    try:
        return {r["custom_id"]: r for r in ledger_db(store).table("requests").rows}
    finally:
        store.close()


def assert_nothing_lost_nothing_twice(server: LocalBatchServer, n_files: int) -> None:
    """Every request answered once and recorded; no custom_id sent more often than the ledger says."""
    rows = ledger()
    assert len(rows) == n_files
    for cid, row in rows.items():
        assert server.stats.sent[cid] == row["attempts"], (cid, server.stats.sent[cid], row["attempts"])
        assert server.stats.answered[cid] == (1 if row["state"] == "succeeded" else 0), cid
    assert set(server.stats.answered) <= set(rows)
    store = Store(STATE)
    assert server.stats.batches_created == len(store.batches())  # no batch the store does not know
    store.close()
    records = read_dataset(Path("data/generated_prompts.json"))
    assert len(records) == len({r["file_name"] for r in records}) == n_files
    assert {r["custom_id"] for r in records} == set(rows)


# ---- a crash at one exact point, in process -------------------------------------------------------


@pytest.mark.parametrize("point", ["after_upload", "before_create", "after_create"])
def test_submit_crash_then_submit_again(provider: str, server: LocalBatchServer, tmp_path: Path, point: str) -> None:
    root = make_hip_dir(tmp_path / "kernels", 9)
    prepare_only(root, provider, 3)
    store = Store(STATE)
    with pytest.raises(Killed):
        feed(store, crashing(point, nth=2))  # dies on the second shard; the first is already sent
    store.close()
    created = server.stats.batches_created
    assert created == (2 if point == "after_create" else 1)
    out = cli("submit", root, "--provider", provider)
    if point == "after_create":
        assert "Adopted 1 batch(es) created by an interrupted run" in out.stderr
    assert server.stats.batches_created == 3  # one per shard, never two
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 9
    assert_nothing_lost_nothing_twice(server, 9)


@pytest.mark.parametrize("command", ["status", "collect"])
def test_status_and_collect_finish_an_interrupted_submit(
    openai_env: LocalBatchServer, tmp_path: Path, command: str
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    prepare_only(root, "openai", 6)
    store = Store(STATE)
    with pytest.raises(Killed):
        feed(store, crashing("after_create"))
    store.close()
    cli(command)  # adopts the batch by its metadata instead of creating another
    assert openai_env.stats.batches_created == 1
    store = Store(STATE)
    assert [b.adopted for b in store.batches()] == [True]
    store.close()
    cli(*WAIT)
    assert_nothing_lost_nothing_twice(openai_env, 6)


@pytest.mark.parametrize(("point", "nth"), [("after_download", 1), ("after_download", 2), ("parse", 5)])
def test_collect_crash_then_collect_again(
    provider: str, server: LocalBatchServer, tmp_path: Path, point: str, nth: int
) -> None:
    from hipbatch.collect import collect_batches
    from hipbatch.status import refresh

    root = make_hip_dir(tmp_path / "kernels", 9)
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", "3")
    store = Store(STATE)
    adapters = crashing(point, nth)
    refresh(store, adapters)
    with pytest.raises(Killed):
        collect_batches(store, adapters)
    store.close()
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 9 and summary["failed"] == 0
    assert_nothing_lost_nothing_twice(server, 9)


def test_retry_crash_after_create_then_retry_again(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    from hipbatch.retry import retry

    root = make_hip_dir(tmp_path / "kernels", 12)
    openai_env.config.request_error_rate = 0.5
    cli("submit", root)
    cli(*WAIT)
    failed = {cid for cid, r in ledger().items() if r["state"] == "failed"}
    assert failed
    openai_env.config.request_error_rate = 0.0
    store = Store(STATE)
    with pytest.raises(Killed):
        retry(store, crashing("after_create"))
    store.close()
    out = cli("retry")
    assert "Requests to send again: 0" in out.stderr  # they are already in a (recorded) retry shard
    assert openai_env.stats.batches_created == 2
    assert {cid for cid, n in openai_env.stats.sent.items() if n == 2} == failed
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 12
    assert_nothing_lost_nothing_twice(openai_env, 12)


# ---- adoption of orphans: Anthropic by time and size, OpenAI by metadata --------------------------


def anthropic_requests(shard: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in shard.read_text().splitlines()]


def test_anthropic_single_orphan_is_adopted(
    server: LocalBatchServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anthropic

    point_at(server, "anthropic", monkeypatch)
    root = make_hip_dir(tmp_path / "kernels", 5)
    prepare_only(root, "anthropic", 5)
    store = Store(STATE)
    with pytest.raises(Killed):
        feed(store, crashing("before_create"))  # the intent is recorded, the call never left
    shard = store.shards_in_states(["creating"])[0]
    store.close()
    # ... but say it did: the batch exists at the provider and its id was never saved.
    sdk = anthropic.Anthropic(api_key="test-key", base_url=server.anthropic_base_url)
    orphan = sdk.messages.batches.create(requests=anthropic_requests(Path(shard.path))).id  # type: ignore[arg-type]
    out = cli("submit", root, "--provider", "anthropic")
    assert f"Adopted 1 batch(es) created by an interrupted run: {orphan}" in out.stderr
    assert server.stats.batches_created == 1
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 5
    assert_nothing_lost_nothing_twice(server, 5)


def test_anthropic_ambiguous_orphans_refused_without_force(
    server: LocalBatchServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anthropic

    point_at(server, "anthropic", monkeypatch)
    root = make_hip_dir(tmp_path / "kernels", 4)
    prepare_only(root, "anthropic", 4)
    store = Store(STATE)
    with pytest.raises(Killed):
        feed(store, crashing("before_create"))
    shard = store.shards_in_states(["creating"])[0]
    store.close()
    sdk = anthropic.Anthropic(api_key="test-key", base_url=server.anthropic_base_url)
    lines = anthropic_requests(Path(shard.path))
    twins = {sdk.messages.batches.create(requests=lines).id for _ in range(2)}  # type: ignore[arg-type]

    out = cli("submit", root, "--provider", "anthropic", code=1)
    assert "cannot be told apart" in out.stderr and "--force" in out.stderr
    assert all(t in out.stderr for t in twins)
    assert server.stats.batches_created == 2  # refused: nothing created
    warned = cli("collect")  # collect warns and goes on; it does not create either
    assert "cannot be told apart" in warned.stderr and server.stats.batches_created == 2
    store = Store(STATE)
    assert store.shard(shard.id).state == "ambiguous"
    store.close()

    cli("submit", root, "--provider", "anthropic", "--force")
    assert server.stats.batches_created == 3
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 4
    assert all(server.stats.sent[cid] == 3 for cid in ledger())  # the two twins and ours: the user's call


def test_openai_orphan_adopted_by_metadata_even_among_others(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    import openai

    root = make_hip_dir(tmp_path / "kernels", 8)
    prepare_only(root, "openai", 4)
    store = Store(STATE)
    with pytest.raises(Killed):
        feed(store, crashing("before_create"))
    shard = store.shards_in_states(["creating"])[0]
    store.close()
    sdk = openai.OpenAI(api_key="test-key", base_url=openai_env.openai_base_url)
    file_id = sdk.files.create(file=Path(shard.path), purpose="batch").id
    chat = "/v1/chat/completions"
    other = sdk.batches.create(
        input_file_id=file_id, endpoint=chat, completion_window="24h", metadata={"hipbatch_shard": "someone-else"}
    )
    ours = sdk.batches.create(
        input_file_id=file_id,
        endpoint=chat,
        completion_window="24h",
        metadata={"hipbatch_shard": shard.key, "hipbatch_job": "kernels"},
    )
    cli("status")
    store = Store(STATE)
    assert {b.id for b in store.batches()} == {ours.id}  # the other tool's batch is left alone
    store.close()
    cli("submit", root)  # the second shard
    assert openai_env.stats.batches_created == 3
    cli(*WAIT)
    assert other.id not in {b["batch_id"] for b in json.loads(cli("status", "--json").stdout)}
    for cid, row in ledger().items():
        assert row["state"] == "succeeded" and row["attempts"] == 1 and openai_env.stats.answered[cid] == 1
        assert openai_env.stats.sent[cid] == (2 if row["shard_id"] == shard.id else 1)  # + other tool


# ---- SIGKILL at random moments, in real processes -------------------------------------------------


class Trials:
    """Runs hipbatch commands in subprocesses, killing them with SIGKILL at random moments."""

    def __init__(self, server: TrapServer, rng: random.Random, log: Path) -> None:
        self.server, self.rng, self.log = server, rng, log
        self.kills = 0
        self.by_command: dict[str, int] = {}

    def run(self, args: list[str], max_calls: int) -> bool:
        """One run with a trap set; True if it was killed, False if it finished (exit 0) first."""
        with self.log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hipbatch", *args], stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ)
            )
        mode = self.rng.random()
        if mode < 0.45:  # as the server takes its n-th call: the client dies with the call sent, unanswered
            self.server.arm(proc.pid, at_call=self.rng.randint(1, max_calls))
        elif mode < 0.9:  # a while into the work: between calls, inside SQLite writes, writing the dataset
            self.server.arm(proc.pid, after_first=self.rng.uniform(0.0, 0.4))
        else:  # any moment at all, start-up included
            self.server.arm(proc.pid)
            threading.Timer(self.rng.uniform(0.3, 2.0), self.server.kill, args=(proc.pid,)).start()
        try:
            code = proc.wait(timeout=120)
        finally:
            self.server.disarm()
        if code == -signal.SIGKILL:
            self.kills += 1
            self.by_command[args[0]] = self.by_command.get(args[0], 0) + 1
            dataset = Path("data/generated_prompts.json")
            if dataset.exists():  # the old or the new version, complete either way
                assert isinstance(json.loads(dataset.read_text(encoding="utf-8")), list)
            return True
        assert code == 0, self.log.read_text()[-3000:]
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("openai", 25),
        # fewer for the newer provider: the same code paths, and each killed process pays the SDK import again
        pytest.param("gemini", 15, marks=pytest.mark.skipif(not GEMINI_PORTED, reason="collect/retry edits")),
    ],
)
def test_sigkill_at_random_moments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: int) -> None:
    config = EmulatorConfig(seed=3, polls_to_complete=3, forms="tag", request_error_rate=0.2)
    with TrapServer(port=0, config=config) as server:
        point_at(server, name, monkeypatch)
        trials = Trials(server, random.Random(20261127), tmp_path / "children.log")
        root = tmp_path / "kernels"
        collect = ["collect", "--wait", "--poll-interval", "0.05"]
        # (command, API calls it makes in a round (the range of the n-th-call trap), runs it may be killed in)
        commands: list[tuple[list[str], int, int]] = [
            (["submit", str(root), "--provider", name, "--max-requests-per-batch", "3"], 9, 2),
            (collect, 14, 2),
            (["retry"], 3, 1),
            (collect, 0, 0),
        ]
        files, started = 0, time.monotonic()
        while trials.kills < target:
            assert time.monotonic() - started < 150, f"only {trials.kills} kills so far"
            make_hip_dir(root, 12, start=files)
            files += 12
            for args, max_calls, kills in commands:
                # Killed up to `kills` times in a row (the rerun may be killed too), then finished in process.
                for _ in range(kills):
                    if not trials.run(args, max_calls):
                        break
                else:
                    cli(*args)
        for _ in range(8):  # send what still failed until everything has an answer
            if not json.loads(cli("retry", "--json").stdout)["requests"]:
                break
            cli(*WAIT)
        summary = json.loads(cli(*WAIT).stdout)
    assert trials.kills >= target and set(trials.by_command) == {"submit", "collect", "retry"}
    assert summary["succeeded"] == files and summary["pending"] == 0
    assert_nothing_lost_nothing_twice(server, files)
    assert sum(server.stats.answered.values()) == files  # every request answered (billed) exactly once
    store = Store(STATE)
    assert not store.shards_in_states(["queued", "uploading", "uploaded", "creating", "ambiguous"])
    assert all(b.collected for b in store.batches())
    store.close()
    assert not list(Path("data").glob(".*.part"))  # partial files of killed runs are cleaned up


@pytest.mark.slow
def test_two_collects_at_once_write_one_dataset(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 30)
    openai_env.config.polls_to_complete = 3
    cli("submit", root, "--max-requests-per-batch", "5")
    args = [sys.executable, "-m", "hipbatch", "collect", "--wait", "--poll-interval", "0.05", "--json"]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ)) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    assert [s["succeeded"] for s in summaries] == [30, 30]
    records = read_dataset(Path("data/generated_prompts.json"))
    assert len(records) == len({r["file_name"] for r in records}) == 30
    assert not list(Path("data").glob(".*.part"))
    assert_nothing_lost_nothing_twice(openai_env, 30)
