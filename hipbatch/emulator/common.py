"""Pieces shared by the two provider backends: the shared core (config, stats, lock, seeded RNG), replies and
errors, ids and timestamps, deterministic per-request draws, message text helpers and a multipart parser."""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any

from hipbatch.emulator.config import EmulatorConfig
from hipbatch.emulator.faults import DownloadFaults
from hipbatch.emulator.stats import EmulatorStats

SECONDS_PER_DAY = 86_400


class ApiError(Exception):
    """An HTTP error answer; the server renders it in the calling provider's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


@dataclass
class Reply:
    """A complete HTTP answer, built before anything is written to the socket."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # a download's batch, named stably (e.g. "openai:3"), so download_fault_fraction can pick whole batches
    fault_key: str | None = None
    # "cut" download fault: send only this many body bytes under the full Content-Length, then hang up
    cut_at: int | None = None


def json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    """A JSON reply."""
    return Reply(status=status, body=json.dumps(obj).encode("utf-8"), headers=dict(headers or {}))


class Core:
    """State every backend shares: the live config, the stats, one lock and the seeded fault RNG."""

    def __init__(self, config: EmulatorConfig, stats: EmulatorStats) -> None:
        self.config = config
        self.stats = stats
        self.lock = threading.RLock()
        self._rng = random.Random(config.seed)
        self._rng_seed = config.seed
        self.base_url = ""
        # (model, system text) pairs whose cache_control prefix was already written (Anthropic prompt caching)
        self.cache_seen: set[tuple[str, str]] = set()
        # custom_id -> processed batches it was in so far; feeds the per-request draws so a resubmitted
        # request gets a fresh (still deterministic) chance instead of failing the same way forever
        self.attempts: Counter[str] = Counter()
        self.faults = DownloadFaults(lambda: self.config, stats)

    def results_base(self) -> str:
        """Base URL for absolute URLs the server hands out."""
        return (self.config.results_base_url or self.base_url).rstrip("/")

    @property
    def rng(self) -> random.Random:
        """The seeded per-HTTP-request RNG (use under `lock`); reseeded when config.seed changes."""
        if self.config.seed != self._rng_seed:
            self._rng = random.Random(self.config.seed)
            self._rng_seed = self.config.seed
        return self._rng

    def draw(self) -> float:
        """Next number of the seeded per-HTTP-request RNG."""
        with self.lock:
            return self.rng.random()

    def take_attempts(self, custom_ids: list[str]) -> dict[str, int]:
        """Attempt number of each custom_id in a newly processed batch (0 the first time), counted as sent."""
        with self.lock:
            numbers = {cid: self.attempts[cid] for cid in custom_ids}
            self.attempts.update(custom_ids)
        self.stats.add_sent(custom_ids)
        return numbers

    def frac(self, *parts: object) -> float:
        """Deterministic number in [0, 1) from the seed and `parts` (independent of arrival order)."""
        return unit_hash(self.config.seed, *parts)


def unit_hash(*parts: object) -> float:
    """Map `parts` to a float in [0, 1) through sha256."""
    text = "\0".join(str(part) for part in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def now() -> float:
    """Current time in seconds."""
    return time.time()


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC timestamp with microseconds, e.g. 2026-11-27T10:00:00.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id(prefix: str, length: int = 24) -> str:
    """A fresh random id such as `batch_1f...`."""
    return prefix + secrets.token_hex(length // 2)


def is_unknown_model(model: str) -> bool:
    """Models the emulator pretends not to know."""
    return model.startswith(("unknown", "no-such"))


def content_text(content: Any) -> str:
    """Text of a message content: a string or a list of text blocks/parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            str(block.get("text", ""))
            for block in content
            if isinstance(block, dict) and block.get("type") in ("text", "input_text", None)
        ]
        return "\n".join(texts)
    return ""


def live_key(messages: Any) -> str:
    """Key of a live call in the stats: sha256 of the canonical JSON of its messages."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def canonical_dumps(obj: Any) -> str:
    """Compact one-line JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    """JSON Lines: one object per line, each ending with a single '\\n', no blank lines."""
    return "".join(canonical_dumps(line) + "\n" for line in lines).encode("utf-8")


@dataclass
class FormPart:
    """One part of a multipart/form-data body."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """Parse a multipart/form-data body into its parts by field name (later parts win)."""
    header = BytesHeaderParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1"))
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ApiError(400, "multipart body without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    parts: dict[str, FormPart] = {}
    pos = body.find(delimiter)
    if pos < 0:
        raise ApiError(400, "malformed multipart body")
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            break
        if body[pos : pos + 2] == b"\r\n":
            pos += 2
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise ApiError(400, "malformed multipart body (no closing boundary)")
        head_end = body.find(b"\r\n\r\n", pos, end)
        if head_end < 0:
            head, data = body[pos:end], b""
        else:
            head, data = body[pos:head_end], body[head_end + 4 : end]
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_param("filename", header="content-disposition")
        if isinstance(name, str):
            parts[name] = FormPart(
                name=name,
                data=data,
                filename=filename if isinstance(filename, str) else None,
                content_type=headers.get("content-type"),
            )
        pos = end + 2
    return parts


@dataclass
class Call:
    """One parsed HTTP request as the backends see it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""
    params: tuple[str, ...] = ()  # path parameters captured by the route
    provider: str = "openai"  # whose conventions (error shape, ids) the answer follows

    def arg(self, name: str, default: str | None = None) -> str | None:
        """First value of query parameter `name`."""
        values = self.query.get(name)
        return values[0] if values else default

    def int_arg(self, name: str, default: int, low: int, high: int) -> int:
        """Integer query parameter within [low, high], else 400."""
        raw = self.arg(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, got {raw!r}", param=name) from None
        if not low <= value <= high:
            raise ApiError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
        return value

    def json(self) -> dict[str, Any]:
        """The body as a JSON object, else 400."""
        try:
            data = json.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return data
