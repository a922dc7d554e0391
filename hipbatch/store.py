"""Store: the only code that talks to SQLite (state dir's hipbatch.db, WAL mode).

Tables: jobs (one per --job), files (job, file_name -> custom_id or skip reason), requests (one row per
custom_id: state, batch, reply, extracted prompt, usage, cost), shards (JSONL files and their submit
intents), batches (provider batches and their last known status, why their results could not be read, whether
an adopted one is proven ours), superseded (tokens and cost of paid answers that were asked again),
foreign_batches (batches matched by time and size that proved not to be ours: never adopted again).

The store is checked before it is trusted (a directory, a regular SQLite file of a known schema, writable), and
every SQLite failure (disk full, read-only, corrupt) leaves it as one StoreError naming the path.
"""

from __future__ import annotations

import fcntl
import functools
import heapq
import inspect
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError, Table

from hipbatch import __version__
from hipbatch.errors import NoState, StoreError, StoreLocked, disk_error
from hipbatch.migrations import STATS_KEY, migrations, stats_columns, stats_select
from hipbatch.poll import wait_until
from hipbatch.records import (
    FAILED_COLUMNS,
    RESULT_COLUMNS,
    RETRYABLE,
    BatchInfo,
    BatchRow,
    JobRow,
    RequestState,
    ShardRow,
    ShardState,
)

_IN_FLIGHT = (RequestState.PENDING, RequestState.SUBMITTED)
_ANSWERED = "state NOT IN (?, ?)"  # takes _IN_FLIGHT
_FINAL_AT = "coalesce(r.answered_at, CASE WHEN r.state NOT IN (?, ?) THEN r.updated_at END)"  # takes _IN_FLIGHT
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


@dataclass(frozen=True)
class TokenRates:
    """A model's prices (USD per 1M tokens) and the batch or live factor, as the cost columns are computed."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    factor: float
    input_includes_cache: bool = False


#: The dataset's default record (dataset.record_json's keys and spacing) as SQL over files f and requests r, then
#: the job, file name, prompt length and suspect (for the summary of what was kept).
_RECORD_SQL = (
    "'{\"file_name\": ' || json_quote(f.file_name) || ', \"english_prompt\": ' || json_quote(r.prompt) || "
    "', \"custom_id\": ' || json_quote(r.custom_id) || ', \"provider\": ' || json_quote(r.provider) || "
    "', \"model\": ' || json_quote(r.model) || ', \"job\": ' || json_quote(f.job) || ', \"via\": ' || "
    "json_quote(coalesce(r.via, 'batch')) || '}', f.job, f.file_name, length(r.prompt), r.suspect"
)


# ---- checks before the store is trusted, and SQLite failures as one line --------------------------------------

DB_NAME = "hipbatch.db"
PAGE_SIZE = 16384  # bytes a page, for stores made from now on (an existing store keeps its own)
QUICK_CHECK_MAX_BYTES = 8 << 20  # stores up to this size get a full quick_check (about 10 ms); all, the size check
_S = TypeVar("_S")


def no_state_message(state_dir: Path) -> str:
    """What a read-only command says when the state dir holds no store."""
    return f"no hipbatch state in {state_dir} (run `hipbatch submit DIR` first, or pass --state-dir)"


def _store_message(path: Path, e: sqlite3.Error) -> str:
    text = str(e)
    low = text.lower()
    if "full" in low:
        return (
            f"{path}: the disk is full ({text}); free some space and run the same command again "
            "(everything committed before this write is kept)"
        )
    if "readonly" in low or "read-only" in low:
        return f"{path} is read-only ({text}): make the file and its folder writable, then run the command again"
    if "not a database" in low:
        return f"{path} is not a SQLite database (not a hipbatch store): move it away or pass another --state-dir"
    if "malformed" in low or "corrupt" in low:
        return (
            f"{path} is not a usable hipbatch store ({text}): restore it from a backup, or move it away and use "
            "another --state-dir (a new store would send, and pay for, every request again)"
        )
    if "disk i/o" in low:
        return f"{path}: disk I/O error ({text}); check the disk, then run the same command again"
    if "unable to open" in low:
        return f"{path}: cannot open the store ({text}); check that its folder exists and is writable"
    return f"{path}: {text}"


@contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """SQLite failures of the store (disk full, read-only, corrupt, I/O) -> one StoreError naming the path.
    Integrity and programming errors are bugs and pass through."""
    try:
        yield
    except sqlite3.OperationalError as e:
        raise StoreError(_store_message(path, e)) from e
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
            raise
        raise StoreError(_store_message(path, e)) from e
    except OSError as e:
        problem = disk_error(e)
        if problem is None:
            raise
        raise problem from e


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streamed(self: Store, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with sqlite_errors(self.path):
                yield from fn(self, *args, **kwargs)

        return streamed

    @functools.wraps(fn)
    def call(self: Store, *args: Any, **kwargs: Any) -> Any:
        with sqlite_errors(self.path):
            return fn(self, *args, **kwargs)

    return call


def _guarded(cls: type[_S]) -> type[_S]:
    """Every public method of the store reports SQLite failures as a StoreError (see sqlite_errors)."""
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(fn):
            setattr(cls, name, _guard(fn))
    return cls


def _check_dir(state_dir: Path, create: bool) -> None:
    """The state dir is a directory (made when `create`); NoState when it is missing and may not be made."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StoreError(f"state dir {state_dir} is not a directory: pass --state-dir (or HIPBATCH_STATE_DIR) a folder")
    if state_dir.is_dir():
        return
    if not create:
        raise NoState(no_state_message(state_dir))
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the state dir {state_dir}: {e.strerror or e}; pass another --state-dir") from e


def _check_writable(state_dir: Path) -> None:
    """A file can be made in the state dir (the lock, the WAL, shards): checked by making one."""
    try:
        fd, probe = tempfile.mkstemp(dir=state_dir, prefix=".hipbatch-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StoreError(
            f"state dir {state_dir} is not writable ({e.strerror or e}): make it writable or pass another --state-dir"
        ) from e


def check_db_file(path: Path) -> None:
    """The store file is a regular, non-empty, writable file, or StoreError saying what it is instead.

    Only stat() here: opening and closing the file would drop the POSIX locks SQLite connections of this
    process hold on it (SQLite's "how to corrupt a database", 2.2). What is inside is checked through SQLite.
    """
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a hipbatch store: move it away or pass another --state-dir")
    if not path.is_file():
        raise StoreError(f"{path} is not a regular file: move it away or pass another --state-dir")
    if path.stat().st_size == 0:
        raise StoreError(
            f"{path} is empty (0 bytes), not a hipbatch store: if this state dir never held a run, delete the file; "
            "otherwise its ledger is lost: restore it from a backup (starting again would send, and pay for, every "
            "request again)"
        )
    if not os.access(path, os.W_OK):
        raise StoreError(f"{path} is read-only: make it writable, then run the command again")


def _check_whole(db: Database, path: Path) -> None:
    """The file holds every page its header counts (unless a WAL holds pages not yet written back)."""
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size:
        return
    page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
    pages = int(db.execute("PRAGMA page_count").fetchone()[0])
    size = path.stat().st_size
    if size < page_size * pages:
        raise StoreError(f"{path} is truncated ({size:,} bytes of {page_size * pages:,}): restore it from a backup")


def _check_schema(db: Database, path: Path) -> None:
    """Refuse a store a newer hipbatch wrote (a migration this one does not know) or, when small enough to check
    quickly, one whose pages do not hold together."""
    _check_whole(db, path)
    known = [m.name for m in migrations._migrations]
    unknown = [m.name for m in migrations.applied(db) if m.name not in known]
    if unknown:
        raise StoreError(
            f"{path} was written by a newer hipbatch: its schema has migration {unknown[-1]}, which hipbatch "
            f"{__version__} does not know (it knows up to {known[-1]}); upgrade hipbatch to use this state dir"
        )
    if path.stat().st_size <= QUICK_CHECK_MAX_BYTES:
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"{path} is corrupt ({problems[0]}): restore it from a backup")


