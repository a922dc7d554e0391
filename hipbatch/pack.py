"""Request lines -> JSONL shards on disk, each within a provider's request-count and byte limits."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, Protocol

_SENTINELS = ("\x00hipbatch-custom-id\x00", "\x00hipbatch-system\x00", "\x00hipbatch-user\x00")


class _LineMaker(Protocol):
    name: str
    endpoint: str

    def to_line(self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str) -> dict[str, Any]: ...


class LineEncoder:
    """(system, user) -> (custom_id, JSONL line), JSON-escaping each text once.

    Escaping the source text is most of the cost of a request. The id keeps render.request_id's recipe
    (sha256 of the canonical JSON of provider, endpoint, model, params, system, user) and the line is
    byte for byte `json.dumps(provider.to_line(...))`; both are assembled from the same escaped bytes.
    This relies on to_line placing system and user as opaque strings; if a provider's line does not contain
    each of them exactly once, every line falls back to a plain json.dumps.
    """

    def __init__(self, provider: _LineMaker, model: str, params: dict[str, Any]) -> None:
        self.provider, self.model, self.params = provider, model, params
        head = json.dumps(
            [provider.name, provider.endpoint, model, sorted(params.items())],
            ensure_ascii=False,
            separators=(",", ":"),
            default=str,
        )
        self._head = hashlib.sha256((head[:-1] + ",").encode("utf-8"))
        self._system: tuple[str, bytes, Any] | None = None  # last system text, escaped, hash so far
        self._layouts: dict[tuple[bool, bool], list[bytes | int] | None] = {}

    def encode(self, system: str, user: str) -> tuple[str, bytes]:
        """The request's custom_id and its JSONL line (with the trailing newline)."""
        cached = self._system
        if cached is None or cached[0] is not system and cached[0] != system:
            esys = encode_basestring(system).encode("utf-8")
            head = self._head.copy()
            head.update(esys + b",")
            cached = self._system = (system, esys, head)
        esys, digest = cached[1], cached[2].copy()
        euser = encode_basestring(user).encode("utf-8")
        digest.update(euser)
        digest.update(b"]")
        custom_id = "hb-" + digest.hexdigest()[:48]
        layout = self._layout(bool(system), bool(user))
        if layout is None:
            line = self.provider.to_line(custom_id, self.model, self.params, system, user)
            return custom_id, (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        slots = (b'"' + custom_id.encode("ascii") + b'"', esys, euser)
        return custom_id, b"".join(part if isinstance(part, bytes) else slots[part] for part in layout)

    def _layout(self, has_system: bool, has_user: bool) -> list[bytes | int] | None:
        """The line cut around the three strings: literal bytes and slot numbers (0 id, 1 system, 2 user)."""
        key = (has_system, has_user)
        if key not in self._layouts:
            cid, system, user = _SENTINELS
            line = self.provider.to_line(
                cid, self.model, self.params, system if has_system else "", user if has_user else ""
            )
            text = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            marks = [
                (encode_basestring(s).encode(), slot)
                for slot, s in enumerate(_SENTINELS)
                if slot == 0 or (has_system, has_user)[slot - 1]
            ]
            layout: list[bytes | int] | None = []
            if any(text.count(mark) != 1 for mark, _ in marks):
                layout = None
            else:
                assert layout is not None
                at = 0
                for mark, slot in sorted(marks, key=lambda m: text.index(m[0])):
                    start = text.index(mark)
                    layout += [text[at:start], slot]
                    at = start + len(mark)
                layout.append(text[at:])
            self._layouts[key] = layout
        return self._layouts[key]


@dataclass
class Shard:
    """A finished shard file and the ledger rows of the requests in it."""

    path: Path
    key: str
    n_requests: int = 0
    n_bytes: int = 0
    est_tokens: int = 0
    requests: list[Any] = field(default_factory=list)  # ledger rows (dicts, or the caller's tuples)
    ids: set[str] = field(default_factory=set)


SYNC_EVERY = 16 * 1024 * 1024  # bytes written between two background fdatasync calls of a durable shard


class ShardWriter:
    """Appends lines to the current shard and starts a new one when the next line would not fit.

    A shard is written to `<name>.part` and renamed when complete, so a crash never leaves a half-written
    shard under its final name. Each finished shard goes to `on_close` (which records it in the ledger) as soon
    as it is renamed: the one packer behind submit, retry and the local queue.

    A durable shard is fsynced before it is renamed; so that this last fsync has little left to write, every
    SYNC_EVERY bytes a short-lived thread runs fdatasync on what is written so far while lines keep coming
    (the disk works while the caller renders; the system call releases the GIL).
    """

    def __init__(
        self,
        directory: Path,
        prefix: str,
        max_requests: int,
        max_bytes: int,
        durable: bool = True,
        on_close: Callable[[Shard], None] | None = None,
        sync_every: int = SYNC_EVERY,
        ramp_from: int | None = None,
    ) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        # With ramp_from, the first shard holds at most that many bytes and each next one twice the last, up to
        # max_bytes: a pipelined submit starts sending early (see prepare.RAMP_FROM).
        self.shard_bytes = min(ramp_from or max_bytes, max_bytes)
        self.durable = durable  # fsync each shard before it is renamed and recorded (not for previews)
        self.on_close = on_close
        self.current: Shard | None = None
        self._fh: Any = None
        self.sync_every = sync_every
        self.background_syncs = 0  # started so far (for tests and profiling)
        self._unsynced = 0  # bytes written since the last background sync was started
        self._sync: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def fits_alone(self, line: bytes) -> bool:
        """Whether a line fits in a shard of its own (else no batch can hold it)."""
        return len(line) <= self.max_bytes

    def add(self, line: bytes, custom_id: str, est_tokens: int, row: Any = None) -> Shard | None:
        """Add one line (row, if given, is kept for the ledger); returns the shard it closed to make room."""
        closed = None
        cur = self.current
        if cur is not None and (cur.n_requests >= self.max_requests or cur.n_bytes + len(line) > self.shard_bytes):
            closed = self.close()
            self.shard_bytes = min(self.shard_bytes * 2, self.max_bytes)
        if self.current is None:
            key = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
            self.current = Shard(path=self.directory / f"{key}.jsonl", key=key)
            self._fh = open(self.current.path.with_suffix(".jsonl.part"), "wb")  # noqa: SIM115
        cur = self.current
        self._fh.write(line)
        cur.n_requests += 1
        cur.n_bytes += len(line)
        if self.durable:
            self._unsynced += len(line)
            if self._unsynced >= self.sync_every:
                self._sync_in_background()
        cur.est_tokens += est_tokens
        if row is not None:
            cur.requests.append(row)
        cur.ids.add(custom_id)
        return closed

    def close(self) -> Shard | None:
        """Finish the current shard (flush, fsync, rename, hand to on_close); None if there is none."""
        shard, self.current = self.current, None
        if shard is None:
            return None
        self._fh.flush()
        self._join_sync()  # never close a file a background sync still uses
        if self.durable:
            os.fsync(self._fh.fileno())
        self._fh.close()
        self._unsynced = 0
        os.replace(shard.path.with_suffix(".jsonl.part"), shard.path)
        if self.on_close is not None:
            self.on_close(shard)
        return shard

    def _sync_in_background(self) -> None:
        if self._sync is not None and self._sync.is_alive():
            return  # the disk is still busy with the last one: try again after more lines
        self._join_sync()
        self._fh.flush()
        self._sync = threading.Thread(target=_datasync, args=(self._fh.fileno(),), daemon=True)
        self._sync.start()
        self.background_syncs += 1
        self._unsynced = 0

    def _join_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None

    def pending_ids(self) -> set[str]:
        """custom_ids in the shard being written."""
        return self.current.ids if self.current else set()


def _datasync(fd: int) -> None:
    """Write a file's data to disk ahead of its final fsync (which reports any error): best effort."""
    try:
        getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
    except OSError:
        pass


def safe_name(name: str, keep: str = "-_") -> str:
    """A job or file name reduced to letters, digits and `keep`, for paths (never empty)."""
    return "".join(c if c.isalnum() or c in keep else "_" for c in name) or "job"


def shard_prefix(job: str, number: int, suffix: str = "") -> str:
    """The file-name prefix of the shards a packer writes for a job (the number keeps runs apart)."""
    return f"{safe_name(job)[:40]}-{number:06d}{suffix}"
