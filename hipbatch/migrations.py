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


#: ISO-8601 (UTC, milliseconds) text of an epoch-seconds column, as the views and the *_iso columns show it.
def _iso(column: str) -> str:
    return f"strftime('%Y-%m-%dT%H:%M:%fZ', {column}, 'unixepoch')"


_TIMESTAMPS = {
    "jobs": ("created_at", "updated_at"),
    "files": ("updated_at",),
    "requests": ("created_at", "answered_at", "updated_at"),
    "shards": ("intent_at", "created_at", "updated_at"),
    "batches": ("created_at", "expires_at", "finished_at", "refreshed_at"),
    "superseded": ("answered_at", "superseded_at"),
}
_NO_GOOD_ANSWER = "('failed', 'expired', 'canceled', 'extraction_failed', 'truncated', 'missing')"


@migrations()
def m005_readable_store(db: Database) -> None:
    # A store people can open (datasette, sqlite3): every epoch timestamp gets an ISO-8601 text twin, computed
    # when read (VIRTUAL generated columns: nothing is added to any write), and three views.
    for table, columns in _TIMESTAMPS.items():
        for column in columns:
            db.execute(
                f"ALTER TABLE [{table}] ADD COLUMN [{column}_iso] TEXT GENERATED ALWAYS AS ({_iso(column)}) VIRTUAL"
            )
    # requests.is_current: 1 while a file row points at the request (what the dataset holds), 0 for the old
    # request of a changed or removed file, so counts show those apart ("superseded"). Kept by triggers on
    # files, so no writer has to remember it; status reads it from its covering index.
    db.table("requests").add_column("is_current", int, not_null_default=1)
    db.execute(
        "UPDATE requests SET is_current = 0 WHERE NOT EXISTS "
        "(SELECT 1 FROM files f WHERE f.custom_id = requests.custom_id)"
    )
    db.execute("DROP INDEX IF EXISTS idx_requests_job_state_cost_usd_est_cost_usd")
    db.table("requests").create_index(["job", "state", "is_current", "cost_usd", "est_cost_usd"])
    unpointed = "AND NOT EXISTS (SELECT 1 FROM files f WHERE f.custom_id = OLD.custom_id)"
    db.execute(  # one primary-key look-up per new file row; an UPDATE only in the rare case it is needed
        "CREATE TRIGGER files_point_insert AFTER INSERT ON files "
        "WHEN (SELECT is_current FROM requests WHERE custom_id = NEW.custom_id) = 0 BEGIN "
        "UPDATE requests SET is_current = 1 WHERE custom_id = NEW.custom_id; END"
    )
    db.execute(
        "CREATE TRIGGER files_point_update AFTER UPDATE OF custom_id ON files "
        "WHEN OLD.custom_id IS NOT NEW.custom_id BEGIN "
        f"UPDATE requests SET is_current = 0 WHERE custom_id = OLD.custom_id {unpointed}; "
        "UPDATE requests SET is_current = 1 WHERE custom_id = NEW.custom_id AND is_current = 0; END"
    )
    db.execute(
        "CREATE TRIGGER files_point_delete AFTER DELETE ON files WHEN OLD.custom_id IS NOT NULL BEGIN "
        f"UPDATE requests SET is_current = 0 WHERE custom_id = OLD.custom_id {unpointed}; END"
    )
    db.execute(
        "CREATE VIEW dataset AS SELECT f.job, f.file_name, r.prompt AS english_prompt, r.custom_id, r.provider, "
        f"r.model, coalesce(r.via, 'batch') AS via, r.batch_id, {_iso('r.answered_at')} AS answered_at "
        "FROM files f JOIN requests r ON r.custom_id = f.custom_id WHERE r.state = 'succeeded'"
    )
    db.execute(
        "CREATE VIEW failures AS SELECT f.job, f.file_name, r.state, r.error_code, r.error_message, r.attempts, "
        f"r.batch_id, r.custom_id, r.provider, r.model, {_iso('r.updated_at')} AS updated_at "
        f"FROM files f JOIN requests r ON r.custom_id = f.custom_id WHERE r.state IN {_NO_GOOD_ANSWER} "
        "UNION ALL SELECT job, file_name, 'skipped', NULL, skip_reason, 0, NULL, NULL, NULL, NULL, "
        f"{_iso('updated_at')} FROM files WHERE skip_reason IS NOT NULL"
    )
    db.execute(
        "CREATE VIEW batch_overview AS SELECT b.id AS batch_id, b.job, b.provider, b.model, b.status, b.is_final, "
        "b.collected, b.total, b.done, b.failed, (SELECT count(*) FROM requests r WHERE r.state = 'succeeded' "
        "AND r.batch_id = b.id) AS succeeded_in_ledger, (SELECT count(*) FROM requests r WHERE r.state IN "
        f"{_NO_GOOD_ANSWER} AND r.batch_id = b.id) AS failed_in_ledger, {_iso('b.created_at')} AS created_at, "
        f"{_iso('b.expires_at')} AS expires_at, {_iso('b.finished_at')} AS finished_at, "
        f"{_iso('b.refreshed_at')} AS refreshed_at, s.path AS shard_path, s.n_requests AS shard_requests "
        "FROM batches b LEFT JOIN shards s ON s.id = b.shard_id"
    )