def lock_timeout() -> float:
    """Seconds a command waits for another one on the same state dir (HIPBATCH_LOCK_TIMEOUT, default 600)."""
    return float(os.environ.get("HIPBATCH_LOCK_TIMEOUT", "600"))


class StateLock:
    """An exclusive lock file per state dir, so two commands never interleave their writes."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "hipbatch.lock"
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to `timeout` seconds (default: HIPBATCH_LOCK_TIMEOUT, else 600)."""
        timeout = lock_timeout() if timeout is None else timeout
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot take the lock {self.path}: {e.strerror or e}") from e

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if not wait_until(take, timeout):
            os.close(fd)
            raise StoreLocked(
                f"another hipbatch command is working on {self.path.parent} "
                f"(waited {timeout:.0f}s); wait for it to finish or stop it, then rerun"
            )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @contextmanager
    def held(self, timeout: float | None = None) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


@_guarded
class Store:
    """The ledger of jobs, files, requests, shards and batches."""

    def __init__(self, state_dir: Path, create: bool = True) -> None:
        """Open the state dir's store, checked first; with create (commands that send), make it if missing."""
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._json_checked: bool | None = None
        _check_dir(state_dir, create)
        self.lock = StateLock(state_dir)
        if not self.path.exists() and not self.path.is_symlink():
            if not create:
                raise NoState(no_state_message(state_dir))
            _check_writable(state_dir)
            self._create_fresh()
        else:
            check_db_file(self.path)
            _check_writable(state_dir)
        with sqlite_errors(self.path):
            self._db = self._connect(self.path)
            _check_schema(self._db, self.path)
            if migrations.pending(self._db):  # read-only check: an up-to-date store needs no lock to open
                with self.lock.held():
                    migrations.apply(self._db)

    @classmethod
    def open_existing(cls, state_dir: Path) -> Store:
        """The store of a state dir that must already hold one (read-only commands): nothing is created,
        NoState when there is none."""
        return cls(state_dir, create=False)

    @staticmethod
    def _connect(path: Path) -> Database:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        db = Database(conn, execute_plugins=False)  # no plugin scan: 50 ms off every command start
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
        db.execute("PRAGMA busy_timeout=60000")
        # A bounded page cache (32 MB, not proportional to the store) so bulk updates in random order stay
        # in memory within one transaction instead of re-reading and re-writing pages.
        db.execute("PRAGMA cache_size=-32768")
        return db

    def _create_fresh(self) -> None:
        """A new store appears whole or not at all: migrated in a temp file under the lock, then renamed into
        place, so a store file is never empty or half made (an empty one is refused as a lost ledger). The temp
        file uses a rollback journal, not WAL: each commit is then in the file itself (a WAL checkpoint that a
        full disk stops at close would leave the renamed file without its last pages)."""
        tmp = self.path.with_name(DB_NAME + ".new")
        with self.lock.held(), sqlite_errors(tmp):
            if self.path.exists():
                return  # another command made it while this one waited for the lock
            for suffix in ("", "-journal", "-wal", "-shm"):
                tmp.with_name(tmp.name + suffix).unlink(missing_ok=True)
            db = Database(sqlite3.connect(tmp, isolation_level=None), execute_plugins=False)
            try:
                db.execute("PRAGMA journal_mode=DELETE")
                db.execute("PRAGMA synchronous=FULL")
                # 16 KB pages (SQLite's default is 4 KB): collect's bulk update of the ledger, which makes each
                # row about twice as long, splits and writes fewer pages (~25% less time a result line).
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                migrations.apply(db)
            finally:
                db.close()
            os.replace(tmp, self.path)

    def limit_cache(self, mb: int) -> None:
        """Bound SQLite's page cache for this connection (submit: its peak RSS then stays flat as stores grow)."""
        self._db.execute(f"PRAGMA cache_size=-{int(mb) * 1024}")

    def read_mapped(self) -> None:
        """Read pages straight from the OS cache, for commands that aggregate the whole ledger (status):
        ~1.5x faster on 10^6 requests. Not for writers: mapped pages would count in their peak RSS."""
        self._db.execute("PRAGMA mmap_size=268435456")

    def close(self) -> None:
        self._db.close()

    def _table(self, name: str) -> Table:
        return self._db.table(name)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with sqlite_errors(self.path), self._db.atomic():  # a failed commit (disk full) is a StoreError too
            yield

    # ---- jobs and files -------------------------------------------------------------------------

    def upsert_job(self, name: str, **fields: Any) -> None:
        now = time.time()
        existing = self._get("jobs", name)
        row = {"name": name, **fields, "updated_at": now}
        if existing is None:
            row["created_at"] = now
        self._table("jobs").upsert(row, pk="name")

    def job(self, name: str) -> JobRow | None:
        row = self._get("jobs", name)
        return None if row is None else _job_row(row)

    def jobs(self) -> list[JobRow]:
        return [_job_row(r) for r in self._table("jobs").rows_where(order_by="name")]

    def record_files(self, rows: Iterable[dict[str, Any]], now: float | None = None) -> None:
        """Upsert (job, file_name) -> custom_id / skip_reason rows in one transaction.

        A row that is already there unchanged is not written again (a re-submit of an unchanged folder).
        """
        now = time.time() if now is None else now
        with self._db.atomic():
            self._db.conn.executemany(
                "INSERT INTO files (job, file_name, custom_id, skip_reason, updated_at) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (job, file_name) DO UPDATE SET custom_id = excluded.custom_id, "
                "skip_reason = excluded.skip_reason, updated_at = excluded.updated_at "
                "WHERE files.custom_id IS NOT excluded.custom_id OR files.skip_reason IS NOT excluded.skip_reason",
                ((r["job"], r["file_name"], r.get("custom_id"), r.get("skip_reason"), now) for r in rows),
            )

    def file_count(self, job: str) -> int:
        return int(self._db.execute("SELECT count(*) FROM files WHERE job = ?", [job]).fetchone()[0])

    def forget_files_not_in(self, job: str, names: Iterable[str]) -> int:
        """Drop the job's file rows whose name is not in `names`, which must come sorted (as discovery gives
        them): a merge with the rows in file-name order, holding only the names to drop."""
        present = iter(names)
        current = next(present, None)
        gone = []
        for (name,) in self._db.execute("SELECT file_name FROM files WHERE job = ? ORDER BY file_name", [job]):
            while current is not None and current < name:
                current = next(present, None)
            if current != name:
                gone.append(name)
        for chunk in _chunks(gone, 500):
            marks = ",".join("?" * len(chunk))
            self._db.execute(f"DELETE FROM files WHERE job = ? AND file_name IN ({marks})", [job, *chunk])
        return len(gone)

    def skipped_files(self, job: str | None = None) -> list[dict[str, Any]]:
        where, args = "skip_reason IS NOT NULL", []
        if job:
            where += " AND job = ?"
            args.append(job)
        return list(self._table("files").rows_where(where, args, order_by="file_name"))

    # ---- requests -------------------------------------------------------------------------------

    def known_ids(self, custom_ids: Sequence[str]) -> set[str]:
        """Which of these custom_ids the store already has, in one query per chunk."""
        found: set[str] = set()
        for chunk in _chunks(custom_ids, 900):
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0] for r in self._db.execute(f"SELECT custom_id FROM requests WHERE custom_id IN ({marks})", chunk)
            )
        return found

    def add_shard(self, shard: dict[str, Any], requests: Iterable[dict[str, Any]]) -> int:
        """Record a written shard and its requests (rows of plain values) in one transaction; returns the shard
        id. A custom_id already in the store is left as it is."""
        now = time.time()
        with self._db.atomic():
            table = self._table("shards")
            table.insert({**shard, "state": ShardState.QUEUED, "created_at": now, "updated_at": now})
            shard_id = int(table.last_pk)  # type: ignore[arg-type]
            fixed = (shard_id, RequestState.PENDING.value, now, now)
            for chunk in _chunks(requests):
                # executemany over tuples: a third of what insert_all costs per row (submit's critical path)
                cols = list(dict.fromkeys(k for row in chunk for k in row))
                names = ", ".join([*cols, "shard_id", "state", "created_at", "updated_at"])
                self._db.conn.executemany(
                    f"INSERT OR IGNORE INTO requests ({names}) VALUES ({', '.join('?' * (len(cols) + 4))})",
                    (tuple(row.get(c) for c in cols) + fixed for row in chunk),
                )
            self._stats_add(1, "shard_id = ?", [shard_id])  # a new shard: its rows are the ones just added
        return shard_id

    def supersede_answers(self, custom_ids: Sequence[str]) -> int:
        """Before requests are asked again, move the tokens and cost of their current (paid) answers to the
        superseded table, in one transaction: the ledger then counts both answers, each once."""
        now = time.time()
        moved = 0
        with self._db.atomic():
            for chunk in _chunks(custom_ids, 900):
                where = f"custom_id IN ({','.join('?' * len(chunk))}) AND (input_tokens > 0 OR output_tokens > 0)"
                moved += self._db.execute(
                    "INSERT INTO superseded (custom_id, job, provider, model, batch_id, via, input_tokens, "
                    "output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, answered_at, superseded_at) "
                    "SELECT custom_id, job, provider, model, batch_id, via, input_tokens, output_tokens, "
                    f"cache_read_tokens, cache_write_tokens, cost_usd, answered_at, ? FROM requests WHERE {where}",
                    [now, *chunk],
                ).rowcount
                with self._counted(f"custom_id IN ({','.join('?' * len(chunk))})", chunk):
                    self._db.execute(
                        "UPDATE requests SET input_tokens = 0, output_tokens = 0, cache_read_tokens = 0, "
                        f"cache_write_tokens = 0, cost_usd = NULL WHERE {where}",
                        list(chunk),
                    )
        return moved

    def move_requests_to_shard(
        self,
        custom_ids: Sequence[str],
        shard: dict[str, Any],
        renewed: Mapping[str, str] | None = None,
        max_tokens: int | None = None,
    ) -> int:
        """Record a retry shard: the requests go back to pending in it, their attempt counted, any paid
        answer they had kept in the superseded table. `renewed` (new custom_id -> old) are new requests for the
        old ones' files (retry --max-tokens): made pending in the shard, and the files point at them; the old
        requests keep their answers and become superseded."""
        now = time.time()
        with self._db.atomic():
            self.supersede_answers(custom_ids)
            table = self._table("shards")
            table.insert({**shard, "state": ShardState.QUEUED, "created_at": now, "updated_at": now})
            shard_id = int(table.last_pk)  # type: ignore[arg-type]
            for chunk in _chunks(custom_ids, 900):
                marks = ",".join("?" * len(chunk))
                with self._counted(f"custom_id IN ({marks})", chunk):
                    self._db.execute(
                        f"UPDATE requests SET shard_id = ?, batch_id = NULL, state = ?, updated_at = ? "
                        f"WHERE custom_id IN ({marks})",
                        [shard_id, RequestState.PENDING, now, *chunk],
                    )
            for new_id, old_id in (renewed or {}).items():
                with self._counted("custom_id = ?", [new_id]):
                    self._db.execute(
                        "INSERT OR IGNORE INTO requests (custom_id, job, file_name, provider, model, endpoint, "
                        "state, shard_id, attempts, est_input_tokens, max_tokens, created_at, updated_at) SELECT ?, "
                        "job, file_name, provider, model, endpoint, ?, ?, 0, est_input_tokens, "
                        "coalesce(?, max_tokens), ?, ? FROM requests WHERE custom_id = ?",
                        [new_id, RequestState.PENDING, shard_id, max_tokens, now, now, old_id],
                    )
                # The files table's triggers mark the old request superseded (is_current = 0).
                self._db.execute("UPDATE files SET custom_id = ? WHERE custom_id = ?", [new_id, old_id])
        return shard_id

    def request(self, custom_id: str) -> dict[str, Any] | None:
        return self._get("requests", custom_id)

    def requests_in_states(
        self, states: Iterable[str], job: str | None = None, max_attempts: int | None = None
    ) -> Iterator[dict[str, Any]]:
        states = list(states)
        where = f"state IN ({','.join('?' * len(states))}) AND is_current = 1"  # an old version is never resent
        args: list[Any] = list(states)
        if job:
            where += " AND job = ?"
            args.append(job)
        if max_attempts is not None:
            where += " AND attempts < ?"
            args.append(max_attempts)
        yield from self._table("requests").rows_where(
            where,
            args,
            order_by="shard_id, custom_id",
            select="custom_id, shard_id, provider, model, endpoint, job, file_name, est_input_tokens, max_tokens, "
            "attempts, state",
        )

    def batch_request_ids(self, batch_id: str) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT custom_id FROM requests WHERE batch_id = ?", [batch_id])}

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
        for chunk in _chunks(rows, 900):  # 900: the custom_ids fit in one IN (...) for request_stats
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
            ids = list({row["custom_id"] for row in chunk})
            with self._counted(f"custom_id IN ({','.join('?' * len(ids))})", ids):
                for cols, many in groups.items():
                    sets = ", ".join(f"{c} = ?" for c in cols)
                    self._db.conn.executemany(f"UPDATE requests SET {sets} WHERE custom_id = ?{guard}", many)

    @contextmanager
    def staging(self) -> Iterator[None]:
        """A fresh temp.hb_staged for stage_results(), in one transaction (a savepoint of the caller's): when the
        block fails, what apply_staged wrote in it goes too, and the staged rows are dropped."""
        db = self._db.conn
        db.execute("DROP TABLE IF EXISTS temp.hb_staged")
        db.execute(f"CREATE TEMP TABLE hb_staged (custom_id TEXT, full INTEGER, {', '.join(RESULT_COLUMNS)})")
        try:
            with self.atomic():
                yield
        except BaseException:
            self.drop_staged()
            raise

    def stage_results(self, rows: Sequence[Sequence[Any]]) -> None:
        """Stage result rows, each (custom_id, full, *RESULT_COLUMNS) (full 0: only the first FAILED_COLUMNS are
        applied), inside staging(); they keep their file order (the staged rowid). Plain inserts: each row's
        request is found when the stage is applied, in one join."""
        marks = ", ".join("?" * (len(RESULT_COLUMNS) + 2))
        self._db.conn.executemany(f"INSERT INTO temp.hb_staged VALUES ({marks})", rows)

    def drop_staged(self) -> None:
        self._db.conn.execute("DROP TABLE IF EXISTS temp.hb_staged")
        self._db.conn.execute("DROP TABLE IF EXISTS temp.hb_map")

    def apply_staged(self, from_batch: str | None = None, keep_success: bool = True, twice: bool = True) -> None:
        """Apply the staged rows to their requests, in the ledger's row order, and empty the stage.

        With keep_success, a request that already has a good answer is never overwritten by a worse one (a late
        line from an older batch of the same request). With from_batch, a line read again from an older batch (a
        collect killed before it finished, rerun after `retry` resent the request) only counts if it is a
        success: a stale failure must not mark a request that is in flight again. Result lines come in any order;
        updating the ledger in that order rewrites pages at random (about 3x slower for 50,000 rows): one UPDATE
        ... FROM sorted by rowid. A custom_id found twice (`twice`: the caller knows if any was) is applied line
        by line in file order. Run inside the caller's transaction."""
        with self._db.atomic():
            # request_stats: rows of other batches' requests (a line of an older batch read again) are taken away
            # and added back; the caller counts from_batch's requests again (recount_batch) once all is applied.
            db = self._db.conn
            db.execute("CREATE TEMP TABLE IF NOT EXISTS hb_map (seq INTEGER PRIMARY KEY, rid INTEGER, rbatch TEXT)")
            db.execute("DELETE FROM temp.hb_map")
            # Each staged row's request, found once (one join): the update and the counts use it.
            db.execute(
                "INSERT INTO temp.hb_map SELECT x.rowid, r.rowid, r.batch_id FROM temp.hb_staged x "
                "JOIN requests r ON r.custom_id = x.custom_id"
            )
            other, args = ("rbatch IS NOT ?", [from_batch]) if from_batch is not None else ("1", [])
            scope = self._scope(f"rowid IN (SELECT rid FROM temp.hb_map WHERE {other})", args)
            with self._counted(scope):
                self._apply_staged(from_batch, keep_success, twice)
            db.execute("DELETE FROM temp.hb_staged")
            db.execute("DELETE FROM temp.hb_map")

    def _apply_staged(self, from_batch: str | None, keep_success: bool, twice: bool) -> None:
        """Apply temp.hb_staged to the requests in rowid order, under apply_staged's guards."""
        db = self._db.conn
        guard = ""
        if keep_success:
            guard += " AND (requests.state != ?1 OR s.state = ?1)"
        if from_batch is not None:
            guard += " AND (requests.batch_id = ?2 OR s.state = ?1)"
        sets = "".join(f", {c} = s.{c}" for c in RESULT_COLUMNS[:FAILED_COLUMNS])
        sets += "".join(
            f", {c} = CASE WHEN s.full THEN s.{c} ELSE requests.{c} END" for c in RESULT_COLUMNS[FAILED_COLUMNS:]
        )
        args = [RequestState.SUCCEEDED, from_batch, time.time()]

        def apply(where: str, where_args: Sequence[Any] = ()) -> None:
            db.execute(
                f"UPDATE requests SET updated_at = ?3{sets} FROM (SELECT m.rid, x.* FROM temp.hb_map m "
                f"JOIN temp.hb_staged x ON x.rowid = m.seq WHERE {where} ORDER BY m.rid) AS s "
                f"WHERE requests.rowid = s.rid{guard}",
                [*args, *where_args],
            )

        found = db.execute("SELECT custom_id FROM temp.hb_staged GROUP BY 1 HAVING count(*) > 1") if twice else []
        for chunk in _chunks([r[0] for r in found], 500):  # a custom_id seen twice: its lines one by one, in order
            marks = ",".join("?" * len(chunk))
            for (seq,) in db.execute(
                f"SELECT rowid FROM temp.hb_staged WHERE custom_id IN ({marks}) ORDER BY rowid", chunk
            ).fetchall():
                apply("x.rowid = ?4", [seq])
            db.execute(f"DELETE FROM temp.hb_staged WHERE custom_id IN ({marks})", chunk)
        apply("1")

    def mark_unanswered(self, batch_id: str, state: str, message: str) -> int:
        """Requests of a batch still waiting on it after its results were read get `state`."""
        with self._db.atomic():
            cur = self._db.execute(
                "UPDATE requests SET state = ?, error_code = ?, error_message = ?, updated_at = ? "
                "WHERE batch_id = ? AND state = ?",
                [state, state, message, time.time(), batch_id, RequestState.SUBMITTED],
            )
            if cur.rowcount:
                self.recount_batch(batch_id)
        return int(cur.rowcount)

    def stored_replies(self, job: str | None = None) -> Iterator[dict[str, Any]]:
        """Every request that holds a reply, for --reextract."""
        where = "reply_text IS NOT NULL OR finish IS NOT NULL"
        args: list[Any] = []
        if job:
            where = f"({where}) AND job = ?"
            args.append(job)
        yield from self._table("requests").rows_where(where, args, select="custom_id, job, reply_text, finish")

    DATASET_COLUMNS = (
        "job", "file_name", "english_prompt", "custom_id", "provider", "model", "via", "method", "suspect",
    )  # fmt: skip

    def dataset_rows(self, job: str | None = None) -> Iterator[dict[str, Any]]:
        """Files whose request has an extracted prompt, sorted by file name; streamed from SQLite."""
        for row in self.dataset_tuples(job):
            yield dict(zip(self.DATASET_COLUMNS, row, strict=True))

    def dataset_tuples(self, job: str | None = None) -> Iterator[tuple[Any, ...]]:
        """Dataset rows as plain tuples in DATASET_COLUMNS order (no dict per row: the dataset's hot loop), sorted
        by file name (then job). Each job's rows come in the files table's own order (no sort of the whole
        dataset); several jobs are merged."""
        names = [job] if job else [r[0] for r in self._db.execute("SELECT name FROM jobs ORDER BY name")]
        if len(names) == 1:
            yield from self._job_dataset(names[0])
            return
        yield from heapq.merge(*(self._job_dataset(name) for name in names), key=lambda row: (row[1], row[0]))

    def dataset_lines(self, job: str | None = None) -> Iterator[tuple[str, str, str, int, str | None]]:
        """(default record as a JSON line, job, file name, prompt length, suspect) in dataset order: the record
        made by SQLite (only where sql_json_like_python())."""
        names = [job] if job else [r[0] for r in self._db.execute("SELECT name FROM jobs ORDER BY name")]
        if len(names) == 1:
            yield from self._job_dataset(names[0], _RECORD_SQL)
            return
        yield from heapq.merge(*(self._job_dataset(n, _RECORD_SQL) for n in names), key=lambda r: (r[2], r[1]))

    def sql_json_like_python(self) -> bool:
        """Whether this SQLite's json_quote() escapes text exactly as json.dumps(ensure_ascii=False) does (checked
        once, on every kind of character that needs care)."""
        if self._json_checked is None:
            from json.encoder import encode_basestring

            probe = "".join(chr(i) for i in range(0x80)) + "\u2028\u2029\u00e9\u65e5\U0001f600\x7f"
            try:
                (quoted,) = self._db.execute("SELECT json_quote(?)", [probe]).fetchone()
            except sqlite3.OperationalError:  # no JSON functions in this SQLite
                quoted = None
            self._json_checked = quoted == encode_basestring(probe)
        return self._json_checked

    def _job_dataset(self, job: str, columns: str | None = None) -> Iterator[tuple[Any, ...]]:
        # CROSS JOIN: the files of the job in their primary-key order, each request looked up by its custom_id
        columns = (
            columns or "f.job, f.file_name, r.prompt, r.custom_id, r.provider, r.model, r.via, r.method, r.suspect"
        )
        yield from self._db.conn.execute(
            f"SELECT {columns} FROM files f CROSS JOIN requests r ON r.custom_id = f.custom_id "
            "WHERE f.job = ? AND r.state = ? ORDER BY f.file_name",
            [job, RequestState.SUCCEEDED],
        )

    def request_counts(self, job: str | None = None) -> dict[str, int]:
        """Current requests (those a file points at: what the dataset holds) per state."""
        counts = self._current_counts(job, "state")
        return {st: n for (st,), n in counts.items() if n}

    def _current_counts(self, job: str | None, *columns: str) -> dict[tuple[str, ...], int]:
        """Current requests per `columns` (request_stats, less the superseded ones); '' stands for NULL."""
        where, args = ("WHERE job = ?", [job]) if job else ("", [])
        cols = ", ".join(columns)
        groups = ", ".join(str(i + 1) for i in range(len(columns)))
        counts = {
            tuple(key): int(n)
            for *key, n in self._db.execute(
                f"SELECT {cols}, sum(n) FROM request_stats {where} GROUP BY {groups}", args
            ).fetchall()
        }
        for _, *key, n, _c, _nc, _e, _ne in self._superseded_by(job, *columns):
            counts[tuple(key)] = counts.get(tuple(key), 0) - int(n)
        return counts

    def superseded_count(self, job: str | None = None) -> int:
        """Old requests no file points at any more (a changed or removed file, a retry with new max_tokens)."""
        sql = "SELECT count(*) FROM requests WHERE is_current = 0" + (" AND job = ?" if job else "")
        return int(self._db.execute(sql, [job] if job else []).fetchone()[0])

    def failed_files(self, job: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Files with no good answer (the `failures` view): job, file_name, reason, error; skipped files last."""
        sql = (
            "SELECT job, file_name, state || CASE WHEN error_code IS NOT NULL AND error_code != state "
            "THEN ':' || error_code ELSE '' END AS reason, error_message AS error, custom_id FROM failures"
            + (" WHERE job = ?" if job else "")
            + " ORDER BY state = 'skipped', job, file_name"
            + (" LIMIT ?" if limit is not None else "")
        )
        args: list[Any] = [*([job] if job else []), *([limit] if limit is not None else [])]
        return [dict(r) for r in self._db.query(sql, args)]

    def failure_reasons(self, job: str | None = None) -> dict[str, int]:
        """Current requests with no good answer per reason (state, or state:error_code), most common first."""
        reasons: dict[str, int] = {}
        for (state, code), n in self._current_counts(job, "state", "error_code").items():
            if n and state not in (RequestState.SUCCEEDED, RequestState.PENDING, RequestState.SUBMITTED):
                reason = state if not code or code == state else f"{state}:{code}"
                reasons[reason] = reasons.get(reason, 0) + n
        return dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0])))

    # ---- shards ---------------------------------------------------------------------------------

    def shard(self, shard_id: int) -> ShardRow:
        row = self._get("shards", shard_id)
        if row is None:
            raise KeyError(shard_id)
        return _shard_row(row)

    def shards_in_states(self, states: Iterable[str], job: str | None = None) -> list[ShardRow]:
        states = list(states)
        where = f"state IN ({','.join('?' * len(states))})" + (" AND job = ?" if job else "")
        args = [*states, *([job] if job else [])]
        return [_shard_row(r) for r in self._table("shards").rows_where(where, args, order_by="id")]

    def next_shard_number(self) -> int:
        row = self._db.execute("SELECT coalesce(max(id), 0) + 1 FROM shards").fetchone()
        return int(row[0])

    def update_shard(self, shard_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self._table("shards").update(shard_id, fields)

    def attach_batch(self, shard: ShardRow, info: BatchInfo, adopted: bool = False) -> None:
        """Record the provider batch of a shard and mark its requests submitted, in one transaction.
        info.proven False (matched by time and size only) records it as tentative; a proven row stays proven."""
        now = time.time()
        before = self._get("batches", info.id)
        row = {
            "id": info.id,
            "shard_id": shard.id,
            "job": shard.job,
            "provider": shard.provider,
            "model": shard.model,
            **_batch_columns(info),
            "counts_final_only": int(info.counts_final_only),
            "created_at": info.created_at or now,
            "adopted": int(adopted),
            "proven": int(info.proven or bool(before and before.get("proven"))),
        }
        with self._db.atomic():
            self._table("batches").upsert(row, pk="id")
            self.update_shard(shard.id, state=ShardState.SUBMITTED, batch_id=info.id)
            with self._counted("shard_id = ?", [shard.id]):
                self._db.execute(
                    "UPDATE requests SET state = ?, batch_id = ?, attempts = attempts + 1, updated_at = ? "
                    "WHERE shard_id = ? AND state = ?",
                    [RequestState.SUBMITTED, info.id, now, shard.id, RequestState.PENDING],
                )

    def requeue_shard(self, shard_id: int, batch_id: str) -> None:
        """A batch refused for quota goes back to the queue: its requests are pending again, uncounted."""
        now = time.time()
        with self._db.atomic(), self._counted(self._scope("batch_id = ?", [batch_id])):
            self._db.execute(
                "UPDATE requests SET state = ?, batch_id = NULL, attempts = max(attempts - 1, 0), "
                "updated_at = ? WHERE batch_id = ? AND state = ?",
                [RequestState.PENDING, now, batch_id, RequestState.SUBMITTED],
            )
            self._db.execute(
                "UPDATE shards SET state = ?, batch_id = NULL, file_id = NULL, "
                "requeues = requeues + 1, updated_at = ? WHERE id = ?",
                [ShardState.QUEUED, now, shard_id],
            )
            self._db.execute("UPDATE batches SET collected = 1 WHERE id = ?", [batch_id])

    def pending_count(self, shard_id: int) -> int:
        """How many of a shard's requests still wait to be sent."""
        row = self._db.execute(
            "SELECT count(*) FROM requests WHERE shard_id = ? AND state = ?", [shard_id, RequestState.PENDING]
        ).fetchone()
        return int(row[0])

    def pending_in_shard(self, shard_id: int) -> set[str]:
        """custom_ids of a shard's requests that still wait to be sent."""
        rows = self._db.execute(
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
        with self._db.atomic():
            ids = [r[0] for r in self._db.execute(f"SELECT id FROM shards WHERE {where}", args)]
            n = 0
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                with self._counted(f"shard_id IN ({marks})", chunk):
                    n += int(
                        self._db.execute(
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
                self._db.execute(
                    f"UPDATE shards SET state = ?, updated_at = ? WHERE id IN ({marks})",
                    [ShardState.CANCELED, now, *chunk],
                )
        return len(ids), n

    def live_work(self, job: str, file_names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Requests of these files that have no good answer and that no batch holds or may hold:
        pending in a shard never sent (queued), or in a retryable state. For live mode. `missing` requests are
        left out: their answers may have been paid for (results gone), so only `retry --only missing --yes`
        sends them again."""
        retryable = [s for s in RETRYABLE if s is not RequestState.MISSING]
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
            yield from self._db.query(sql, [job, *chunk, *retryable, RequestState.PENDING, ShardState.QUEUED])

    # ---- batches --------------------------------------------------------------------------------

    def batch(self, batch_id: str) -> BatchRow | None:
        row = self._get("batches", batch_id)
        return None if row is None else _batch_row(row)

    def batches(self, job: str | None = None, unfinished_only: bool = False) -> list[BatchRow]:
        where, args = [], []
        if job:
            where.append("job = ?")
            args.append(job)
        if unfinished_only:
            where.append("is_final = 0")
        rows = self._table("batches").rows_where(" AND ".join(where) or None, args, order_by="created_at, id")
        return [_batch_row(r) for r in rows]

    def batches_to_collect(self) -> list[BatchRow]:
        rows = self._table("batches").rows_where("is_final = 1 AND collected = 0", order_by="created_at")
        return [_batch_row(r) for r in rows]

    def known_batch_ids(self) -> set[str]:
        """Ids of every batch this store holds, and of those it found not to be its own (never adopted)."""
        return {r[0] for r in self._db.execute("SELECT id FROM batches UNION SELECT id FROM foreign_batches")}

    def update_batch(self, info: BatchInfo) -> None:
        self._table("batches").update(
            info.id, {**_batch_columns(info), "finished_at": time.time() if info.is_final else None}
        )

    def mark_collected(self, batch_id: str, note: str | None = None) -> None:
        """The batch's results are in the ledger (`note`: why some could not be, e.g. gone)."""
        self._table("batches").update(batch_id, {"collected": 1, "read_error": note})

    def record_read_error(self, batch_id: str, message: str) -> None:
        """A collect could not read the batch's results: it stays uncollected, `status` shows why."""
        self._db.execute(
            "UPDATE batches SET read_error = ?, read_attempts = coalesce(read_attempts, 0) + 1 WHERE id = ?",
            [message, batch_id],
        )

    def prove_batch(self, batch_id: str) -> None:
        """A batch adopted by time and size returned this shard's custom_ids: it is ours."""
        self._table("batches").update(batch_id, {"proven": 1})

    def release_batch(self, batch_id: str, reason: str) -> int:
        """A batch adopted by time and size whose results are not this shard's: forget it (its id is kept in
        foreign_batches, so it is never adopted again), put its shard back in the queue and its requests back to
        pending, the attempt not counted, in one transaction. Returns the requests put back."""
        row = self.batch(batch_id)
        if row is None:
            return 0
        now = time.time()
        with self._db.atomic():
            self._table("foreign_batches").upsert(
                {"id": batch_id, "provider": row.provider, "shard_id": row.shard_id, "released_at": now,
                 "reason": reason},
                pk="id",
            )  # fmt: skip
            with self._counted(self._scope("batch_id = ?", [batch_id])):
                n = self._db.execute(
                    "UPDATE requests SET state = ?, batch_id = NULL, attempts = max(attempts - 1, 0), "
                    "updated_at = ? WHERE batch_id = ? AND state = ?",
                    [RequestState.PENDING, now, batch_id, RequestState.SUBMITTED],
                ).rowcount
            self._db.execute(
                "UPDATE shards SET state = ?, batch_id = NULL, file_id = NULL, updated_at = ? WHERE id = ?",
                [ShardState.QUEUED, now, row.shard_id],
            )
            self._db.execute("DELETE FROM batches WHERE id = ?", [batch_id])
        return int(n)

    def shard_size(self, shard_id: int) -> tuple[int, int]:
        """(requests, estimated input tokens) of one shard, (0, 0) if it is unknown."""
        row = self._db.execute("SELECT n_requests, est_tokens FROM shards WHERE id = ?", [shard_id]).fetchone()
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
        n, tokens = self._db.execute(sql, args).fetchone()
        return int(n), int(tokens)

    # ---- money: estimates, settling, the ledger ----------------------------------------------------

    def calibration_sums(self, provider: str, model: str, includes_cache: bool) -> tuple[int, float, float]:
        """(answered requests, their estimated input tokens, the input tokens the provider reported)."""
        actual = "input_tokens" if includes_cache else "input_tokens + cache_read_tokens + cache_write_tokens"
        n, est, act = self._db.execute(
            f"SELECT count(*), sum(est_input_tokens), sum({actual}) FROM requests "
            f"WHERE provider = ? AND model = ? AND answered_at IS NOT NULL AND est_input_tokens > 0 "
            f"AND ({actual}) > 0",
            [provider, model],
        ).fetchone()
        return int(n or 0), float(est or 0), float(act or 0)

    def avg_output_tokens(self, provider: str, model: str) -> float | None:
        """Average output tokens of this model's good answers, None before the first."""
        row = self._db.execute(
            "SELECT avg(output_tokens) FROM requests WHERE provider = ? AND model = ? AND state = ? "
            "AND output_tokens > 0",
            [provider, model, RequestState.SUCCEEDED],
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def queued_by_model(self) -> list[tuple[str, str, int, int, int]]:
        """(provider, model, requests, estimated input tokens, max output tokens) waiting to be sent."""
        rows = self._db.execute(
            "SELECT provider, model, count(*), coalesce(sum(est_input_tokens), 0), coalesce(sum(max_tokens), 0) "
            "FROM requests WHERE state = ? GROUP BY provider, model",
            [RequestState.PENDING],
        ).fetchall()
        return [(p, m, int(n), int(t), int(o)) for p, m, n, t, o in rows]

    def unsettled_groups(self) -> list[tuple[str, str, bool, bool, bool]]:
        """(provider, model, live, needs an estimate, needs a cost) for requests whose money is not set yet (from
        request_stats: rows counted with fewer costs than requests)."""
        marks = ",".join("?" * len(_IN_FLIGHT))
        rows = self._db.execute(
            "SELECT nullif(provider, ''), nullif(model, ''), coalesce(nullif(via, ''), 'batch') = 'live', "
            f"max(n_est_cost_usd < n), max(state NOT IN ({marks}) AND n_cost_usd < n) FROM request_stats "
            "GROUP BY 1, 2, 3 HAVING max(n_est_cost_usd < n) OR max(state NOT IN "
            f"({marks}) AND n_cost_usd < n)",
            [*_IN_FLIGHT, *_IN_FLIGHT],
        ).fetchall()
        return [(p, m, bool(live), bool(e), bool(c)) for p, m, live, e, c in rows]

    def fill_estimated_costs(self, provider: str, model: str, ratio: float, rates: TokenRates) -> int:
        """est_cost_usd (worst case: calibrated input at the worst input price, max_tokens of output) where NULL."""
        value = "(est_input_tokens * ? * ? + max_tokens * ?) * ? / 1e6"
        value_args = [ratio, max(rates.input, rates.cache_write), rates.output, rates.factor]
        return self._fill("est_cost_usd", value, value_args, "provider = ? AND model = ? AND est_cost_usd IS NULL",
                          [provider, model])  # fmt: skip

    def fill_costs(self, provider: str, model: str, live: bool, rates: TokenRates) -> int:
        """cost_usd from the token columns of answered requests where it is NULL."""
        value = (
            "((input_tokens - ? * cache_read_tokens) * ? + cache_read_tokens * ? + cache_write_tokens * ? "
            "+ output_tokens * ?) * ? / 1e6"
        )
        value_args = [int(rates.input_includes_cache), rates.input, rates.cache_read, rates.cache_write]
        value_args += [rates.output, rates.factor]
        where = (
            f"provider = ? AND model = ? AND (coalesce(via, 'batch') = 'live') = ? AND cost_usd IS NULL AND {_ANSWERED}"
        )
        return self._fill("cost_usd", value, value_args, where, [provider, model, live, *_IN_FLIGHT])

    def _fill(self, column: str, value: str, value_args: list[Any], where: str, where_args: list[Any]) -> int:
        """SET column = value WHERE where, with request_stats' sum of the column (and its count) moved alike: the
        rows keep their key, so one pass before the update adds what it will set."""
        keys = ", ".join(STATS_KEY)
        key = ", ".join(f"coalesce({k}, '') AS {k}" for k in STATS_KEY)
        with self._db.atomic():
            self._db.execute(
                f"INSERT INTO request_stats ({keys}, {column}, n_{column}) SELECT {keys}, total(v), count(v) FROM "
                f"(SELECT {key}, {value} AS v FROM requests WHERE {where}) WHERE true GROUP BY {keys} "
                f"ON CONFLICT ({keys}) DO UPDATE SET {column} = {column} + excluded.{column}, "
                f"n_{column} = n_{column} + excluded.n_{column}",
                [*value_args, *where_args],
            )
            cur = self._db.execute(f"UPDATE requests SET {column} = {value} WHERE {where}", [*value_args, *where_args])
        return max(cur.rowcount, 0)

    def ledger_sums(self, job: str | None = None) -> list[tuple[Any, ...]]:
        """Per (job, provider, model): requests, input, output, cache read, cache write tokens, sum of cost_usd,
        answered requests with a cost, answered requests, worst case of the requests still in flight (from
        request_stats)."""
        where, args = ("WHERE job = ?", [job]) if job else ("", [])
        marks = ",".join("?" * len(_IN_FLIGHT))
        sql = (
            "SELECT nullif(job, ''), nullif(provider, ''), nullif(model, ''), sum(n), sum(input_tokens), "
            "sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), "
            "CASE WHEN sum(n_cost_usd) > 0 THEN total(cost_usd) END, "
            f"sum(CASE WHEN state NOT IN ({marks}) THEN n_cost_usd ELSE 0 END), "
            f"sum(CASE WHEN state NOT IN ({marks}) THEN n ELSE 0 END), "
            f"CASE WHEN sum(CASE WHEN state IN ({marks}) THEN n_est_cost_usd ELSE 0 END) > 0 THEN "
            f"total(CASE WHEN state IN ({marks}) THEN est_cost_usd END) END "
            f"FROM request_stats {where} GROUP BY job, provider, model HAVING sum(n) > 0 ORDER BY 1, 2, 3"
        )
        return self._db.execute(sql, [*_IN_FLIGHT * 4, *args]).fetchall()

    def superseded_sums(self, job: str | None = None) -> list[tuple[Any, ...]]:
        """(job, provider, model, live, input, output, cache read, cache write, cost) of answers paid for and
        then asked again, summed per job, model and mode."""
        where, args = ("WHERE job = ?", [job]) if job else ("", [])
        return self._db.execute(
            "SELECT job, provider, model, coalesce(via, 'batch') = 'live', total(input_tokens), "
            "total(output_tokens), total(cache_read_tokens), total(cache_write_tokens), total(cost_usd) "
            f"FROM superseded {where} GROUP BY 1, 2, 3, 4",
            args,
        ).fetchall()

    def unsettled_tokens(self, job: str, provider: str, model: str) -> Iterator[tuple[int, int, int, int, bool]]:
        """(input, output, cache read, cache write, live) of answered requests whose cost is not set yet."""
        for tin, tout, tcr, tcw, live in self._db.execute(
            "SELECT input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, "
            "coalesce(via, 'batch') = 'live' FROM requests WHERE job = ? AND provider = ? AND model = ? "
            f"AND cost_usd IS NULL AND {_ANSWERED}",
            [job, provider, model, *_IN_FLIGHT],
        ):
            yield int(tin or 0), int(tout or 0), int(tcr or 0), int(tcw or 0), bool(live)

    def token_sums_by_model(self, job: str) -> list[tuple[str, str, bool, int, int, int, int]]:
        """(provider, model, live, input, output, cache read, cache write) of every answer the job paid for,
        superseded ones included."""
        columns = "provider, model, via, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens"
        rows = self._db.execute(
            "SELECT provider, model, coalesce(via, 'batch') = 'live', sum(input_tokens), sum(output_tokens), "
            f"sum(cache_read_tokens), sum(cache_write_tokens) FROM (SELECT {columns} FROM requests WHERE job = ? "
            f"AND state NOT IN (?, ?) UNION ALL SELECT {columns} FROM superseded WHERE job = ?) GROUP BY 1, 2, 3",
            [job, *_IN_FLIGHT, job],
        ).fetchall()
        return [(p, m, bool(lv), int(a or 0), int(b or 0), int(c or 0), int(d or 0)) for p, m, lv, a, b, c, d in rows]

    # ---- what the extractor kept -------------------------------------------------------------------

    def extraction_methods(self, job: str | None = None) -> dict[str, int]:
        """Good answers per extraction method (tag, fenced, label, json, whole)."""
        where, args = ("AND job = ?", [job]) if job else ("", [])
        rows = self._db.execute(
            f"SELECT coalesce(nullif(method, ''), 'unknown'), sum(n) FROM request_stats WHERE state = ? {where} "
            "GROUP BY 1 HAVING sum(n) > 0 ORDER BY 2 DESC, 1",
            [RequestState.SUCCEEDED, *args],
        ).fetchall()
        return {m: int(n) for m, n in rows}

    def median_prompt_length(self, job: str) -> float:
        """The median length in characters of a job's kept prompts (0 when it has none)."""
        (n,) = self._db.execute(
            "SELECT count(*) FROM requests WHERE job = ? AND state = ?", [job, RequestState.SUCCEEDED]
        ).fetchone()
        if not n:
            return 0.0
        rows = self._db.execute(
            "SELECT length(prompt) FROM requests WHERE job = ? AND state = ? ORDER BY 1 LIMIT ? OFFSET ?",
            [job, RequestState.SUCCEEDED, 2 - n % 2, (n - 1) // 2],
        ).fetchall()
        return sum(float(r[0]) for r in rows) / len(rows)

    def suspect_files(self, job: str, overlong: float, limit: int | None = None) -> list[tuple[str, str]]:
        """(file name, reasons) of a job's current files whose kept prompt looks suspicious: a suspect the
        extractor named, or longer than `overlong` characters."""
        rows = self._db.execute(
            "SELECT f.file_name, r.suspect, length(r.prompt) > ? FROM files f JOIN requests r "
            "ON r.custom_id = f.custom_id WHERE f.job = ? AND r.state = ? AND (r.suspect IS NOT NULL "
            "OR length(r.prompt) > ?) ORDER BY f.file_name LIMIT ?",
            [overlong, job, RequestState.SUCCEEDED, overlong, -1 if limit is None else limit],
        ).fetchall()
        return [
            (name, ",".join(p for p in (suspect, "overlong" if long else None) if p)) for name, suspect, long in rows
        ]

    def count_suspects(self, job: str, overlong: float) -> int:
        """How many of a job's current files suspect_files would list."""
        (n,) = self._db.execute(
            "SELECT count(*) FROM files f JOIN requests r ON r.custom_id = f.custom_id WHERE f.job = ? "
            "AND r.state = ? AND (r.suspect IS NOT NULL OR length(r.prompt) > ?)",
            [job, RequestState.SUCCEEDED, overlong],
        ).fetchone()
        return int(n)

    def fail_suspects(self, job: str, overlong: float) -> int:
        """--strict: a job's suspicious kept prompts become extraction_failed (retryable), naming why."""
        where = "job = ? AND state = ? AND (suspect IS NOT NULL OR length(prompt) > ?)"
        with self._db.atomic(), self._counted(self._scope(where, [job, RequestState.SUCCEEDED, overlong])):
            cur = self._db.execute(
                "UPDATE requests SET state = ?, error_code = 'suspect', error_message = 'suspect: ' || "
                f"coalesce(suspect, 'overlong'), updated_at = ? WHERE {where}",
                [RequestState.EXTRACTION_FAILED, time.time(), job, RequestState.SUCCEEDED, overlong],
            )
        return max(cur.rowcount, 0)

    # ---- status and report aggregates -------------------------------------------------------------

    def job_state_sums(self, job: str | None = None) -> list[tuple[str, str, bool, int, float, int, float, int]]:
        """Per (job, state, current or superseded): requests, total cost, requests with a cost, total worst case,
        requests with one. From request_stats (a few rows per batch), less the superseded requests (few, read
        through their partial index): no cost that grows with the requests."""
        where, args = ("WHERE job = ?", [job]) if job else ("", [])
        rows = self._db.execute(
            "SELECT job, state, sum(n), total(cost_usd), sum(n_cost_usd), total(est_cost_usd), sum(n_est_cost_usd) "
            f"FROM request_stats {where} GROUP BY job, state",
            args,
        ).fetchall()
        old = {(j, st): rest for j, st, *rest in self._superseded_by(job, "state")}
        out = []
        for j, st, n, cost, n_cost, est, n_est in rows:
            o_n, o_cost, o_nc, o_est, o_ne = old.pop((j, st), (0, 0.0, 0, 0.0, 0))
            if n - o_n:
                out.append((j, st, True, int(n - o_n), float(cost - o_cost), int(n_cost - o_nc), float(est - o_est),
                            int(n_est - o_ne)))  # fmt: skip
            if o_n:
                out.append((j, st, False, int(o_n), float(o_cost), int(o_nc), float(o_est), int(o_ne)))
        return out

    def _superseded_by(self, job: str | None, *columns: str) -> list[tuple[Any, ...]]:
        """(job, *columns, requests, cost, with a cost, worst case, with one) of the superseded requests (is_current
        0: no file points at them), grouped by job and columns, through their partial index."""
        where, args = ("AND job = ?", [job]) if job else ("", [])
        cols = "".join(f", coalesce({c}, '')" for c in columns)
        groups = ", ".join(str(i + 1) for i in range(len(columns) + 1))
        return self._db.execute(
            f"SELECT coalesce(job, ''){cols}, count(*), total(cost_usd), count(cost_usd), total(est_cost_usd), "
            f"count(est_cost_usd) FROM requests WHERE is_current = 0 {where} GROUP BY {groups}",
            args,
        ).fetchall()

    def batch_failure_counts(self) -> list[tuple[str, str, str | None, int]]:
        """(batch id, state, error code, requests) of the failed requests of every batch (from request_stats)."""
        marks = ",".join("?" * len(RETRYABLE))
        rows = self._db.execute(
            f"SELECT batch_id, state, error_code, sum(n) FROM request_stats WHERE state IN ({marks}) "
            "AND batch_id != '' GROUP BY 1, 2, 3 HAVING sum(n) > 0",
            list(RETRYABLE),
        ).fetchall()
        return [(b, st, code or None, int(n)) for b, st, code, n in rows]

    def failure_message(self, state: str, batch_id: str, code: str | None) -> str | None:
        """One error message of a batch's requests in this state with this code."""
        row = self._db.execute(
            "SELECT error_message FROM requests WHERE state = ? AND batch_id = ? AND error_code IS ? LIMIT 1",
            [state, batch_id, code],
        ).fetchone()
        return row[0] if row else None

    def failure_examples(self, job: str) -> list[tuple[str, int, str | None]]:
        """(reason, requests, one message) per failure reason of a job, most common first."""
        rows = self._db.execute(
            "SELECT state || CASE WHEN error_code IS NOT NULL AND error_code != state THEN ':' || error_code "
            "ELSE '' END, count(*), max(error_message) FROM requests WHERE job = ? AND state NOT IN (?, ?, ?) "
            "AND is_current = 1 GROUP BY 1 ORDER BY 2 DESC",
            [job, RequestState.SUCCEEDED, *_IN_FLIGHT],
        ).fetchall()
        return [(r, int(n), m) for r, n, m in rows]

    def timeline_span(self, job: str) -> tuple[float, float | None, int] | None:
        """(first request created, last request final, requests still in flight) of a job; None if it has none."""
        row = self._db.execute(
            f"SELECT min(r.created_at), max({_FINAL_AT}), sum(r.state IN (?, ?)) FROM requests r WHERE r.job = ?",
            [*_IN_FLIGHT, *_IN_FLIGHT, job],
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return float(row[0]), None if row[1] is None else float(row[1]), int(row[2] or 0)

    def timeline_histories(
        self, job: str, start: float, span: float, buckets: int
    ) -> Iterator[tuple[str, int | None, int | None, int | None, int]]:
        """Requests grouped by equal histories: (state, slot created, slot sent or None, slot final or None, n),
        slots being `buckets` equal slices of [start, start + span]: 100,000 requests are a few hundred rows."""
        slot = f"CAST(min({buckets - 1}, max(0, ({{}} - ?) / ? * {buckets})) AS INTEGER)"
        sql = (
            f"SELECT r.state, {slot.format('r.created_at')}, "
            f"CASE WHEN b.created_at IS NULL OR r.state = ? THEN NULL ELSE {slot.format('b.created_at')} END, "
            f"CASE WHEN r.state IN (?, ?) THEN NULL ELSE {slot.format(_FINAL_AT)} END, count(*) "
            "FROM requests r LEFT JOIN batches b ON b.id = r.batch_id WHERE r.job = ? GROUP BY 1, 2, 3, 4"
        )
        args = [start, span, RequestState.PENDING, start, span, *_IN_FLIGHT, *_IN_FLIGHT, start, span, job]
        yield from self._db.execute(sql, args)

    # ---- request_stats: counts and sums kept with every change of the requests ------------------------

    def _stats_add(self, sign: int, where: str, args: Sequence[Any] = ()) -> None:
        """Add (sign 1) or take away (-1) the requests `where` selects to / from request_stats."""
        keys = ", ".join(STATS_KEY)
        sums = ", ".join(f"{c} = {c} + excluded.{c}" for c in stats_columns().split(", ")[len(STATS_KEY) :])
        self._db.execute(
            f"INSERT INTO request_stats ({stats_columns()}) {stats_select(where)} ON CONFLICT ({keys}) DO UPDATE SET "
            f"{sums}",
            [sign, *args],
        )

    @contextmanager
    def _counted(self, where: str, args: Sequence[Any] = ()) -> Iterator[None]:
        """Keep request_stats right across a change of the requests `where` selects: they are taken away before and
        added back after, in one transaction. `where` must select the same rows after the change (a condition on
        columns it does not set: custom_id, shard_id, or rowid IN temp.hb_scope after _scope())."""
        with self._db.atomic():
            self._stats_add(-1, where, args)
            yield
            self._stats_add(1, where, args)
            self._db.execute("DELETE FROM request_stats WHERE n = 0")

    def _scope(self, where: str, args: Sequence[Any] = ()) -> str:
        """The rowids of the requests `where` selects now, kept in temp.hb_scope for _counted() (for a change
        that moves them out of `where`); returns the condition that selects them."""
        db = self._db.conn
        db.execute("CREATE TEMP TABLE IF NOT EXISTS hb_scope (rid INTEGER PRIMARY KEY)")
        db.execute("DELETE FROM temp.hb_scope")
        db.execute(f"INSERT INTO temp.hb_scope SELECT rowid FROM requests WHERE {where}", list(args))
        return "rowid IN (SELECT rid FROM temp.hb_scope)"

    def recount_batch(self, batch_id: str) -> None:
        """request_stats of one batch's requests counted again from them (one pass over its index), in the
        caller's transaction."""
        self._db.execute("DELETE FROM request_stats WHERE batch_id = ?", [batch_id])
        self._stats_add(1, "batch_id = ?", [batch_id])

    def rebuild_stats(self, job: str | None = None) -> None:
        """request_stats counted again from the requests (of one job, or all): after the ledger was changed from
        outside hipbatch, or an old store's rows were re-read (--reextract)."""
        where, args = ("job = ?", [job]) if job else ("1", [])
        with self._db.atomic():
            self._db.execute(f"DELETE FROM request_stats WHERE {where}", args)
            self._stats_add(1, where, args)

    def stats_rows(self, recount: bool = False) -> list[tuple[Any, ...]]:
        """request_stats as stored (or, with recount, as the requests give it now), sorted: for checks."""
        if recount:
            rows = self._db.execute(stats_select(), [1]).fetchall()
        else:
            rows = self._db.execute(f"SELECT {stats_columns()} FROM request_stats").fetchall()
        return sorted(tuple(r) for r in rows)

    # ---- helpers --------------------------------------------------------------------------------

    def _get(self, table: str, pk: Any) -> dict[str, Any] | None:
        try:
            return dict(self._table(table).get(pk))
        except NotFoundError:
            return None


# ---- typed rows: each built here, in one place --------------------------------------------------------------


def _job_row(row: dict[str, Any]) -> JobRow:
    return JobRow(
        name=row["name"],
        provider=row.get("provider"),
        model=row.get("model"),
        input_dir=row.get("input_dir"),
        template_dir=row.get("template_dir"),
        created_at=row.get("created_at"),
        updated_at=row.get("updated_at"),
    )


def _shard_row(row: dict[str, Any]) -> ShardRow:
    return ShardRow(
        id=int(row["id"]),
        key=row["key"],
        job=row["job"],
        provider=row["provider"],
        model=row["model"],
        endpoint=row["endpoint"],
        path=row["path"],
        n_requests=int(row["n_requests"] or 0),
        n_bytes=int(row["n_bytes"] or 0),
        est_tokens=int(row["est_tokens"] or 0),
        state=row["state"],
        file_id=row.get("file_id"),
        batch_id=row.get("batch_id"),
        intent_at=row.get("intent_at"),
        requeues=int(row.get("requeues") or 0),
        created_at=float(row.get("created_at") or 0.0),
    )


def _batch_row(row: dict[str, Any]) -> BatchRow:
    return BatchRow(
        id=row["id"],
        shard_id=int(row["shard_id"]),
        job=row["job"],
        provider=row["provider"],
        model=row["model"],
        status=row["status"],
        is_final=bool(row["is_final"]),
        total=row["total"],
        done=row["done"],
        failed=row["failed"],
        counts_final_only=bool(row["counts_final_only"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        finished_at=row["finished_at"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        errors=json.loads(row["errors"]) if row["errors"] else [],
        collected=bool(row["collected"]),
        adopted=bool(row["adopted"]),
        read_error=row.get("read_error"),
        read_attempts=int(row.get("read_attempts") or 0),
        proven=bool(row.get("proven", 1)),
    )


def _batch_columns(info: BatchInfo) -> dict[str, Any]:
    """The batches-table columns that a status check refreshes (the one place a BatchInfo is flattened)."""
    return {
        "status": info.status,
        "is_final": int(info.is_final),
        "total": info.total,
        "done": info.done,
        "failed": info.failed,
        "expires_at": info.expires_at,
        "output_file_id": info.output_file_id,
        "error_file_id": info.error_file_id,
        "errors": json.dumps(info.errors) if info.errors else None,
        "refreshed_at": time.time(),
    }
