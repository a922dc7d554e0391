"""Live mode: answer requests now with concurrent live calls, through the same store, extractor and dataset.

The requests are the ones `submit` would send (same render, same custom_id); only those with no good
answer that no batch holds or may hold are sent. Worker threads call through one shared Throttle
(concurrency, requests/tokens per minute, 429 back-off); the main thread is the only store writer.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from hipbatch import poll
from hipbatch.collect import outcome_row
from hipbatch.errors import AuthFailed, ProviderError, TransientError
from hipbatch.prepare import Source, prepare
from hipbatch.progress import default_progress
from hipbatch.providers import Provider
from hipbatch.queue import without_answered
from hipbatch.records import Outcome, RequestState, Result, ShardState
from hipbatch.render import SkipFile, Template, request_id
from hipbatch.store import Store

DEFAULT_WORKERS = 10
GRACE_S = 10.0  # after Ctrl-C, how long calls in flight may still finish (their answers are kept)
RATE_LIMIT_STATUSES = frozenset({429, 503, 529})  # "slow down" answers: they hold the whole pool
FATAL_STATUSES = frozenset({401, 403, 404})  # key, permission, model or URL: every request would fail
WORK_CHUNK = 500


class Stopped(Exception):
    """The run is stopping: a worker gives up its request before calling."""


# ---- the shared gate ---------------------------------------------------------------------------------------


def ready_at(tat: float, cost_s: float, now: float, burst_s: float = 1.0) -> float:
    """Earliest start of a call costing cost_s seconds of a rate budget whose next free time is tat.

    A cell-rate (GCRA) rule with a burst of burst_s: up to one second's worth may go at once; a call bigger
    than that goes alone once the budget is idle, so it never waits forever.
    """
    if tat <= now:
        return now
    return min(tat, max(now, tat + cost_s - burst_s))


class Throttle:
    """Shared by every worker: how many calls may run at once, and when the next one may start.

    Concurrency follows AIMD: a 429/overload halves it (once per episode: answers to calls started before
    the last cut do not cut again) and each success adds 1/limit. A 429 also closes the gate for the whole
    pool for max(Retry-After, back-off), the back-off doubling while 429s keep coming without a success.
    --max-requests-per-minute / --max-tokens-per-minute are paced with a one-second burst.
    """

    def __init__(
        self,
        max_concurrency: int,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.limit = float(self.max_concurrency)
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock = clock
        self.active = 0
        self.not_before = 0.0  # the gate is closed until then (rate limited)
        self.epoch = 0  # bumped at each cut of the limit
        self.streak = 0  # rate-limit episodes since the last success
        self.rate_limited = 0
        self.paused_s = 0.0  # total time the gate was held closed
        self.min_limit = self.max_concurrency
        self._req_tat = self._tok_tat = 0.0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, tokens: int = 0) -> int:
        """Block until a call may start; returns the epoch to hand back. Raises Stopped once closed."""
        req_cost = 60.0 / self.rpm if self.rpm else 0.0
        tok_cost = tokens * 60.0 / self.tpm if self.tpm else 0.0
        with self._cond:
            while True:
                if self._closed:
                    raise Stopped
                now = self.clock()
                start = max(
                    self.not_before, ready_at(self._req_tat, req_cost, now), ready_at(self._tok_tat, tok_cost, now)
                )
                if start > now:
                    self._cond.wait(start - now)
                elif self.active >= int(self.limit):
                    self._cond.wait(0.5)  # woken by a release
                else:
                    self.active += 1
                    self._req_tat = max(self._req_tat, now) + req_cost
                    self._tok_tat = max(self._tok_tat, now) + tok_cost
                    return self.epoch

    def release(self, ok: bool) -> None:
        """A call ended without a rate-limit answer; ok=True (a success) grows the pool back."""
        with self._cond:
            self.active -= 1
            if ok:
                self.streak = 0
                self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)
            self._cond.notify_all()

    def slow_down(self, epoch: int, retry_after: float | None) -> float:
        """A call ended with 429/overload: cut the pool and close the gate. Returns the pause in seconds."""
        with self._cond:
            self.active -= 1
            self.rate_limited += 1
            if epoch == self.epoch:  # first answer of this episode
                self.epoch += 1
                self.streak += 1
                self.limit = max(1.0, self.limit / 2)
                self.min_limit = min(self.min_limit, int(self.limit))
            delay = poll.gate_pause(self.streak, retry_after)
            now = self.clock()
            until = now + delay
            if until > self.not_before:
                self.paused_s += until - max(now, self.not_before)
                self.not_before = until
            self._cond.notify_all()
            return delay

    def waiting_s(self) -> float:
        """Seconds until the gate opens (0 when open)."""
        return max(0.0, self.not_before - self.clock())

    def close(self) -> None:
        """Wake every waiting worker; from now on acquire raises Stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _status_of(error: BaseException) -> int | None:
    """HTTP status of a translated provider error (the adapters chain the SDK error as the cause)."""
    status = getattr(error, "status_code", None) or getattr(error.__cause__, "status_code", None)
    return int(status) if isinstance(status, int) else None


