"""Gemini API Batch Mode adapter: the only module that imports the google-genai SDK."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK takes ~0.5 s to import: only calls that reach the provider load it
    from google import genai

from hipbatch.errors import AuthFailed, MissingKey, ProviderError, ResultsGone, TransientError, UsageError
from hipbatch.providers.base import AdapterBase, ProviderSettings, retry_after_of
from hipbatch.records import BatchInfo, Outcome, Result

DEFAULT_KEY_ENV = "GEMINI_API_KEY"
KEY_ENVS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's order: GOOGLE_API_KEY wins when both are set
BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"
API_VERSION = "v1beta"  # Batch Mode and the Files API live in v1beta (the 3.x SDK defaults to v1)
JOB_WINDOW = 48 * 3600.0  # a job not finished in 48 hours becomes JOB_STATE_EXPIRED
FINAL = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"})
#: The job states `status` returns (the SDK's words; the REST API says BATCH_STATE_...).
STATES = ("JOB_STATE_PENDING", "JOB_STATE_RUNNING", *sorted(FINAL))
QUOTA_CODE = "RESOURCE_EXHAUSTED"  # BatchInfo.errors[].code of a job refused for the enqueued-token quota
REFUSED_PREFIX = "hipbatch-refused-"  # the id given to a create the server refused for quota (no job exists)
SHARD_LABEL = "hipbatch_shard="  # the display name carries the shard tag: `hipbatch_shard=<key>`
FIELDS = {"max_tokens": "maxOutputTokens", "top_p": "topP", "top_k": "topK", "stop": "stopSequences"}
#: google.rpc.Code numbers (an Operation's `error.code`) -> names.
RPC_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx2  # the SDK's HTTP client

    return (httpx2.TransportError,)


@contextmanager
def translate(what: str, where: str = "", key_env: str = DEFAULT_KEY_ENV) -> Iterator[None]:
    """SDK exceptions -> hipbatch errors: transient ones can be retried, the rest are final.

    `where` names the endpoint for connection errors, `key_env` the key variable for 401/403.
    """
    from google.genai import errors

    try:
        yield
    except errors.APIError as e:
        raise api_error(what, e, key_env) from e
    except _transport_errors() as e:  # refused, reset, timed out: the SDK does not retry these either
        at = f" at {where}" if where else ""
        raise TransientError(f"{what}: cannot reach the Gemini API{at}: {type(e).__name__}: {e}") from e
    except ValueError as e:
        # An answer cut short (not JSON), or the SDK's upload loop ending without a final status: worth another try.
        if isinstance(e, json.JSONDecodeError | errors.UnknownApiResponseError) or "upload" in str(e).lower():
            raise TransientError(f"{what}: {type(e).__name__}: {str(e)[:300]}") from e
        raise
    except KeyError as e:  # files.upload: the server returned no x-goog-upload-url
        raise ProviderError(f"{what}: the server did not start a resumable upload ({e})") from e


def api_error(what: str, e: Any, key_env: str = DEFAULT_KEY_ENV) -> ProviderError:
    """A google.genai APIError (.code, .status, .message, .details, .response) -> TransientError or ProviderError."""
    code = int(getattr(e, "code", 0) or 0)
    status = str(getattr(e, "status", "") or "")
    message = str(getattr(e, "message", "") or e)
    label = f"HTTP {code}" + (f" {status}" if status else "")
    err: ProviderError
    if code in (408, 429) or code >= 500:
        err = TransientError(f"{what}: {label}: {message}")
        headers = getattr(getattr(e, "response", None), "headers", None)
        asked = retry_after_of(headers) if headers is not None else None
        err.retry_after = asked if asked is not None else retry_delay_of(getattr(e, "details", None))
    elif code in (401, 403) or _bad_key(e):
        return AuthFailed(what, code if code in (401, 403) else 401, f"{label}: {message}", key_env)
    else:
        err = ProviderError(f"{what}: {label}: {message}")
    err.status_code = code
    return err


def _bad_key(e: Any) -> bool:
    """Google answers an invalid key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID."""
    return "API_KEY_INVALID" in json.dumps(getattr(e, "details", None), default=str) or "API key not valid" in str(
        getattr(e, "message", "")
    )


def retry_delay_of(details: Any) -> float | None:
    """Seconds from a google.rpc.RetryInfo detail (`"retryDelay": "31s"`), if the error carries one."""
    error = details.get("error", details) if isinstance(details, dict) else None
    items = error.get("details") if isinstance(error, dict) else None
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            try:
                return float(str(item.get("retryDelay", "")).removesuffix("s"))
            except ValueError:
                return None
    return None


def is_quota_refusal(e: Any) -> bool:
    """A create refused for the per-model enqueued-token quota (429 RESOURCE_EXHAUSTED naming enqueued tokens).

    Google's exact wording is unverified: any other 429 stays a TransientError, which is retried and never
    loses a shard, only time.
    """
    if int(getattr(e, "code", 0) or 0) != 429:
        return False
    text = json.dumps(getattr(e, "details", None), default=str) + str(getattr(e, "message", ""))
    return "enqueued" in text.lower()


class Adapter(AdapterBase):
    """Gemini API Batch Mode: a JSONL file through the Files API, one batch job per shard."""

    name = "gemini"
    endpoint = "models.generateContent"  # recorded per request, part of its identity (the model is too)
    max_requests = 50_000  # the docs give no per-job count (only 2 GB a file): one failed job stays cheap
    max_bytes = 2_000_000_000  # "2 GB" a file: 2 x 10^9 bytes, under 2 GiB too
    has_metadata = True  # the display name carries the shard tag exactly

    def __init__(self, settings: ProviderSettings, client: genai.Client | None = None) -> None:
        super().__init__(settings)
        if client is not None:
            self.__dict__["client"] = client  # replaces the lazily built one (cached_property)

    @cached_property
    def client(self) -> genai.Client:
        from google import genai
        from google.genai import types

        # No retry_options: the SDK then makes one attempt per call; hipbatch's own policy owns every retry
        # (the SDK ignores Retry-After). The adapter keeps the client: Client.__del__ closes its HTTP client.
        options = types.HttpOptions(
            base_url=self.settings.base_url or None,
            api_version=API_VERSION,
            timeout=int(self.settings.timeout * 1000),
        )
        return genai.Client(api_key=self.api_key(), vertexai=False, http_options=options)

    # ---- keys and errors -------------------------------------------------------------------------------

    def api_key(self) -> str:
        """GOOGLE_API_KEY, else GEMINI_API_KEY (as the SDK reads them), or the config's api_key_env."""
        if self.settings.key_env != DEFAULT_KEY_ENV:
            return self.settings.api_key()
        for name in KEY_ENVS:
            value = os.environ.get(name, "").strip()
            if value:
                return value
        raise MissingKey(
            f"{DEFAULT_KEY_ENV} is not set: export {DEFAULT_KEY_ENV}=... (or GOOGLE_API_KEY, which wins when "
            "both are set; hipbatch reads keys from the environment only), or try `hipbatch demo --provider "
            "gemini` which needs no key"
        )

    def check_key(self) -> None:
        self.api_key()

    @staticmethod
    def translate(what: str) -> AbstractContextManager[None]:
        return translate(what)

    def _translate(self, what: str) -> AbstractContextManager[None]:
        key_env = self.settings.key_env
        if key_env == DEFAULT_KEY_ENV:
            key_env = "GOOGLE_API_KEY" if os.environ.get("GOOGLE_API_KEY", "").strip() else DEFAULT_KEY_ENV
        where = f"{self.settings.base_url} ({BASE_URL_ENV} or base_url)" if self.settings.base_url else ""
        return translate(what, where, key_env)

    def check_model(self, model: str) -> str | None:
        """UsageError if Gemini does not know the model; a server without the models route is warned about
        (if its batch routes answer) and used."""
        try:
            with self._translate(f"model {model}"):
                self.client.models.get(model=model)
        except ProviderError as e:
            cause = e.__cause__
            text = str(getattr(cause, "message", "") or e).lower()
            if e.status_code == 404 and f"models/{model}".lower() in text and "not found" in text:
                raise UsageError(f"--model {model}: the provider does not know this model ({e})") from None
            if e.status_code != 404:
                raise
            self.check_batch_route()  # no such route (a proxy or gateway without it): is the batch API there?
            where = self.settings.where()
            return (
                f"{self.settings.name} at {where} has no model route: --model {model} cannot be checked here; going on"
            )
        return None

    def ping(self) -> None:
        """One cheap call to the batch API: list one job."""
        next(iter(self.client.batches.list(config={"page_size": 1})), None)

    def request_parts(self, line: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
        """(model, params, system, user) of one of our lines: to_line read backwards."""
        request = line["request"]
        model = str(request["model"]).removeprefix("models/")
        system = "".join(p.get("text", "") for p in (request.get("systemInstruction") or {}).get("parts", []))
        user = "".join(p.get("text", "") for c in request["contents"] for p in c.get("parts", []))
        params: dict[str, Any] = {}
        names = {rest: neutral for neutral, rest in FIELDS.items()}
        for key, value in (request.get("generationConfig") or {}).items():
            if key == "responseMimeType":
                continue
            if key == "responseJsonSchema":  # the json template's schema (its name is not sent to Gemini)
                params["json_schema"] = {"name": "english_prompt", "schema": value}
            elif key == "stopSequences":
                params["stop"] = value
            else:
                params[names.get(key, key)] = value
        return model, params, system, user

    # ---- batch lines ---------------------------------------------------------------------------------

    def to_line(self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str) -> dict[str, Any]:
        """`{"key", "request"}`: a GenerateContentRequest in REST form; its model names the batch's model."""
        request: dict[str, Any] = {"model": model_name(model)}
        if system:
            request["systemInstruction"] = {"parts": [{"text": system}]}
        request["contents"] = [{"role": "user", "parts": [{"text": user}]}]
        config = generation_config(params)
        if config:
            request["generationConfig"] = config
        return {"key": custom_id, "request": request}

    def upload(self, path: Path) -> str | None:
        with self._translate(f"upload {path.name}"):
            # The mimetypes module does not know .jsonl: the type must be given.
            uploaded = self.client.files.upload(
                file=str(path), config={"mime_type": "jsonl", "display_name": path.name}
            )
        return str(uploaded.name)

    def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> BatchInfo:
        assert file_id is not None
        from google.genai import errors

        model = _first_model(path)
        label = display_name(tag)
        # No SDK retry: a TransientError means "maybe created", and submit looks with find() before trying again.
        with self._translate(f"create batch for {path.name}"):
            try:
                job = self.client.batches.create(model=model, src=file_id, config={"display_name": label})
            except errors.APIError as e:
                if is_quota_refusal(e):
                    return refused(label, model, e)
                raise
        return _info_of_job(job)

    def find(self, tag: dict[str, str], since: float, n_requests: int) -> list[BatchInfo]:
        """Jobs whose display name carries the shard tag (created at most 10 minutes before `since`)."""
        wanted = display_name(tag)
        found = []
        with self._translate("list batches"):
            for n, job in enumerate(self.client.batches.list(config={"page_size": 100})):
                if n >= 2000:
                    break  # a long history: the job we look for is recent
                created = job.create_time.timestamp() if job.create_time else None
                if job.display_name == wanted and (created is None or created >= since - 600):
                    found.append(_info_of_job(job))
        return found

    def status(self, batch_id: str) -> BatchInfo:
        if batch_id.startswith(REFUSED_PREFIX):
            return refused_info(batch_id)
        with self._translate(f"status of {batch_id}"):
            return info_of(self._get_raw(job_name(batch_id)))

    def _get_raw(self, name: str) -> dict[str, Any]:
        """The job as the REST API sends it: the SDK's BatchJob drops batchStats and error for this API."""
        api = getattr(self.client, "_api_client", None)
        if api is None or not hasattr(api, "request"):  # a future SDK without it: fewer fields, still correct
            job = self.client.batches.get(name=name)
            return {"name": job.name, "metadata": _metadata_of_job(job)}
        body = api.request("get", name, {}, None).body
        data = json.loads(body) if body else {}
        return data if isinstance(data, dict) else {}

    def download(self, info: BatchInfo, dest: Path) -> int:
        """The responses file, streamed to dest; returns its line count (a missing final newline is added)."""
        if not info.output_file_id:
            dest.write_bytes(b"")
            return 0
        try:
            with self._translate(f"download {info.output_file_id}"):
                self.client.files.download(file=info.output_file_id, destination=str(dest))
        except ProviderError as e:
            if e.status_code != 404:
                raise
            gone = ResultsGone(f"{e}: the provider no longer has these results")  # retry --only missing --yes
            gone.status_code = 404
            raise gone from e
        lines, last = 0, b"\n"
        with dest.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 16), b""):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        if last != b"\n":
            with dest.open("ab") as fh:
                fh.write(b"\n")
            lines += 1
        return lines

    def parse(self, line: dict[str, Any]) -> Result:
        key = str(line.get("key"))
        if isinstance(line.get("response"), dict):
            return parse_response(key, line["response"])
        error: dict[str, Any] = line["error"] if isinstance(line.get("error"), dict) else {}
        code = str(error.get("status") or (f"http_{error['code']}" if error.get("code") else "unknown"))
        return Result(key, Outcome.ERRORED, error_code=code, error_message=str(error.get("message") or line)[:2000])

    def cancel(self, batch_id: str) -> BatchInfo:
        if batch_id.startswith(REFUSED_PREFIX):
            return refused_info(batch_id)
        try:
            with self._translate(f"cancel {batch_id}"):
                self.client.batches.cancel(name=job_name(batch_id))  # answers nothing: ask for the job afterwards
        except ProviderError as e:
            if isinstance(e, TransientError) or e.status_code not in (400, 409):
                raise
            # Already final (or never cancellable): what it is now is the answer.
        return self.status(batch_id)

    def live(self, line: dict[str, Any]) -> Result:
        """The batch line's request through models.generate_content (the same REST body)."""
        from google.genai import types

        request = line["request"]
        config = types.GenerateContentConfig.model_validate(
            {**(request.get("generationConfig") or {}), "systemInstruction": request.get("systemInstruction")}
        )
        with self._translate("generate content"):
            response = self.client.models.generate_content(
                model=request["model"], contents=request["contents"], config=config
            )
        body = response.model_dump(mode="json", by_alias=True, exclude_none=True)
        return parse_response(str(line["key"]), body)


