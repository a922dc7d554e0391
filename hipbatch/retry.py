"""Retry and cancel: requests with no good answer go into new shards (their lines copied, streamed, from
the shards they were sent in) and are sent again; unfinished batches are cancelled at the provider.

Crash safety: a retry shard is written to disk first and recorded, with its requests moved into it, in one
transaction; a killed retry leaves either the old states (the next retry picks them again) or a queued
shard (the next retry, submit or collect sends it). Attempts are counted when a batch is attached.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch.collect import cancel_batches
from hipbatch.errors import AmbiguousSubmit, HipbatchError, UsageError
from hipbatch.pack import Shard, ShardWriter
from hipbatch.poll import retrying
from hipbatch.records import RETRYABLE, ShardState
from hipbatch.store import Store
from hipbatch.submit import Adapters, FeedReport, Window, _look_for_batch, _safe, feed


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


class _Packer:
    """New shards for one (job, provider, model, endpoint) group, recorded as soon as each is closed."""

    def __init__(
        self, store: Store, shard: dict[str, Any], max_requests: int, max_bytes: int, report: RetryReport
    ) -> None:
        self.store, self.report = store, report
        self.group = {k: shard[k] for k in ("job", "provider", "model", "endpoint")}
        job = _safe(str(shard["job"]))
        prefix = f"{job[:40]}-{store.next_shard_number():06d}-retry"
        self.writer = ShardWriter(store.state_dir / "shards" / job, prefix, max_requests, max_bytes)

    def add(self, line: bytes, row: dict[str, Any]) -> None:
        closed = self.writer.add(line, {"custom_id": row["custom_id"]}, int(row["est_input_tokens"] or 0))
        state = str(row["state"])
        self.report.selected[state] = self.report.selected.get(state, 0) + 1
        self.report.requests += 1
        if closed is not None:
            self._record(closed)

    def finish(self) -> None:
        closed = self.writer.close()
        if closed is not None:
            self._record(closed)

    def _record(self, shard: Shard) -> None:
        self.store.move_requests_to_shard(
            sorted(shard.ids),
            {
                **self.group,
                "key": shard.key,
                "path": str(shard.path),
                "n_requests": shard.n_requests,
                "n_bytes": shard.n_bytes,
                "est_tokens": shard.est_tokens,
            },
        )
        self.report.shards.append(str(shard.path))


def requeue_for_retry(
    store: Store,
    adapters: Adapters,
    reasons: Iterable[str] = RETRYABLE,
    max_attempts: int | None = None,
    job: str | None = None,
) -> RetryReport:
    """Put the requests in these states into new queued shards; nothing is sent here."""
    reasons = [str(r) for r in reasons]
    unknown = sorted(set(reasons) - {str(s) for s in RETRYABLE})
    if unknown:
        raise UsageError(f"--only {unknown[0]}: not a retry reason; use any of {', '.join(str(s) for s in RETRYABLE)}")
    report = RetryReport(reasons=reasons)
    # Only the selected requests are held (custom_id -> row, grouped by the shard they were sent in); the
    # shard files themselves are streamed line by line.
    wanted: dict[int | None, dict[str, dict[str, Any]]] = {}
    for row in store.requests_in_states(reasons, job):
        if max_attempts is not None and int(row["attempts"] or 0) >= max_attempts:
            report.skipped_max_attempts += 1
            continue
        wanted.setdefault(row["shard_id"], {})[row["custom_id"]] = row
    old_shards: dict[int, dict[str, Any]] = {}
    for shard_id in wanted:
        if shard_id is not None:
            try:
                old_shards[shard_id] = store.shard(shard_id)
            except KeyError:
                pass
    # A retry shard is no bigger than the biggest shard it takes requests from (--max-requests-per-batch).
    caps: dict[tuple[str, ...], int] = {}
    for shard in old_shards.values():
        group = (shard["job"], shard["provider"], shard["model"], shard["endpoint"])
        caps[group] = max(caps.get(group, 1), int(shard["n_requests"] or 1))
    packers: dict[tuple[str, ...], _Packer] = {}
    for shard_id in sorted(wanted, key=lambda s: -1 if s is None else s):
        rows = wanted.pop(shard_id)
        shard = old_shards.get(shard_id) if shard_id is not None else None
        if shard is None:
            report.unreadable.extend(sorted(rows))
            continue
        group = (shard["job"], shard["provider"], shard["model"], shard["endpoint"])
        if group not in packers:
            provider = adapters.get(shard["provider"])
            cap = min(caps[group], provider.max_requests)
            packers[group] = _Packer(store, shard, cap, provider.max_bytes, report)
        _copy_lines(Path(shard["path"]), rows, packers[group])
        report.unreadable.extend(sorted(rows))  # whatever the file did not hold
    for packer in packers.values():
        packer.finish()
    return report


def _copy_lines(path: Path, rows: dict[str, dict[str, Any]], packer: _Packer) -> None:
    """Stream one shard file, handing the lines of `rows` to the packer (found ones are popped)."""
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
                custom_id = json.loads(raw).get("custom_id")
            except ValueError:
                continue
            row = rows.pop(custom_id, None) if isinstance(custom_id, str) else None
            if row is not None:
                packer.add(raw if raw.endswith(b"\n") else raw + b"\n", row)


def retry(
    store: Store,
    adapters: Adapters,
    reasons: Iterable[str] = RETRYABLE,
    max_attempts: int | None = None,
    job: str | None = None,
    window: Window | None = None,
    force: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> RetryReport:
    """Resubmit, in new batches, the requests with no good answer (requests with one are never touched)."""
    report = requeue_for_retry(store, adapters, reasons, max_attempts, job)
    report.feed = feed(store, adapters, window, force=force, sleep=sleep)
    return report


# ---- cancel ---------------------------------------------------------------------------------------


@dataclass
class CancelReport:
    """What `cancel` asked for and what the providers answered."""

    cancelled: list[dict[str, Any]] = field(default_factory=list)  # {"batch_id", "status"}
    already_final: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)  # orphans of killed submits, found and cancelled too
    unqueued_shards: int = 0  # local shards never sent, taken out of the queue
    unqueued_requests: int = 0


def cancel_targets(store: Store, batch_ids: list[str] | None, job: str | None = None) -> list[dict[str, Any]]:
    """The batches `cancel` acts on: the ids given (UsageError on an unknown one) or every unfinished one."""
    if not batch_ids:
        return store.batches(job=job, unfinished_only=True)
    rows = []
    for batch_id in batch_ids:
        row = store.batch(batch_id)
        if row is None:
            raise UsageError(f"BATCH_ID {batch_id}: not a batch of this state dir (see `hipbatch status`)")
        rows.append(row)
    return rows


def cancel(
    store: Store,
    adapters: Adapters,
    batch_ids: list[str] | None = None,
    job: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> CancelReport:
    """Cancel batches at the provider (results already produced are collected later like any other).

    Without ids, everything unfinished stops: shards still in the local queue are taken out (their requests
    become `canceled`, so `retry` can send them later), the batch of a killed submit is found and adopted,
    then every unfinished batch is cancelled.
    """
    report = CancelReport()
    if not batch_ids:
        _adopt_orphans(store, adapters, job, report, sleep)
        report.unqueued_shards, report.unqueued_requests = store.cancel_queued_shards(job)
    for row in cancel_targets(store, batch_ids, job):
        if row["is_final"]:
            report.already_final.append(row["id"])
            continue
        try:
            info = cancel_batches(store, adapters, [row["id"]])[0]
            report.cancelled.append({"batch_id": info.id, "status": info.status})
        except HipbatchError as e:
            # Most often the batch ended meanwhile; the next status or collect sees its real state.
            report.errors.append(f"{row['id']}: {e}")
            try:
                store.update_batch(retrying(adapters.get(row["provider"]).status, row["id"], sleep=sleep, attempts=3))
            except HipbatchError:
                pass
    return report


def _adopt_orphans(
    store: Store, adapters: Adapters, job: str | None, report: CancelReport, sleep: Callable[[float], None]
) -> None:
    """Shards whose create was interrupted: adopt the batch if the provider has one, else mark them unsent."""
    for shard in store.shards_in_states([ShardState.CREATING]):
        if job and shard["job"] != job:
            continue
        tag = {"hipbatch_shard": shard["key"], "hipbatch_job": str(shard["job"])[:500]}
        try:
            provider = adapters.get(shard["provider"])
            provider.check_key()
            found = _look_for_batch(store, provider, shard, tag, sleep)
        except AmbiguousSubmit as e:
            report.errors.append(str(e))
            continue
        except HipbatchError as e:
            report.errors.append(f"shard {Path(shard['path']).name}: {e}")
            continue
        if found is not None:
            store.attach_batch(shard, found, adopted=True)
            report.adopted.append(found.id)
        else:
            # We hold the state-dir lock, so no create is in flight: no batch exists for this shard.
            store.update_shard(shard["id"], state=ShardState.UPLOADED)
