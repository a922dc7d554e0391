"""Append-only schema migrations for the hipbatch store. Never edit a released one: add m00N_..."""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("hipbatch")


@migrations()
def m001_initial(db: Database) -> None:
    db.table("jobs").create(
        {
            "name": str,
            "provider": str,
            "model": str,
            "input_dir": str,
            "template_dir": str,
            "output_file": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="name",
    )
    db.table("files").create(
        {"job": str, "file_name": str, "custom_id": str, "skip_reason": str, "updated_at": float},
        pk=("job", "file_name"),
    )
    db.table("requests").create(
        {
            "custom_id": str,
            "job": str,
            "file_name": str,
            "provider": str,
            "model": str,
            "endpoint": str,
            "state": str,
            "shard_id": int,
            "batch_id": str,
            "attempts": int,
            "est_input_tokens": int,
            "max_tokens": int,
            "est_cost_usd": float,
            "reply_text": str,
            "finish": str,
            "prompt": str,
            "detail": str,
            "error_code": str,
            "error_message": str,
            "input_tokens": int,
            "output_tokens": int,
            "cache_read_tokens": int,
            "cache_write_tokens": int,
            "cost_usd": float,
            "via": str,
            "created_at": float,
            "answered_at": float,
            "updated_at": float,
        },
        pk="custom_id",
        defaults={
            "attempts": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
    )
    db.table("shards").create(
        {
            "id": int,
            "key": str,
            "job": str,
            "provider": str,
            "model": str,
            "endpoint": str,
            "path": str,
            "n_requests": int,
            "n_bytes": int,
            "est_tokens": int,
            "state": str,
            "file_id": str,
            "batch_id": str,
            "intent_at": float,
            "requeues": int,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        defaults={"requeues": 0},
    )
    db.table("batches").create(
        {
            "id": str,
            "shard_id": int,
            "job": str,
            "provider": str,
            "model": str,
            "status": str,
            "is_final": int,
            "total": int,
            "done": int,
            "failed": int,
            "counts_final_only": int,
            "created_at": float,
            "expires_at": float,
            "finished_at": float,
            "output_file_id": str,
            "error_file_id": str,
            "errors": str,
            "collected": int,
            "adopted": int,
            "refreshed_at": float,
        },
        pk="id",
        defaults={"collected": 0, "adopted": 0, "is_final": 0},
    )
    db.table("shards").create_index(["key"], unique=True)
    db.table("shards").create_index(["state"])
    db.table("requests").create_index(["state"])
    db.table("requests").create_index(["job", "state"])
    db.table("requests").create_index(["batch_id"])
    db.table("requests").create_index(["shard_id"])
    db.table("files").create_index(["custom_id"])
    db.table("batches").create_index(["is_final", "collected"])


@migrations()
def m002_status_covering_indexes(db: Database) -> None:
    # `status` sums cost per (job, state) and finds each batch's top failure on every call: covering indexes
    # make both index-only scans (1,000,000 requests in a fraction of a second). Each new index starts with
    # the columns of the one it replaces, so it serves every query the old one did.
    db.execute("DROP INDEX IF EXISTS idx_requests_job_state")
    db.table("requests").create_index(["job", "state", "cost_usd", "est_cost_usd"])
    db.execute("DROP INDEX IF EXISTS idx_requests_state")
    db.table("requests").create_index(["state", "batch_id", "error_code"])


@migrations()
def m003_superseded_answers(db: Database) -> None:
    # A paid answer that `retry` or live mode asks again (truncated, extraction_failed) moves its tokens and
    # cost here before the new answer overwrites them, so the ledger counts every answer paid for, once.
    db.table("superseded").create(
        {
            "id": int,
            "custom_id": str,
            "job": str,
            "provider": str,
            "model": str,
            "batch_id": str,
            "via": str,
            "input_tokens": int,
            "output_tokens": int,
            "cache_read_tokens": int,
            "cache_write_tokens": int,
            "cost_usd": float,
            "answered_at": float,
            "superseded_at": float,
        },
        pk="id",
    )
    db.table("superseded").create_index(["job", "provider", "model"])


@migrations()
def m004_batch_read_errors(db: Database) -> None:
    # A finished batch whose results cannot be read completely stays uncollected (its requests `submitted`):
    # why, and after how many collects, is kept for `status`. `proven` is 0 for a batch adopted by creation
    # time and size only (no tag to name its shard) until its results' custom_ids are found to be the shard's;
    # such a batch is never cancelled. A candidate found not to be ours is forgotten and its id kept in
    # foreign_batches, so it is never adopted again.
    batches = db.table("batches")
    batches.add_column("read_error", str)
    batches.add_column("read_attempts", int, not_null_default=0)
    batches.add_column("proven", int, not_null_default=1)
    db.execute("UPDATE batches SET proven = 0 WHERE adopted = 1 AND provider = 'anthropic' AND collected = 0")
    db.table("foreign_batches").create(
        {"id": str, "provider": str, "shard_id": int, "released_at": float, "reason": str}, pk="id"
    )