# ---- requests -----------------------------------------------------------------------------------------


def job_name(batch_id: str) -> str:
    """The API's name of a job from hipbatch's id (the name without "batches/", safe in file names)."""
    return batch_id if batch_id.startswith("batches/") else f"batches/{batch_id}"


def model_name(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


def generation_config(params: dict[str, Any]) -> dict[str, Any]:
    """hipbatch's neutral request params -> generationConfig (REST names)."""
    config: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if key == "json_schema":  # {"name": ..., "schema": {...}}: the json template's contract
            config["responseMimeType"] = "application/json"
            config["responseJsonSchema"] = value.get("schema", value) if isinstance(value, dict) else value
        elif key == "stop":
            config["stopSequences"] = [value] if isinstance(value, str) else list(value)
        else:
            config[FIELDS.get(key, _camel(key))] = value
    return config


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def display_name(tag: dict[str, str]) -> str:
    """The one label a job carries: the shard key names the shard (and its job) exactly."""
    return SHARD_LABEL + tag["hipbatch_shard"]


def _first_model(path: Path) -> str:
    """The model of a shard: its first request names it (a shard holds one model)."""
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                model = json.loads(raw).get("request", {}).get("model")
                if isinstance(model, str) and model:
                    return model
                break
    raise ProviderError(f"{path.name}: the first line names no request.model")


# ---- responses ----------------------------------------------------------------------------------------


def parse_response(key: str, response: dict[str, Any]) -> Result:
    """One GenerateContentResponse -> Result: parts joined, MAX_TOKENS -> "length", blocked/empty -> errored."""
    usage = response.get("usageMetadata") or {}

    def result(outcome: Outcome, **fields: Any) -> Result:
        return Result(
            key,
            outcome,
            input_tokens=int(usage.get("promptTokenCount") or 0),  # includes the cached tokens
            output_tokens=int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0),
            cache_read_tokens=int(usage.get("cachedContentTokenCount") or 0),
            **fields,
        )

    candidates = response.get("candidates") or []
    if not candidates:
        feedback = response.get("promptFeedback") or {}
        reason = str(feedback.get("blockReason") or "no_candidates")
        return result(Outcome.ERRORED, error_code=reason, error_message=f"no reply: the prompt was {reason}")
    candidate = candidates[0] or {}
    finish = str(candidate.get("finishReason") or "STOP")
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and not p.get("thought"))
    if finish == "MAX_TOKENS":
        return result(Outcome.SUCCEEDED, text=text, finish="length")
    if finish != "STOP" or not text:
        reason = finish if finish != "STOP" else "no_content"
        return result(
            Outcome.ERRORED, error_code=reason, error_message=f"reply blocked or empty (finishReason {finish})"
        )
    return result(Outcome.SUCCEEDED, text=text, finish="stop")


