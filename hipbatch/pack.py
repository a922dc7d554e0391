"""Request lines -> JSONL shards on disk, each within a provider's request-count and byte limits."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Shard:
    """A finished shard file and the ledger rows of the requests in it."""

    path: Path
    key: str
    n_requests: int = 0
    n_bytes: int = 0
    est_tokens: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


class ShardWriter:
    """Appends lines to the current shard and starts a new one when the next line would not fit.

    A shard is written to `<name>.part` and renamed when complete, so a crash never leaves a
    half-written shard under its final name.
    """

    def __init__(self, directory: Path, prefix: str, max_requests: int, max_bytes: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.current: Shard | None = None
        self._fh: Any = None
        directory.mkdir(parents=True, exist_ok=True)

    def fits_alone(self, line: bytes) -> bool:
        return len(line) <= self.max_bytes

    def add(self, line: bytes, row: dict[str, Any], est_tokens: int) -> Shard | None:
        """Add one line; returns the shard it closed to make room, if any."""
        closed = None
        cur = self.current
        if cur is not None and (cur.n_requests >= self.max_requests or cur.n_bytes + len(line) > self.max_bytes):
            closed = self.close()
        if self.current is None:
            key = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
            self.current = Shard(path=self.directory / f"{key}.jsonl", key=key)
            self._fh = open(self.current.path.with_suffix(".jsonl.part"), "wb")  # noqa: SIM115
        cur = self.current
        self._fh.write(line)
        cur.n_requests += 1
        cur.n_bytes += len(line)
        cur.est_tokens += est_tokens
        cur.requests.append(row)
        cur.ids.add(row["custom_id"])
        return closed

    def close(self) -> Shard | None:
        """Finish the current shard (flush, fsync, rename); None if there is none."""
        shard, self.current = self.current, None
        if shard is None:
            return None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(shard.path.with_suffix(".jsonl.part"), shard.path)
        return shard

    def pending_ids(self) -> set[str]:
        return self.current.ids if self.current else set()