def is_rate_limit(error: BaseException) -> bool:
    return isinstance(error, TransientError) and _status_of(error) in RATE_LIMIT_STATUSES


# ---- workers -----------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One request to answer live."""

    custom_id: str
    line: dict[str, Any]  # the provider's batch line: body (OpenAI) or params (Anthropic)
    tokens: int  # estimated input + max output, for --max-tokens-per-minute
    attempts: int = 0  # the ledger's count before this run
    calls: int = 0
    transient: int = 0
    rate_limited: int = 0


@dataclass
class Answer:
    """What a worker hands back: kind is ok, permanent, gave_up, stopped or crashed."""

    kind: str
    result: Result | None = None
    error: BaseException | None = None


class Pool:
    """Daemon worker threads: a call still running after the grace period never holds the process."""

    def __init__(self, provider: Provider, throttle: Throttle, workers: int, stopping: threading.Event) -> None:
        self.provider, self.throttle, self.stopping = provider, throttle, stopping
        self.todo: queue.Queue[Item | None] = queue.Queue()
        self.done: queue.Queue[tuple[Item, Answer]] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._work, name=f"hipbatch-live-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def shutdown(self) -> None:
        for _ in self.threads:
            self.todo.put(None)

    def _work(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            try:
                answer = self.answer(item)
            except BaseException as e:  # a bug must not lose the request silently nor kill the worker
                answer = Answer("crashed", error=e)
            self.done.put((item, answer))

    def answer(self, item: Item) -> Answer:
        """Call until an answer, a permanent error, the retry cap, or the stop."""

        def give_up() -> bool:
            return (
                self.stopping.is_set()
                or item.transient >= poll.LIVE.attempts
                or item.rate_limited >= poll.LIVE_RATE_LIMITED
            )

        # A rate-limited call waits at the shared gate, which holds every worker: no back-off of its own.
        def sleep(seconds: float) -> None:
            self.stopping.wait(seconds)  # a stop cuts the back-off short

        retrying = poll.policy(poll.LIVE_UNBOUNDED, sleep, give_up=give_up, no_wait=is_rate_limit)
        try:
            for attempt in retrying:
                with attempt:
                    return Answer("ok", result=self._call(item))
        except Stopped:
            return Answer("stopped")
        except TransientError as e:
            return Answer("stopped" if self.stopping.is_set() else "gave_up", error=e)
        except ProviderError as e:
            return Answer("permanent", error=e)
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, item: Item) -> Result:
        epoch = self.throttle.acquire(item.tokens)
        item.calls += 1
        try:
            result = self.provider.live(item.line)
        except TransientError as e:
            if is_rate_limit(e):
                item.rate_limited += 1
                self.throttle.slow_down(epoch, getattr(e, "retry_after", None))
            else:
                item.transient += 1
                self.throttle.release(ok=False)
            raise
        except BaseException:
            self.throttle.release(ok=False)
            raise
        self.throttle.release(ok=True)
        return result


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class LiveReport:
    """What a live run did."""

    job: str
    provider: str
    model: str
    files: int = 0
    to_answer: int = 0  # requests of these files with no good answer and in no batch
    succeeded: int = 0
    unusable: int = 0  # answered, but the extractor found no prompt (extraction_failed / truncated)
    failed: int = 0  # permanent errors, recorded as failed and not retried
    left: int = 0  # not answered in this run (transient errors after retries, stop); unchanged in the store
    changed: int = 0  # files edited since they were rendered: the next run renders them afresh
    calls: int = 0  # HTTP calls made
    rate_limited: int = 0  # 429/overload answers
    paused_s: float = 0.0  # time the whole pool was held by rate limits
    min_workers: int = 0  # the smallest the pool was cut to
    wall_s: float = 0.0
    per_second: float = 0.0  # answers per second
    errors: dict[str, int] = field(default_factory=dict)  # error code -> requests
    interrupted: bool = False
    abandoned: int = 0  # calls still in flight when the grace period ran out (their answers are lost)
    fatal: str | None = None  # the error that stopped the run (key, permission, model)
    prepare: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.succeeded + self.unusable + self.failed