def _state(raw: Any) -> str:
    """JOB_STATE_... from the SDK's JobState enum or the REST API's BATCH_STATE_... string."""
    state = str(getattr(raw, "value", raw) or "JOB_STATE_UNSPECIFIED")
    return "JOB_STATE_" + state.removeprefix("BATCH_STATE_") if state.startswith("BATCH_STATE_") else state


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _count(stats: dict[str, Any], name: str) -> int | None:
    value = stats.get(name)
    return int(value) if value is not None else None


def info_of(op: dict[str, Any]) -> BatchInfo:
    """A job in REST form (an Operation: name, metadata{state, batchStats, output, ...}, error) -> BatchInfo."""
    meta = op.get("metadata") or {}
    state = _state(meta.get("state"))
    stats = meta.get("batchStats") or {}
    errors = []
    if isinstance(op.get("error"), dict):
        error = op["error"]
        code = error.get("code")
        errors = [
            {
                "code": RPC_CODES.get(code, str(code)) if isinstance(code, int) else str(code),
                "message": error.get("message"),
            }
        ]
    created = _ts(meta.get("createTime"))
    shard = str(meta.get("displayName") or "")
    total = _count(stats, "requestCount")
    done = _count(stats, "successfulRequestCount")
    failed = _count(stats, "failedRequestCount")
    final = state in FINAL
    if final and total is not None:
        done, failed = done or 0, failed or 0
    return BatchInfo(
        id=str(op.get("name") or meta.get("name")).removeprefix("batches/"),  # a path-safe id: "batches/" + id
        status=state,
        is_final=final,
        total=total,
        done=done,
        failed=failed,
        created_at=created,
        expires_at=created + JOB_WINDOW if created else None,
        output_file_id=(meta.get("output") or {}).get("responsesFile") or None,
        errors=errors,
        metadata={"hipbatch_shard": shard.removeprefix(SHARD_LABEL)} if shard.startswith(SHARD_LABEL) else {},
        model=str(meta["model"]).removeprefix("models/") if meta.get("model") else None,
    )


