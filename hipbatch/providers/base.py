"""The Provider protocol every adapter implements, and the settings it is built from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hipbatch.errors import AuthFailed, MissingKey, ProviderError, ResultsGone, TransientError, Unreachable, UsageError
from hipbatch.records import BatchInfo, Result

#: provider -> (its SDK's default base URL, the variable that changes it)
BASE_URLS = {
    "openai": ("https://api.openai.com/v1", "OPENAI_BASE_URL"),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_BASE_URL"),
}


@dataclass
class ProviderSettings:
    """What an adapter needs: where to call, which variable holds the key, request defaults."""

    name: str
    key_env: str
    base_url: str | None = None
    timeout: float = 120.0
    params: dict[str, Any] = field(default_factory=dict)
    base_url_source: str | None = None  # where base_url came from: "OPENAI_BASE_URL", "providers.openai.base_url ..."
    connect_timeout: float = 10.0  # a host that does not answer at all fails in seconds, not after `timeout`

    def where(self) -> str:
        """The base URL and where it came from, for messages."""
        default, env = BASE_URLS.get(self.name, ("the SDK's default URL", "its base URL variable"))
        if not self.base_url:
            return f"{default} (the default; {env} changes it)"
        return f"{self.base_url} (from {self.base_url_source or env})"

    def checked_base_url(self) -> str | None:
        """base_url if it is a usable http(s) URL (None: the SDK default), else UsageError naming its source."""
        url = self.base_url
        if not url:
            return None
        from urllib.parse import urlsplit

        problem = ""
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError when the port is not a number in range
        except ValueError as e:
            problem, port = str(e), None
        if not problem and parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not problem and (not parts.hostname or any(c.isspace() for c in url)):
            problem = "it names no usable host"
        if problem or port == 0:
            source = self.base_url_source or BASE_URLS.get(self.name, ("", "the base URL"))[1]
            raise UsageError(
                f"{source}={url!r} is not a usable base URL ({problem or 'port 0'}); "
                f"expected something like {url_example(self.name)}"
            )
        return url

    def api_key(self) -> str:
        """The key from the environment, or MissingKey naming the variable."""
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise MissingKey(
                f"{self.key_env} is not set: export {self.key_env}=... (hipbatch reads keys from the "
                f"environment only), or try `hipbatch demo --provider {self.name}` which needs no key"
            )
        return key


class LineMaker(Protocol):
    """Turns a rendered request into one line of the provider's request format."""

    name: str
    endpoint: str  # recorded per request, part of its identity

    def to_line(
        self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str
    ) -> dict[str, Any]: ...  # one JSONL line in the provider's batch input format

    def check_key(self) -> None: ...  # raise MissingKey before anything is sent


class BatchProvider(LineMaker, Protocol):
    """One batch API. Adapters translate between hipbatch records and the provider; they never touch the Store."""

    max_requests: int  # per batch
    max_bytes: int  # per batch input (file or request body)
    has_metadata: bool  # can a batch carry our shard tag (so an orphan can be adopted exactly)?

    def check_model(self, model: str) -> str | None: ...  # UsageError if unknown; a warning if it cannot check

    def request_parts(
        self, line: dict[str, Any]
    ) -> tuple[str, dict[str, Any], str, str]: ...  # a request line -> (model, params, system, user), as rendered

    def upload(self, path: Path) -> str | None: ...  # input file id (None: nothing to upload)

    def create(
        self, path: Path, file_id: str | None, tag: dict[str, str]
    ) -> BatchInfo: ...  # one create call with no SDK retries; TransientError means "maybe created"

    def find(
        self, tag: dict[str, str], since: float, n_requests: int
    ) -> list[BatchInfo]: ...  # batches that may be the one created for `tag`

    def status(self, batch_id: str) -> BatchInfo: ...

    def download(self, info: BatchInfo, dest: Path) -> int: ...  # result lines to dest (JSONL); count

    def parse(self, line: dict[str, Any]) -> Result: ...  # one downloaded line -> Result

    def cancel(self, batch_id: str) -> BatchInfo: ...