def run_live(
    store: Store,
    template: Template,
    provider: Provider,
    model: str,
    params: dict[str, Any],
    source: Source,
    max_workers: int = DEFAULT_WORKERS,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    show_progress: bool = False,
    grace: float = GRACE_S,
    handle_sigint: bool = True,
) -> LiveReport:
    """Render and record like submit, then answer every request of these files that lacks an answer, live.

    Call with the store lock held: requests taken from a queued shard must not be sent in a batch meanwhile.
    """
    progress = default_progress(quiet=not show_progress)
    prep = prepare(store, template, provider, model, params, source, progress=progress)
    report = LiveReport(
        job=source.job,
        provider=provider.name,
        model=model,
        files=prep.files,
        prepare=asdict(prep),
        min_workers=max_workers,
    )
    names = list(source.names())
    report.to_answer = len({row["custom_id"] for row in _work_rows(store, source.job, names)})
    run = _Run(store, template, provider, max_workers, requests_per_minute, tokens_per_minute, report, grace)
    started = time.monotonic()
    try:
        if report.to_answer:
            with _sigint_sets(run.stopping, run.abandon, handle_sigint), _bar(report, show_progress) as bar:
                run.drive(_items(store, template, provider, model, params, source, names, report), bar)
    finally:
        run.pool_down()
        for shard in store.shards_in_states([ShardState.QUEUED]):
            without_answered(store, shard)  # so `status` and `submit` see only what is left to send
        _finish_report(report, run, time.monotonic() - started)
    return report


def _finish_report(report: LiveReport, run: _Run, wall_s: float) -> None:
    report.left = max(report.to_answer - report.done - report.changed, 0)
    report.wall_s = round(wall_s, 3)
    report.per_second = round(report.done / report.wall_s, 2) if report.wall_s else 0.0
    report.calls = run.calls
    report.rate_limited = run.throttle.rate_limited
    report.paused_s = round(run.throttle.paused_s, 3)
    report.min_workers = run.throttle.min_limit
    report.errors = dict(run.errors)


def _work_rows(store: Store, job: str, names: list[str]) -> Iterator[dict[str, Any]]:
    for start in range(0, len(names), WORK_CHUNK):
        rows = list(store.live_work(job, names[start : start + WORK_CHUNK]))
        # A paid answer asked again (truncated, extraction_failed) stays in the ledger as superseded.
        store.supersede_answers([r["custom_id"] for r in rows if r["state"] != RequestState.PENDING])
        yield from rows


def _items(
    store: Store,
    template: Template,
    provider: Provider,
    model: str,
    params: dict[str, Any],
    source: Source,
    names: list[str],
    report: LiveReport,
) -> Iterator[Item]:
    """The work, rendered again lazily with the code submit uses; a request is taken once."""
    seen: set[str] = set()
    for row in _work_rows(store, source.job, names):
        cid = row["custom_id"]
        if cid in seen:
            continue  # two files with the same content share one request
        seen.add(cid)
        try:
            code = source.read(row["file_name"])
        except (SkipFile, OSError):
            report.changed += 1
            continue
        system, user = template.render(code, row["file_name"])
        if request_id(provider.name, provider.endpoint, model, params, system, user) != cid:
            report.changed += 1  # edited since prepare rendered it: this request is not the file's any more
            continue
        yield Item(
            cid,
            provider.to_line(cid, model, params, system, user),
            tokens=int(row["est_input_tokens"] or 0) + int(row["max_tokens"] or 0),
            attempts=int(row["attempts"] or 0),
        )


