"""Gemini API surface of the emulator (v1beta): the Files API's resumable upload and download, Batch Mode jobs
(BATCH_STATE_PENDING -> RUNNING -> SUCCEEDED / FAILED / CANCELLED / EXPIRED) with their JSONL responses file,
models.get and live generateContent. Errors use Google's shape: {"error": {"code", "message", "status"}}.

Emulated on purpose, beyond what the docs say: implicit caching of a system prompt of at least
IMPLICIT_CACHE_MIN_TOKENS (reported as cachedContentTokenCount, included in promptTokenCount); thinking
tokens (thoughtsTokenCount) on 2.5 / 3 models other than Flash-Lite, not taken from maxOutputTokens; replies in
two text parts; a create over `enqueued_token_limit` refused with 429 RESOURCE_EXHAUSTED and a QuotaFailure
naming the enqueued-token quota (nothing is created).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from hipbatch.emulator import fake_model
from hipbatch.emulator.common import (
    ApiError,
    Call,
    Core,
    Reply,
    is_unknown_model,
    json_reply,
    jsonl,
    live_key,
    new_id,
    now,
    rfc3339,
)
from hipbatch.emulator.openai_api import live_gate

API = "v1beta"
JOB_WINDOW = 48 * 3600  # seconds before an unfinished job becomes BATCH_STATE_EXPIRED
MAX_FILE_BYTES = 2_000_000_000
DEFAULT_MAX_TOKENS = 8192
IMPLICIT_CACHE_MIN_TOKENS = 1024  # 2.5 Flash's documented minimum for implicit caching
JSONL_TYPES = ("jsonl", "application/jsonl", "application/x-ndjson", "text/jsonl")
PENDING, RUNNING = "BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"
SUCCEEDED, FAILED = "BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED"
CANCELLED, EXPIRED = "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "refusal": "SAFETY"}
STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
TYPE_PREFIX = "type.googleapis.com/google.ai.generativelanguage.v1beta."


class GoogleError(ApiError):
    """An ApiError with Google's `status` name and optional `details` (google.rpc messages)."""

    def __init__(self, status: int, message: str, name: str | None = None, details: list[Any] | None = None) -> None:
        super().__init__(status, message, type=name or STATUS.get(status, "UNKNOWN"))
        self.details = details or []


def error_reply(err: ApiError) -> Reply:
    """`err` in Google's error shape. Every Gemini error also says `x-goog-upload-status: final`: on the upload
    URL the SDK otherwise retries the chunk itself (sleeping 1, 2, 4 s); elsewhere the header is ignored."""
    name = err.type if err.type.isupper() else STATUS.get(err.status, "UNKNOWN")
    error: dict[str, Any] = {"code": err.status, "message": err.message, "status": name}
    details = list(getattr(err, "details", None) or [])
    if "retry-after-ms" in err.headers:
        delay = int(err.headers["retry-after-ms"]) / 1000
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay:g}s"})
    if details:
        error["details"] = details
    return json_reply({"error": error}, status=err.status, headers={"x-goog-upload-status": "final", **err.headers})


