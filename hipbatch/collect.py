"""Collect: download the results of finished batches (kept only when whole: every line parses, the count matches
the provider's, no custom_id answered twice differently; else fetched again, and left uncollected), read every
line through the extractor into the ledger, and run the extractor again over stored replies."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from hipbatch import poll, worker
from hipbatch.errors import AuthFailed, HipbatchError, ResultsGone, TransientError, UnreadableResults
from hipbatch.extract import ExtractSettings, extract
from hipbatch.progress import NullProgress, Progress
from hipbatch.providers import Provider
from hipbatch.providers.base import line_id
from hipbatch.providers.registry import Adapters
from hipbatch.records import FAILED_COLUMNS, RESULT_COLUMNS, BatchInfo, BatchRow, Outcome, RequestState, Result
from hipbatch.status import FAILED_STATES
from hipbatch.store import Store

if TYPE_CHECKING:
    from hipbatch.cost import Price, PriceTable


@dataclass
class CollectReport:
    batches: list[str] = field(default_factory=list)
    lines: int = 0
    refetches: int = 0
    errors: list[str] = field(default_factory=list)  # batches whose results could not be read (uncollected)
    gone: list[str] = field(default_factory=list)  # batches whose results the provider no longer has
    proven: list[str] = field(default_factory=list)  # batches adopted by time and size, found to be ours
    released: list[str] = field(default_factory=list)  # batches adopted by time and size, found not to be ours


class _Extractors:
    """The extractor settings of each job's template, loaded once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, ExtractSettings] = {}

    def __call__(self, job: str) -> ExtractSettings:
        if job not in self._cache:
            row = self.store.job(job)
            try:
                from hipbatch.render import load_template

                assert row is not None and row.template_dir is not None
                self._cache[job] = load_template(Path(row.template_dir)).extract
            except (HipbatchError, AssertionError):
                self._cache[job] = ExtractSettings()
        return self._cache[job]


CHUNK_ROWS = 2000  # rows staged at once
APPLY_ROWS = 8000  # staged rows applied to the ledger at once while a proven batch is read (sorted by rowid)
WORKER_MIN_BYTES = 4 << 20  # a results file this large is read in a second process (worker.py), when there is one
_MASK = (1 << 64) - 1
_LOST = {
    Outcome.ERRORED: RequestState.FAILED,
    Outcome.EXPIRED: RequestState.EXPIRED,
    Outcome.CANCELED: RequestState.CANCELED,
}
_NO_REPLY = (None,) * (len(RESULT_COLUMNS) - FAILED_COLUMNS)


def result_row(
    result: Result, settings: ExtractSettings, via: str = "batch", price: Price | None = None, now: float = 0.0
) -> tuple[Any, ...]:
    """(custom_id, full, *RESULT_COLUMNS) for one result, after the extractor (the hot loop of collect).

    cost_usd is set, never added, from the tokens just set: by `price` when the model's price is known (as
    cost.settle() would), else NULL for cost.settle() to fill in.
    """
    tin, tout, tcr, tcw = result.input_tokens, result.output_tokens, result.cache_read_tokens, result.cache_write_tokens
    cost = None if price is None else price.cost(tin or 0, tout or 0, tcr or 0, tcw or 0, live=via == "live")
    common = (via, now or time.time(), tin, tout, tcr, tcw)
    if result.outcome is not Outcome.SUCCEEDED:
        state = _LOST[result.outcome]
        return (result.custom_id, 0, *common, result.error_code, result.error_message, cost, state, *_NO_REPLY)
    ex = extract(result.text, result.finish, settings)
    suspect = ",".join(ex.suspects) or None
    kept = (result.text, result.finish, ex.prompt, ex.detail or None, ex.method, suspect)
    if ex.ok:
        return (result.custom_id, 1, *common, result.error_code, result.error_message, cost, RequestState.SUCCEEDED,
                *kept)  # fmt: skip
    return (result.custom_id, 1, *common, ex.reason, ex.detail, cost, ex.reason, *kept)


def outcome_row(
    result: Result, settings: ExtractSettings, via: str = "batch", price: Price | None = None
) -> dict[str, Any]:
    """result_row() as the ledger columns it sets (by name), for Store.save_results."""
    custom_id, full, *values = result_row(result, settings, via, price)
    width = len(RESULT_COLUMNS) if full else FAILED_COLUMNS
    return {"custom_id": custom_id, **dict(zip(RESULT_COLUMNS[:width], values[:width], strict=True))}


def collect_batches(
    store: Store,
    adapters: Adapters,
    progress: Progress | None = None,
    sleep: poll.Sleep = poll.REAL_CLOCK.sleep,
    left: Callable[[], float] | None = None,
) -> CollectReport:
    """Read the results of every finished, uncollected batch into the ledger.

    A batch whose results cannot be read completely (short, empty, cut, malformed, inconsistent, no output file
    yet) stays uncollected, its requests `submitted`, and the reason is kept for `status`: the next collect
    fetches it again, and nothing of it is ever sent again. Only when the provider says its results are gone do
    its unanswered requests become `missing`. A batch adopted by time and size is used only when its results are
    the shard's requests; else it is released and the shard goes back to the queue. `left()`: time left before
    the command's deadline (no download starts or retries past it). An AuthFailed ends the collect.
    """
    progress = progress or NullProgress()
    report = CollectReport()
    extractors = _Extractors(store)
    prices = _prices(adapters)
    results_dir = store.state_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for batch in store.batches_to_collect():
        if left is not None and left() <= 0:
            break  # past the deadline: the rest waits for the next collect, as it was
        dest = results_dir / f"{batch.id}.jsonl"
        try:
            provider = adapters.get(batch.provider)
            price = prices.lookup(batch.provider, batch.model) if prices is not None else None
            reader = _Reader(store, batch, provider, extractors(batch.job), price, progress)
            # One transaction per batch: a batch is read in whole or not at all (a killed collect reads it again).
            with store.atomic():
                ids = _fetch(store, provider, batch, dest, reader, sleep, left, report)
                if batch.proven or _owned(store, batch, ids, dest, report):
                    _record(store, batch, reader, report)
        except AuthFailed:
            raise
        except ResultsGone as e:
            _gone(store, batch, e, report)
        except HipbatchError as e:
            store.record_read_error(batch.id, str(e))
            report.errors.append(f"{batch.id}: results not read, batch left uncollected (requests stay submitted): {e}")
        finally:
            store.drop_staged()
    return report


def _record(store: Store, batch: BatchRow, reader: _Reader, report: CollectReport) -> None:
    """What the reader staged into the ledger, and the batch's requests without a line by their batch's final
    status; the batch's counts taken again. Inside the batch's transaction."""
    if reader.summary.lines:
        store.apply_staged(from_batch=batch.id, twice=reader.summary.twice)
        report.lines += reader.summary.lines
    info = store.batch(batch.id) or batch
    leftover_state, message = _leftover(info.info())
    store.mark_unanswered(batch.id, leftover_state, message)
    store.recount_batch(batch.id)
    store.mark_collected(batch.id)
    report.batches.append(batch.id)


