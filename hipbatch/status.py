"""Where every batch stands: status checks at the provider (refresh), and the figures `status` shows per job
(requests done / failed / in flight / queued, cost so far and committed) and per batch (expiry, top error)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hipbatch import poll
from hipbatch.cost import money
from hipbatch.errors import AuthFailed, HipbatchError
from hipbatch.providers.registry import Adapters
from hipbatch.queue import Window, pick_window
from hipbatch.records import RETRYABLE, BatchRow, RequestState
from hipbatch.store import Store

#: Batch-level error codes meaning "over the enqueued-token quota": the shard goes back to the queue.
QUOTA_CODES = ("token_limit_exceeded", "RESOURCE_EXHAUSTED")  # OpenAI's word, Gemini's
#: A batch status meaning "the provider refused the batch as a whole" (OpenAI, Gemini).
FAILED_STATES = ("failed", "JOB_STATE_FAILED")
IN_FLIGHT = (RequestState.PENDING, RequestState.SUBMITTED)


@dataclass
class RefreshReport:
    refreshed: int = 0
    requeued: list[str] = field(default_factory=list)  # batches refused for quota, shard queued again
    errors: list[str] = field(default_factory=list)  # status checks that failed (batch left as it was)


def refresh(
    store: Store,
    adapters: Adapters,
    window: Window | Mapping[str, Window] | None = None,
    sleep: poll.Sleep = poll.REAL_CLOCK.sleep,
) -> RefreshReport:
    """Ask the provider about every unfinished batch; a failed check leaves the batch as it was."""
    report = RefreshReport()
    for batch in store.batches(unfinished_only=True):
        try:
            info = poll.retrying(adapters.get(batch.provider).status, batch.id, rule=poll.STATUS, sleep=sleep)
        except AuthFailed:
            raise  # every other check would be refused too: the command ends
        except HipbatchError as e:
            report.errors.append(f"{batch.id}: {e}")
            continue
        report.refreshed += 1
        quota = info.status in FAILED_STATES and any(e.get("code") in QUOTA_CODES for e in info.errors)
        # One transaction: a batch recorded as failed must never be left without its shard requeued.
        with store.atomic():
            store.update_batch(info)
            if quota:
                store.requeue_shard(batch.shard_id, batch.id)
        if quota:
            # Over the enqueued-token quota: not the requests' fault. Shard queued again; shrink the window.
            report.requeued.append(batch.id)
            if window is not None:
                # What is still enqueued is what the quota holds: send no more than that until a batch ends.
                _, in_flight = store.in_flight(batch.provider, batch.model)
                pick_window(window, batch.provider).refused(batch.model, in_flight)
        elif window is not None and info.is_final and info.status not in FAILED_STATES:
            # The window grows back by what this batch held at the provider.
            _, tokens = store.shard_size(batch.shard_id)
            pick_window(window, batch.provider).succeeded(batch.model, tokens)
    return report


def batch_rows(store: Store, job: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """One row per batch for `status` (and `status --json`), with its expiry, top error and job summary."""
    now = time.time() if now is None else now
    batches = store.batches(job=job)
    figures, summaries = batch_figures(store, batches, now), job_summaries(store, job)
    rows = []
    for b in batches:
        created = b.created_at or now
        rows.append(
            {
                "job": b.job,
                "batch_id": b.id,
                "provider": b.provider,
                "model": b.model,
                "status": b.status,
                "is_final": b.is_final,
                "done": b.done,
                "failed": b.failed,
                "total": b.total,
                "counts_final_only": b.counts_final_only,
                "created_at": b.created_at,
                "age_seconds": round(now - created, 1),
                "expires_at": b.expires_at,
                "collected": b.collected,
                "read_error": b.read_error,
                "read_attempts": b.read_attempts,
                "proven": b.proven,
                **figures.get(b.id, {}),
                "job_summary": summaries.get(b.job),
            }
        )
    return rows


_COUNTS = ("requests", "done", "failed", "in_flight", "queued", "superseded", "final", "n_cost", "open", "n_committed")
_COUNTED_AS: dict[str, str] = {
    RequestState.SUCCEEDED: "done",
    RequestState.SUBMITTED: "in_flight",
    RequestState.PENDING: "queued",
}


def job_summaries(store: Store, job: str | None = None) -> dict[str, dict[str, Any]]:
    """Per job: current requests (what the dataset holds: one per file) done / failed / in flight / queued; the
    superseded ones apart (replaced by newer requests for their files: a changed file, retry --max-tokens); the
    money spent and still committed (all of it)."""
    sums: dict[str, dict[str, Any]] = {}
    for name, state, current, n, cost, n_cost, committed, n_committed in store.job_state_sums(job):
        s = sums.setdefault(name, {**dict.fromkeys(_COUNTS, 0), "cost": 0.0, "committed": 0.0, "states": {}})
        if current:
            s["requests"] += n
            s["states"][state] = n
            key = _COUNTED_AS.get(state) or ("failed" if state in RETRYABLE else None)
            if key:
                s[key] += n
        else:
            s["superseded"] += n
        s["cost"] += cost or 0.0
        if state in IN_FLIGHT:  # money is counted for every request, current or not
            s["committed"] += committed or 0.0
            s["n_committed"] += n_committed
            s["open"] += n
        else:
            s["final"] += n
            s["n_cost"] += n_cost
    for name, *_, cost in store.superseded_sums(job):
        if name in sums:
            sums[name]["cost"] += cost  # paid answers asked again count too
    return {name: _summary(sums[name]) for name in sorted(sums)}


def _summary(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": s["requests"],
        "done": s["done"],
        "failed": s["failed"],
        "in_flight": s["in_flight"],
        "queued": s["queued"],
        "superseded": s["superseded"],  # old requests no file points at (their cost still counts)
        # None when an answered request has no price yet (unknown model, or not settled)
        "cost_usd": money(s["cost"]) if s["n_cost"] >= s["final"] else None,
        "committed_usd": money(s["committed"]) if s["n_committed"] >= s["open"] else None,
        "states": dict(sorted(s["states"].items())),  # current requests per ledger state
    }


def batch_figures(store: Store, batches: list[BatchRow], now: float | None = None) -> dict[str, dict[str, Any]]:
    """Per batch: seconds to expiry while it runs, and the most common failure reason."""
    now = time.time() if now is None else now
    tops = _request_errors(store)
    out: dict[str, dict[str, Any]] = {}
    for b in batches:
        expires = b.expires_at
        out[b.id] = {
            "expires_in_seconds": round(expires - now, 1) if expires and not b.is_final else None,
            "top_error": tops.get(b.id) or _batch_error(b),
        }
    return out


def _request_errors(store: Store) -> dict[str, dict[str, Any]]:
    """The most common failure reason of each batch's requests."""
    best: dict[str, tuple[int, str, str | None]] = {}
    for batch_id, state, code, n in store.batch_failure_counts():
        seen = best.get(batch_id)
        if seen is None or (n, seen[1]) > (seen[0], state):  # most requests first, then state name
            best[batch_id] = (n, state, code)
    out = {}
    for batch_id, (n, state, code) in best.items():
        reason = state if not code or code == state else f"{state}:{code}"
        out[batch_id] = {"reason": reason, "count": n, "message": store.failure_message(state, batch_id, code)}
    return out


def _batch_error(b: BatchRow) -> dict[str, Any] | None:
    if b.read_error and not b.collected:  # finished, results not readable yet: fetched again by `collect`
        why = b.read_error.removeprefix(f"batch {b.id}: ")
        return {"reason": "results not read", "count": b.total, "message": f"{b.read_attempts} collect(s): {why}"}
    if not b.proven:
        return {
            "reason": "adopted by time and size",
            "count": b.total,
            "message": "not proven ours yet: never cancelled; used only if its results are this shard's",
        }
    if b.errors:  # a batch refused as a whole (validation, quota)
        first = b.errors[0]
        return {
            "reason": f"batch {b.status}:{first.get('code')}",
            "count": b.total or len(b.errors),
            "message": first.get("message"),
        }
    if b.is_final and (b.failed or 0) > 0 and not b.collected:
        return {
            "reason": "not collected yet",
            "count": b.failed,
            "message": "run `hipbatch collect` to download the error lines and see why",
        }
    return None