def _metadata_of_job(job: Any) -> dict[str, Any]:
    """The REST metadata fields the SDK's BatchJob keeps."""
    dest = job.dest
    return {
        "state": _state(job.state),
        "displayName": job.display_name,
        "createTime": job.create_time,
        "model": job.model,
        "output": {"responsesFile": dest.file_name} if dest is not None and dest.file_name else {},
    }


def _info_of_job(job: Any) -> BatchInfo:
    """A typed BatchJob (create, list) -> BatchInfo; it has no counts and no error for this API."""
    return info_of({"name": job.name, "metadata": _metadata_of_job(job)})


# ---- a create refused for quota -------------------------------------------------------------------------


def refused(label: str, model: str, e: Any) -> BatchInfo:
    """A create the server refused for the enqueued-token quota: nothing was created, so the answer is a local
    pending "job" whose status is JOB_STATE_FAILED with code RESOURCE_EXHAUSTED (collect requeues its shard)."""
    name = f"{REFUSED_PREFIX}{uuid.uuid4().hex[:16]}"
    return BatchInfo(
        id=name,
        status="JOB_STATE_PENDING",
        is_final=False,
        metadata={"hipbatch_shard": label.removeprefix(SHARD_LABEL)},
        model=model.removeprefix("models/"),
        errors=[{"code": QUOTA_CODE, "message": str(getattr(e, "message", e))[:500]}],
    )


def refused_info(name: str) -> BatchInfo:
    return BatchInfo(
        id=name,
        status="JOB_STATE_FAILED",
        is_final=True,
        total=None,
        errors=[
            {"code": QUOTA_CODE, "message": "the create was refused: enqueued-token quota of the model (HTTP 429)"}
        ],
    )
