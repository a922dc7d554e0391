"""Anthropic surface of the emulator: message batches (in_progress -> canceling -> ended), their JSONL
results, prompt-caching usage and live messages."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from hipbatch.emulator import fake_model
from hipbatch.emulator.common import (
    SECONDS_PER_DAY,
    ApiError,
    Call,
    Core,
    Reply,
    content_text,
    is_unknown_model,
    json_reply,
    jsonl,
    live_key,
    new_id,
    now,
    rfc3339,
)
from hipbatch.emulator.openai_api import live_gate

CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_BODY_BYTES = 256 * 1024 * 1024
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "refusal": "refusal"}


@dataclass
class MessageRequest:
    """One request of a message batch, reduced to what the fake model needs."""

    custom_id: str
    model: str
    system: str
    cached: bool  # the system prompt carries cache_control
    user_text: str
    max_tokens: int
    attempt: int = 0
    json_schema: dict[str, Any] | None = None  # the reply must be JSON (output_config.format)


@dataclass
class MessageBatch:
    """One Anthropic message batch and its lifecycle."""

    id: str
    order: int
    created_at: float
    requests: list[MessageRequest]
    status: str = "in_progress"
    polls: int = 0
    cancel_after_progress: bool = False
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    results: bytes = b""

    @property
    def fault_key(self) -> str:
        """Stable name of this batch for download_fault_fraction."""
        return f"anthropic:{self.order}"

    def obj(self, base_url: str, hide_results: bool = False, archived: bool = False) -> dict[str, Any]:
        """The MessageBatch JSON (`hide_results`, `archived`: the "no_output" and "gone" download faults)."""
        ended = self.status == "ended"
        counts = (
            self.counts
            if ended
            else {
                "processing": len(self.requests),
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            }
        )
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": dict(counts),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.created_at + SECONDS_PER_DAY),
            "ended_at": rfc3339(self.ended_at) if self.ended_at is not None else None,
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at) if self.cancel_initiated_at else None,
            "archived_at": rfc3339(self.ended_at) if archived and self.ended_at is not None else None,
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended and not hide_results else None,
        }


def system_text(system: Any) -> tuple[str, bool]:
    """(text, has cache_control) of a `system` param: a string or a list of text blocks."""
    if isinstance(system, list):
        cached = any(isinstance(block, dict) and block.get("cache_control") for block in system)
        return content_text(system), cached
    if isinstance(system, str):
        return system, False
    return "", False


def user_text_of(messages: list[Any]) -> str:
    """The user turns' text."""
    return "\n\n".join(
        content_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"
    )


def check_params(params: Any, where: str) -> MessageRequest:
    """Validate one Messages request body (`where` prefixes error fields); custom_id is filled in later."""

    def at(name: str) -> str:
        return f"{where}.{name}" if where else name

    if not isinstance(params, dict):
        raise ApiError(400, f"{where or 'body'}: Input should be an object")
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"{at('model')}: Field required")
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise ApiError(400, f"{at('max_tokens')}: Field required")
    if max_tokens < 1:
        raise ApiError(400, f"{at('max_tokens')}: Input should be greater than or equal to 1")
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"{at('messages')}: Field required (at least one message)")
    if params.get("stream"):
        raise ApiError(400, f"{at('stream')}: streaming is not supported here")
    system, cached = system_text(params.get("system"))
    schema = output_schema(params.get("output_config"), at("output_config"))
    return MessageRequest("", model, system, cached, user_text_of(messages), max_tokens, json_schema=schema)


