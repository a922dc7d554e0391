"""Refresh batch status, read results into the ledger through the extractor, and write the dataset."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hipbatch.errors import HipbatchError, TransientError
from hipbatch.extract import ExtractSettings, extract
from hipbatch.poll import retrying
from hipbatch.progress import NullProgress, Progress
from hipbatch.providers import Provider
from hipbatch.providers.base import iter_jsonl
from hipbatch.records import BatchInfo, Outcome, RequestState, Result
from hipbatch.store import Store

if TYPE_CHECKING:
    from hipbatch.cost import Price, PriceTable
from hipbatch.submit import Adapters, Window, pick_window

QUOTA_CODES = ("token_limit_exceeded",)


@dataclass
class RefreshReport:
    refreshed: int = 0
    requeued: list[str] = field(default_factory=list)  # batches refused for quota, shard queued again
    errors: list[str] = field(default_factory=list)  # status checks that failed (batch left as it was)


def refresh(
    store: Store,
    adapters: Adapters,
    window: Window | Mapping[str, Window] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> RefreshReport:
    """Ask the provider about every unfinished batch; a failed check leaves the batch as it was."""
    report = RefreshReport()
    for batch in store.batches(unfinished_only=True):
        try:
            info = retrying(adapters.get(batch["provider"]).status, batch["id"], sleep=sleep, attempts=4)
        except HipbatchError as e:
            report.errors.append(f"{batch['id']}: {e}")
            continue
        report.refreshed += 1
        quota = info.status == "failed" and any(e.get("code") in QUOTA_CODES for e in info.errors)
        # One transaction: a batch recorded as failed must never be left without its shard requeued.
        with store.atomic():
            store.update_batch(info)
            if quota:
                store.requeue_shard(batch["shard_id"], batch["id"])
        if quota:
            # Over the enqueued-token quota: not the requests' fault. Shard queued again; shrink the window.
            report.requeued.append(batch["id"])
            if window is not None:
                # What is still enqueued is what the quota holds: send no more than that until a batch ends.
                _, in_flight = store.in_flight(batch["provider"], batch["model"])
                pick_window(window, batch["provider"]).refused(batch["model"], in_flight)
        elif window is not None and info.is_final and info.status != "failed":
            # The window grows back by what this batch held at the provider.
            _, tokens = store.shard_size(batch["shard_id"])
            pick_window(window, batch["provider"]).succeeded(batch["model"], tokens)
    return report


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
            row = self.store.job(job) or {}
            try:
                from hipbatch.render import load_template

                self._cache[job] = load_template(Path(row["template_dir"])).extract
            except (HipbatchError, KeyError, TypeError):
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
    store: Store, adapters: Adapters, progress: Progress | None = None, sleep: Callable[[float], None] = time.sleep
) -> CollectReport:
    """Read the results of every finished, uncollected batch into the ledger."""
    progress = progress or NullProgress()
    report = CollectReport()
    extractors = _Extractors(store)
    prices = _prices(adapters)
    results_dir = store.state_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for batch in store.batches_to_collect():
        info = _info_from_row(batch)
        dest = results_dir / f"{batch['id']}.jsonl"
        try:
            provider = adapters.get(batch["provider"])
            # dest only ever appears whole (checked, then renamed): a collect killed after the download
            # reads it again instead of fetching it again.
            remote = info.output_file_id or info.error_file_id or batch["counts_final_only"]
            if remote and not dest.exists():
                provider.check_key()
                report.refetches += _download_checked(provider, info, dest, sleep)
        except HipbatchError as e:
            # Left uncollected, its requests still `submitted`: the next collect fetches it again.
            report.errors.append(f"{batch['id']}: results not read, batch left uncollected: {e}")
            continue
        # One transaction per batch: a batch is read in whole or not at all (a killed collect reads it again),
        # and SQLite writes each touched page once instead of once per chunk: results come in any order.
        with store.atomic(), progress.task(f"collect {batch['id']}", info.total) as bar:
            if dest.exists():
                price = prices.lookup(batch["provider"], batch["model"]) if prices is not None else None
                rows = _outcome_rows(dest, provider, extractors(batch["job"]), price, bar)
                report.lines += store.save_results_staged(rows, from_batch=batch["id"])
            leftover_state, message = _leftover(info)
            store.mark_unanswered(batch["id"], leftover_state, message)
            store.mark_collected(batch["id"])
        report.batches.append(batch["id"])
    return report


def _outcome_rows(
    dest: Path, provider: Provider, settings: ExtractSettings, price: Price | None, bar: Any
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
    if info.status == "failed":
        reasons = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in info.errors) or "batch failed"
        return RequestState.FAILED, f"batch failed validation: {reasons}"
    if info.status == "expired":
        return RequestState.EXPIRED, "the 24 h window passed before this request ran"
    if info.status in ("cancelled", "cancelling", "canceling"):
        return RequestState.CANCELED, "the batch was cancelled before this request ran"
    return RequestState.MISSING, "the provider returned no line for this request"


def _download_checked(
    provider: Provider, info: BatchInfo, dest: Path, sleep: Callable[[float], None], tries: int = 4
) -> int:
    """Download to a temp file; every line must parse and the line count must match, else fetch again."""
    expected = (info.done or 0) + (info.failed or 0) if info.done is not None else None
    part = dest.with_suffix(".part")
    refetches = 0
    for attempt in range(tries):
        try:
            retrying(provider.download, info, part, sleep=sleep)
            count = sum(1 for _ in iter_jsonl(part))
            if expected is not None and count < expected and attempt < tries - 1:
                raise TransientError(f"{info.id}: download has {count} of {expected} lines")
            os.replace(part, dest)
            return refetches
        except (TransientError, ValueError) as e:
            refetches += 1
            if attempt == tries - 1:
                raise TransientError(f"{info.id}: download still incomplete after {tries} tries: {e}") from e
            sleep(min(0.5 * 2**attempt, 10.0))
    return refetches


def _info_from_row(row: dict[str, Any]) -> BatchInfo:
    return BatchInfo(
        id=row["id"],
        status=row["status"],
        is_final=bool(row["is_final"]),
        total=row["total"],
        done=row["done"],
        failed=row["failed"],
        counts_final_only=bool(row["counts_final_only"]),
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        errors=json.loads(row["errors"]) if row["errors"] else [],
    )


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
                "error_code": None if ex.ok else ex.reason,
                "error_message": None if ex.ok else ex.detail,
            }
        )
        if len(rows) >= 2000:
            store.save_results(rows, keep_success=False)
            rows = []
    store.save_results(rows, keep_success=False)
    return counts


# ---- the dataset ----------------------------------------------------------------------------------


def write_dataset(store: Store, output: Path, fmt: str = "json", job: str | None = None) -> int:
    """Write the dataset atomically (temp file + rename), streamed from the store; returns records."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*.part"):
        stale.unlink(missing_ok=True)  # left by a killed run; callers hold the state-dir lock
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    n = 0
    try:
        with part.open("w", encoding="utf-8") as fh:
            if fmt == "json":
                fh.write("[")
            for text in _record_lines(store, job):
                if fmt == "json":
                    fh.write(("\n  " if n == 0 else ",\n  ") + text)
                else:
                    fh.write(text + "\n")
                n += 1
            if fmt == "json":
                fh.write("\n]\n" if n else "]\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, output)
    finally:
        part.unlink(missing_ok=True)
    return n


def record_json(record: dict[str, Any]) -> str:
    """json.dumps(record, ensure_ascii=False), with strings escaped directly (the dataset's hot loop)."""
    parts = []
    for key, value in record.items():
        text = encode_basestring(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(f"{encode_basestring(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _record_lines(store: Store, job: str | None) -> Iterator[str]:
    """record_json of each record, without a dict per record: the columns that repeat (provider, model,
    job, via) are encoded once per combination."""
    tails: dict[tuple[Any, ...], str] = {}
    for job_name, file_name, prompt, custom_id, provider, model, via in store.dataset_tuples(job):
        key = (provider, model, job_name, via)
        tail = tails.get(key)
        if tail is None:
            tail = tails[key] = record_json(
                {"provider": provider, "model": model, "job": job_name, "via": via or "batch"}
            )[1:]
        yield (
            f'{{"file_name": {_value(file_name)}, "english_prompt": {_value(prompt)}, '
            f'"custom_id": {_value(custom_id)}, {tail}'
        )


def _value(value: Any) -> str:
    return encode_basestring(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def cancel_batches(store: Store, adapters: Adapters, batch_ids: list[str]) -> list[BatchInfo]:
    """Ask the provider to cancel these batches; partial results are collected later like any other."""
    out = []
    for batch_id in batch_ids:
        row = store.batch(batch_id)
        if row is None:
            raise HipbatchError(f"batch {batch_id}: not in this state dir (see `hipbatch status`)")
        info = retrying(adapters.get(row["provider"]).cancel, batch_id)
        store.update_batch(info)
        out.append(info)
    return out
