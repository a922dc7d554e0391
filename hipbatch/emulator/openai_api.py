"""OpenAI surface of the emulator: files, batches (validate -> in_progress -> finalizing -> final), output and
error files, models and live chat completions."""

from __future__ import annotations

import json
import math
import random
import time
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
    parse_multipart,
)

BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
CHAT_ENDPOINT = "/v1/chat/completions"
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
DEFAULT_MAX_TOKENS = 4096
EXPIRES_MIN, EXPIRES_MAX = 3600, 2_592_000
MAX_REPORTED_ERRORS = 20
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


@dataclass
class StoredFile:
    """An uploaded or generated file."""

    id: str
    data: bytes
    filename: str
    purpose: str
    created_at: int
    expires_at: int | None = None
    fault_key: str | None = None  # set on a batch's output and error files: "openai:<batch order>"

    def obj(self) -> dict[str, Any]:
        """The FileObject JSON."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": self.expires_at,
        }


@dataclass
class ChatLine:
    """One valid request line of a batch input file."""

    custom_id: str
    model: str
    system: str
    user_text: str
    max_tokens: int
    attempt: int = 0
    json_schema: dict[str, Any] | None = None  # the reply must be JSON (response_format)


@dataclass
class Batch:
    """One OpenAI batch and its lifecycle."""

    id: str
    order: int
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    output_expires_seconds: int | None
    lines: list[ChatLine]
    fail_errors: list[dict[str, Any]] | None  # set at creation when the batch will fail at its first retrieve
    model: str | None
    status: str = "validating"
    polls: int = 0
    cancel_after_progress: bool = False
    times: dict[str, int | None] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    usage: dict[str, Any] | None = None
    _tokens: dict[str, int] | None = None

    @property
    def tokens_by_model(self) -> dict[str, int]:
        """Input tokens per model, counted on first use (only the enqueued-token quota needs them)."""
        if self._tokens is None:
            self._tokens = queued_tokens(self.lines)
        return self._tokens

    @property
    def fault_key(self) -> str:
        """Stable name of this batch for download_fault_fraction."""
        return f"openai:{self.order}"

    def obj(self, hide_files: bool = False) -> dict[str, Any]:
        """The Batch JSON (`hide_files`: the "no_output" download fault)."""
        failed = self.status == "failed" and self.fail_errors
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.fail_errors} if failed else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": None if hide_files else self.output_file_id,
            "error_file_id": None if hide_files else self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.times.get("in_progress_at"),
            "expires_at": self.created_at + SECONDS_PER_DAY,
            "finalizing_at": self.times.get("finalizing_at"),
            "completed_at": self.times.get("completed_at"),
            "failed_at": self.times.get("failed_at"),
            "expired_at": self.times.get("expired_at"),
            "cancelling_at": self.times.get("cancelling_at"),
            "cancelled_at": self.times.get("cancelled_at"),
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
            "model": self.model,
            "usage": self.usage,
        }

    @property
    def unfinished(self) -> bool:
        """Still queued against the enqueued-token quota."""
        return self.status not in FINAL_STATUSES and self.fail_errors is None


def queued_tokens(lines: list[ChatLine]) -> dict[str, int]:
    """Input tokens of `lines` per model, as the enqueued-token quota counts them."""
    tokens: dict[str, int] = {}
    for line in lines:
        tokens[line.model] = tokens.get(line.model, 0) + fake_model.prompt_tokens(line.system, line.user_text)
    return tokens


def split_chat_messages(messages: list[Any]) -> tuple[str, str]:
    """(system text, user text) of chat messages."""
    system: list[str] = []
    user: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        text = content_text(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            user.append(text)
    return "\n\n".join(system), "\n\n".join(user)


def chat_max_tokens(body: dict[str, Any]) -> int:
    """The reply budget of a chat completion body."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return DEFAULT_MAX_TOKENS


