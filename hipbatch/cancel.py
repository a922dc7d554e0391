"""Cancel: stop unfinished batches at the provider and take unsent shards out of the local queue; what the
batches finished is collected later like any other result, and `retry --only canceled` sends the rest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hipbatch import poll
from hipbatch.errors import AmbiguousSubmit, AuthFailed, HipbatchError, UsageError
from hipbatch.providers.registry import Adapters
from hipbatch.records import BatchInfo, BatchRow, ShardState
from hipbatch.store import Store
from hipbatch.submit import look_for_batch


@dataclass
class CancelReport:
    """What `cancel` asked for and what the providers answered."""

    cancelled: list[dict[str, Any]] = field(default_factory=list)  # {"batch_id", "status"}
    already_final: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)  # orphans of killed submits, found and cancelled too
    unqueued_shards: int = 0  # local shards never sent, taken out of the queue
    unqueued_requests: int = 0
    unproven: list[str] = field(default_factory=list)  # adopted by time and size only: never cancelled


def cancel_targets(store: Store, batch_ids: list[str] | None, job: str | None = None) -> list[BatchRow]:
    """The batches `cancel` acts on: the ids given (UsageError on an unknown one) or every unfinished one that
    the store created or proved its own (a batch adopted by time and size only may be another state dir's)."""
    if not batch_ids:
        return [b for b in store.batches(job=job, unfinished_only=True) if b.proven]
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
    sleep: poll.Sleep = time.sleep,
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
    report.unproven = [b.id for b in store.batches(job=job, unfinished_only=True) if not b.proven]
    for row in cancel_targets(store, batch_ids, job):
        if row.is_final:
            report.already_final.append(row.id)
            continue
        if not row.proven:
            continue  # named on the command line: still not ours to cancel until its results prove it
        try:
            info = _cancel_one(store, adapters, row, sleep)
            report.cancelled.append({"batch_id": info.id, "status": info.status})
        except AuthFailed:
            raise
        except HipbatchError as e:
            # Most often the batch ended meanwhile; the next status or collect sees its real state.
            report.errors.append(f"{row.id}: {e}")
            try:
                status = adapters.get(row.provider).status
                store.update_batch(poll.retrying(status, row.id, rule=poll.CANCEL, sleep=sleep))
            except HipbatchError:
                pass
    return report


def _cancel_one(store: Store, adapters: Adapters, row: BatchRow, sleep: poll.Sleep) -> BatchInfo:
    """Ask the provider to cancel one batch; partial results are collected later like any other."""
    info = poll.retrying(adapters.get(row.provider).cancel, row.id, rule=poll.CANCEL, sleep=sleep)
    store.update_batch(info)
    return info


def _adopt_orphans(store: Store, adapters: Adapters, job: str | None, report: CancelReport, sleep: poll.Sleep) -> None:
    """Shards whose create was interrupted: adopt the batch if the provider has one, else mark them unsent."""
    for shard in store.shards_in_states([ShardState.CREATING], job):
        try:
            provider = adapters.get(shard.provider)
            provider.check_key()
            found = look_for_batch(store, provider, shard, sleep)
        except AmbiguousSubmit as e:
            report.errors.append(str(e))
            continue
        except AuthFailed:
            raise
        except HipbatchError as e:
            report.errors.append(f"shard {shard.name}: {e}")
            continue
        if found is not None:
            store.attach_batch(shard, found, adopted=True)
            report.adopted.append(found.id)
        else:
            # We hold the state-dir lock, so no create is in flight: no batch exists for this shard.
            store.update_shard(shard.id, state=ShardState.UPLOADED)