def output_schema(config: Any, where: str) -> dict[str, Any] | None:
    """The JSON schema an `output_config` asks the reply to match (None: a text reply); 400 when malformed."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ApiError(400, f"{where}: Input should be an object")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise ApiError(400, f"{where}.format.type: Input should be 'json_schema'")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, f"{where}.format.schema: Field required (a JSON Schema object)")
    return schema


class AnthropicBackend:
    """In-memory message batches; every method runs under the core lock unless noted."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.batches: dict[str, MessageBatch] = {}
        self.batch_order: list[str] = []

    def create_batch(self, call: Call) -> Reply:
        """POST /v1/messages/batches: validates at once (400), then starts "in_progress"."""
        if len(call.body) > MAX_BODY_BYTES:
            raise ApiError(
                413,
                f"Request body is {len(call.body)} bytes; the limit is {MAX_BODY_BYTES}.",
                type="request_too_large",
            )
        body = call.json()
        items = body.get("requests")
        if not isinstance(items, list):
            raise ApiError(400, "requests: Field required")
        limit = self.core.config.anthropic_max_requests
        if not 1 <= len(items) <= limit:
            raise ApiError(400, f"requests: List should have between 1 and {limit} items, got {len(items)}")
        requests: list[MessageRequest] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(400, f"requests.{index}: Input should be an object")
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str):
                raise ApiError(400, f"requests.{index}.custom_id: Field required")
            if len(custom_id) > 64:
                raise ApiError(400, f"requests.{index}.custom_id: String should have at most 64 characters")
            if not CUSTOM_ID_RE.match(custom_id):
                raise ApiError(400, f"requests.{index}.custom_id: String should match pattern '{CUSTOM_ID_RE.pattern}'")
            if custom_id in seen:
                raise ApiError(
                    400,
                    f"requests.{index}.custom_id: Duplicate custom_id {custom_id!r}; "
                    "custom_id values must be unique within a batch",
                )
            seen.add(custom_id)
            request = check_params(item.get("params"), f"requests.{index}.params")
            request.custom_id = custom_id
            requests.append(request)
        with self.core.lock:
            batch = MessageBatch(
                id=new_id("msgbatch_"), order=len(self.batch_order), created_at=now(), requests=requests
            )
            self.batches[batch.id] = batch
            self.batch_order.append(batch.id)
            attempts = self.core.take_attempts([r.custom_id for r in requests])
            for request in requests:
                request.attempt = attempts[request.custom_id]
            self.core.stats.batch_created("anthropic")
            return json_reply(batch.obj(self.core.results_base()))

    def _batch(self, batch_id: str) -> MessageBatch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No message batch found with id '{batch_id}'.", type="not_found_error")
        return batch

    def retrieve_batch(self, call: Call) -> Reply:
        """GET /v1/messages/batches/{id}: one poll, which may end the batch."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            self._advance(batch)
            return json_reply(self._shown(batch, count=True))

    def _shown(self, batch: MessageBatch, count: bool = False) -> dict[str, Any]:
        """The MessageBatch JSON as a client sees it now; a retrieve (`count`) is one "no_output" injection."""
        base = self.core.results_base()
        if batch.status != "ended":
            return batch.obj(base)
        faults = self.core.faults
        hidden = (faults.draw if count else faults.peek)(("no_output",), batch.id, batch.fault_key)
        archived = faults.peek(("gone",), batch.id, batch.fault_key)
        return batch.obj(base, hide_results=hidden is not None, archived=archived is not None)

    def list_batches(self, call: Call) -> Reply:
        """GET /v1/messages/batches (limit, after_id, before_id), newest first."""
        limit = call.int_arg("limit", 20, 1, 1000)
        after_id, before_id = call.arg("after_id"), call.arg("before_id")
        with self.core.lock:
            items = [self._shown(self.batches[bid]) for bid in reversed(self.batch_order) if bid in self.batches]
        ids = [item["id"] for item in items]
        for name, cursor in (("after_id", after_id), ("before_id", before_id)):
            if cursor and cursor not in ids:
                raise ApiError(400, f"{name}: {cursor!r} does not name a message batch in this list")
        if after_id:
            start = ids.index(after_id) + 1
            data, has_more = items[start : start + limit], start + limit < len(items)
        elif before_id:
            end = ids.index(before_id)
            start = max(0, end - limit)
            data, has_more = items[start:end], start > 0
        else:
            data, has_more = items[:limit], limit < len(items)
        return json_reply(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    def cancel_batch(self, call: Call) -> Reply:
        """POST /v1/messages/batches/{id}/cancel."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            if batch.status == "ended":
                raise ApiError(400, f"Message batch {batch.id} has already ended and cannot be canceled.")
            if batch.status == "in_progress":
                batch.cancel_after_progress = batch.polls > 0
                batch.status = "canceling"
                batch.cancel_initiated_at = now()
            return json_reply(batch.obj(self.core.results_base()))

    def delete_batch(self, call: Call) -> Reply:
        """DELETE /v1/messages/batches/{id} (ended batches only)."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            if batch.status != "ended":
                raise ApiError(
                    400,
                    f"Message batch {batch.id} is still {batch.status}; cancel it and wait "
                    "for it to end before deleting it.",
                )
            del self.batches[batch.id]
        return json_reply({"id": batch.id, "type": "message_batch_deleted"})

    def results(self, call: Call) -> Reply:
        """GET /v1/messages/batches/{id}/results: JSONL, '\\n'-terminated lines, no blank lines."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            if batch.status != "ended":
                raise ApiError(400, f"Results for message batch {batch.id} are not available until it has ended.")
            return Reply(body=batch.results, content_type="application/binary", fault_key=batch.fault_key)

    def complete_all(self) -> None:
        """End every batch that is still processing."""
        with self.core.lock:
            for batch in self.batches.values():
                if batch.status != "ended":
                    self._advance(batch, force=True)

    def _advance(self, batch: MessageBatch, force: bool = False) -> None:
        if batch.status == "ended":
            return
        batch.polls += 1
        if batch.status == "canceling":
            self._finish(batch, canceled=True)
        elif force or batch.polls >= max(1, self.core.config.polls_to_complete):
            self._finish(batch, canceled=False)

    def _finish(self, batch: MessageBatch, canceled: bool) -> None:
        cfg = self.core.config
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        lines: list[dict[str, Any]] = []
        for request in batch.requests:
            key = (request.custom_id, request.attempt)
            if canceled and not (batch.cancel_after_progress and self.core.frac("cancel", *key) < 0.5):
                result: dict[str, Any] = {"type": "canceled"}
            elif (
                cfg.expire_fraction is not None
                and not canceled
                and (self.core.frac("expire", *key) < cfg.expire_fraction)
            ):
                result = {"type": "expired"}
            elif is_unknown_model(request.model):
                result = errored("not_found_error", f"model: {request.model}")
            elif self.core.frac("error", *key) < cfg.request_error_rate:
                result = errored("api_error", "Internal server error (injected by the emulator's request_error_rate).")
            else:
                result = {"type": "succeeded", "message": self._message(request, request.custom_id)}
            counts[result["type"]] += 1
            lines.append({"custom_id": request.custom_id, "result": result})
        random.Random(f"{cfg.seed}:anthropic:{batch.order}").shuffle(lines)
        batch.results = jsonl(lines)
        batch.counts = counts
        batch.status = "ended"
        batch.ended_at = now()

    def _message(self, request: MessageRequest, stats_key: str) -> dict[str, Any]:
        """Ask the fake model and count the billed usage under `stats_key`."""
        cfg = self.core.config
        answer = fake_model.reply(
            request.system, request.user_text, request.max_tokens, cfg.forms, cfg.seed, request.json_schema
        )
        cache_read = cache_write = 0
        input_tokens = answer.prompt_tokens
        if request.cached and request.system:
            system_tokens = fake_model.count_tokens(request.system)
            with self.core.lock:
                first = (request.model, request.system) not in self.core.cache_seen
                self.core.cache_seen.add((request.model, request.system))
            cache_write, cache_read = (system_tokens, 0) if first else (0, system_tokens)
            input_tokens -= system_tokens
        self.core.stats.add_answer(stats_key, input_tokens, answer.completion_tokens, cache_read, cache_write)
        text = answer.text or ""
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": request.model,
            # like the real service, an empty answer has no text block at all
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": STOP_REASONS[answer.finish],
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": answer.completion_tokens,
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_write,
            },
        }

    def create_message(self, call: Call) -> Reply:
        """POST /v1/messages: a live reply from the fake model."""
        body = call.json()
        request = check_params(body, "")
        if is_unknown_model(request.model):
            raise ApiError(404, f"model: {request.model}", type="not_found_error")
        live_gate(self.core)
        key = live_key(body.get("messages"))
        self.core.stats.add_live_call(key)
        return json_reply(self._message(request, key), headers={"request-id": new_id("req_")})


def errored(error_type: str, message: str) -> dict[str, Any]:
    """An `errored` batch result."""
    return {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": new_id("req_"),
        },
    }