def chat_json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a chat completion body asks the reply to match: response_format json_schema -> its schema,
    json_object -> {} (any object), none or text -> None (a text reply)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_schema", "json_object"):
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else {}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> str:
    """OpenAI's unknown-model message."""
    return f"The model `{model}` does not exist or you do not have access to it."


class OpenAIBackend:
    """In-memory OpenAI files and batches; every method runs under the core lock unless noted."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.batch_order: list[str] = []  # creation order, oldest first

    # ---- files -------------------------------------------------------------------------------------------

    def create_file(self, call: Call) -> Reply:
        """POST /v1/files (multipart)."""
        content_type = call.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "Uploads must be sent as multipart/form-data.")
        parts = parse_multipart(content_type, call.body)
        purpose_part = parts.get("purpose")
        file_part = parts.get("file")
        if purpose_part is None:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
        if file_part is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        purpose = purpose_part.data.decode("utf-8", "replace")
        if purpose not in FILE_PURPOSES:
            raise ApiError(400, f"Invalid purpose {purpose!r}; use one of {', '.join(FILE_PURPOSES)}.", param="purpose")
        created = int(now())
        expires_at: int | None = created + 30 * SECONDS_PER_DAY if purpose == "batch" else None
        seconds_part = parts.get("expires_after[seconds]")
        if seconds_part is not None:
            anchor_part = parts.get("expires_after[anchor]")
            anchor = anchor_part.data.decode() if anchor_part else "created_at"
            seconds = _expiry_seconds(anchor, seconds_part.data.decode(), "expires_after")
            expires_at = created + seconds
        with self.core.lock:
            stored = StoredFile(
                id=new_id("file-"),
                data=file_part.data,
                filename=file_part.filename or "upload.jsonl",
                purpose=purpose,
                created_at=created,
                expires_at=expires_at,
            )
            self.files[stored.id] = stored
        self.core.stats.file_uploaded()
        return json_reply(stored.obj())

    def _file(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id)
        if stored is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return stored

    def retrieve_file(self, call: Call) -> Reply:
        """GET /v1/files/{id}; a batch output under the "gone" download fault is 404 here too."""
        with self.core.lock:
            stored = self._file(call.params[0])
        if stored.fault_key and self.core.faults.peek(("gone",), stored.id, stored.fault_key):
            raise ApiError(404, f"No such File object: {stored.id}", param="id")
        return json_reply(stored.obj())

    def delete_file(self, call: Call) -> Reply:
        """DELETE /v1/files/{id}."""
        with self.core.lock:
            stored = self._file(call.params[0])
            del self.files[stored.id]
        return json_reply({"id": stored.id, "object": "file", "deleted": True})

    def file_content(self, call: Call) -> Reply:
        """GET /v1/files/{id}/content: the raw bytes."""
        with self.core.lock:
            stored = self._file(call.params[0])
        return Reply(body=stored.data, content_type="application/octet-stream", fault_key=stored.fault_key)

    def list_files(self, call: Call) -> Reply:
        """GET /v1/files (purpose, limit, after, order)."""
        limit = call.int_arg("limit", 10_000, 1, 10_000)
        purpose = call.arg("purpose")
        order = call.arg("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'.", param="order")
        with self.core.lock:
            items = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        if order == "desc":
            items.reverse()
        return json_reply(_page([f.obj() for f in items], call.arg("after"), limit))

    # ---- batches -----------------------------------------------------------------------------------------

    def create_batch(self, call: Call) -> Reply:
        """POST /v1/batches: always answers "validating"; the verdict shows at the first retrieve."""
        body = call.json()
        input_file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise ApiError(400, "Missing required parameter: 'input_file_id'.", param="input_file_id")
        if endpoint not in BATCH_ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid endpoint {endpoint!r}; use one of {', '.join(BATCH_ENDPOINTS)}.",
                param="endpoint",
                code="invalid_value",
            )
        if window != "24h":
            raise ApiError(
                400,
                f"Invalid completion_window {window!r}; only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        _check_metadata(metadata)
        output_seconds: int | None = None
        expires_after = body.get("output_expires_after")
        if expires_after is not None:
            if not isinstance(expires_after, dict):
                raise ApiError(400, "output_expires_after must be an object.", param="output_expires_after")
            output_seconds = _expiry_seconds(
                expires_after.get("anchor"), expires_after.get("seconds"), "output_expires_after"
            )
        with self.core.lock:
            stored = self.files.get(input_file_id)
        if stored is None:
            raise ApiError(
                400, f"Cannot find file {input_file_id}, perhaps it has been deleted?", param="input_file_id"
            )
        if stored.purpose != "batch":
            raise ApiError(
                400,
                f"File {input_file_id} has purpose {stored.purpose!r}; batch input files "
                "must be uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        # parse and check the file outside the lock: it can be 200 MB
        lines, errors = self._validate_file(stored.data, endpoint)
        models = {line.model for line in lines}
        # only the enqueued-token quota needs token counts, and counting 200 MB takes a while
        tokens = queued_tokens(lines) if self.core.config.enqueued_token_limit is not None else None
        with self.core.lock:
            order = len(self.batch_order)
            cfg = self.core.config
            if (
                not errors
                and cfg.validation_error_rate > 0
                and (self.core.frac("validation", order) < cfg.validation_error_rate)
            ):
                errors = [
                    _batch_error(
                        "invalid_request",
                        "The batch input file failed validation (injected by the emulator's validation_error_rate).",
                    )
                ]
            if not errors and cfg.enqueued_token_limit is not None:
                tokens = tokens if tokens is not None else queued_tokens(lines)
                errors = self._quota_errors(tokens, cfg.enqueued_token_limit)
            batch = Batch(
                id=new_id("batch_"),
                order=order,
                endpoint=endpoint,
                input_file_id=input_file_id,
                completion_window=window,
                metadata=metadata,
                created_at=int(now()),
                output_expires_seconds=output_seconds,
                lines=lines,
                fail_errors=errors or None,
                model=sorted(models)[0] if models else None,
                _tokens=tokens,
            )
            self.batches[batch.id] = batch
            self.batch_order.append(batch.id)
            if not errors:
                attempts = self.core.take_attempts([line.custom_id for line in lines])
                for line in lines:
                    line.attempt = attempts[line.custom_id]
            self.core.stats.batch_created("openai")
            return json_reply(batch.obj())

    def _quota_errors(self, tokens: dict[str, int], limit: int) -> list[dict[str, Any]]:
        queued: dict[str, int] = {}
        for other in self.batches.values():
            if other.unfinished:
                for model, count in other.tokens_by_model.items():
                    queued[model] = queued.get(model, 0) + count
        errors = []
        for model, count in sorted(tokens.items()):
            if count + queued.get(model, 0) > limit:
                errors.append(
                    _batch_error(
                        "token_limit_exceeded",
                        f"Enqueued token limit reached for {model} in organization org-emulator. "
                        f"Limit: {limit} enqueued tokens; this batch needs {count} and "
                        f"{queued.get(model, 0)} are already enqueued. Please try again once some "
                        "in_progress batches have been completed.",
                    )
                )
        return errors

    def _validate_file(self, data: bytes, endpoint: str) -> tuple[list[ChatLine], list[dict[str, Any]]]:
        cfg = self.core.config
        errors: list[dict[str, Any]] = []
        if len(data) > cfg.max_file_bytes:
            return [], [
                _batch_error(
                    "file_too_large",
                    f"The input file is {len(data)} bytes; the limit is "
                    f"{cfg.max_file_bytes} bytes. Split it into smaller batches.",
                )
            ]
        if endpoint != CHAT_ENDPOINT:
            return [], [
                _batch_error(
                    "unsupported_endpoint",
                    f"The emulator only runs {CHAT_ENDPOINT} batches, not {endpoint}.",
                    param="endpoint",
                )
            ]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return [], [_batch_error("invalid_file_encoding", "The input file is not valid UTF-8.")]
        lines: list[ChatLine] = []
        seen: dict[str, int] = {}
        raw_lines = [(number, raw) for number, raw in enumerate(text.split("\n"), start=1) if raw.strip()]
        if not raw_lines:
            return [], [_batch_error("empty_file", "The input file contains no requests.")]
        if len(raw_lines) > cfg.max_requests_per_file:
            return [], [
                _batch_error(
                    "too_many_requests",
                    f"The input file has {len(raw_lines)} requests; "
                    f"the limit is {cfg.max_requests_per_file} per batch.",
                )
            ]
        for number, raw in raw_lines:
            problem = _check_line(raw, endpoint)
            if isinstance(problem, dict):
                errors.append(dict(problem, line=number))
            else:
                first = seen.get(problem.custom_id)
                if first is not None:
                    errors.append(
                        _batch_error(
                            "duplicate_custom_id",
                            f"The custom_id {problem.custom_id!r} on line {number} was already used on line "
                            f"{first}; custom_id values must be unique within a batch.",
                            line=number,
                            param="custom_id",
                        )
                    )
                else:
                    seen[problem.custom_id] = number
                    lines.append(problem)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        return lines, errors

    def _batch(self, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def retrieve_batch(self, call: Call) -> Reply:
        """GET /v1/batches/{id}: one poll, which advances the batch one step."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            self._advance(batch)
            return json_reply(self._shown(batch, count=True))

    def list_batches(self, call: Call) -> Reply:
        """GET /v1/batches (limit, after), newest first; listing never advances a batch."""
        limit = call.int_arg("limit", 20, 1, 100)
        with self.core.lock:
            items = [self._shown(self.batches[bid]) for bid in reversed(self.batch_order) if bid in self.batches]
        return json_reply(_page(items, call.arg("after"), limit))

    def _shown(self, batch: Batch, count: bool = False) -> dict[str, Any]:
        """The Batch JSON as a client sees it now; a retrieve (`count`) is one "no_output" injection."""
        if batch.status not in FINAL_STATUSES or not (batch.output_file_id or batch.error_file_id):
            return batch.obj()
        faults = self.core.faults
        kind = (faults.draw if count else faults.peek)(("no_output",), batch.id, batch.fault_key)
        return batch.obj(hide_files=kind is not None)

    def cancel_batch(self, call: Call) -> Reply:
        """POST /v1/batches/{id}/cancel."""
        with self.core.lock:
            batch = self._batch(call.params[0])
            if batch.status in FINAL_STATUSES:
                raise ApiError(400, f"Cannot cancel a batch with status '{batch.status}'.")
            if batch.status != "cancelling":
                batch.cancel_after_progress = batch.status != "validating"
                batch.status = "cancelling"
                batch.times["cancelling_at"] = int(now())
            return json_reply(batch.obj())

    def complete_all(self) -> None:
        """Move every unfinished batch to its final state."""
        with self.core.lock:
            for batch in self.batches.values():
                if batch.status not in FINAL_STATUSES:
                    self._advance(batch, force=True)

    def _advance(self, batch: Batch, force: bool = False) -> None:
        if batch.status in FINAL_STATUSES:
            return
        batch.polls += 1
        stamp = int(now())
        if batch.status == "cancelling":
            self._finish(batch, "cancelled")
            return
        if batch.status == "validating":
            if batch.fail_errors is not None:
                batch.status = "failed"
                batch.times["failed_at"] = stamp
                return
            batch.status = "in_progress"
            batch.times["in_progress_at"] = stamp
            batch.counts = {"total": len(batch.lines), "completed": 0, "failed": 0}
        needed = max(1, self.core.config.polls_to_complete)
        if force or batch.polls >= needed:
            final = "completed" if self.core.config.expire_fraction is None else "expired"
            self._finish(batch, final)
        elif batch.polls == needed - 1 and needed >= 3:
            batch.status = "finalizing"
            batch.times["finalizing_at"] = stamp

    def _finish(self, batch: Batch, final: str) -> None:
        cfg = self.core.config
        seed = cfg.seed
        if final == "cancelled":
            todo = [
                line
                for line in batch.lines
                if batch.cancel_after_progress and self.core.frac("cancel", line.custom_id, line.attempt) < 0.5
            ]
        else:
            todo = batch.lines
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        usage = {"input": 0, "output": 0}
        for line in todo:
            key = (line.custom_id, line.attempt)
            if final == "expired" and self.core.frac("expire", *key) < (cfg.expire_fraction or 0.0):
                errors.append(
                    _result_line(
                        line.custom_id,
                        None,
                        {
                            "code": "batch_expired",
                            "message": EXPIRED_MESSAGE,
                        },
                    )
                )
            elif is_unknown_model(line.model):
                errors.append(
                    _result_line(
                        line.custom_id,
                        {
                            "status_code": 404,
                            "request_id": new_id("req_"),
                            "body": error_body(model_not_found(line.model), "invalid_request_error", "model_not_found"),
                        },
                    )
                )
            elif self.core.frac("error", *key) < cfg.request_error_rate:
                errors.append(
                    _result_line(
                        line.custom_id,
                        {
                            "status_code": 500,
                            "request_id": new_id("req_"),
                            "body": error_body(
                                "The server had an error while processing your request. Sorry about that!",
                                "server_error",
                                "server_error",
                            ),
                        },
                    )
                )
            else:
                answer = fake_model.reply(
                    line.system, line.user_text, line.max_tokens, cfg.forms, seed, line.json_schema
                )
                usage["input"] += answer.prompt_tokens
                usage["output"] += answer.completion_tokens
                self.core.stats.add_answer(line.custom_id, answer.prompt_tokens, answer.completion_tokens)
                outputs.append(
                    _result_line(
                        line.custom_id,
                        {
                            "status_code": 200,
                            "request_id": new_id("req_"),
                            "body": chat_completion_body(line.model, answer),
                        },
                    )
                )
        shuffler = random.Random(f"{seed}:openai:{batch.order}")
        shuffler.shuffle(outputs)
        shuffler.shuffle(errors)
        stamp = int(now())
        expires = stamp + batch.output_expires_seconds if batch.output_expires_seconds else None
        if outputs:
            batch.output_file_id = self._store_output(batch, "output", outputs, stamp, expires)
        if errors:
            batch.error_file_id = self._store_output(batch, "error", errors, stamp, expires)
        batch.counts = {"total": len(batch.lines), "completed": len(outputs), "failed": len(errors)}
        batch.usage = {
            "input_tokens": usage["input"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["input"] + usage["output"],
        }
        if final == "completed":
            batch.times.setdefault("finalizing_at", stamp)
        batch.times[f"{final}_at"] = stamp
        batch.status = final

    def _store_output(
        self, batch: Batch, kind: str, lines: list[dict[str, Any]], stamp: int, expires: int | None
    ) -> str:
        stored = StoredFile(
            id=new_id("file-"),
            data=jsonl(lines),
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
            created_at=stamp,
            expires_at=expires,
            fault_key=batch.fault_key,
        )
        self.files[stored.id] = stored
        return stored.id

    # ---- models and live calls (no lock needed until stats) ----------------------------------------------

    def chat_completion(self, call: Call) -> Reply:
        """POST /v1/chat/completions: a live reply from the fake model."""
        body = call.json()
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
        if body.get("stream"):
            raise ApiError(400, "The emulator does not stream; send stream=false.", param="stream")
        if is_unknown_model(model):
            raise ApiError(404, model_not_found(model), code="model_not_found", param="model")
        live_gate(self.core)
        system, user_text = split_chat_messages(messages)
        cfg = self.core.config
        answer = fake_model.reply(system, user_text, chat_max_tokens(body), cfg.forms, cfg.seed, chat_json_schema(body))
        key = live_key(messages)
        self.core.stats.add_live_call(key)
        self.core.stats.add_answer(key, answer.prompt_tokens, answer.completion_tokens)
        return json_reply(chat_completion_body(model, answer), headers={"x-request-id": new_id("req_")})


def live_gate(core: Core) -> None:
    """Latency and injected 429s of live calls (called without the lock held)."""
    cfg = core.config
    if cfg.live_429_rate > 0 and core.draw() < cfg.live_429_rate:
        core.stats.fault("live_429")
        raise ApiError(
            429,
            "Rate limit reached for requests (injected by the emulator's live_429_rate).",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers=retry_headers(cfg.retry_after_ms),
        )
    if cfg.live_latency_s > 0:
        time.sleep(cfg.live_latency_s)


def retry_headers(retry_after_ms: int) -> dict[str, str]:
    """retry-after-ms plus retry-after (whole seconds, rounded up)."""
    return {"retry-after-ms": str(retry_after_ms), "retry-after": str(math.ceil(retry_after_ms / 1000))}


def chat_completion_body(model: str, answer: fake_model.FakeReply) -> dict[str, Any]:
    """A full ChatCompletion for one fake reply."""
    refused = answer.finish == "refusal"
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(now()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None if refused else answer.text,
                    "refusal": answer.text if refused else None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "length" if answer.finish == "length" else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": None,
    }


def _result_line(
    custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": error}


def _batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "param": param}


def _check_line(raw: str, endpoint: str) -> ChatLine | dict[str, Any]:
    """A valid request line as a ChatLine, or a batch error entry (without its line number)."""
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        return _batch_error("invalid_json_line", f"This line is not valid JSON: {exc.msg}.")
    if not isinstance(item, dict):
        return _batch_error("invalid_json_line", "Each line must be a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _batch_error(
            "missing_required_parameter",
            "Each request needs a non-empty string custom_id.",
            param="custom_id",
        )
    if item.get("method") != "POST":
        return _batch_error("invalid_method", f"The method of request {custom_id!r} must be 'POST'.", param="method")
    if item.get("url") != endpoint:
        return _batch_error(
            "invalid_url",
            f"The url {item.get('url')!r} of request {custom_id!r} does not match the batch endpoint {endpoint!r}.",
            param="url",
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return _batch_error("missing_required_parameter", f"Request {custom_id!r} has no body object.", param="body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _batch_error(
            "missing_required_parameter", f"Request {custom_id!r} has no body.model.", param="body.model"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _batch_error(
            "missing_required_parameter",
            f"Request {custom_id!r} has no body.messages.",
            param="body.messages",
        )
    system, user_text = split_chat_messages(messages)
    return ChatLine(custom_id, model, system, user_text, chat_max_tokens(body), json_schema=chat_json_schema(body))


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ApiError(400, "metadata must be an object of string values.", param="metadata")
    if len(metadata) > 16:
        raise ApiError(400, f"metadata has {len(metadata)} keys; at most 16 are allowed.", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(400, f"metadata key {key[:20]!r}... is longer than 64 characters.", param="metadata")
        if not isinstance(value, str):
            raise ApiError(400, f"metadata value for {key!r} must be a string.", param="metadata")
        if len(value) > 512:
            raise ApiError(400, f"metadata value for {key!r} is longer than 512 characters.", param="metadata")


def _expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    if anchor != "created_at":
        raise ApiError(400, f"{param}.anchor must be 'created_at'.", param=f"{param}.anchor")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise ApiError(400, f"{param}.seconds must be an integer.", param=f"{param}.seconds") from None
    if not EXPIRES_MIN <= value <= EXPIRES_MAX:
        raise ApiError(
            400, f"{param}.seconds must be between {EXPIRES_MIN} and {EXPIRES_MAX}.", param=f"{param}.seconds"
        )
    return value


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"The cursor {after!r} does not name an object in this list.", param="after")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }
