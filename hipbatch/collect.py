"""Collect: download the results of finished batches (checked: complete and parsable, or fetched again), read
every line through the extractor into the ledger, and run the extractor again over stored replies."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hipbatch import poll
from hipbatch.errors import HipbatchError, TransientError
from hipbatch.extract import ExtractSettings, extract
from hipbatch.progress import NullProgress, Progress, Task
from hipbatch.providers import Provider
from hipbatch.providers.base import iter_jsonl
from hipbatch.providers.registry import Adapters
from hipbatch.records import BatchInfo, Outcome, RequestState, Result
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


def outcome_row(
    result: Result, settings: ExtractSettings, via: str = "batch", price: Price | None = None
) -> dict[str, Any]:
    """The ledger columns for one result, after the extractor.

    cost_usd is set, never added, from the tokens just set: by `price` when the model's price is known (as
    cost.settle() would), else NULL for cost.settle() to fill in.
    """
    row: dict[str, Any] = {
        "custom_id": result.custom_id,
        "via": via,
        "answered_at": time.time(),
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "cache_read_tokens": result.cache_read_tokens,
        "cache_write_tokens": result.cache_write_tokens,
        "error_code": result.error_code,
        "error_message": result.error_message,
        "cost_usd": None
        if price is None
        else price.cost(
            result.input_tokens or 0,
            result.output_tokens or 0,
            result.cache_read_tokens or 0,
            result.cache_write_tokens or 0,
            live=via == "live",
        ),
    }
    if result.outcome is Outcome.SUCCEEDED:
        ex = extract(result.text, result.finish, settings)
        row.update(
            state=RequestState.SUCCEEDED if ex.ok else ex.reason,
            reply_text=result.text,
            finish=result.finish,
            prompt=ex.prompt,
            detail=ex.detail or None,
            method=ex.method,
            suspect=",".join(ex.suspects) or None,
        )
        if not ex.ok:
            row.update(error_code=ex.reason, error_message=ex.detail)
    else:
        row["state"] = {
            Outcome.ERRORED: RequestState.FAILED,
            Outcome.EXPIRED: RequestState.EXPIRED,
            Outcome.CANCELED: RequestState.CANCELED,
        }[result.outcome]
    return row


def collect_batches(
    store: Store, adapters: Adapters, progress: Progress | None = None, sleep: poll.Sleep = poll.REAL_CLOCK.sleep
) -> CollectReport:
    """Read the results of every finished, uncollected batch into the ledger."""
    progress = progress or NullProgress()
    report = CollectReport()
    extractors = _Extractors(store)
    prices = _prices(adapters)
    results_dir = store.state_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for batch in store.batches_to_collect():
        info = batch.info()
        dest = results_dir / f"{batch.id}.jsonl"
        try:
            provider = adapters.get(batch.provider)
            # dest only ever appears whole (checked, then renamed): a collect killed after the download
            # reads it again instead of fetching it again.
            if (info.output_file_id or info.error_file_id or info.counts_final_only) and not dest.exists():
                provider.check_key()
                report.refetches += _download_checked(provider, info, dest, sleep)
        except HipbatchError as e:
            # Left uncollected, its requests still `submitted`: the next collect fetches it again.
            report.errors.append(f"{batch.id}: results not read, batch left uncollected: {e}")
            continue
        # One transaction per batch: a batch is read in whole or not at all (a killed collect reads it again),
        # and SQLite writes each touched page once instead of once per chunk: results come in any order.
        with store.atomic(), progress.task(f"collect {batch.id}", info.total) as bar:
            if dest.exists():
                price = prices.lookup(batch.provider, batch.model) if prices is not None else None
                rows = _outcome_rows(dest, provider, extractors(batch.job), price, bar)
                report.lines += store.save_results_staged(rows, from_batch=batch.id)
            leftover_state, message = _leftover(info)
            store.mark_unanswered(batch.id, leftover_state, message)
            store.mark_collected(batch.id)
        report.batches.append(batch.id)
    return report


def _outcome_rows(
    dest: Path, provider: Provider, settings: ExtractSettings, price: Price | None, bar: Task
) -> Iterator[dict[str, Any]]:
    """The ledger rows of a downloaded results file, streamed; the progress bar moves every 2,000."""
    n = 0
    for line in iter_jsonl(dest):
        yield outcome_row(provider.parse(line), settings, price=price)
        n += 1
        if n % 2000 == 0:
            bar.advance(2000)
    bar.advance(n % 2000)


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
    return RequestState.MISSING, "the provider returned no line for this request"


def _download_checked(provider: Provider, info: BatchInfo, dest: Path, sleep: poll.Sleep) -> int:
    """Download to a temp file; every line must parse and the line count must match, else fetch again.
    Returns how many downloads were thrown away."""
    expected = (info.done or 0) + (info.failed or 0) if info.done is not None else None
    part = dest.with_suffix(".part")
    refetches = 0
    try:
        for attempt in poll.attempts(poll.DOWNLOAD, sleep, retry_on=(TransientError, ValueError)):
            with attempt:
                try:
                    provider.download(info, part)
                    count = sum(1 for _ in iter_jsonl(part))
                    last = attempt.retry_state.attempt_number >= poll.DOWNLOAD.attempts
                    if expected is not None and count < expected and not last:
                        raise TransientError(f"{info.id}: download has {count} of {expected} lines")
                except (TransientError, ValueError):
                    refetches += 1
                    raise
                os.replace(part, dest)
    except (TransientError, ValueError) as e:
        raise TransientError(f"{info.id}: download still incomplete after {poll.DOWNLOAD.attempts} tries: {e}") from e
    return refetches


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
    return counts