class _Reader:
    """Reads one batch's results file in one pass (read_chunks: each line checked and turned into its ledger row
    once) into the stage; _record applies it. A file found broken leaves nothing staged."""

    def __init__(
        self,
        store: Store,
        batch: BatchRow,
        provider: Provider,
        settings: ExtractSettings,
        price: Price | None,
        progress: Progress,
    ) -> None:
        self.store, self.batch, self.provider = store, batch, provider
        self.settings, self.price, self.progress = settings, price, progress
        self.summary = Summary()

    def __call__(self, path: Path, info: BatchInfo) -> set[str] | None:
        """The custom_ids of the file when the batch is not proven ours yet (None otherwise); or UnreadableResults
        naming the batch and the line, with nothing staged."""
        summary = self.summary = Summary()
        parse, settings, price, want_ids = self.provider.parse, self.settings, self.price, not self.batch.proven

        def produce() -> Iterator[list[tuple[Any, ...]] | Summary]:
            found = Summary()
            yield from read_chunks(path, info, parse, settings, price, found, want_ids)
            yield found  # last: what the whole read found

        # A large file is read in a second process (JSON, parse, extractor) while this one writes the ledger.
        parts = worker.items(produce, child=path.stat().st_size >= WORKER_MIN_BYTES)
        staged = 0
        with closing(parts), self.store.staging(), self.progress.task(f"collect {self.batch.id}", info.total) as bar:
            for part in parts:
                if isinstance(part, Summary):
                    summary.lines, summary.twice, summary.ids = part.lines, part.twice, part.ids
                    continue
                self.store.stage_results(part)
                bar.advance(len(part))
                staged += len(part)
                if staged >= APPLY_ROWS and self.batch.proven:
                    # Applied as the reading goes (the reader's process keeps reading): in the same transaction,
                    # so a file found broken at its end leaves nothing applied. Lines of one custom_id stay in
                    # file order (twice=True: checked in each part).
                    self.store.apply_staged(from_batch=self.batch.id, twice=True)
                    staged = 0
        return summary.ids


def expected_results(info: BatchInfo) -> int | None:
    """How many result lines the provider's final counts promise (None when it gives no counts)."""
    return (info.done or 0) + (info.failed or 0) if info.done is not None else None


class Check:
    """Whether a downloaded results file is whole, line by line: every line parses and names a custom_id, a
    custom_id found twice carries the same answer both times, and it answers as many requests as the provider's
    final counts (verdict(); else UnreadableResults naming the batch and the line). Keeps its custom_ids when asked.

    Memory stays flat-ish: one packed (custom_id hash, line hash) int per line, not the ids themselves."""

    def __init__(self, info: BatchInfo, want_ids: bool = False) -> None:
        self.info = info
        self.decode = json.JSONDecoder().decode  # json.loads without its per-call encoding detection
        self.pairs: list[int] = []
        self.ids: set[str] | None = set() if want_ids else None
        self.twice = False  # set by verdict(): a custom_id is on two lines

    @property
    def count(self) -> int:
        return len(self.pairs)

    def line(self, n: int, raw: bytes) -> Any:
        """Line n, decoded (None for a blank line)."""
        line = raw.strip()
        if not line:
            return None
        try:
            item = orjson.loads(line)  # ~2.5x faster than json; what it refuses (a BOM, a lone surrogate) goes on
        except ValueError:
            try:
                text = line.decode()  # UTF-8 (the C codec: utf-8-sig is Python code), a leading BOM dropped
                item = self.decode(text[1:] if text[:1] == "\ufeff" else text)
            except ValueError:
                raise UnreadableResults(f"batch {self.info.id}: results line {n} is not valid JSON") from None
        custom_id = line_id(item)  # custom_id (OpenAI, Anthropic) or key (Gemini)
        if custom_id is None:
            raise UnreadableResults(f"batch {self.info.id}: results line {n} names no custom_id")
        self.pairs.append((hash(custom_id) & _MASK) << 64 | (hash(line) & _MASK))
        if self.ids is not None:
            self.ids.add(custom_id)
        return item

    def verdict(self, path: Path) -> None:
        """UnreadableResults unless the lines seen make a whole file (see the class)."""
        pairs = self.pairs
        pairs.sort()
        distinct, differing = 0, False
        for i, pair in enumerate(pairs):
            if i and pair >> 64 == pairs[i - 1] >> 64:
                differing = differing or pair != pairs[i - 1]
            else:
                distinct += 1
        self.twice = distinct < len(pairs)
        if differing:
            _same_answers(path, self.info)
        expected = expected_results(self.info)
        if expected is not None and distinct < expected:
            raise UnreadableResults(
                f"batch {self.info.id}: the download holds {distinct} of the {expected} results the provider counts"
            )


def _same_answers(path: Path, info: BatchInfo) -> None:
    """Lines of one custom_id that differ byte for byte must still say the same, else UnreadableResults: a
    second, different answer is never applied over a paid one (nor its tokens). Rare: holds every line."""
    first: dict[str, tuple[int, Any]] = {}
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            item = json.loads(raw)
            custom_id = line_id(item)
            line, value = first.setdefault(str(custom_id), (n, item))
            if value != item:
                raise UnreadableResults(
                    f"batch {info.id}: custom_id {custom_id} has two different answers (results lines "
                    f"{line} and {n}): the download is inconsistent and was not used"
                )


