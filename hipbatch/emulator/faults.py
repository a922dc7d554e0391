"""Download and auth faults of the local batch server (EmulatorConfig.download_fault*, auth_after): which
download misbehaves, how often, and the mangled bodies. Provider-neutral: bodies are JSON Lines."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from hipbatch.emulator.config import EmulatorConfig
from hipbatch.emulator.stats import EmulatorStats

#: Download faults the server applies to a download's body; "gone" replaces the answer with a 404 and
#: "no_output" is applied by the backends where they show a batch.
BODY_FAULTS = frozenset({"short", "empty", "cut", "duplicate", "conflict", "malformed"})
TEXT_KEYS = frozenset({"text", "content", "refusal", "message"})
CONFLICT_MARK = " (a second, different answer injected by the emulator)"


class DownloadFaults:
    """Counts, per (fault kind, target), how often a download fault was injected, and the API calls that
    `auth_after` lets through. A target is the id a download is fetched by (an OpenAI file, an Anthropic batch);
    a fault key names its batch stably (e.g. "openai:3") so `download_fault_fraction` picks whole batches."""

    def __init__(self, config: Callable[[], EmulatorConfig], stats: EmulatorStats) -> None:
        self._config = config
        self._stats = stats
        self._lock = threading.Lock()
        self._applied: Counter[tuple[str, str]] = Counter()
        self._generation: tuple[Any, ...] | None = None
        self._auth_limit: int | None = None
        self._auth_calls = 0

    def peek(self, kinds: Collection[str], target: str, fault_key: str | None) -> str | None:
        """The configured download fault if it is one of `kinds` and still due for `target`, else None."""
        cfg = self._config()
        kind = cfg.download_fault
        if kind is None or kind not in kinds:
            return None
        if cfg.download_fault_fraction < 1.0 and not (
            unit(cfg.seed, "download_fault", fault_key or target) < cfg.download_fault_fraction
        ):
            return None
        with self._lock:
            self._sync(cfg)
            if cfg.download_fault_times is not None and self._applied[(kind, target)] >= cfg.download_fault_times:
                return None
        return kind

    def take(self, kind: str, target: str) -> bool:
        """Record one injection of `kind` into `target` (False when its K times are already used up)."""
        cfg = self._config()
        with self._lock:
            self._sync(cfg)
            if cfg.download_fault_times is not None and self._applied[(kind, target)] >= cfg.download_fault_times:
                return False
            self._applied[(kind, target)] += 1
        self._stats.fault(kind)
        return True

    def draw(self, kinds: Collection[str], target: str, fault_key: str | None) -> str | None:
        """peek() and take() in one step, for faults that need no body."""
        kind = self.peek(kinds, target, fault_key)
        return kind if kind is not None and self.take(kind, target) else None

    def key_rotated(self) -> bool:
        """True when this API call must answer 401 (`auth_after` calls were already served); else counts it."""
        limit = self._config().auth_after
        with self._lock:
            if limit != self._auth_limit:
                self._auth_limit, self._auth_calls = limit, 0
            if limit is None:
                return False
            if self._auth_calls >= limit:
                refused = True
            else:
                self._auth_calls += 1
                refused = False
        if refused:
            self._stats.fault("auth_after")
        return refused

    def _sync(self, cfg: EmulatorConfig) -> None:
        generation = (cfg.download_fault, cfg.download_fault_times, cfg.download_fault_fraction, cfg.seed)
        if generation != self._generation:
            self._generation = generation
            self._applied.clear()


def unit(*parts: object) -> float:
    """Map `parts` to a float in [0, 1) through sha256 (the same mapping as common.unit_hash)."""
    digest = hashlib.sha256("\0".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_lines(body: bytes) -> list[bytes]:
    """The lines of `body`, each keeping its b"\\n" (the last one may lack it)."""
    lines = [line + b"\n" for line in body.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return [line for line in lines if line]


def mangle(kind: str, body: bytes) -> bytes | None:
    """`body` changed by body fault `kind` (not "cut"), or None when this body cannot show it."""
    lines = split_lines(body)
    if not lines:
        return None
    if lines[-1][-1:] != b"\n":
        lines[-1] += b"\n"
    if kind == "short":
        return b"".join(lines[: len(lines) - max(1, len(lines) // 3)])
    if kind == "empty":
        return b""
    if kind == "duplicate":
        return b"".join([*lines, lines[0]])
    if kind == "malformed":
        middle = len(lines) // 2
        line = lines[middle].rstrip(b"\n")
        if len(line) < 2:
            return None
        return b"".join([*lines[:middle], line[: len(line) // 2] + b"\n", *lines[middle + 1 :]])
    if kind == "conflict":
        for line in lines:
            other = conflicting(line)
            if other is not None:
                return b"".join([*lines, other])
        return None
    raise ValueError(f"not a body fault: {kind!r}")


def cut_point(body: bytes) -> int | None:
    """Where a "cut" download stops: inside the middle line, about half-way through the body."""
    lines = split_lines(body)
    if not lines:
        return None
    middle = len(lines) // 2
    line = lines[middle].rstrip(b"\n")
    if len(line) < 2:
        return None
    return sum(len(before) for before in lines[:middle]) + len(line) // 2


def conflicting(line: bytes) -> bytes | None:
    """Another answer for the same id: every text field changed, every token count doubled; None if no change."""
    try:
        item = json.loads(line)
    except ValueError:
        return None
    other = _changed(item, "")
    if other == item:
        return None
    return json.dumps(other, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _changed(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {name: _changed(item, name) for name, item in value.items()}
    if isinstance(value, list):
        return [_changed(item, key) for item in value]
    if isinstance(value, str) and key in TEXT_KEYS:
        return value + CONFLICT_MARK
    if isinstance(value, int) and not isinstance(value, bool) and "token" in key.lower():
        return value * 2  # doubling keeps every total equal to the sum of its parts
    return value
