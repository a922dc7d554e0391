"""The one place that waits: the retry policies for provider calls (tenacity), their numbers, and the loops that
wait for batches to finish, for the state-dir lock, or for the next refresh.

Every wait goes through a `Clock` (sleep, monotonic, time) that callers pass in, so tests run the same loops
with no real sleep and can assert on the waits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from hipbatch.errors import TransientError

if TYPE_CHECKING:  # tenacity loads on the first retry, not with every command (`--help` stays fast)
    from tenacity import AttemptManager, RetryCallState, Retrying

T = TypeVar("T")
Sleep = Callable[[float], None]
#: Told before each back-off once retries have waited NOTIFY_AFTER_S in all: (attempt that failed, of how many,
#: seconds until the next try, the error).
Notify = Callable[[int, int, float, BaseException], None]

MAX_RETRY_AFTER = 60.0  # honour Retry-After up to this; a server asking for an hour does not stall a run


@dataclass(frozen=True)
class Clock:
    """Time as the waiting code sees it; tests pass a fake one."""

    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], float] = time.time


REAL_CLOCK = Clock()


@dataclass(frozen=True)
class Policy:
    """How often one kind of call is tried, and the back-off between tries (doubling from `first` to `cap`)."""

    attempts: int
    first: float = 0.5
    cap: float = 30.0


#: The retry policies, by what is retried. These are the only retry numbers in hipbatch.
CALL = Policy(attempts=8)  # an upload, a list: safe to repeat
CHECK = Policy(attempts=3, cap=4.0)  # the model check before a submit: a wrong URL must fail in seconds
STATUS = Policy(attempts=4)  # a status check: a failed one leaves the batch as it was until the next poll
CANCEL = Policy(attempts=3)  # a cancel, and the status check after a refused cancel
CREATE = Policy(attempts=6)  # a batch create: after an ambiguous failure, look for the batch before trying again
DOWNLOAD = Policy(attempts=4, cap=10.0)  # a results download, including one that is incomplete or does not parse
LIVE = Policy(attempts=5)  # a live call that failed transiently (5xx, timeout, dropped connection)
LIVE_RATE_LIMITED = 30  # a live call answered "slow down" (each waits at the shared gate, not here)
LIVE_UNBOUNDED = Policy(attempts=LIVE.attempts + LIVE_RATE_LIMITED)  # both caps are counted by the caller
GATE = Policy(attempts=0, first=0.25, cap=MAX_RETRY_AFTER)  # the live pool's pause after a 429

#: `collect --wait`: polls in a row that may fail to read finished batches before the wait gives up on them,
#: and polls in a row where shards wait, nothing runs and nothing can be sent (a missing key, ...).
MAX_STUCK_POLLS = 5
MAX_IDLE_POLLS = 5

LOCK_POLL_S = 0.05  # how often a command waiting for the state-dir lock tries again
NOTIFY_AFTER_S = 3.0  # retries that have waited this long in all are announced (attempt n, next try in s)

#: Who is told about long retries when a caller passes no `notify` (a command sets it for its whole run).
_NOTIFY: ContextVar[Notify | None] = ContextVar("hipbatch_notify", default=None)


@contextmanager
def notifying(notify: Notify | None) -> Iterator[None]:
    """Within the block, every retry policy that waits more than NOTIFY_AFTER_S tells `notify`."""
    token = _NOTIFY.set(notify)
    try:
        yield
    finally:
        _NOTIFY.reset(token)


def backoff(
    policy: Policy, attempt: int, retry_after: float | None = None, rng: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before try `attempt + 1`: what the server asked (capped), else jittered doubling."""
    if retry_after is not None:
        return min(float(retry_after), MAX_RETRY_AFTER)
    base = min(policy.first * 2.0 ** max(attempt - 1, 0), policy.cap)
    return base * (0.75 + rng() / 2)


def gate_pause(streak: int, retry_after: float | None, rng: Callable[[], float] = random.random) -> float:
    """How long the live pool's gate stays closed after a 429: max(Retry-After, back-off), capped."""
    return min(max(retry_after or 0.0, backoff(GATE, streak, None, rng)), MAX_RETRY_AFTER)


def _retry_after(state: RetryCallState) -> float | None:
    error = state.outcome.exception() if state.outcome else None
    asked = getattr(error, "retry_after", None)
    return None if asked is None else float(asked)


