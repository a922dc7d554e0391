"""Retry: requests with no good answer go into new shards (their lines copied, streamed, from the shards they
were sent in) and are sent again.

Crash safety: a retry shard is written to disk first and recorded, with its requests moved into it, in one
transaction; a killed retry leaves either the old states (the next retry picks them again) or a queued
shard (the next retry, submit or collect sends it). Attempts are counted when a batch is attached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch import poll
from hipbatch.errors import UsageError
from hipbatch.pack import LineEncoder, Shard, ShardWriter, safe_name, shard_prefix
from hipbatch.providers.base import line_id
from hipbatch.providers.registry import Adapters
from hipbatch.queue import Window
from hipbatch.records import RETRY_DEFAULT, RETRYABLE, RequestState, ShardRow
from hipbatch.store import Store
from hipbatch.submit import FeedReport, feed

#: A group of requests that may share one batch: (job, provider, model, endpoint).
Group = tuple[str, str, str, str]


@dataclass
class RetryReport:
    """What `retry` selected, packed and sent."""

    reasons: list[str]
    selected: dict[str, int] = field(default_factory=dict)  # requests put in new shards, by their state
    requests: int = 0
    skipped_max_attempts: int = 0  # requests that already had --max-attempts attempts
    unreadable: list[str] = field(default_factory=list)  # requests whose original line could not be found
    shards: list[str] = field(default_factory=list)
    feed: FeedReport | None = None
    max_tokens: int | None = None  # --max-tokens: truncated requests go again as new requests with it
    renewed: int = 0  # truncated requests sent as new requests (new custom_id) with max_tokens
    missing_left: int = 0  # `missing` requests not resent (not asked for with --only missing --yes)


class Renewer:
    """--max-tokens: a truncated request's line rebuilt with the new max_tokens, under its new custom_id (the
    same recipe as a rendered request: provider, endpoint, model, params, messages)."""

    def __init__(self, adapters: Adapters, max_tokens: int, known: Callable[[list[str]], set[str]]) -> None:
        self.adapters, self.max_tokens, self.known = adapters, max_tokens, known
        self.renamed: dict[str, str] = {}  # new custom_id -> the old one, until its shard is recorded
        self._encoders: dict[tuple[str, str, str], LineEncoder] = {}

    def renew(self, provider: str, line: dict[str, Any]) -> tuple[str, bytes] | None:
        """(new custom_id, line), or None when the new request would be the same or is already in the store."""
        adapter = self.adapters.get(provider)
        model, params, system, user = adapter.request_parts(line)
        params = {**params, "max_tokens": self.max_tokens}
        key = (provider, model, json.dumps(sorted(params.items()), default=str))
        encoder = self._encoders.setdefault(key, LineEncoder(adapter, model, params))
        custom_id, new_line = encoder.encode(system, user)
        if custom_id == line_id(line) or custom_id in self.renamed or self.known([custom_id]):
            return None
        self.renamed[custom_id] = str(line_id(line))
        return custom_id, new_line


def _group(shard: ShardRow) -> Group:
    return (shard.job, shard.provider, shard.model, shard.endpoint)


def _writer(
    store: Store, shard: ShardRow, max_requests: int, max_bytes: int, report: RetryReport, renewer: Renewer | None
) -> ShardWriter:
    """The packer of one group's retry shards: each is recorded, its requests moved into it (or, renewed with
    --max-tokens, new requests made in it for the same files), once closed."""
    job, provider, model, endpoint = _group(shard)
    renamed = renewer.renamed if renewer is not None else {}

    def record(new: Shard) -> None:
        row: dict[str, Any] = {"job": job, "provider": provider, "model": model, "endpoint": endpoint, "key": new.key}
        row.update(path=str(new.path), n_requests=new.n_requests, n_bytes=new.n_bytes, est_tokens=new.est_tokens)
        fresh = {cid: renamed.pop(cid) for cid in sorted(new.ids) if cid in renamed}
        moved = sorted(new.ids - fresh.keys())
        store.move_requests_to_shard(moved, row, renewed=fresh, max_tokens=report.max_tokens)
        report.shards.append(str(new.path))

    directory = store.state_dir / "shards" / safe_name(job)
    prefix = shard_prefix(job, store.next_shard_number(), "-retry")
    return ShardWriter(directory, prefix, max_requests, max_bytes, on_close=record)


def _selected(
    store: Store, reasons: list[str], max_attempts: int | None, job: str | None, report: RetryReport
) -> dict[int | None, dict[str, dict[str, Any]]]:
    """The requests to send again, grouped by the shard they were sent in (custom_id -> row)."""
    wanted: dict[int | None, dict[str, dict[str, Any]]] = {}
    for row in store.requests_in_states(reasons, job):
        if max_attempts is not None and int(row["attempts"] or 0) >= max_attempts:
            report.skipped_max_attempts += 1
            continue
        wanted.setdefault(row["shard_id"], {})[row["custom_id"]] = row
    return wanted


def requeue_for_retry(
    store: Store,
    adapters: Adapters,
    reasons: Iterable[str] = RETRY_DEFAULT,
    max_attempts: int | None = None,
    job: str | None = None,
    max_tokens: int | None = None,
) -> RetryReport:
    """Put the requests in these states into new queued shards (truncated ones renewed with max_tokens, if
    given); nothing is sent here."""
    reasons = [str(r) for r in reasons]
    unknown = sorted(set(reasons) - {str(s) for s in RETRYABLE})
    if unknown:
        raise UsageError(f"--only {unknown[0]}: not a retry reason; use any of {', '.join(str(s) for s in RETRYABLE)}")
    report = RetryReport(reasons=reasons, max_tokens=max_tokens)
    renewer = Renewer(adapters, max_tokens, store.known_ids) if max_tokens is not None else None
    if RequestState.MISSING not in reasons:
        report.missing_left = store.request_counts(job).get(RequestState.MISSING, 0)
    # Only the selected requests are held; the shard files themselves are streamed line by line.
    wanted = _selected(store, reasons, max_attempts, job, report)
    old: dict[int, ShardRow] = {}
    for shard_id in wanted:
        if shard_id is not None:
            try:
                old[shard_id] = store.shard(shard_id)
            except KeyError:
                pass
    # A retry shard is no bigger than the biggest shard it takes requests from (--max-requests-per-batch).
    caps: dict[Group, int] = {}
    for shard in old.values():
        caps[_group(shard)] = max(caps.get(_group(shard), 1), shard.n_requests or 1)
    writers: dict[Group, ShardWriter] = {}
    for shard_id in sorted(wanted, key=lambda s: -1 if s is None else s):
        rows = wanted.pop(shard_id)
        source = old.get(shard_id) if shard_id is not None else None
        if source is None:
            report.unreadable.extend(sorted(rows))
            continue
        group = _group(source)
        if group not in writers:
            provider = adapters.get(source.provider)
            cap = min(caps[group], provider.max_requests)
            writers[group] = _writer(store, source, cap, provider.max_bytes, report, renewer)
        _copy_lines(Path(source.path), rows, writers[group], report, renewer, source.provider)
        report.unreadable.extend(sorted(rows))  # whatever the file did not hold
    for writer in writers.values():
        writer.close()
    return report


def _copy_lines(
    path: Path,
    rows: dict[str, dict[str, Any]],
    writer: ShardWriter,
    report: RetryReport,
    renewer: Renewer | None = None,
    provider: str = "",
) -> None:
    """Stream one shard file, handing the lines of `rows` to the writer (found ones are popped); a truncated
    request is renewed (new line, new custom_id) when the renewer says so."""
    try:
        fh = path.open("rb")
    except OSError:
        return
    with fh:
        for raw in fh:
            if not rows:
                break
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                custom_id = line_id(line)
            except ValueError:
                continue
            row = rows.pop(custom_id, None) if custom_id is not None else None
            if row is None or custom_id is None:
                continue
            renewed = None
            if renewer is not None and row["state"] == RequestState.TRUNCATED:
                renewed = renewer.renew(provider, line)
            new_id, new_line = renewed or (custom_id, raw if raw.endswith(b"\n") else raw + b"\n")
            writer.add(new_line, new_id, int(row["est_input_tokens"] or 0))
            report.renewed += renewed is not None
            state = str(row["state"])
            report.selected[state] = report.selected.get(state, 0) + 1
            report.requests += 1


def retry(
    store: Store,
    adapters: Adapters,
    reasons: Iterable[str] = RETRY_DEFAULT,
    max_attempts: int | None = None,
    job: str | None = None,
    window: Window | Mapping[str, Window] | None = None,
    force: bool = False,
    sleep: poll.Sleep = time.sleep,
    max_tokens: int | None = None,
) -> RetryReport:
    """Resubmit, in new batches, the requests with no good answer (requests with one are never touched)."""
    report = requeue_for_retry(store, adapters, reasons, max_attempts, job, max_tokens)
    report.feed = feed(store, adapters, window, force=force, sleep=sleep)
    return report