@dataclass
class Summary:
    """What a whole read found: its lines, whether a custom_id was on two, its custom_ids when asked."""

    lines: int = 0
    twice: bool = False
    ids: set[str] | None = None


def read_chunks(
    path: Path,
    info: BatchInfo,
    parse: Callable[[Any], Result],
    settings: ExtractSettings,
    price: Price | None,
    summary: Summary,
    want_ids: bool = False,
) -> Iterator[list[tuple[Any, ...]]]:
    """The file's ledger rows (result_row), CHUNK_ROWS at a time; `summary` filled at the end, or UnreadableResults
    (checked as the lines go, then as a whole: a caller uses nothing of an unfinished read)."""
    check = Check(info, want_ids)
    now = time.time()
    rows: list[tuple[Any, ...]] = []
    with _no_gc(), path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            item = check.line(n, raw)
            if item is None:
                continue
            rows.append(result_row(parse(item), settings, price=price, now=now))
            if len(rows) >= CHUNK_ROWS:
                yield rows
                rows = []
    if rows:
        yield rows
    check.verdict(path)
    summary.lines, summary.twice, summary.ids = check.count, check.twice, check.ids


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a loop that makes no cycles (each line's objects go with their
    reference counts): it would otherwise walk every live object again and again, ~10-20% of the loop."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fetch(
    store: Store,
    provider: Provider,
    batch: BatchRow,
    dest: Path,
    read: Callable[[Path, BatchInfo], set[str] | None],
    sleep: poll.Sleep,
    left: Callable[[], float] | None,
    report: CollectReport,
) -> set[str] | None:
    """Read the batch's checked results file (downloaded unless a killed collect left it) with `read`, which checks
    and stages it; returns what read returns, or None when there is nothing to read (no file and no answer
    counted: a batch that failed validation)."""
    info = batch.info()
    if dest.exists():
        # dest only ever appears whole (checked, then renamed): a collect killed after the download reads it
        # again instead of fetching it again.
        try:
            return read(dest, info)
        except UnreadableResults:
            dest.unlink()  # not what a checked download leaves: fetch it again
            raise
    if not (info.output_file_id or info.error_file_id or info.counts_final_only) and not expected_results(info):
        return None
    provider.check_key()
    ids, refetches = _download_checked(store, provider, info, dest, read, sleep, left)
    report.refetches += refetches
    return ids


def _owned(store: Store, batch: BatchRow, ids: set[str] | None, dest: Path, report: CollectReport) -> bool:
    """A batch adopted by time and size only is ours when its results are its shard's requests: proven, or
    released (forgotten, its shard queued again, the attempt not counted)."""
    ours = store.batch_request_ids(batch.id)
    foreign = (ids or set()) - ours
    if ids and not foreign:
        store.prove_batch(batch.id)
        report.proven.append(batch.id)
        return True
    why = (
        f"its results hold {len(foreign)} request(s) that are not in shard {batch.shard_id}"
        if ids
        else "it returned no results to compare with the shard"
    )
    store.release_batch(batch.id, why)
    dest.unlink(missing_ok=True)
    report.released.append(
        f"{batch.id} was matched by creation time and size only and is not this state dir's ({why}): released, "
        "never cancelled; its shard is queued to be sent again"
    )
    return False


def _gone(store: Store, batch: BatchRow, error: ResultsGone, report: CollectReport) -> None:
    """The provider no longer has the batch's results: what has no line becomes `missing` (it may have been
    answered and billed, so only `retry --only missing --yes` sends it again)."""
    message = (
        f"the provider no longer has the results of batch {batch.id} ({error}); it may have been answered and "
        "billed: `hipbatch retry --only missing --yes` sends it again"
    )
    with store.atomic():
        n = store.mark_unanswered(batch.id, RequestState.MISSING, message)
        store.mark_collected(batch.id, note=f"results gone: {error}")
    report.gone.append(f"{batch.id}: {error}; {n} request(s) marked missing (`hipbatch retry --only missing --yes`)")