@dataclass
class StoredFile:
    """An uploaded input file or a generated responses file."""

    id: str
    data: bytes
    display_name: str
    mime_type: str
    created_at: float
    source: str = "UPLOADED"
    fault_key: str | None = None  # a job's responses file: "gemini:<job order>", for the download faults

    def obj(self, base: str) -> dict[str, Any]:
        """The File resource."""
        digest = base64.b64encode(hashlib.sha256(self.data).digest()).decode("ascii")
        item: dict[str, Any] = {
            "name": f"files/{self.id}",
            "displayName": self.display_name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": rfc3339(self.created_at),
            "updateTime": rfc3339(self.created_at),
            "expirationTime": rfc3339(self.created_at + JOB_WINDOW),
            "sha256Hash": digest,
            "uri": f"{base}/{API}/files/{self.id}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.source == "GENERATED":
            item["downloadUri"] = f"{base}/{API}/files/{self.id}:download?alt=media"
        return item


@dataclass
class Upload:
    """A resumable upload session."""

    id: str
    display_name: str
    mime_type: str
    size: int | None
    received: bytearray = field(default_factory=bytearray)


@dataclass
class Line:
    """One request of a job, reduced to what the fake model needs."""

    key: str
    system: str
    user_text: str
    max_tokens: int
    attempt: int = 0
    json_schema: dict[str, Any] | None = None  # the request asked for JSON (responseJsonSchema)


@dataclass
class Job:
    """One batch job and its lifecycle."""

    id: str
    order: int
    model: str
    display_name: str
    input_file: str
    created_at: float
    lines: list[Line]
    tokens: int
    fail_error: dict[str, Any] | None = None
    state: str = PENDING
    polls: int = 0
    updated_at: float = 0.0
    ended_at: float | None = None
    output_file: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def fault_key(self) -> str:
        """Which job this is for the seeded download-fault fraction."""
        return f"gemini:{self.order}"

    @property
    def unfinished(self) -> bool:
        """Still queued against the enqueued-token quota."""
        return self.state not in FINAL_STATES and self.fail_error is None

    def obj(self, hide_output: bool = False) -> dict[str, Any]:
        """The job as an Operation, metadata a GenerateContentBatch (zero counts left out, as proto3 JSON does);
        `hide_output`: the "no_output" download fault (a finished job that names no responses file)."""
        total = len(self.lines)
        done = self.counts.get("ok", 0) + self.counts.get("failed", 0)
        stats = {
            "requestCount": total,
            "successfulRequestCount": self.counts.get("ok", 0),
            "failedRequestCount": self.counts.get("failed", 0),
            "pendingRequestCount": 0 if self.state in FINAL_STATES else total - done,
        }
        meta: dict[str, Any] = {
            "@type": TYPE_PREFIX + "GenerateContentBatch",
            "model": f"models/{self.model}",
            "displayName": self.display_name,
            "inputConfig": {"fileName": self.input_file},
            "createTime": rfc3339(self.created_at),
            "updateTime": rfc3339(self.updated_at or self.created_at),
            "batchStats": {k: str(v) for k, v in stats.items() if v},
            "state": self.state,
            "name": f"batches/{self.id}",
        }
        if self.ended_at is not None:
            meta["endTime"] = rfc3339(self.ended_at)
        if self.output_file and not hide_output:
            meta["output"] = {"responsesFile": f"files/{self.output_file}"}
        op: dict[str, Any] = {"name": f"batches/{self.id}", "metadata": meta}
        if self.state in FINAL_STATES:
            op["done"] = True
            if self.state == FAILED and self.fail_error:
                op["error"] = self.fail_error
            else:
                op["response"] = {"@type": TYPE_PREFIX + "GenerateContentBatchOutput", **meta.get("output", {})}
        return op


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def parts_text(content: Any) -> str:
    """The text of a Content ({"parts": [{"text": ...}]})."""
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if not isinstance(parts, list):
        return ""
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))


def json_schema_of(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a request asks its answer to match (responseMimeType application/json), if any."""
    config = request.get("generationConfig") or {}
    if not isinstance(config, dict) or config.get("responseMimeType") != "application/json":
        return None
    schema = config.get("responseJsonSchema") or config.get("responseSchema") or {"type": "object"}
    return schema if isinstance(schema, dict) else {"type": "object"}


def split_request(request: Any) -> tuple[str, str, int]:
    """(system text, user text, max output tokens) of a GenerateContentRequest; ValueError if it has none."""
    if not isinstance(request, dict):
        raise ValueError("request must be a GenerateContentRequest object")
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ValueError("request.contents must be a non-empty list")
    user = "\n\n".join(parts_text(c) for c in contents if isinstance(c, dict) and c.get("role", "user") == "user")
    system = parts_text(request.get("systemInstruction"))
    config = request.get("generationConfig") or {}
    max_tokens = config.get("maxOutputTokens") if isinstance(config, dict) else None
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = DEFAULT_MAX_TOKENS
    return system, user, max_tokens


def thinking_tokens(model: str, user_text: str) -> int:
    """Thoughts the fake 2.5 / 3 models (not Flash-Lite) bill as output; 0 for the others."""
    thinks = ("2.5" in model or "gemini-3" in model) and "lite" not in model
    return 8 + len(user_text) % 16 if thinks else 0


def quota_refusal(model: str, limit: int, needed: int, queued: int) -> GoogleError:
    """The 429 of a create over the per-model enqueued-token quota (its wording is the emulator's own)."""
    return GoogleError(
        429,
        f"Enqueued token limit reached for models/{model}: the limit is {limit} enqueued tokens; this batch needs "
        f"{needed} and {queued} are already enqueued. Try again once running batches have finished.",
        details=[
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/batch_enqueued_tokens",
                        "quotaId": "BatchEnqueuedTokensPerModelPerProject",
                        "quotaDimensions": {"model": model},
                        "quotaValue": str(limit),
                    }
                ],
            }
        ],
    )


