"""The one retry policy (tenacity) for provider calls, and the wait loop for batches."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from hipbatch.errors import TransientError

T = TypeVar("T")

MAX_RETRY_AFTER = 60.0  # honour Retry-After up to this; a server asking for an hour does not stall a run


def _wait(state: RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome else None
    asked = getattr(error, "retry_after", None)
    if asked is not None:
        return min(float(asked), MAX_RETRY_AFTER)
    base = min(0.5 * 2 ** (state.attempt_number - 1), 30.0)
    return base * (0.75 + random.random() / 2)


def retrying(
    fn: Callable[..., T], *args: Any, sleep: Callable[[float], None] = time.sleep, attempts: int = 8, **kwargs: Any
) -> T:
    """Call fn, retrying TransientError with backoff (honouring Retry-After); other errors pass through."""
    for attempt in Retrying(
        stop=stop_after_attempt(attempts),
        wait=_wait,
        retry=retry_if_exception_type(TransientError),
        sleep=sleep,
        reraise=True,
    ):
        with attempt:
            return fn(*args, **kwargs)
    raise AssertionError("unreachable")  # pragma: no cover
