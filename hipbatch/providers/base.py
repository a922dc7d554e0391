"""The Provider protocol every adapter implements, and the settings it is built from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hipbatch.errors import AuthFailed, MissingKey, ProviderError, ResultsGone, TransientError, UsageError
from hipbatch.records import BatchInfo, Result


@dataclass
class ProviderSettings:
    """What an adapter needs: where to call, which variable holds the key, request defaults."""

    name: str
    key_env: str
    base_url: str | None = None
    timeout: float = 120.0
    params: dict[str, Any] = field(default_factory=dict)

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

    def check_model(self, model: str) -> None: ...  # raise UsageError if the provider does not know it

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

    def check_model(self, model: str) -> None:
        """UsageError if the provider does not know the model (both SDKs have models.retrieve)."""
        try:
            with self.guard(f"model {model}"):
                self.client.models.retrieve(model)
        except ProviderError as e:
            if e.status_code == 404:
                raise UsageError(f"--model {model}: the provider does not know this model ({e})") from None
            raise


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
