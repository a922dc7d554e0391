"""poll.py: the retry policies and the wait loops, run with an injected sleep and clock (no real waiting)."""

from __future__ import annotations

from typing import Any

import pytest

from hipbatch import poll
from hipbatch.errors import ProviderError, TransientError


class FakeClock:
    """A clock whose sleep only moves time forward, recording each wait."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    def clock(self) -> poll.Clock:
        return poll.Clock(sleep=self.sleep, monotonic=lambda: self.t, now=lambda: self.t)


def failing(n: int, error: Exception, result: Any = "ok") -> Any:
    calls = {"n": 0}

    def fn() -> Any:
        calls["n"] += 1
        if calls["n"] <= n:
            raise error
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    rule = poll.Policy(attempts=10, first=0.5, cap=4.0)
    mid = [poll.backoff(rule, n, rng=lambda: 0.5) for n in range(1, 7)]
    assert mid == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # jitter at its middle is x1
    assert poll.backoff(rule, 1, rng=lambda: 0.0) == 0.375 and poll.backoff(rule, 1, rng=lambda: 1.0) == 0.625


def test_retry_after_wins_and_is_capped() -> None:
    assert poll.backoff(poll.CALL, 1, retry_after=7.0) == 7.0
    assert poll.backoff(poll.CALL, 1, retry_after=3600.0) == poll.MAX_RETRY_AFTER


def test_retrying_sleeps_between_tries_and_honours_retry_after() -> None:
    clock = FakeClock()
    error = TransientError("429")
    error.retry_after = 2.5
    fn = failing(3, error)
    assert poll.retrying(fn, rule=poll.Policy(attempts=5), sleep=clock.sleep) == "ok"
    assert clock.slept == [2.5, 2.5, 2.5] and fn.calls["n"] == 4


def test_retrying_stops_at_the_policy_and_reraises() -> None:
    clock = FakeClock()
    fn = failing(99, TransientError("500"))
    with pytest.raises(TransientError):
        poll.retrying(fn, rule=poll.Policy(attempts=4, first=1.0, cap=100.0), sleep=clock.sleep)
    assert fn.calls["n"] == 4 and len(clock.slept) == 3
    assert all(0.75 * b <= s <= 1.25 * b for s, b in zip(clock.slept, (1.0, 2.0, 4.0), strict=True))


def test_final_errors_are_not_retried() -> None:
    clock = FakeClock()
    fn = failing(1, ProviderError("401"))
    with pytest.raises(ProviderError):
        poll.retrying(fn, sleep=clock.sleep)
    assert fn.calls["n"] == 1 and clock.slept == []


def test_give_up_and_no_wait() -> None:
    clock = FakeClock()
    stop = {"now": False}
    fn = failing(99, TransientError("503"))

    def give_up() -> bool:
        stop["now"] = fn.calls["n"] >= 2
        return stop["now"]

    retrying = poll.policy(poll.Policy(attempts=50), clock.sleep, give_up=give_up, no_wait=lambda e: True)
    with pytest.raises(TransientError):
        for attempt in retrying:
            with attempt:
                fn()
    assert fn.calls["n"] == 2 and clock.slept == [0.0]


def test_a_deadline_cuts_the_back_off_and_stops_the_tries() -> None:
    fake = FakeClock()
    deadline = fake.t + 1.0
    fn = failing(100, TransientError("malformed line"))
    policy = poll.policy(poll.DOWNLOAD, fake.sleep, left=poll.time_left(deadline, fake.clock()))
    with pytest.raises(TransientError):
        for attempt in policy:
            with attempt:
                fn()
    assert fake.t <= deadline + 1e-9  # no wait runs past the deadline
    assert fn.calls["n"] < poll.DOWNLOAD.attempts  # and the tries stop when it passes
    assert poll.time_left(None) is None


def test_gate_pause_grows_with_the_streak_and_respects_retry_after() -> None:
    assert poll.gate_pause(1, None, rng=lambda: 0.5) == 0.25
    assert poll.gate_pause(3, None, rng=lambda: 0.5) == 1.0
    assert poll.gate_pause(1, 5.0, rng=lambda: 0.5) == 5.0
    assert poll.gate_pause(20, None, rng=lambda: 0.5) == poll.MAX_RETRY_AFTER


def test_wait_until_gives_up_after_the_timeout() -> None:
    clock = FakeClock()
    assert not poll.wait_until(lambda: False, timeout=1.0, clock=clock.clock(), every=0.25)
    assert sum(clock.slept) == pytest.approx(1.0)
    ready = iter([False, False, True])
    assert poll.wait_until(lambda: next(ready), timeout=10.0, clock=clock.clock(), every=0.25)


def rounds(*items: poll.Round) -> Any:
    it = iter(items)
    return lambda: next(it)


def test_wait_for_batches_polls_until_done() -> None:
    clock = FakeClock()
    seen: list[float] = []
    reason, last = poll.wait_for_batches(
        rounds(poll.Round(2, 0), poll.Round(1, 1), poll.Round(0, 0)),
        wait=True,
        interval=5.0,
        clock=clock.clock(),
        on_wait=lambda r, pause: seen.append(pause),
    )
    assert reason == "done" and last == poll.Round(0, 0)
    assert clock.slept == [5.0, 5.0] and seen == [5.0, 5.0]


def test_wait_for_batches_once_without_wait() -> None:
    clock = FakeClock()
    assert poll.wait_for_batches(rounds(poll.Round(3, 0)), wait=False, interval=5, clock=clock.clock())[0] == "once"
    assert clock.slept == []


def test_the_timeout_bounds_the_whole_wait() -> None:
    clock = FakeClock()
    busy = poll.Round(1, 0)
    reason, _ = poll.wait_for_batches(lambda: busy, wait=True, interval=60.0, timeout=100.0, clock=clock.clock())
    assert reason == "deadline"
    assert sum(clock.slept) == pytest.approx(100.0) and clock.slept[-1] == pytest.approx(40.0)


def test_a_stalled_queue_ends_the_wait() -> None:
    clock = FakeClock()
    stuck = poll.Round(0, 2, stalled=True)
    reason, _ = poll.wait_for_batches(lambda: stuck, wait=True, interval=1.0, clock=clock.clock())
    assert reason == "stalled" and len(clock.slept) == poll.MAX_IDLE_POLLS - 1


def test_unreadable_finished_batches_are_tried_a_few_polls_then_given_up() -> None:
    clock = FakeClock()
    unreadable = poll.Round(0, 0, stuck=True)
    reason, _ = poll.wait_for_batches(lambda: unreadable, wait=True, interval=1.0, clock=clock.clock())
    assert reason == "done" and len(clock.slept) == poll.MAX_STUCK_POLLS - 1


def test_repeat_runs_until_the_step_says_done() -> None:
    clock = FakeClock()
    steps = iter([False, False, False, True])
    poll.repeat(lambda: next(steps), 2.0, clock.clock())
    assert clock.slept == [2.0, 2.0, 2.0]
