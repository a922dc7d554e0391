"""Submit: feed shards from the local queue to their provider (upload, create), adopting the batch of a submit
that was interrupted instead of creating it again.

Every provider call that creates something is preceded by a committed intent (shard state uploading /
creating), and every result is committed as soon as it is known, so a killed submit is finished, not
redone, by the next submit, status or collect.

`Feeder` runs the same sending on a worker thread, so `submit` uploads and creates shard n while it renders and
records shard n+1 (the network waits release the GIL). The store has one SQLite connection: while a Feeder runs,
both threads reach it through `Feeder.store`, which holds one lock for each Store call (one transaction each),
so the order of every shard's intents and calls is the one `feed` keeps.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from hipbatch import poll
from hipbatch.errors import AmbiguousSubmit, AuthFailed, HipbatchError, ProviderError, TransientError
from hipbatch.poll import Sleep
from hipbatch.progress import NullProgress, Progress
from hipbatch.providers import Provider
from hipbatch.providers.registry import Adapters
from hipbatch.queue import Window, pick_window, without_answered
from hipbatch.records import BatchInfo, ShardRow, ShardState
from hipbatch.store import Store

#: Anthropic batches are matched on creation time: allow this much difference between our clock and theirs.
CLOCK_SKEW = 60.0
RESUMABLE = (ShardState.UPLOADING, ShardState.UPLOADED, ShardState.CREATING, ShardState.AMBIGUOUS)


@dataclass
class FeedReport:
    """What feeding the queue did."""

    uploaded: int = 0
    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    queued: int = 0  # shards left waiting for capacity
    blocked: list[str] = field(default_factory=list)  # why some shards could not be sent now
    ambiguous: list[str] = field(default_factory=list)  # shards refused without --force (AmbiguousSubmit)
    errors: list[str] = field(default_factory=list)  # provider calls that failed after retries
    duplicates_cancelled: list[str] = field(default_factory=list)  # extra batches found for one shard
    tentative: list[str] = field(default_factory=list)  # adopted by time and size only, proven at collect


def feed(
    store: Store,
    adapters: Adapters,
    window: Window | Mapping[str, Window] | None = None,
    force: bool = False,
    resume_only: bool = False,
    sleep: Sleep = time.sleep,
    progress: Progress | None = None,
) -> FeedReport:
    """Finish interrupted submits, then (unless resume_only) send queued shards while the window allows.

    A shard that cannot be sent (ambiguous, or a provider error after retries) is reported and left as it
    is; the others still go. A provider that keeps failing transiently gets no more calls in this run.
    """
    report = FeedReport()
    down: set[str] = set()  # providers that failed transiently after retries: stop calling them now
    for shard in store.shards_in_states(RESUMABLE):
        _send_reported(store, adapters, shard, report, force, sleep, down)
    waiting = [] if resume_only else store.shards_in_states([ShardState.QUEUED])
    with (progress or NullProgress()).task("send shards", len(waiting) or None) as bar:
        for queued in waiting:
            bar.advance()
            _send_queued(store, adapters, queued, window, report, force, sleep, down)
    return report


def _send_queued(
    store: Store,
    adapters: Adapters,
    queued: ShardRow,
    window: Window | Mapping[str, Window] | None,
    report: FeedReport,
    force: bool,
    sleep: Sleep,
    down: set[str],
) -> None:
    """Send one queued shard if its window allows (else count it as left in the queue)."""
    sendable = without_answered(store, queued)  # requests answered live since packing are never sent
    if sendable is None or sendable.provider in down:
        return
    if not pick_window(window, sendable.provider).allows(store, sendable):
        report.queued += 1
        return
    _send_reported(store, adapters, sendable, report, force, sleep, down)


class Feeder:
    """Sends shards on a worker thread while the caller packs the next ones: `with Feeder(...) as f:`, then
    `f.put(shard_id)` for each shard as soon as it is recorded; leaving the block waits for the last send.

    What `feed` would send comes first (interrupted submits, then the shards already queued, as found when the
    Feeder is made), then each shard put, in order; a shard no longer queued when its turn comes is skipped.
    `before_send(store)` runs once, before anything is sent (submit settles there the worst-case cost of
    requests recorded earlier without one; the new ones are recorded with theirs). An error in the block stops
    the worker after its current call; an unexpected error in the worker is raised again when the block ends.
    """

    def __init__(
        self,
        store: Store,
        adapters: Adapters,
        window: Window | Mapping[str, Window] | None = None,
        force: bool = False,
        sleep: Sleep = time.sleep,
        before_send: Callable[[Store], object] | None = None,
    ) -> None:
        self.store = serialized(store, threading.RLock())
        self.report = FeedReport()
        self._args = (adapters, window, force, sleep)
        self._before_send = before_send
        self._resume = self.store.shards_in_states(RESUMABLE)
        self._waiting = [s.id for s in self.store.shards_in_states([ShardState.QUEUED])]
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        # The worker runs in a copy of this context: what the command set up (poll.notifying's retry notices)
        # reaches the calls it makes.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="hipbatch-feed", daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self._stop.set()
        self._todo.put(None)
        self._thread.join()
        if self._failure is not None and kind is None:
            raise self._failure

    def put(self, shard_id: int) -> None:
        """Send this (recorded, queued) shard after the ones before it."""
        self._todo.put(shard_id)

    def _run(self) -> None:
        adapters, window, force, sleep = self._args
        store, report, down = self.store, self.report, set[str]()
        try:
            if self._before_send is not None:
                self._before_send(store)
            for shard in self._resume:
                if not self._stop.is_set():
                    _send_reported(store, adapters, shard, report, force, sleep, down)
            seen: set[int] = set()
            for shard_id in itertools.chain(self._waiting, iter(self._todo.get, None)):
                if self._stop.is_set():
                    break
                queued = store.shard(shard_id)  # as it is now: a shard is never sent twice
                if shard_id in seen or queued.state != ShardState.QUEUED:
                    continue
                seen.add(shard_id)
                _send_queued(store, adapters, queued, window, report, force, sleep, down)
        except BaseException as e:  # handed to the caller's thread when the block ends
            self._failure = e


class _Locked:
    """A Store whose every call holds one lock (a call is one transaction); `atomic()` holds it throughout."""

    def __init__(self, store: Store, lock: threading.RLock) -> None:
        self._store, self._lock = store, lock

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self._lock, self._store.atomic():
            yield


def serialized(store: Store, lock: threading.RLock) -> Store:
    """The store shared by two threads: each call through it holds `lock`."""
    return cast(Store, _Locked(store, lock))


def _send_reported(
    store: Store,
    adapters: Adapters,
    shard: ShardRow,
    report: FeedReport,
    force: bool,
    sleep: Sleep,
    down: set[str],
) -> None:
    if shard.provider in down:
        return
    try:
        _send(store, adapters, shard, report, force, sleep)
    except AmbiguousSubmit as e:
        report.ambiguous.append(str(e))
    except AuthFailed:
        raise  # every later call would be refused too: the command ends, the shard stays as it was
    except TransientError as e:
        down.add(shard.provider)
        report.errors.append(f"shard {shard.name}: {e} (left as it was; rerun to continue)")
    except ProviderError as e:
        report.errors.append(f"shard {shard.name}: {e}")


def _send(store: Store, adapters: Adapters, shard: ShardRow, report: FeedReport, force: bool, sleep: Sleep) -> None:
    try:
        provider = adapters.get(shard.provider)
        provider.check_key()
    except HipbatchError as e:
        report.blocked.append(f"shard {shard.name}: {e}")
        return
    if shard.state in (ShardState.QUEUED, ShardState.UPLOADING):
        # An interrupted upload is simply redone: files cost nothing and a batch is what gets billed.
        store.update_shard(shard.id, state=ShardState.UPLOADING, intent_at=time.time())
        file_id = poll.retrying(provider.upload, _path(shard), sleep=sleep)
        store.update_shard(shard.id, state=ShardState.UPLOADED, file_id=file_id)
        report.uploaded += file_id is not None
        shard = store.shard(shard.id)
    if shard.state in (ShardState.CREATING, ShardState.AMBIGUOUS):
        # The last run may have been stopped after the provider accepted the create: look before creating.
        found = look_for_batch(store, provider, shard, sleep, force=force, report=report)
        if found is not None:
            store.attach_batch(shard, found, adopted=True)
            report.adopted.append(found.id)
            if not found.proven:
                report.tentative.append(found.id)
            return
        if shard.state == ShardState.AMBIGUOUS and not force:
            raise AmbiguousSubmit(ambiguous_message(shard))
    info = _create(store, provider, shard, force, sleep, report)
    store.attach_batch(shard, info)
    report.created.append(info.id)
    if not info.proven:  # found after a create whose answer was lost: likely ours, perhaps another state dir's
        report.tentative.append(info.id)


class _FileNotVisible(ProviderError):
    """The provider does not see the uploaded input file yet (a known race right after an upload)."""


def _create(
    store: Store, provider: Provider, shard: ShardRow, force: bool, sleep: Sleep, report: FeedReport | None = None
) -> BatchInfo:
    """Create a batch with no blind retries: after an ambiguous failure, look before trying again."""
    # One intent time for every attempt of this call: a batch made by an early attempt whose answer was
    # lost must still fall inside the window the later looks search.
    store.update_shard(shard.id, state=ShardState.CREATING, intent_at=time.time())
    shard = store.shard(shard.id)
    maybe_created = False
    try:
        for attempt in poll.attempts(poll.CREATE, sleep, retry_on=(TransientError, _FileNotVisible)):
            with attempt:
                if maybe_created:
                    found = look_for_batch(store, provider, shard, sleep, force=force, report=report)
                    if found is not None:
                        return found
                maybe_created = False
                try:
                    return provider.create(_path(shard), shard.file_id, shard.tag)
                except TransientError:
                    maybe_created = True
                    raise
                except ProviderError as e:
                    if "cannot find file" in str(e).lower():
                        raise _FileNotVisible(str(e)) from e
                    store.update_shard(shard.id, state=ShardState.UPLOADED if shard.file_id else ShardState.QUEUED)
                    raise
    except _FileNotVisible as e:
        # The input file is gone (expired or deleted): upload it again next time.
        store.update_shard(shard.id, state=ShardState.QUEUED, file_id=None)
        raise ProviderError(str(e)) from e
    raise AssertionError("unreachable")  # pragma: no cover


def look_for_batch(
    store: Store,
    provider: Provider,
    shard: ShardRow,
    sleep: Sleep,
    force: bool = False,
    report: FeedReport | None = None,
) -> BatchInfo | None:
    """The provider batch an interrupted create made for this shard, if any.

    With a tag the batch carries (OpenAI metadata) the shard is named exactly; should a create have happened
    twice, the earliest batch is adopted and the others are cancelled before they are billed. Without
    (Anthropic), a single unknown batch of the same size created after the intent is adopted only tentatively
    (proven False: it may be another state dir's on the same account): never cancelled, and used at collect only
    if its results are the shard's requests. Several are ambiguous: the shard is marked so and refused until
    --force (which submits it again).
    """
    since = float(shard.intent_at or shard.created_at)
    if not provider.has_metadata:
        since -= CLOCK_SKEW
    known = store.known_batch_ids()
    found = poll.retrying(provider.find, shard.tag, since, shard.n_requests, sleep=sleep)
    candidates = [b for b in found if b.id not in known]
    if not candidates:
        return None
    if provider.has_metadata:
        candidates.sort(key=lambda b: (b.created_at or 0, b.id))
        for extra in candidates[1:]:
            _cancel_duplicate(provider, shard, extra, sleep, report)
        return candidates[0]
    if len(candidates) == 1:
        return replace(candidates[0], proven=False)  # matched by time and size: tentative until its results come
    if force:
        return None
    store.update_shard(shard.id, state=ShardState.AMBIGUOUS)
    raise AmbiguousSubmit(ambiguous_message(shard, [b.id for b in candidates]))


def _cancel_duplicate(
    provider: Provider, shard: ShardRow, extra: BatchInfo, sleep: Sleep, report: FeedReport | None
) -> None:
    try:
        poll.retrying(provider.cancel, extra.id, rule=poll.CANCEL, sleep=sleep)
        if report is not None:
            report.duplicates_cancelled.append(extra.id)
    except ProviderError as e:
        if report is not None:
            report.errors.append(f"duplicate batch {extra.id} of shard {shard.key}: cancel it by hand ({e})")


def ambiguous_message(shard: ShardRow, ids: list[str] | None = None) -> str:
    """Why a shard is not resubmitted, and what the user does about it."""
    which = f" (candidates: {', '.join(ids)})" if ids else ""
    return (
        f"shard {shard.name} of job {shard.job}: a batch may already exist at "
        f"{shard.provider}{which} and cannot be told apart, so it is not resubmitted; check the "
        "provider's console, cancel any duplicate, then rerun with --force to submit it again"
    )


def _path(shard: ShardRow) -> Path:
    return Path(shard.path)