@migrations()
def m006_extraction_method(db: Database) -> None:
    # How each kept prompt was found (tag, fenced, label, json, whole) and why it may still be wrong (suspects,
    # comma-joined): `collect` counts them, `report` lists them, `collect --strict` turns suspects into failures.
    db.table("requests").add_column("method", str)
    db.table("requests").add_column("suspect", str)


#: request_stats' key: what status, collect's summary and the cost ledger group requests by ('' stands for NULL,
#: so the key can be unique).
STATS_KEY = ("job", "provider", "model", "via", "batch_id", "state", "error_code", "method")
#: request_stats' sums: (column, its sum's type); cost_usd and est_cost_usd also count their non-NULL values.
STATS_SUMS = (
    ("cost_usd", float),
    ("est_cost_usd", float),
    ("input_tokens", int),
    ("output_tokens", int),
    ("cache_read_tokens", int),
    ("cache_write_tokens", int),
)


def stats_select(where: str = "1") -> str:
    """A SELECT of request_stats' rows (key, n, sums, counts) aggregated from the requests `where` selects; its
    first parameter is the sign (1 to add the rows, -1 to take them away)."""
    key = ", ".join(f"coalesce({k}, '')" for k in STATS_KEY)
    sums = ", ".join(f"?1 * total({c})" if kind is float else f"?1 * coalesce(sum({c}), 0)" for c, kind in STATS_SUMS)
    return (
        f"SELECT {key}, ?1 * count(*), {sums}, ?1 * count(cost_usd), ?1 * count(est_cost_usd) FROM requests "
        f"WHERE {where} GROUP BY {', '.join(str(i + 1) for i in range(len(STATS_KEY)))}"
    )


def stats_columns() -> str:
    return ", ".join([*STATS_KEY, "n", *(c for c, _ in STATS_SUMS), "n_cost_usd", "n_est_cost_usd"])


@migrations()
def m007_request_stats(db: Database) -> None:
    # Counts and sums of the requests per job, model, batch, state, error code and extraction method, kept by the
    # store's writers in the same transaction as each change: `status`, collect's summary and the cost ledger
    # read a few hundred rows instead of every request (their cost no longer grows with the requests). The
    # covering index status read before is dropped (one index less to keep on every recorded answer); requests
    # that no file points at any more (superseded) are read through a partial index, as they are few.
    key = ", ".join(f"{k} TEXT NOT NULL" for k in STATS_KEY)
    sums = ", ".join(f"{c} {'REAL' if kind is float else 'INTEGER'} NOT NULL DEFAULT 0" for c, kind in STATS_SUMS)
    db.execute(
        f"CREATE TABLE request_stats ({key}, n INTEGER NOT NULL DEFAULT 0, {sums}, "
        "n_cost_usd INTEGER NOT NULL DEFAULT 0, n_est_cost_usd INTEGER NOT NULL DEFAULT 0, "
        f"PRIMARY KEY ({', '.join(STATS_KEY)}))"
    )
    db.execute(f"INSERT INTO request_stats ({stats_columns()}) {stats_select()}", [1])
    db.execute("DROP INDEX IF EXISTS idx_requests_job_state_is_current_cost_usd_est_cost_usd")
    db.execute(
        "CREATE INDEX idx_requests_superseded ON requests (job, state, error_code, cost_usd, est_cost_usd) "
        "WHERE is_current = 0"
    )
