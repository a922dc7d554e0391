"""A provider that misbehaves never makes hipbatch pay twice or drop a paid answer: short, empty, cut, duplicated,
conflicting and malformed downloads, a finished batch with no output file, results that are gone, a key rotated
mid-run, and two state dirs on one account. Everything through the real SDKs against the local batch server's
fault injection; waits go through an injected clock, so back-off costs no real time."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hipbatch import ops, poll
from hipbatch.emulator import LocalBatchServer
from hipbatch.store import Store
from hipbatch.views import Out
from tests.conftest import cli, make_hip_dir, read_dataset

STATE = Path("state")
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "gemini": "GEMINI_API_KEY"}
TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@dataclass
class FakeClock:
    """Time that moves only when something waits: the retry policies run whole, instantly."""

    t: float = 0.0
    slept: list[float] = field(default_factory=list)

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    @property
    def clock(self) -> poll.Clock:
        return poll.Clock(sleep=self.sleep, monotonic=lambda: self.t, now=time.time)


def ctx(clock: FakeClock, state: Path = STATE) -> ops.Context:
    return ops.Context(state_dir=state, clock=clock.clock)


def collect(clock: FakeClock, state: Path = STATE, **options: Any) -> dict[str, Any]:
    return ops.collect(ctx(clock, state), ops.CollectOptions(**options), Out(quiet=True))


def retry(clock: FakeClock, **options: Any) -> Any:
    return ops.retry(ctx(clock), ops.RetryOptions(**options), Out(quiet=True))


def batches(state: Path = STATE) -> list[Any]:
    store = Store(state)
    try:
        return store.batches()
    finally:
        store.close()


def ledger_tokens(clock: FakeClock, state: Path = STATE) -> dict[str, int]:
    led = ops.cost_ledger(ctx(clock, state), None, Out(quiet=True))
    assert led is not None
    return {k: led.total[k] for k in TOKENS}


def billed(server: LocalBatchServer) -> dict[str, int]:
    return {k: getattr(server.stats, k) for k in TOKENS}


def submit(provider: str, root: Path, per_batch: int = 3) -> None:
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", per_batch)


# ---- every download fault, forever and healing, both providers -----------------------------------------------

#: Faults that leave a finished batch unreadable until they heal (the batch stays uncollected meanwhile).
UNREADABLE = ("short", "empty", "cut", "conflict", "malformed", "no_output")


@pytest.mark.parametrize("times", [None, 2], ids=["forever", "heals-after-2"])
@pytest.mark.parametrize("kind", [*UNREADABLE, "duplicate"])
def test_broken_download_is_never_paid_twice(
    provider: str, server: LocalBatchServer, tmp_path: Path, kind: str, times: int | None
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    submit(provider, root)
    server.config.download_fault = kind
    server.config.download_fault_times = times
    clock = FakeClock()
    first = collect(clock)
    assert server.stats.faults[kind] >= 2  # the provider did misbehave, on both batches or twice on each
    readable = kind == "duplicate" or times is not None  # 2 bad downloads heal within one collect's tries
    if readable:
        assert first["succeeded"] == 6 and first["pending"] == 0
    else:
        assert (first["succeeded"], first["pending"], first["failed"]) == (0, 6, 0)  # nothing missing or failed
        rows = batches()
        assert [b.collected for b in rows] == [False, False]
        assert all(b.read_error and b.id in b.read_error and b.read_attempts == 1 for b in rows)
        assert clock.slept and max(clock.slept) <= poll.DOWNLOAD.cap  # retried with back-off, bounded
    again = retry(clock)  # a finished batch that could not be read is never resent
    assert again.requests == 0 and server.stats.batches_created == 2
    second = collect(clock)
    assert second["succeeded"] == first["succeeded"]
    if not readable:
        assert all(b.read_attempts == 2 for b in batches())
    server.config.download_fault = None  # the provider heals: the next collect reads everything
    last = collect(clock)
    assert last["succeeded"] == 6 and last["records"] == 6 and last["pending"] == 0
    assert server.stats.billed_twice() == []
    assert all(n == 1 for n in server.stats.sent.values()) and len(server.stats.sent) == 6
    assert ledger_tokens(clock) == billed(server)  # a conflicting line never changed a paid answer's tokens
    assert all(b.collected and b.read_error is None for b in batches())


def test_reasons_name_the_batch_and_the_line(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    submit(provider, make_hip_dir(tmp_path / "kernels", 6), per_batch=6)
    expected = {
        "malformed": "is not valid JSON",
        "short": "the download holds 4 of the 6 results",
        "empty": "the download holds 0 of the 6 results",
        "conflict": "has two different answers (results lines 1 and 7)",
        "cut": "RemoteProtocolError",
    }
    clock = FakeClock()
    for kind, words in expected.items():
        server.config.download_fault = kind
        collect(clock)
        (batch,) = batches()
        assert batch.id in batch.read_error and words in batch.read_error, (kind, batch.read_error)
        if kind == "malformed":
            assert "line 4" in batch.read_error  # the middle line of six
        shown = json.loads(cli("status", "--json").stdout)[0]
        assert shown["read_error"] == batch.read_error and shown["top_error"]["reason"] == "results not read"
        assert words in shown["top_error"]["message"]
    assert "results not read" in cli("status").stdout
    server.config.download_fault = None
    assert collect(clock)["succeeded"] == 6


def test_completed_without_output_file_is_not_readable_yet(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    openai_env.config.download_fault = "no_output"
    clock = FakeClock()
    summary = collect(clock)
    assert summary["pending"] == 6 and summary.get("failed") == 0  # never "missing": answers were counted
    (batch,) = batches()
    assert "names no output file yet" in batch.read_error and not batch.collected
    openai_env.config.download_fault = None
    assert collect(clock)["succeeded"] == 6
    assert openai_env.stats.billed_twice() == []


def test_gone_results_are_missing_and_resent_only_when_asked(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    submit(provider, make_hip_dir(tmp_path / "kernels", 6))
    server.config.download_fault = "gone"
    clock = FakeClock()
    summary = collect(clock)
    assert summary["failed_by_reason"] == {"missing": 6} and summary["pending"] == 0
    assert all(b.collected and "results gone" in (b.read_error or "") for b in batches())
    server.config.download_fault = None
    plain = json.loads(cli("retry", "--json").stdout)
    assert plain["requests"] == 0 and plain["missing_left"] == 6  # a bare retry never resends them
    refused = cli("retry", "--only", "missing", code=2)
    assert "may have been answered and billed" in refused.stderr and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert server.stats.billed_twice() == [] and server.stats.batches_created == 2
    resent = json.loads(cli("retry", "--only", "missing", "--yes", "--json").stdout)
    assert resent["requests"] == 6
    assert collect(clock)["succeeded"] == 6
    assert len(server.stats.billed_twice()) == 6  # asked for: the user's call, and the only way to pay twice


def test_duplicate_lines_that_agree_are_read_once(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    openai_env.config.download_fault = "duplicate"
    clock = FakeClock()
    summary = collect(clock)
    assert summary["succeeded"] == 6 and clock.slept == []  # a harmless repeat is not a reason to fetch again
    assert ledger_tokens(clock) == billed(openai_env)


def test_some_batches_broken_the_others_collected(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    submit(provider, make_hip_dir(tmp_path / "kernels", 12), per_batch=2)
    server.config.download_fault = "short"
    server.config.download_fault_fraction = 0.5
    clock = FakeClock()
    summary = collect(clock)
    broken = [b for b in batches() if not b.collected]
    assert 0 < len(broken) < 6 and summary["pending"] == 2 * len(broken)
    assert summary["succeeded"] == 12 - 2 * len(broken) and summary["failed"] == 0
    server.config.download_fault = None
    assert collect(clock)["succeeded"] == 12
    assert server.stats.billed_twice() == [] and ledger_tokens(clock) == billed(server)


# ---- --timeout bounds the whole collect -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["malformed", "cut"])
def test_timeout_bounds_collect_wait_with_a_download_broken_forever(
    provider: str, server: LocalBatchServer, tmp_path: Path, kind: str
) -> None:
    submit(provider, make_hip_dir(tmp_path / "kernels", 6))
    server.config.download_fault = kind
    started = time.monotonic()
    result = cli("collect", "--wait", "--poll-interval", "0.5", "--timeout", "2", "--json")
    took = time.monotonic() - started
    assert took < 6, f"collect --timeout 2 took {took:.1f}s"
    assert json.loads(result.stdout)["pending"] == 6
    assert "results not read" in result.stderr and "Traceback" not in result.stderr
    assert all(not b.collected for b in batches())


def test_wait_gives_up_on_unreadable_batches_and_says_so(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    openai_env.config.download_fault = "short"
    clock = FakeClock()
    summary = collect(clock, wait=True, poll_interval=60.0)
    assert summary["pending"] == 6
    assert batches()[0].read_attempts == poll.MAX_STUCK_POLLS
    assert openai_env.stats.downloads["openai.files.content"] == poll.MAX_STUCK_POLLS * poll.DOWNLOAD.attempts


# ---- a key rotated mid-run: one line naming the variable, nothing marked failed ---------------------------------


def one_error_line(stderr: str, key_env: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and key_env in errors[0] and "HTTP 401" in errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def request_states(state: Path = STATE) -> dict[str, int]:
    store = Store(state)
    try:
        return store.request_counts()
    finally:
        store.close()


@pytest.mark.parametrize(
    "command",
    [
        ["collect", "--wait", "--poll-interval", "0.01"],
        ["collect"],
        ["status"],
        ["cancel", "--yes"],
        ["retry", "--only", "failed"],
    ],
    ids=lambda c: " ".join(c),
)
def test_key_rotated_mid_run_stops_with_one_line(
    provider: str, server: LocalBatchServer, tmp_path: Path, command: list[str]
) -> None:
    server.config.polls_to_complete = 3
    server.config.request_error_rate = 0.5 if command[0] == "retry" else 0.0
    submit(provider, make_hip_dir(tmp_path / "kernels", 6))
    if command[0] == "retry":
        cli("collect", "--wait", "--poll-interval", "0.01")
    before = request_states()
    server.config.auth_after = 1  # one more call is served, then every call answers 401
    hits = sum(server.stats.hits.values())
    result = cli(*command, code=1)
    one_error_line(result.stderr, KEY_ENV[provider])
    assert sum(server.stats.hits.values()) - hits <= 3  # stopped at once: no polling on, no warning per batch
    after = request_states()
    if command[0] == "retry":  # the failed ones went into retry shards: sent, or queued for the next collect
        assert after["succeeded"] == before["succeeded"] and "failed" not in after and sum(after.values()) == 6
    else:
        assert after == before  # nothing marked failed (or anything else) because of it
    server.config.auth_after = None
    cli("collect", "--wait", "--poll-interval", "0.01")
    assert server.stats.billed_twice() == []


def test_key_refused_at_submit_creates_nothing_and_marks_nothing(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    server.config.auth_after = 1  # the model check passes, the create is refused
    result = cli("submit", root, "--provider", provider, code=1)
    one_error_line(result.stderr, KEY_ENV[provider])
    assert server.stats.batches_created == 0 and request_states() == {"pending": 6}
    server.config.auth_after = None
    submit(provider, root)
    assert json.loads(cli("collect", "--wait", "--poll-interval", "0.01", "--json").stdout)["succeeded"] == 6


def test_key_refused_in_live_mode_marks_nothing_failed(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.auth_after = 1  # the model check passes, every live call is refused
    result = cli("run", hip_dir, "--max-workers", "2", code=1)
    assert "OPENAI_API_KEY" in result.stderr and "Traceback" not in result.stderr
    assert "failed" not in request_states()


# ---- two state dirs on one account: adoption is proven, never guessed --------------------------------------------


def state_env(state: Path) -> list[str]:
    return ["--state-dir", str(state)]


def test_two_state_dirs_never_adopt_or_cancel_each_others_batches(
    server: LocalBatchServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import point_at

    point_at(server, "anthropic", monkeypatch)
    server.config.polls_to_complete = 3
    a, b = tmp_path / "state-a", tmp_path / "state-b"
    mine, theirs = make_hip_dir(tmp_path / "a", 3), make_hip_dir(tmp_path / "b", 3, start=100)
    cli(*state_env(b), "submit", theirs, "--provider", "anthropic")
    (other,) = [x.id for x in batches(b)]
    # A's create fails (500, nothing created): its look for "the batch that may exist" finds B's, same size.
    server.config.fault_routes = ("anthropic.batches.create",)
    server.config.fault_kinds = ("500",)
    server.config.fault_rate = 1.0
    cli(*state_env(a), "submit", mine, "--provider", "anthropic", code=None)
    server.config.fault_rate = 0.0
    (tentative,) = batches(a)
    assert tentative.id == other and not tentative.proven  # matched by time and size only
    shown = json.loads(cli(*state_env(a), "status", "--json").stdout)[0]
    assert shown["proven"] is False and shown["top_error"]["reason"] == "adopted by time and size"
    cancelled = cli(*state_env(a), "cancel", "--yes")
    assert f"Not cancelled: {other}" in cancelled.stderr
    assert server.stats.hits["anthropic.batches.cancel"] == 0
    clock = FakeClock()
    summary = collect(clock, a, wait=True, poll_interval=1.0)  # B's batch ends: its ids are not A's shard's
    assert summary["succeeded"] == 3 and summary["records"] == 3
    assert [x.id for x in batches(a)] != [other] and all(x.proven for x in batches(a))
    assert {r["file_name"] for r in read_dataset(Path("data/generated_prompts.json"))} == {
        "k0001.hip",
        "k0002.hip",
        "sub/k0000.hip",
    }
    theirs_summary = collect(clock, b, output_file=tmp_path / "b.json")
    assert theirs_summary["succeeded"] == 3 and [x.id for x in batches(b)] == [other]
    assert server.stats.batches_created == 2 and server.stats.billed_twice() == []
    both = {k: ledger_tokens(clock, a)[k] + ledger_tokens(clock, b)[k] for k in TOKENS}
    assert both == billed(server)
    store = Store(a)
    assert other in store.known_batch_ids()  # remembered as not ours: never adopted again
    store.close()


def test_a_lost_create_next_to_another_state_dirs_batch_is_ambiguous(
    server: LocalBatchServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import point_at

    point_at(server, "anthropic", monkeypatch)
    a, b = tmp_path / "state-a", tmp_path / "state-b"
    cli(*state_env(b), "submit", make_hip_dir(tmp_path / "b", 3, start=100), "--provider", "anthropic")
    server.config.fault_routes = ("anthropic.batches.create",)
    server.config.fault_kinds = ("drop_after",)  # A's batch is created, its answer lost
    server.config.fault_rate = 1.0
    result = cli(*state_env(a), "submit", make_hip_dir(tmp_path / "a", 3), "--provider", "anthropic", code=1)
    server.config.fault_rate = 0.0
    assert "cannot be told apart" in result.stderr and batches(a) == []  # neither batch taken
    cli(*state_env(a), "cancel", "--yes")
    assert server.stats.hits["anthropic.batches.cancel"] == 0
    clock = FakeClock()
    assert collect(clock, b, wait=True, poll_interval=1.0, output_file=tmp_path / "b.json")["succeeded"] == 3
    assert server.stats.billed_twice() == []


def test_live_mode_does_not_answer_missing_requests_again(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    openai_env.config.download_fault = "gone"
    assert collect(FakeClock())["failed_by_reason"] == {"missing": 6}
    openai_env.config.download_fault = None
    cli("run", hip_dir)
    assert sum(openai_env.stats.live_calls.values()) == 0 and openai_env.stats.billed_twice() == []