class _Run:
    """The main thread's side: hand out work, record answers as they arrive, stop cleanly."""

    def __init__(
        self,
        store: Store,
        template: Template,
        provider: Provider,
        workers: int,
        rpm: int | None,
        tpm: int | None,
        report: LiveReport,
        grace: float,
    ) -> None:
        self.store, self.template, self.report, self.grace = store, template, report, grace
        self.workers = max(1, workers)
        self.stopping = threading.Event()  # stop sending (Ctrl-C, or a fatal error)
        self.abandon = threading.Event()  # second Ctrl-C: stop waiting for calls in flight
        self.throttle = Throttle(self.workers, rpm, tpm)
        self.provider = provider
        self.pool: Pool | None = None
        self.calls = 0
        self.errors: Counter[str] = Counter()

    def drive(self, items: Iterator[Item], bar: Any) -> None:
        self.pool = pool = Pool(self.provider, self.throttle, self.workers, self.stopping)
        report = self.report
        in_flight = 0
        exhausted = False
        deadline: float | None = None
        while True:
            while not self.stopping.is_set() and not exhausted and in_flight < 2 * self.workers:
                item = next(items, None)
                if item is None:
                    exhausted = True
                else:
                    pool.todo.put(item)
                    in_flight += 1
            if self.stopping.is_set() and deadline is None:
                deadline = time.monotonic() + self.grace
                report.interrupted = report.fatal is None
                self.throttle.close()
                in_flight -= self._drain_todo()
            if in_flight == 0:
                break
            if self.abandon.is_set() or (deadline is not None and time.monotonic() > deadline):
                report.abandoned = in_flight
                break
            try:
                got = [pool.done.get(timeout=0.1)]
            except queue.Empty:
                bar.update(report, self.throttle.waiting_s())
                continue
            while True:
                try:
                    got.append(pool.done.get_nowait())
                except queue.Empty:
                    break
            in_flight -= len(got)
            self._record(got)
            bar.update(report, self.throttle.waiting_s())

    def _drain_todo(self) -> int:
        assert self.pool is not None
        n = 0
        while True:
            try:
                item = self.pool.todo.get_nowait()
            except queue.Empty:
                return n
            if item is not None:
                n += 1

    def _record(self, got: list[tuple[Item, Answer]]) -> None:
        """Commit answers (main thread only). A request keeps a good answer it already has."""
        rows = []
        for item, answer in got:
            self.calls += item.calls
            if answer.kind == "ok" and answer.result is not None:
                row = outcome_row(answer.result, self.template.extract, via="live")
            elif isinstance(answer.error, AuthFailed):  # the key, not the request: left as it was, run stops
                self.report.fatal = self.report.fatal or str(answer.error)
                self.stopping.set()
                continue
            elif answer.kind == "permanent" and answer.error is not None:
                status = _status_of(answer.error)
                code = f"http_{status}" if status else "provider_error"
                failure = Result(
                    item.custom_id, Outcome.ERRORED, error_code=code, error_message=str(answer.error)[:2000]
                )
                row = outcome_row(failure, self.template.extract, via="live")
                self.errors[code] += 1
                if (status is None or status in FATAL_STATUSES) and self.report.fatal is None:
                    self.report.fatal = str(answer.error)
                    self.stopping.set()
            else:  # not answered: left as it was in the store
                if answer.kind in ("gave_up", "crashed"):
                    self.errors[_code_of(answer.error)] += 1
                if answer.kind == "crashed" and self.report.fatal is None:
                    # Not a provider answer but a local failure (a bug, a bad setting): every call hits it.
                    error = answer.error
                    self.report.fatal = f"a live call failed unexpectedly: {type(error).__name__}: {error}"
                    self.stopping.set()
                continue
            row["attempts"] = item.attempts + 1
            state = row["state"]
            if state == RequestState.SUCCEEDED:
                self.report.succeeded += 1
            elif state == RequestState.FAILED:
                self.report.failed += 1
            else:
                self.report.unusable += 1
                self.errors[str(state)] += 1
            rows.append(row)
        self.store.save_results(rows)

    def pool_down(self) -> None:
        self.throttle.close()
        if self.pool is not None:
            self._drain_todo()
            self.pool.shutdown()


def _code_of(error: BaseException | None) -> str:
    if error is None:
        return "unknown"
    status = _status_of(error)
    if status:
        return f"http_{status}"
    return "transient" if isinstance(error, TransientError) else type(error).__name__


@contextmanager
def _sigint_sets(stopping: threading.Event, abandon: threading.Event, enabled: bool) -> Iterator[None]:
    """Ctrl-C stops sending (the first) or stops waiting for calls in flight (the second); no exception is
    raised in the middle of a store write."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        (abandon if stopping.is_set() else stopping).set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _NullBar:
    def update(self, report: LiveReport, waiting_s: float) -> None:
        pass


@contextmanager
def _bar(report: LiveReport, show: bool) -> Iterator[Any]:
    """A rich bar on stderr: done / failed / rate, and the pause when rate limited."""
    if not show:
        yield _NullBar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    columns = [
        TextColumn("{task.description}", markup=False),  # the job name is outside text
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}", markup=False),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        from hipbatch.text import plain

        task = progress.add_task(plain(f"live {report.job}"), total=report.to_answer, detail="")

        class Bar:
            def update(self, report: LiveReport, waiting_s: float) -> None:
                elapsed = max(time.monotonic() - started, 1e-6)
                detail = (
                    f"ok {report.succeeded}  failed {report.failed + report.unusable}  {report.done / elapsed:.1f}/s"
                )
                if waiting_s > 0.05:
                    detail += f"  rate limited: waiting {waiting_s:.1f}s"
                progress.update(task, completed=report.done, detail=detail)

        yield Bar()