def _prices(adapters: Adapters) -> PriceTable | None:
    """The price table, to cost each answer as it is recorded; None leaves that to cost.settle()."""
    from hipbatch import cost

    try:
        return cost.load_prices(adapters.config)
    except (HipbatchError, AttributeError):
        return None


def _leftover(info: BatchInfo) -> tuple[str, str]:
    """What a request with no result line in a final batch is, by the batch's status."""
    if info.status in FAILED_STATES:
        reasons = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in info.errors) or "batch failed"
        return RequestState.FAILED, f"batch failed validation: {reasons}"
    if info.status in ("expired", "JOB_STATE_EXPIRED"):
        return RequestState.EXPIRED, "the batch window (24 h; Gemini 48 h) passed before this request ran"
    if info.status in ("cancelled", "cancelling", "canceling", "JOB_STATE_CANCELLED"):
        return RequestState.CANCELED, "the batch was cancelled before this request ran"
    return RequestState.MISSING, "the batch's results hold no line for this request (the provider's counts miss it)"


def _download_checked(
    store: Store,
    provider: Provider,
    info: BatchInfo,
    dest: Path,
    read: Callable[[Path, BatchInfo], set[str] | None],
    sleep: poll.Sleep,
    left: Callable[[], float] | None,
) -> tuple[set[str] | None, int]:
    """Download to a temp file, kept (renamed to dest) only when `read` finds it whole (and has staged it); else
    fetched again under the DOWNLOAD policy, then UnreadableResults. Returns (what read returned, downloads thrown
    away)."""
    part = dest.with_suffix(".part")
    refetches = tries = 0
    try:
        for attempt in poll.attempts(poll.DOWNLOAD, sleep, left=left):
            with attempt:
                tries += 1
                try:
                    info = _with_files(store, provider, info)
                    provider.download(info, part)
                    ids = read(part, info)
                except TransientError:
                    refetches += 1
                    raise
                os.replace(part, dest)
                return ids, refetches
    except TransientError as e:
        named = str(e) if info.id in str(e) else f"batch {info.id}: {e}"
        raise UnreadableResults(f"{named} (after {tries} tr{'y' if tries == 1 else 'ies'})") from e
    finally:
        part.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _with_files(store: Store, provider: Provider, info: BatchInfo) -> BatchInfo:
    """The batch as the provider shows it now when it finished with answers counted but no result file named:
    a completed batch without an output file is "not readable yet", never "no answers"."""
    if info.output_file_id or info.error_file_id or info.counts_final_only or not expected_results(info):
        return info
    fresh = provider.status(info.id)
    store.update_batch(fresh)
    if not (fresh.output_file_id or fresh.error_file_id):
        raise UnreadableResults(
            f"batch {info.id} is {fresh.status} with {expected_results(fresh)} answer(s) counted but names no "
            "output file yet"
        )
    return fresh


def reextract(store: Store, job: str | None = None) -> dict[str, int]:
    """Run the extractor again over stored replies; no network. Returns new counts by state."""
    extractors = _Extractors(store)
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for req in store.stored_replies(job):
        ex = extract(req["reply_text"], req["finish"], extractors(req["job"]))
        state = RequestState.SUCCEEDED if ex.ok else ex.reason
        counts[str(state)] = counts.get(str(state), 0) + 1
        rows.append(
            {
                "custom_id": req["custom_id"],
                "state": state,
                "prompt": ex.prompt,
                "detail": ex.detail or None,
                "method": ex.method,
                "suspect": ",".join(ex.suspects) or None,
                "error_code": None if ex.ok else ex.reason,
                "error_message": None if ex.ok else ex.detail,
            }
        )
        if len(rows) >= 2000:
            store.save_results(rows, keep_success=False)
            rows = []
    store.save_results(rows, keep_success=False)
    store.rebuild_stats(job)  # a full pass anyway: counts of a store an older hipbatch wrote are made right too
    return counts
