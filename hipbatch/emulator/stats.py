"""EmulatorStats: thread-safe counters of what the local batch server saw, sent and billed."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Billed:
    """What the server billed for one custom_id (or live key): answers produced and their usage."""

    answers: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


class EmulatorStats:
    """Counters read by tests (also served at GET /_emulator/stats). Writers hold `lock`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.files_uploaded = 0
        self.batches_created = 0
        self.batches_created_by_provider: dict[str, int] = {}
        self.sent: Counter[str] = Counter()  # custom_id -> times included in a processed batch
        self.answered: Counter[str] = Counter()  # custom_id (or live key) -> billed replies produced
        self.live_calls: Counter[str] = Counter()  # live key (sha256 of the messages) -> calls answered
        self.faults: Counter[str] = Counter()  # fault kind -> times injected
        self.hits: Counter[str] = Counter()  # route name -> requests received
        self.downloads: Counter[str] = Counter()  # download route name -> 200 answers its handler produced
        self.refused: Counter[str] = Counter()  # reason -> requests refused before their body was read
        self.billed_per_custom_id: dict[str, Billed] = {}  # custom_id (or live key) -> billed answers and usage
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0

    def reset(self) -> None:
        """Zero every counter."""
        with self.lock:
            self.files_uploaded = 0
            self.batches_created = 0
            self.batches_created_by_provider = {}
            for counter in (self.sent, self.answered, self.live_calls, self.faults, self.hits):
                counter.clear()
            self.downloads.clear()
            self.refused.clear()
            self.billed_per_custom_id = {}
            self.input_tokens = self.output_tokens = 0
            self.cache_read_tokens = self.cache_write_tokens = 0

    def hit(self, route: str) -> None:
        """Count one request to `route`."""
        with self.lock:
            self.hits[route] += 1

    def fault(self, kind: str) -> None:
        """Count one injected fault."""
        with self.lock:
            self.faults[kind] += 1

    def download(self, route: str) -> None:
        """Count one download its handler answered (before any download fault changed it)."""
        with self.lock:
            self.downloads[route] += 1

    def refuse(self, reason: str) -> None:
        """Count one request refused before its body was read."""
        with self.lock:
            self.refused[reason] += 1

    def file_uploaded(self) -> None:
        """Count one upload."""
        with self.lock:
            self.files_uploaded += 1

    def batch_created(self, provider: str) -> None:
        """Count one created batch."""
        with self.lock:
            self.batches_created += 1
            self.batches_created_by_provider[provider] = self.batches_created_by_provider.get(provider, 0) + 1

    def add_sent(self, custom_ids: Iterable[str]) -> None:
        """Count custom_ids included in a batch that is processed."""
        with self.lock:
            self.sent.update(custom_ids)

    def add_answer(
        self, key: str, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
    ) -> None:
        """Count one billed reply and its usage."""
        with self.lock:
            self.answered[key] += 1
            billed = self.billed_per_custom_id.get(key)
            if billed is None:
                billed = self.billed_per_custom_id[key] = Billed()
            billed.answers += 1
            billed.input_tokens += input_tokens
            billed.output_tokens += output_tokens
            billed.cache_read_tokens += cache_read
            billed.cache_write_tokens += cache_write
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            self.cache_read_tokens += cache_read
            self.cache_write_tokens += cache_write

    def add_live_call(self, key: str) -> None:
        """Count one answered live call."""
        with self.lock:
            self.live_calls[key] += 1

    def billed_twice(self) -> list[str]:
        """Keys the server produced (and billed) more than one answer for, sorted."""
        with self.lock:
            return sorted(key for key, billed in self.billed_per_custom_id.items() if billed.answers > 1)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot."""
        with self.lock:
            return {
                "files_uploaded": self.files_uploaded,
                "batches_created": self.batches_created,
                "batches_created_by_provider": dict(self.batches_created_by_provider),
                "sent": dict(self.sent),
                "answered": dict(self.answered),
                "live_calls": dict(self.live_calls),
                "faults": dict(self.faults),
                "hits": dict(self.hits),
                "downloads": dict(self.downloads),
                "refused": dict(self.refused),
                "billed_per_custom_id": {key: asdict(b) for key, b in self.billed_per_custom_id.items()},
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cache_read_tokens": self.cache_read_tokens,
                "cache_write_tokens": self.cache_write_tokens,
            }
