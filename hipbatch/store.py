"""Store: the only code that talks to SQLite (state dir's hipbatch.db, WAL mode).

Tables: jobs (one per --job), files (job, file_name -> custom_id or skip reason), requests (one row per
custom_id: state, batch, reply, extracted prompt, usage, cost), shards (JSONL files and their submit
intents), batches (provider batches and their last known status), superseded (tokens and cost of paid
answers that were asked again).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError, Table

from hipbatch.errors import StoreLocked
from hipbatch.migrations import migrations
from hipbatch.records import RETRYABLE, BatchInfo, RequestState, ShardState

CHUNK = 2000  # rows per bulk statement: keeps memory flat and statements under SQLite's variable limit


def _chunks(items: Iterable[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class StateLock:
    """An exclusive lock file per state dir, so two commands never interleave their writes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "hipbatch.lock"
        self._fd: int | None = None

    def acquire(self, timeout: float = 30.0) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLocked(
                        f"another hipbatch command is working on {self.path.parent} "
                        f"(waited {timeout:.0f}s); wait for it to finish or stop it, then rerun"
                    ) from None
                time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @contextmanager
    def held(self, timeout: float = 30.0) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


class Store:
    """The ledger of jobs, files, requests, shards and batches."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.lock = StateLock(state_dir)
        conn = sqlite3.connect(state_dir / "hipbatch.db", timeout=60, isolation_level=None, check_same_thread=False)
        self.db = Database(conn, execute_plugins=False)  # no plugin scan: 50 ms off every command start
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        self.db.execute("PRAGMA busy_timeout=60000")
        # A bounded page cache (32 MB, not proportional to the store) so bulk updates in random order stay
        # in memory within one transaction instead of re-reading and re-writing pages.
        self.db.execute("PRAGMA cache_size=-32768")
        if migrations.pending(self.db):  # read-only check: an up-to-date store needs no lock to open
            with self.lock.held(timeout=float(os.environ.get("HIPBATCH_LOCK_TIMEOUT", "600"))):
                migrations.apply(self.db)

    def read_mapped(self) -> None:
        """Read pages straight from the OS cache, for commands that aggregate the whole ledger (status):
        ~1.5x faster on 10^6 requests. Not for writers: mapped pages would count in their peak RSS."""
        self.db.execute("PRAGMA mmap_size=268435456")

    def close(self) -> None:
        self.db.close()

    def table(self, name: str) -> Table:
        return self.db.table(name)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self.db.atomic():
            yield

    # ---- jobs and files -------------------------------------------------------------------------

    def upsert_job(self, name: str, **fields: Any) -> None:
        now = time.time()
        existing = self._get("jobs", name)
        row = {"name": name, **fields, "updated_at": now}
        if existing is None:
            row["created_at"] = now
        self.table("jobs").upsert(row, pk="name")

    def job(self, name: str) -> dict[str, Any] | None:
        return self._get("jobs", name)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.table("jobs").rows_where(order_by="name"))

    def record_files(self, rows: Iterable[dict[str, Any]], now: float | None = None) -> None:
        """Upsert (job, file_name) -> custom_id / skip_reason rows in one transaction.

        A row that is already there unchanged is not written again (a re-submit of an unchanged folder).
        """
        now = time.time() if now is None else now
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO files (job, file_name, custom_id, skip_reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (job, file_name) DO UPDATE SET custom_id = excluded.custom_id, "
                "skip_reason = excluded.skip_reason, updated_at = excluded.updated_at "
                "WHERE files.custom_id IS NOT excluded.custom_id OR files.skip_reason IS NOT excluded.skip_reason",
                ((r["job"], r["file_name"], r.get("custom_id"), r.get("skip_reason"), now) for r in rows),
            )

    def file_count(self, job: str) -> int:
        return int(self.db.execute("SELECT count(*) FROM files WHERE job = ?", [job]).fetchone()[0])

    def forget_files_not_in(self, job: str, names: Iterable[str]) -> int:
        """Drop the job's file rows whose name is not in `names`, which must come sorted (as discovery gives
        them): a merge with the rows in file-name order, holding only the names to drop."""
        present = iter(names)
        current = next(present, None)
        gone = []
        for (name,) in self.db.execute("SELECT file_name FROM files WHERE job = ? ORDER BY file_name", [job]):
            while current is not None and current < name:
                current = next(present, None)
            if current != name:
                gone.append(name)
        for chunk in _chunks(gone, 500):
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM files WHERE job = ? AND file_name IN ({marks})", [job, *chunk])
        return len(gone)

    def skipped_files(self, job: str | None = None) -> list[dict[str, Any]]:
        where, args = "skip_reason IS NOT NULL", []
        if job:
            where += " AND job = ?"
            args.append(job)
        return list(self.table("files").rows_where(where, args, order_by="file_name"))

    # ---- requests -------------------------------------------------------------------------------

    def known_ids(self, custom_ids: Sequence[str]) -> set[str]:
        """Which of these custom_ids the store already has, in one query per chunk."""
        found: set[str] = set()
        for chunk in _chunks(custom_ids, 900):
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0] for r in self.db.execute(f"SELECT custom_id FROM requests WHERE custom_id IN ({marks})", chunk)
            )
        return found

    def add_shard(self, shard: dict[str, Any], requests: Iterable[dict[str, Any]]) -> int:
        """Record a written shard and its requests in one transaction; returns the shard id."""
        now = time.time()
        with self.db.atomic():
            table = self.table("shards")
            table.insert({**shard, "state": ShardState.QUEUED, "created_at": now, "updated_at": now})
            shard_id = int(table.last_pk)  # type: ignore[arg-type]
            for chunk in _chunks(requests):
                for row in chunk:
                    row.update(shard_id=shard_id, state=RequestState.PENDING, created_at=now, updated_at=now)
                self.table("requests").insert_all(chunk, pk="custom_id", batch_size=CHUNK, ignore=True)
        return shard_id

    def supersede_answers(self, custom_ids: Sequence[str]) -> int:
        """Before requests are asked again, move the tokens and cost of their current (paid) answers to the
        superseded table, in one transaction: the ledger then counts both answers, each once."""
        now = time.time()
        moved = 0
        with self.db.atomic():
            for chunk in _chunks(custom_ids, 900):
                where = f"custom_id IN ({','.join('?' * len(chunk))}) AND (input_tokens > 0 OR output_tokens > 0)"
                moved += self.db.execute(
                    "INSERT INTO superseded (custom_id, job, provider, model, batch_id, via, input_tokens, "
                    "output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, answered_at, superseded_at) "
                    "SELECT custom_id, job, provider, model, batch_id, via, input_tokens, output_tokens, "
                    f"cache_read_tokens, cache_write_tokens, cost_usd, answered_at, ? FROM requests WHERE {where}",
                    [now, *chunk],
                ).rowcount
                self.db.execute(
                    "UPDATE requests SET input_tokens = 0, output_tokens = 0, cache_read_tokens = 0, "
                    f"cache_write_tokens = 0, cost_usd = NULL WHERE {where}",
                    list(chunk),
                )
        return moved

    def move_requests_to_shard(self, custom_ids: Sequence[str], shard: dict[str, Any]) -> int:
        """Record a retry shard: the requests go back to pending in it, their attempt counted, any paid
        answer they had kept in the superseded table."""
        now = time.time()
        with self.db.atomic():
            self.supersede_answers(custom_ids)
            table = self.table("shards")
            table.insert({**shard, "state": ShardState.QUEUED, "created_at": now, "updated_at": now})
            shard_id = int(table.last_pk)  # type: ignore[arg-type]
            for chunk in _chunks(custom_ids, 900):
                marks = ",".join("?" * len(chunk))
                self.db.execute(
                    f"UPDATE requests SET shard_id = ?, batch_id = NULL, state = ?, updated_at = ? "
                    f"WHERE custom_id IN ({marks})",
                    [shard_id, RequestState.PENDING, now, *chunk],
                )
        return shard_id

    def request(self, custom_id: str) -> dict[str, Any] | None:
        return self._get("requests", custom_id)

    def requests_in_states(
        self, states: Iterable[str], job: str | None = None, max_attempts: int | None = None
    ) -> Iterator[dict[str, Any]]:
        states = list(states)
        where = f"state IN ({','.join('?' * len(states))})"
        args: list[Any] = list(states)
        if job:
            where += " AND job = ?"
            args.append(job)
        if max_attempts is not None:
            where += " AND attempts < ?"
            args.append(max_attempts)
        yield from self.table("requests").rows_where(
            where,
            args,
            order_by="shard_id, custom_id",
            select="custom_id, shard_id, provider, model, endpoint, job, est_input_tokens, attempts, state",
        )

    def batch_request_ids(self, batch_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT custom_id FROM requests WHERE batch_id = ?", [batch_id])}

    def save_results(
        self, rows: Sequence[dict[str, Any]], keep_success: bool = True, from_batch: str | None = None
    ) -> None:
        """Store outcomes (state, reply, prompt, usage...) keyed by custom_id, in bulk.

        With keep_success, a request that already has a good answer is never overwritten by a worse one
        (a late line from an older batch of the same request). With from_batch, a line read again from an
        older batch (a collect killed before it finished, rerun after `retry` resent the request) only
        counts if it is a success: a stale failure must not mark a request that is in flight again.
        """
        now = time.time()
        guard = " AND (state != ? OR ? = ?)" if keep_success else ""
        if from_batch is not None:
            guard += " AND (batch_id = ? OR ? = ?)"
        for chunk in _chunks(rows):
            # Rows with the same columns share one statement, run with executemany: no per-row round trip.
            groups: dict[tuple[str, ...], list[list[Any]]] = {}
            for row in chunk:
                row["updated_at"] = now
                cols = tuple(k for k in row if k != "custom_id")
                args = [row[c] for c in cols]
                args.append(row["custom_id"])
                if keep_success:
                    args += [RequestState.SUCCEEDED, row.get("state"), RequestState.SUCCEEDED]
                if from_batch is not None:
                    args += [from_batch, row.get("state"), RequestState.SUCCEEDED]
                groups.setdefault(cols, []).append(args)
            with self.db.atomic():
                for cols, many in groups.items():
                    sets = ", ".join(f"{c} = ?" for c in cols)
                    self.db.conn.executemany(f"UPDATE requests SET {sets} WHERE custom_id = ?{guard}", many)

    def save_results_staged(
        self, rows: Iterable[dict[str, Any]], keep_success: bool = True, from_batch: str | None = None
    ) -> int:
        """save_results for a whole batch streamed in: the same rules, applied in the ledger's row order.

        Result lines come in any order; updating the ledger in that order rewrites pages at random (about 3x
        slower for 50,000 rows). The rows are staged in a temp table (on disk, like SQLite's other temp
        data: memory stays flat) with the rowid of their request, then applied with one UPDATE ... FROM per
        column set, sorted by rowid. A custom_id found twice is applied line by line in file order, as
        save_results would. Run inside the caller's transaction; returns the rows staged.
        """
        now = time.time()
        db = self.db.conn
        db.execute("DROP TABLE IF EXISTS temp.hb_staged")
        staged: list[str] = []  # value columns of the temp table, in order
        groups: dict[tuple[str, ...], int] = {}
        groups_made = False
        n = 0
        for chunk in _chunks(rows):
            by_group: dict[int, list[list[Any]]] = {}
            for row in chunk:
                cols = tuple(k for k in row if k != "custom_id" and k != "updated_at")
                grp = groups.get(cols)
                if grp is None:
                    grp = groups[cols] = len(groups)
                    new = [c for c in cols if c not in staged]
                    if not groups_made:
                        groups_made = True
                        db.execute(
                            "CREATE TEMP TABLE hb_staged (rid INTEGER, seq INTEGER, grp INTEGER"
                            + "".join(f", {c}" for c in new)
                            + ")"
                        )
                    else:
                        for c in new:
                            db.execute(f"ALTER TABLE temp.hb_staged ADD COLUMN {c}")
                    staged.extend(new)
                by_group.setdefault(grp, []).append([n, grp, *(row[c] for c in cols), row["custom_id"]])
                n += 1
            for grp, many in by_group.items():
                cols = next(c for c, g in groups.items() if g == grp)
                marks = ", ".join("?" * (len(cols) + 2))
                db.executemany(
                    f"INSERT INTO temp.hb_staged (rid, seq, grp{''.join(', ' + c for c in cols)}) "
                    f"SELECT rowid, {marks} FROM requests WHERE custom_id = ?",
                    many,
                )
        if not groups_made:
            return n
        state = "s.state" if "state" in staged else "NULL"
        guard = ""
        args: list[Any] = [now]
        if keep_success:
            guard += f" AND (requests.state != ? OR {state} = ?)"
        if from_batch is not None:
            guard += f" AND (requests.batch_id = ? OR {state} = ?)"
        guard_args = ([RequestState.SUCCEEDED] * 2 if keep_success else []) + (
            [from_batch, RequestState.SUCCEEDED] if from_batch is not None else []
        )

        def apply(cols: tuple[str, ...], where: str, where_args: list[Any]) -> None:
            sets = "".join(f", {c} = s.{c}" for c in cols)
            db.execute(
                f"UPDATE requests SET updated_at = ?{sets} FROM (SELECT * FROM temp.hb_staged WHERE {where} "
                f"ORDER BY rid) AS s WHERE requests.rowid = s.rid{guard}",
                [*args, *where_args, *guard_args],
            )

        twice = [r[0] for r in db.execute("SELECT rid FROM temp.hb_staged GROUP BY rid HAVING count(*) > 1")]
        if twice:
            by_grp = {g: c for c, g in groups.items()}
            for chunk in _chunks(twice, 500):
                marks = ",".join("?" * len(chunk))
                for seq, grp in db.execute(
                    f"SELECT seq, grp FROM temp.hb_staged WHERE rid IN ({marks}) ORDER BY seq", chunk
                ).fetchall():
                    apply(by_grp[grp], "seq = ?", [seq])
                db.execute(f"DELETE FROM temp.hb_staged WHERE rid IN ({marks})", chunk)
        for cols, grp in groups.items():
            apply(cols, "grp = ?", [grp])
        db.execute("DROP TABLE temp.hb_staged")
        return n

    def mark_unanswered(self, batch_id: str, state: str, message: str) -> int:
        """Requests of a batch still waiting on it after its results were read get `state`."""
        cur = self.db.execute(
            "UPDATE requests SET state = ?, error_code = ?, error_message = ?, updated_at = ? "
            "WHERE batch_id = ? AND state = ?",
            [state, state, message, time.time(), batch_id, RequestState.SUBMITTED],
        )
        return int(cur.rowcount)

    def stored_replies(self, job: str | None = None) -> Iterator[dict[str, Any]]:
        """Every request that holds a reply, for --reextract."""
        where = "reply_text IS NOT NULL OR finish IS NOT NULL"
        args: list[Any] = []
        if job:
            where = f"({where}) AND job = ?"
            args.append(job)
        yield from self.table("requests").rows_where(where, args, select="custom_id, job, reply_text, finish")

    DATASET_COLUMNS = ("job", "file_name", "english_prompt", "custom_id", "provider", "model", "via")

    def dataset_rows(self, job: str | None = None) -> Iterator[dict[str, Any]]:
        """Files whose request has an extracted prompt, sorted by file name; streamed from SQLite."""
        for row in self.dataset_tuples(job):
            yield dict(zip(self.DATASET_COLUMNS, row, strict=True))

    def dataset_tuples(self, job: str | None = None) -> Iterator[tuple[Any, ...]]:
        """Dataset rows as plain tuples in DATASET_COLUMNS order (no dict per row: the dataset's hot loop)."""
        sql = (
            "SELECT f.job, f.file_name, r.prompt, r.custom_id, r.provider, r.model, r.via "
            "FROM files f JOIN requests r ON r.custom_id = f.custom_id "
            "WHERE r.state = ? {job} ORDER BY f.file_name, f.job"
        )
        args: list[Any] = [RequestState.SUCCEEDED]
        if job:
            args.append(job)
        yield from self.db.conn.execute(sql.format(job="AND f.job = ?" if job else ""), args)

    def request_counts(self, job: str | None = None) -> dict[str, int]:
        sql = "SELECT state, count(*) FROM requests {} GROUP BY state"
        if job:
            rows = self.db.execute(sql.format("WHERE job = ?"), [job]).fetchall()
        else:
            rows = self.db.execute(sql.format("")).fetchall()
        return dict(rows)

    def failure_reasons(self, job: str | None = None) -> dict[str, int]:
        sql = (
            "SELECT state || CASE WHEN error_code IS NOT NULL AND error_code != state "
            "THEN ':' || error_code ELSE '' END, count(*) FROM requests WHERE state NOT IN (?, ?, ?) {} "
            "GROUP BY 1 ORDER BY 2 DESC"
        )
        args = [RequestState.SUCCEEDED, RequestState.PENDING, RequestState.SUBMITTED]
        if job:
            return dict(self.db.execute(sql.format("AND job = ?"), [*args, job]).fetchall())
        return dict(self.db.execute(sql.format(""), args).fetchall())

    # ---- shards ---------------------------------------------------------------------------------

    def shard(self, shard_id: int) -> dict[str, Any]:
        row = self._get("shards", shard_id)
        if row is None:
            raise KeyError(shard_id)
        return row

    def shards_in_states(self, states: Iterable[str]) -> list[dict[str, Any]]:
        states = list(states)
        return list(self.table("shards").rows_where(f"state IN ({','.join('?' * len(states))})", states, order_by="id"))

    def next_shard_number(self) -> int:
        row = self.db.execute("SELECT coalesce(max(id), 0) + 1 FROM shards").fetchone()
        return int(row[0])

    def update_shard(self, shard_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.table("shards").update(shard_id, fields)

    def attach_batch(self, shard: dict[str, Any], info: BatchInfo, adopted: bool = False) -> None:
        """Record the provider batch of a shard and mark its requests submitted, in one transaction."""
        now = time.time()
        with self.db.atomic():
            self.table("batches").upsert(
                {
                    "id": info.id,
                    "shard_id": shard["id"],
                    "job": shard["job"],
                    "provider": shard["provider"],
                    "model": shard["model"],
                    "status": info.status,
                    "is_final": int(info.is_final),
                    "total": info.total,
                    "done": info.done,
                    "failed": info.failed,
                    "counts_final_only": int(info.counts_final_only),
                    "created_at": info.created_at or now,
                    "expires_at": info.expires_at,
                    "output_file_id": info.output_file_id,
                    "error_file_id": info.error_file_id,
                    "errors": json.dumps(info.errors) if info.errors else None,
                    "adopted": int(adopted),
                    "refreshed_at": now,
                },
                pk="id",
            )
            self.update_shard(shard["id"], state=ShardState.SUBMITTED, batch_id=info.id)
            self.db.execute(
                "UPDATE requests SET state = ?, batch_id = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE shard_id = ? AND state = ?",
                [RequestState.SUBMITTED, info.id, now, shard["id"], RequestState.PENDING],
            )

    def requeue_shard(self, shard_id: int, batch_id: str) -> None:
        """A batch refused for quota goes back to the queue: its requests are pending again, uncounted."""
        now = time.time()
        with self.db.atomic():
            self.db.execute(
                "UPDATE requests SET state = ?, batch_id = NULL, attempts = max(attempts - 1, 0), "
                "updated_at = ? WHERE batch_id = ? AND state = ?",
                [RequestState.PENDING, now, batch_id, RequestState.SUBMITTED],
            )
            self.db.execute(
                "UPDATE shards SET state = ?, batch_id = NULL, file_id = NULL, "
                "requeues = requeues + 1, updated_at = ? WHERE id = ?",
                [ShardState.QUEUED, now, shard_id],
            )
            self.db.execute("UPDATE batches SET collected = 1 WHERE id = ?", [batch_id])

    def shard_ids_with_pending(self, shard_id: int) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM requests WHERE shard_id = ? AND state = ?", [shard_id, RequestState.PENDING]
        ).fetchone()
        return int(row[0])

    def pending_in_shard(self, shard_id: int) -> set[str]:
        """custom_ids of a shard's requests that still wait to be sent."""
        rows = self.db.execute(
            "SELECT custom_id FROM requests WHERE shard_id = ? AND state = ?", [shard_id, RequestState.PENDING]
        )
        return {r[0] for r in rows}

    def cancel_queued_shards(self, job: str | None = None) -> tuple[int, int]:
        """Take shards no batch was asked for yet out of the local queue; their pending requests become
        canceled (and so retryable). Returns (shards, requests)."""
        states = [ShardState.QUEUED, ShardState.UPLOADING, ShardState.UPLOADED]
        where = f"state IN ({','.join('?' * len(states))})" + (" AND job = ?" if job else "")
        args: list[Any] = [*states, *([job] if job else [])]
        now = time.time()
        with self.db.atomic():
            ids = [r[0] for r in self.db.execute(f"SELECT id FROM shards WHERE {where}", args)]
            n = 0
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                n += int(
                    self.db.execute(
                        f"UPDATE requests SET state = ?, error_code = ?, error_message = ?, updated_at = ? "
                        f"WHERE state = ? AND shard_id IN ({marks})",
                        [
                            RequestState.CANCELED,
                            RequestState.CANCELED,
                            "cancelled before it was sent",
                            now,
                            RequestState.PENDING,
                            *chunk,
                        ],
                    ).rowcount
                )
                self.db.execute(
                    f"UPDATE shards SET state = ?, updated_at = ? WHERE id IN ({marks})",
                    [ShardState.CANCELED, now, *chunk],
                )
        return len(ids), n

    def live_work(self, job: str, file_names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Requests of these files that have no good answer and that no batch holds or may hold:
        pending in a shard never sent (queued), or in a retryable state. For live mode."""
        retryable = list(RETRYABLE)
        for chunk in _chunks(file_names, 500):
            sql = (
                "SELECT f.file_name AS file_name, r.custom_id AS custom_id, r.state AS state, "
                "r.attempts AS attempts, r.est_input_tokens AS est_input_tokens, r.max_tokens AS max_tokens "
                "FROM files f JOIN requests r ON r.custom_id = f.custom_id "
                "LEFT JOIN shards s ON s.id = r.shard_id "
                f"WHERE f.job = ? AND f.file_name IN ({','.join('?' * len(chunk))}) "
                f"AND (r.state IN ({','.join('?' * len(retryable))}) OR (r.state = ? AND s.state = ?)) "
                "ORDER BY f.file_name"
            )
            yield from self.db.query(sql, [job, *chunk, *retryable, RequestState.PENDING, ShardState.QUEUED])

    # ---- batches --------------------------------------------------------------------------------

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._get("batches", batch_id)

    def batches(self, job: str | None = None, unfinished_only: bool = False) -> list[dict[str, Any]]:
        where, args = [], []
        if job:
            where.append("job = ?")
            args.append(job)
        if unfinished_only:
            where.append("is_final = 0")
        return list(self.table("batches").rows_where(" AND ".join(where) or None, args, order_by="created_at, id"))

    def batches_to_collect(self) -> list[dict[str, Any]]:
        return list(self.table("batches").rows_where("is_final = 1 AND collected = 0", order_by="created_at"))

    def known_batch_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM batches")}

    def update_batch(self, info: BatchInfo) -> None:
        self.table("batches").update(
            info.id,
            {
                "status": info.status,
                "is_final": int(info.is_final),
                "total": info.total,
                "done": info.done,
                "failed": info.failed,
                "expires_at": info.expires_at,
                "output_file_id": info.output_file_id,
                "error_file_id": info.error_file_id,
                "errors": json.dumps(info.errors) if info.errors else None,
                "finished_at": time.time() if info.is_final else None,
                "refreshed_at": time.time(),
            },
        )

    def mark_collected(self, batch_id: str) -> None:
        self.table("batches").update(batch_id, {"collected": 1})

    def shard_size(self, shard_id: int) -> tuple[int, int]:
        """(requests, estimated input tokens) of one shard, (0, 0) if it is unknown."""
        row = self.db.execute("SELECT n_requests, est_tokens FROM shards WHERE id = ?", [shard_id]).fetchone()
        return (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)

    def in_flight(self, provider: str, model: str | None = None) -> tuple[int, int]:
        """(batches, estimated input tokens) currently at the provider and not final."""
        sql = (
            "SELECT count(*), coalesce(sum(s.est_tokens), 0) FROM batches b JOIN shards s "
            "ON s.id = b.shard_id WHERE b.is_final = 0 AND b.provider = ?"
        )
        args = [provider]
        if model:
            sql += " AND b.model = ?"
            args.append(model)
        n, tokens = self.db.execute(sql, args).fetchone()
        return int(n), int(tokens)

    # ---- helpers --------------------------------------------------------------------------------

    def _get(self, table: str, pk: Any) -> dict[str, Any] | None:
        try:
            return dict(self.table(table).get(pk))
        except NotFoundError:
            return None