def check_google_key(call: Call) -> None:
    """Any key is good except one starting with "invalid" (400 API_KEY_INVALID, as Google answers a bad key).
    A resumable upload's chunks are authorised by the upload_id of the session the key opened."""
    key = call.headers.get("x-goog-api-key", "").strip() or (call.arg("key") or "")
    if not key and call.arg("upload_id"):
        return
    if not key:
        raise GoogleError(403, "Method doesn't allow unregistered callers: send an API key (x-goog-api-key).")
    if key.startswith("invalid"):
        reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        raise GoogleError(400, "API key not valid. Please pass a valid API key.", details=[reason])


class GeminiBackend:
    """In-memory files and batch jobs; every method runs under the core lock unless noted."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, Upload] = {}
        self.jobs: dict[str, Job] = {}
        self.job_order: list[str] = []  # creation order, oldest first

    # ---- files -------------------------------------------------------------------------------------------

    def upload(self, call: Call) -> Reply:
        """POST /upload/v1beta/files: `start` opens a resumable session, then chunks go to its upload URL."""
        upload_id = call.arg("upload_id")
        if upload_id is None:
            return self._start_upload(call)
        return self._upload_chunk(call, upload_id)

    def _start_upload(self, call: Call) -> Reply:
        if call.headers.get("x-goog-upload-protocol") != "resumable":
            raise GoogleError(400, "Only resumable uploads are supported (X-Goog-Upload-Protocol: resumable).")
        if call.headers.get("x-goog-upload-command", "").strip() != "start":
            raise GoogleError(400, "The first upload request must say X-Goog-Upload-Command: start.")
        body = call.json() if call.body else {}
        raw: dict[str, Any] = body["file"] if isinstance(body.get("file"), dict) else {}
        meta = {_camel(k): v for k, v in raw.items()}  # the SDK sends snake_case names here
        size = call.headers.get("x-goog-upload-header-content-length") or meta.get("sizeBytes")
        mime = str(meta.get("mimeType") or call.headers.get("x-goog-upload-header-content-type") or "")
        try:
            declared = int(size) if size is not None else None
        except ValueError:
            raise GoogleError(400, f"Invalid upload size {size!r}.") from None
        session = Upload(new_id("", 16), str(meta.get("displayName") or ""), mime, declared)
        with self.core.lock:
            self.uploads[session.id] = session
        url = f"{self.core.results_base()}/upload/{API}/files?upload_id={session.id}&upload_protocol=resumable"
        headers = {
            "x-goog-upload-url": url,
            "x-goog-upload-status": "active",
            "x-goog-upload-chunk-granularity": "8388608",
        }
        return json_reply({}, headers=headers)

    def _upload_chunk(self, call: Call, upload_id: str) -> Reply:
        command = {c.strip() for c in call.headers.get("x-goog-upload-command", "").split(",")}
        with self.core.lock:
            session = self.uploads.get(upload_id)
            if session is None:
                raise GoogleError(404, f"No upload session {upload_id}.")
            offset = call.headers.get("x-goog-upload-offset")
            if "upload" in command:
                if offset is not None and int(offset) != len(session.received):
                    raise GoogleError(400, f"Upload offset {offset} does not match {len(session.received)} received.")
                session.received.extend(call.body)
            if "finalize" not in command:
                return Reply(body=b"", headers={"x-goog-upload-status": "active"})
            if session.size is not None and session.size != len(session.received):
                raise GoogleError(400, f"Upload of {len(session.received)} bytes, {session.size} were announced.")
            del self.uploads[upload_id]
            stored = StoredFile(
                id=new_id("", 12), data=bytes(session.received), display_name=session.display_name,
                mime_type=session.mime_type, created_at=now(),
            )  # fmt: skip
            self.files[stored.id] = stored
        self.core.stats.file_uploaded()
        return json_reply({"file": stored.obj(self.core.results_base())}, headers={"x-goog-upload-status": "final"})

    def _file(self, file_id: str) -> StoredFile:
        stored = self.files.get(file_id.removeprefix("files/"))
        if stored is None:
            raise GoogleError(404, f"File files/{file_id} does not exist or you do not have access to it.")
        return stored

    def get_file(self, call: Call) -> Reply:
        """GET /v1beta/files/{id}."""
        with self.core.lock:
            return json_reply(self._file(call.params[0]).obj(self.core.results_base()))

    def delete_file(self, call: Call) -> Reply:
        """DELETE /v1beta/files/{id}."""
        with self.core.lock:
            del self.files[self._file(call.params[0]).id]
        return json_reply({})

    def download(self, call: Call) -> Reply:
        """GET /v1beta/files/{id}:download?alt=media: the bytes of a generated file."""
        with self.core.lock:
            stored = self._file(call.params[0])
        if stored.source != "GENERATED":
            raise GoogleError(
                400, "Only generated files can be downloaded; uploaded files cannot.", "FAILED_PRECONDITION"
            )
        return Reply(body=stored.data, content_type="application/octet-stream", fault_key=stored.fault_key)

    # ---- batch jobs ----------------------------------------------------------------------------------------

    def create_batch(self, call: Call) -> Reply:
        """POST /v1beta/models/{model}:batchGenerateContent with a file source; answers BATCH_STATE_PENDING."""
        model = call.params[0].removeprefix("models/")
        if is_unknown_model(model):
            raise self._unknown_model(model)
        batch = call.json().get("batch")
        if not isinstance(batch, dict):
            raise GoogleError(400, "Missing required field: batch.")
        source: dict[str, Any] = batch["inputConfig"] if isinstance(batch.get("inputConfig"), dict) else {}
        file_name = source.get("fileName")
        if not isinstance(file_name, str) or not file_name:
            raise GoogleError(400, "batch.inputConfig.fileName is required (the emulator takes file input only).")
        with self.core.lock:
            stored = self.files.get(file_name.removeprefix("files/"))
        if stored is None:
            raise GoogleError(400, f"Cannot find file {file_name}: it was not uploaded or has been deleted.")
        if stored.mime_type not in JSONL_TYPES:
            raise GoogleError(400, f"The input file {file_name} has mime type {stored.mime_type!r}, not JSONL.")
        if len(stored.data) > MAX_FILE_BYTES:
            raise GoogleError(400, f"The input file is {len(stored.data)} bytes; the limit is {MAX_FILE_BYTES}.")
        lines, problem = self._parse_file(stored.data)  # outside the lock: the file can be large
        limit = self.core.config.max_requests_per_file
        if len(lines) > limit:
            raise GoogleError(400, f"The input file has {len(lines)} requests; the limit is {limit} per batch.")
        tokens = sum(fake_model.prompt_tokens(line.system, line.user_text) for line in lines)
        with self.core.lock:
            job = self._new_job(model, str(batch.get("displayName") or ""), file_name, lines, tokens, problem)
            return json_reply(job.obj())

    def _new_job(
        self, model: str, display: str, file_name: str, lines: list[Line], tokens: int, problem: str | None
    ) -> Job:
        cfg = self.core.config
        order = len(self.job_order)
        if (
            problem is None
            and cfg.validation_error_rate > 0
            and self.core.frac("validation", "gemini", order) < (cfg.validation_error_rate)
        ):
            problem = "The batch input file failed validation (injected by the emulator's validation_error_rate)."
        if problem is None and cfg.enqueued_token_limit is not None:
            queued = sum(j.tokens for j in self.jobs.values() if j.unfinished and j.model == model)
            if tokens + queued > cfg.enqueued_token_limit:
                raise quota_refusal(model, cfg.enqueued_token_limit, tokens, queued)
        stamp = now()
        job = Job(
            id=new_id("", 24), order=order, model=model, display_name=display, input_file=file_name,
            created_at=stamp, updated_at=stamp, lines=lines, tokens=tokens,
            fail_error={"code": 3, "message": problem} if problem else None,
        )  # fmt: skip
        self.jobs[job.id] = job
        self.job_order.append(job.id)
        if problem is None:
            attempts = self.core.take_attempts([line.key for line in lines])
            for line in lines:
                line.attempt = attempts[line.key]
        self.core.stats.batch_created("gemini")
        return job

    @staticmethod
    def _parse_file(data: bytes) -> tuple[list[Line], str | None]:
        """The file's requests, and the first problem found (which fails the job at its first poll)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return [], "The input file is not valid UTF-8."
        lines: list[Line] = []
        for number, raw in enumerate(text.split("\n"), start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
                key = item.get("key") if isinstance(item, dict) else None
                if not isinstance(key, str) or not key:
                    raise ValueError("each line needs a non-empty string key")
                system, user, max_tokens = split_request(item.get("request"))
                schema = json_schema_of(item["request"])
            except (ValueError, AttributeError) as exc:
                return lines, f"Line {number}: {exc}"
            lines.append(Line(key, system, user, max_tokens, json_schema=schema))
        if not lines:
            return [], "The input file contains no requests."
        return lines, None

    def _job(self, name: str) -> Job:
        job = self.jobs.get(name.removeprefix("batches/"))
        if job is None:
            raise GoogleError(404, f"Batch batches/{name} not found.")
        return job

    def get_batch(self, call: Call) -> Reply:
        """GET /v1beta/batches/{id}: one poll, which advances the job one step."""
        with self.core.lock:
            job = self._job(call.params[0])
            self._advance(job)
            return json_reply(self._shown(job, count=True))

    def _shown(self, job: Job, count: bool = False) -> dict[str, Any]:
        """The job as a client sees it now; a retrieve (`count`) is one "no_output" injection."""
        faults = self.core.faults
        hidden = (
            job.state in FINAL_STATES
            and job.output_file is not None
            and bool((faults.draw if count else faults.peek)(("no_output",), job.id, job.fault_key))
        )
        return job.obj(hide_output=hidden)

    def list_batches(self, call: Call) -> Reply:
        """GET /v1beta/batches (pageSize, pageToken), newest first; listing never advances a job."""
        size = call.int_arg("pageSize", 50, 1, 1000)
        token = call.arg("pageToken") or "0"
        if not token.isdigit():
            raise GoogleError(400, f"Invalid page token {token!r}.")
        start = int(token)
        with self.core.lock:
            items = [self._shown(self.jobs[jid]) for jid in reversed(self.job_order) if jid in self.jobs]
        page: dict[str, Any] = {}
        if items[start : start + size]:
            page["operations"] = items[start : start + size]
        if start + size < len(items):
            page["nextPageToken"] = str(start + size)
        return json_reply(page)

    def cancel_batch(self, call: Call) -> Reply:
        """POST /v1beta/batches/{id}:cancel: the job ends CANCELLED now, keeping what it had finished."""
        with self.core.lock:
            job = self._job(call.params[0])
            if job.state in FINAL_STATES:
                raise GoogleError(400, f"Batch batches/{job.id} is already {job.state}.", "FAILED_PRECONDITION")
            if job.fail_error is not None:
                self._end(job, FAILED)
            else:
                self._finish(job, CANCELLED, progressed=job.state == RUNNING)
        return json_reply({})

    def delete_batch(self, call: Call) -> Reply:
        """DELETE /v1beta/batches/{id}: gone from the list; an unfinished job still runs (and is billed)."""
        with self.core.lock:
            job = self._job(call.params[0])
            if job.unfinished:
                self._finish(job, SUCCEEDED)
            del self.jobs[job.id]
        return json_reply({})

    def complete_all(self) -> None:
        """Move every unfinished job to its final state."""
        with self.core.lock:
            for job in self.jobs.values():
                if job.state not in FINAL_STATES:
                    self._advance(job, force=True)

    def _advance(self, job: Job, force: bool = False) -> None:
        if job.state in FINAL_STATES:
            return
        job.polls += 1
        job.updated_at = now()
        if job.state == PENDING:
            if job.fail_error is not None:
                self._end(job, FAILED)
                return
            job.state = RUNNING
        if force or job.polls >= max(1, self.core.config.polls_to_complete):
            self._finish(job, SUCCEEDED if self.core.config.expire_fraction is None else EXPIRED)

    def _end(self, job: Job, state: str) -> None:
        job.state = state
        job.ended_at = job.updated_at = now()

    def _finish(self, job: Job, final: str, progressed: bool = True) -> None:
        """Answer the requests that ran; the responses file holds one line per answered request."""
        cfg = self.core.config
        out: list[dict[str, Any]] = []
        ok = failed = 0
        for line in job.lines:
            key = (line.key, line.attempt)
            if final == CANCELLED and not (progressed and self.core.frac("cancel", *key) < 0.5):
                continue  # never ran
            if final == EXPIRED and self.core.frac("expire", *key) < (cfg.expire_fraction or 0.0):
                continue
            if self.core.frac("error", *key) < cfg.request_error_rate:
                message = (
                    "Internal error while processing this request (injected by the emulator's request_error_rate)."
                )
                out.append({"key": line.key, "error": {"code": 500, "message": message, "status": "INTERNAL"}})
                failed += 1
                continue
            out.append({"key": line.key, "response": self._answer(job.model, line, line.key)})
            ok += 1
        random.Random(f"{cfg.seed}:gemini:{job.order}").shuffle(out)
        if out:
            stored = StoredFile(
                id=f"batch-{job.id}", data=jsonl(out), display_name=f"{job.id}-responses.jsonl",
                mime_type="application/jsonl", created_at=now(), source="GENERATED", fault_key=job.fault_key,
            )  # fmt: skip
            self.files[stored.id] = stored
            job.output_file = stored.id
        job.counts = {"ok": ok, "failed": failed}
        self._end(job, final)

    # ---- the fake model ------------------------------------------------------------------------------------

    def _answer(self, model: str, line: Line, stats_key: str) -> dict[str, Any]:
        """Ask the fake model, count the billed usage under `stats_key`, return a GenerateContentResponse."""
        cfg = self.core.config
        answer = fake_model.reply(line.system, line.user_text, line.max_tokens, cfg.forms, cfg.seed, line.json_schema)
        cached = 0
        system_tokens = fake_model.count_tokens(line.system) if line.system else 0
        if system_tokens >= IMPLICIT_CACHE_MIN_TOKENS:
            with self.core.lock:
                seen = (f"gemini:{model}", line.system) in self.core.cache_seen
                self.core.cache_seen.add((f"gemini:{model}", line.system))
            cached = system_tokens if seen else 0
        thoughts = thinking_tokens(model, line.user_text)
        output = 0 if answer.finish == "refusal" else answer.completion_tokens  # a blocked reply has no text
        self.core.stats.add_answer(stats_key, answer.prompt_tokens, output + thoughts, cached)
        return response_body(model, answer, output, cached, thoughts)

    def generate_content(self, call: Call) -> Reply:
        """POST /v1beta/models/{model}:generateContent: a live reply from the fake model."""
        model = call.params[0].removeprefix("models/")
        body = call.json()
        try:
            system, user, max_tokens = split_request(body)
        except ValueError as exc:
            raise GoogleError(400, f"Invalid GenerateContentRequest: {exc}") from None
        if is_unknown_model(model):
            raise self._unknown_model(model)
        live_gate(self.core)
        key = live_key({"systemInstruction": body.get("systemInstruction"), "contents": body.get("contents")})
        self.core.stats.add_live_call(key)
        line = Line(key, system, user, max_tokens, json_schema=json_schema_of(body))
        return json_reply(self._answer(model, line, key))

    def get_model(self, call: Call) -> Reply:
        """GET /v1beta/models/{model}."""
        model = call.params[0].removeprefix("models/")
        if not self.core.config.models_route:  # a gateway that does not pass this route on
            raise GoogleError(404, "Method not found.")
        if is_unknown_model(model):
            raise self._unknown_model(model)
        return json_reply(
            {
                "name": f"models/{model}",
                "version": "001",
                "displayName": model,
                "inputTokenLimit": 1_048_576,
                "outputTokenLimit": 65_536,
                "supportedGenerationMethods": ["generateContent", "countTokens", "batchGenerateContent"],
            }
        )

    @staticmethod
    def _unknown_model(model: str) -> GoogleError:
        return GoogleError(
            404,
            f"models/{model} is not found for API version {API}, or is not supported for generateContent. "
            "Call ListModels to see the list of available models and their supported methods.",
        )


def response_body(model: str, answer: fake_model.FakeReply, output: int, cached: int, thoughts: int) -> dict[str, Any]:
    """A GenerateContentResponse for one fake reply: the text in two parts, SAFETY with no content for a refusal."""
    finish = FINISH[answer.finish]
    candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
    text = answer.text or ""
    if finish == "SAFETY":
        candidate["safetyRatings"] = [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
        ]
    elif text:
        cut = len(text) // 2
        parts = [{"text": text[:cut]}, {"text": text[cut:]}] if cut else [{"text": text}]
        candidate["content"] = {"parts": parts, "role": "model"}
    else:
        candidate["content"] = {"role": "model"}
    prompt = answer.prompt_tokens
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,  # includes the cached tokens
        "totalTokenCount": prompt + output + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if output:
        usage["candidatesTokenCount"] = output
    if cached:
        usage["cachedContentTokenCount"] = cached
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cached}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": new_id("", 20)}