class LiveProvider(LineMaker, Protocol):
    """The same provider answering one request line now (live mode)."""

    def live(self, line: dict[str, Any]) -> Result: ...


class Provider(BatchProvider, LiveProvider, Protocol):
    """An adapter for both modes (every adapter is)."""


class AdapterBase:
    """What every adapter shares: its settings, the key check and the model check."""

    client: Any  # the SDK client: injected, or built on first use by the adapter (a cached_property)

    def __init__(self, settings: ProviderSettings, client: Any = None) -> None:
        self.settings = settings
        if client is not None:
            self.__dict__["client"] = client  # takes the place of the adapter's cached_property

    @staticmethod
    def translate(what: str) -> AbstractContextManager[None]:
        raise NotImplementedError  # each adapter maps its SDK's exceptions

    @contextmanager
    def guard(self, what: str, gone_on_404: bool = False) -> Iterator[None]:
        """translate(what), naming this adapter's key variable in an AuthFailed; with gone_on_404 (a results
        download of a finished batch), a 404 is ResultsGone: the provider no longer has them."""
        try:
            with self.translate(what):
                yield
        except AuthFailed as e:
            e.key_env = self.settings.key_env
            raise
        except ProviderError as e:
            if gone_on_404 and e.status_code == 404:
                gone = ResultsGone(f"{e}: the provider no longer has these results")
                gone.status_code = 404
                raise gone from e
            raise

    def check_key(self) -> None:
        self.settings.api_key()

    def check_model(self, model: str) -> str | None:
        """UsageError if the provider does not know the model, or if the base URL reaches no batch API; a
        warning (returned) when the server has no model route, so the name cannot be checked there."""
        try:
            with self.guard(f"model {model}"):
                self.client.models.retrieve(model)
        except Unreachable as e:
            raise UsageError(self.unreachable(e)) from None
        except ProviderError as e:
            if e.status_code != 404:
                raise
            if names_model(e, model):
                raise UsageError(f"--model {model}: the provider does not know this model ({e})") from None
            self.check_batch_route()  # the models route is missing: is the batch API there at least?
            return (
                f"{self.settings.where()} has no model route (HTTP 404 on GET .../models/{model}), so the model "
                "name cannot be checked here; going on"
            )
        return None

    def ping(self) -> None:
        """One cheap call to the batch API itself (an adapter lists one batch); no call by default."""

    def request_parts(self, line: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
        """(model, params, system, user) of one of our request lines: to_line read backwards."""
        raise UsageError(f"{self.settings.name}: cannot read its request lines back (retry --max-tokens)")

    def check_batch_route(self) -> None:
        """UsageError naming the base URL when the batch API is not there either (HTTP 404)."""
        try:
            with self.translate("list batches"):
                self.ping()
        except Unreachable as e:
            raise UsageError(self.unreachable(e)) from None
        except ProviderError as e:
            if e.status_code == 404:
                hint = url_hint(self.settings)
                raise UsageError(
                    f"no {self.settings.name} batch API at {self.settings.where()}: HTTP 404 for the model and "
                    f"the batch routes{'; ' + hint if hint else ''}"
                ) from None
            raise

    def unreachable(self, e: Unreachable) -> str:
        """One line for a base URL that cannot be reached: the URL, where it came from, a hint."""
        hint = url_hint(self.settings) or "is the server running and the URL right?"
        return f"cannot reach the {self.settings.name} API at {self.settings.where()}: {e.reason or e}; {hint}"


def names_model(e: ProviderError, model: str) -> bool:
    """Whether a 404 says the model is unknown (OpenAI: code model_not_found; Anthropic: a not_found_error
    naming it) rather than that the route does not exist ("Invalid URL (GET /v1/models/...)")."""
    if e.error_code == "model_not_found":
        return True
    message = str(e).split(": HTTP 404: ", 1)[-1]  # the provider's words, without our "model NAME" prefix
    return model in message.replace(f"/models/{model}", "") and "url" not in message.lower()


def url_example(provider: str) -> str:
    return "http://127.0.0.1:8000" if provider == "anthropic" else "http://127.0.0.1:8000/v1"


def url_hint(settings: ProviderSettings) -> str:
    """What looks wrong in the base URL's path, if anything (OpenAI wants /v1, Anthropic must not have it)."""
    from urllib.parse import urlsplit

    if not settings.base_url:
        return ""
    source = settings.base_url_source or BASE_URLS.get(settings.name, ("", "the base URL"))[1]
    path = urlsplit(settings.base_url).path.rstrip("/")
    if settings.name == "openai" and not path.endswith("/v1") and "/v1" not in path:
        return f"hint: {source} usually ends with /v1 (e.g. {url_example('openai')})"
    if settings.name == "anthropic" and path.endswith("/v1"):
        return f"hint: {source} must not end with /v1, the SDK adds it (e.g. {url_example('anthropic')})"
    return ""


def connection_error(what: str, e: Any) -> TransientError:
    """An SDK's APIConnectionError -> Unreachable (refused, unknown host, no answer to connect, unusable URL) or
    TransientError (a reset, a read timeout: worth retrying)."""
    cause = e.__cause__
    kind = type(cause).__name__ if cause is not None else ""
    url = str(getattr(getattr(e, "request", None), "url", "") or "")
    if kind in ("ConnectError", "ConnectTimeout", "UnsupportedProtocol", "InvalidURL"):
        text = str(cause)
        reason = "connection refused" if "refused" in text.lower() else text
        if "name or service not known" in text.lower() or "nodename nor servname" in text.lower():
            reason = "unknown host"
        if kind == "ConnectTimeout":
            reason = "the host did not answer (connect timeout)"
        elif kind != "ConnectError":
            reason = f"unusable URL ({text})"
        unreachable = Unreachable(f"{what}: cannot connect to {url}: {reason}")
        unreachable.url, unreachable.reason = url, reason
        return unreachable
    detail = f" ({cause})" if cause is not None and str(cause) else ""
    return TransientError(f"{what}: {type(e).__name__}: {e}{detail}")


def status_error(what: str, e: Any) -> ProviderError:
    """An SDK's APIStatusError (both SDKs share its shape) -> TransientError, AuthFailed or ProviderError."""
    body = e.body
    inner = body.get("error", body) if isinstance(body, dict) else None
    message = str(inner["message"]) if isinstance(inner, dict) and inner.get("message") else str(e.message)
    status = int(e.status_code)
    err: ProviderError
    if status in (408, 409, 429) or status >= 500:
        err = TransientError(f"{what}: HTTP {status}: {message}")
        err.retry_after = retry_after_of(e.response.headers)
    elif status in (401, 403):
        return AuthFailed(what, status, message)
    else:
        err = ProviderError(f"{what}: HTTP {status}: {message}")
    err.status_code = status
    code = inner.get("code") or inner.get("type") if isinstance(inner, dict) else None
    err.error_code = str(code) if code else None
    return err


def retry_after_of(headers: Any) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, then retry-after), if it said."""
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        return None
    return None


def line_id(line: Any) -> str | None:
    """The custom_id of one batch input line: `custom_id` (OpenAI, Anthropic) or `key` (Gemini)."""
    if not isinstance(line, dict):
        return None
    value = line.get("custom_id", line.get("key"))
    return value if isinstance(value, str) else None


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's errors that the SDKs let through while a body streams (a cut download is an
    httpx2.RemoteProtocolError, not an SDK error): worth retrying."""
    import httpx2

    return (httpx2.RequestError, httpx2.StreamError)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Lines of a JSONL file as dicts; a line that does not parse raises ValueError naming the line."""
    import json

    decode = json.JSONDecoder().decode  # json.loads without its per-call encoding detection
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                yield decode(raw.decode("utf-8-sig"))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