def policy(
    rule: Policy,
    sleep: Callable[[float], None] = time.sleep,
    retry_on: tuple[type[BaseException], ...] = (TransientError,),
    give_up: Callable[[], bool] | None = None,
    no_wait: Callable[[BaseException], bool] | None = None,
    notify: Notify | None = None,
    left: Callable[[], float] | None = None,
) -> Retrying:
    """The one tenacity builder: retry `retry_on` errors under `rule`, honouring Retry-After.

    give_up() ends the retries early (a stopping run); no_wait(error) skips the back-off for errors that are
    waited for elsewhere (a 429 in live mode holds the shared gate instead); left() is the time left before a
    deadline (`collect --wait --timeout`): no try starts after it and no back-off runs past it. notify (default:
    the one set by `notifying`) hears of each back-off once the waits add up to NOTIFY_AFTER_S.
    """
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

    tell = notify or _NOTIFY.get()

    def stop(state: RetryCallState) -> bool:
        late = left is not None and left() <= 0
        return late or bool(give_up and give_up()) or stop_after_attempt(rule.attempts)(state)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if no_wait is not None and error is not None and no_wait(error):
            return 0.0
        pause = backoff(rule, state.attempt_number, _retry_after(state))
        return pause if left is None else max(min(pause, left()), 0.0)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if tell is not None and error is not None and state.idle_for >= NOTIFY_AFTER_S:
            tell(state.attempt_number, rule.attempts, state.upcoming_sleep, error)

    return Retrying(
        stop=stop,
        wait=wait,
        retry=retry_if_exception_type(retry_on),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep,
    )


def attempts(
    rule: Policy,
    sleep: Callable[[float], None] = time.sleep,
    retry_on: tuple[type[BaseException], ...] = (TransientError,),
    notify: Notify | None = None,
    left: Callable[[], float] | None = None,
) -> Iterator[AttemptManager]:
    """`for attempt in attempts(rule): with attempt: ...`: the tries of a block that does more than one call."""
    yield from policy(rule, sleep, retry_on, notify=notify, left=left)


def time_left(deadline: float | None, clock: Clock = REAL_CLOCK) -> Callable[[], float] | None:
    """Seconds left before `deadline` (a clock.monotonic() reading), as a function; None without a deadline."""
    if deadline is None:
        return None
    return lambda: deadline - clock.monotonic()


def retrying(
    fn: Callable[..., T],
    *args: Any,
    rule: Policy = CALL,
    sleep: Callable[[float], None] = time.sleep,
    notify: Notify | None = None,
    **kwargs: Any,
) -> T:
    """Call fn, retrying TransientError under `rule` (honouring Retry-After); other errors pass through."""
    for attempt in policy(rule, sleep, notify=notify):
        with attempt:
            return fn(*args, **kwargs)
    raise AssertionError("unreachable")  # pragma: no cover


def wait_until(
    ready: Callable[[], bool], timeout: float, clock: Clock = REAL_CLOCK, every: float = LOCK_POLL_S
) -> bool:
    """Try ready() until it is true or `timeout` seconds passed; True if it became true."""
    deadline = clock.monotonic() + timeout
    while not ready():
        if clock.monotonic() >= deadline:
            return False
        clock.sleep(every)
    return True


def repeat(step: Callable[[], bool], interval: float, clock: Clock = REAL_CLOCK) -> None:
    """Run step() every `interval` seconds until it returns True (`status --watch`)."""
    while not step():
        clock.sleep(interval)


@dataclass(frozen=True)
class Round:
    """What one poll of `collect --wait` / `drain` found."""

    unfinished: int  # batches still running at the provider
    queued: int  # shards waiting in the local queue
    finished: int = 0  # batches that ended, collected or not
    stuck: bool = False  # finished batches whose results could not be read this time
    stalled: bool = False  # shards wait, nothing runs, and this round could send none


def wait_for_batches(
    poll_once: Callable[[], Round],
    wait: bool,
    interval: float,
    timeout: float | None = None,
    clock: Clock = REAL_CLOCK,
    on_wait: Callable[[Round, float], None] | None = None,
) -> tuple[str, Round]:
    """Poll until nothing runs or waits (or once, without `wait`). Returns (why it ended, the last round).

    The reasons: "once", "done", "stalled" (nothing can be sent: waiting longer cannot help), "deadline"
    (--timeout, which bounds the whole wait: the last sleep is cut to fit it).
    """
    deadline = clock.monotonic() + timeout if timeout else None
    stuck = idle = 0
    while True:
        last = poll_once()
        idle = idle + 1 if last.stalled else 0
        stuck = stuck + 1 if last.stuck else 0
        if not wait:
            return "once", last
        # A finished batch whose download failed is fetched again at the next poll, a few times.
        if not last.unfinished and not last.queued and not 0 < stuck < MAX_STUCK_POLLS:
            return "done", last
        if idle >= MAX_IDLE_POLLS:
            return "stalled", last
        pause = interval
        if deadline is not None:
            left = deadline - clock.monotonic()
            if left <= 0:
                return "deadline", last
            pause = min(pause, left)
        if on_wait is not None:
            on_wait(last, pause)
        clock.sleep(pause)
