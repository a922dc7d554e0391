"""OpenAI Batch adapter: the only module that imports the openai SDK."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:  # the SDK takes ~1 s to import: only calls that reach the provider load it
    import openai

from hipbatch.errors import ProviderError, TransientError
from hipbatch.providers.base import AdapterBase, connection_error, status_error, transport_errors
from hipbatch.records import BatchInfo, Outcome, Result

FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@contextmanager
def translate(what: str) -> Iterator[None]:
    """SDK exceptions -> hipbatch errors: transient ones can be retried, the rest are final."""
    import openai

    try:
        yield
    except openai.APIConnectionError as e:  # includes timeouts; a refused connection is Unreachable
        raise connection_error(what, e) from e
    except openai.APIStatusError as e:
        raise status_error(what, e) from e
    except openai.OpenAIError as e:
        raise ProviderError(f"{what}: {e}") from e
    except transport_errors() as e:  # raised while a streamed body is read (a cut download)
        raise TransientError(f"{what}: {type(e).__name__}: {e}") from e


class Adapter(AdapterBase):
    """OpenAI Files + Batches on /v1/chat/completions."""

    name = "openai"
    endpoint = "/v1/chat/completions"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    has_metadata = True
    upload_block = 2 << 20  # bytes of an upload read and sent at a time (see WideReads)

    @cached_property
    def client(self) -> openai.OpenAI:
        import openai

        # max_retries=0: hipbatch's own tenacity policy owns every retry, so a create is never repeated blindly.
        return openai.OpenAI(
            api_key=self.settings.api_key(),
            base_url=self.settings.checked_base_url(),
            max_retries=0,
            timeout=openai.Timeout(self.settings.timeout, connect=self.settings.connect_timeout),
        )

    translate = staticmethod(translate)

    def to_line(self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": []}
        if system:
            body["messages"].append({"role": "system", "content": system})
        body["messages"].append({"role": "user", "content": user})
        for key, value in params.items():
            if value is None:
                continue
            if key == "json_schema":  # render.JSON_SCHEMA_PARAM: structured output, strict (schema enforced)
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": value["name"], "schema": value["schema"], "strict": True},
                }
                continue
            body["max_completion_tokens" if key == "max_tokens" else key] = value
        return {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}

    def request_parts(self, line: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
        body = dict(line["body"])
        model, messages = str(body.pop("model")), body.pop("messages")
        system = next((str(m["content"]) for m in messages if m["role"] == "system"), "")
        user = next((str(m["content"]) for m in messages if m["role"] == "user"), "")
        params = {("max_tokens" if k == "max_completion_tokens" else k): v for k, v in body.items()}
        return model, params, system, user

    def upload(self, path: Path) -> str | None:
        # The open file is streamed (the SDK hands it to the multipart encoder, which reads as it sends).
        with self.guard(f"upload {path.name}"), path.open("rb") as fh:
            return self.client.files.create(
                file=(path.name, cast(BinaryIO, WideReads(fh, self.upload_block))), purpose="batch"
            ).id

    def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> BatchInfo:
        assert file_id is not None
        with self.guard(f"create batch for {path.name}"):
            batch = self.client.batches.create(
                input_file_id=file_id,
                endpoint=self.endpoint,  # type: ignore[arg-type]
                completion_window="24h",
                metadata=tag,
            )
        return _info(batch)

    def find(self, tag: dict[str, str], since: float, n_requests: int) -> list[BatchInfo]:
        found = []
        with self.guard("list batches"):
            for batch in self.client.batches.list(limit=100):
                if batch.created_at < since - 600:
                    break  # newest first: everything after is older than the intent
                meta = batch.metadata or {}
                if all(meta.get(k) == v for k, v in tag.items()):
                    found.append(_info(batch))
        return found

    def status(self, batch_id: str) -> BatchInfo:
        with self.guard(f"status of {batch_id}"):
            return _info(self.client.batches.retrieve(batch_id))

    def ping(self) -> None:
        self.client.batches.list(limit=1)

    def download(self, info: BatchInfo, dest: Path) -> int:
        lines = 0
        with dest.open("wb") as out:
            for file_id in (info.output_file_id, info.error_file_id):
                if not file_id:
                    continue
                with (
                    self.guard(f"download {file_id}", gone_on_404=True),
                    self.client.files.with_streaming_response.content(file_id) as response,
                ):
                    last = b"\n"
                    for chunk in response.iter_bytes(1 << 16):
                        out.write(chunk)
                        lines += chunk.count(b"\n")
                        last = chunk[-1:] or last
                    if last != b"\n":
                        out.write(b"\n")
                        lines += 1
        return lines

    def parse(self, line: dict[str, Any]) -> Result:
        custom_id = str(line.get("custom_id"))
        response = line.get("response") or None
        error = line.get("error") or None
        if response is not None and response.get("status_code") == 200:
            return _parse_completion(custom_id, response.get("body") or {})
        if response is not None:
            body = response.get("body") or {}
            err = body.get("error") if isinstance(body, dict) else None
            err = err if isinstance(err, dict) else {}
            code = err.get("code") or err.get("type") or f"http_{response.get('status_code')}"
            return Result(
                custom_id, Outcome.ERRORED, error_code=str(code), error_message=str(err.get("message") or body)[:2000]
            )
        error = error or {}
        code = str(error.get("code") or "unknown")
        outcome = Outcome.ERRORED
        if "expired" in code:
            outcome = Outcome.EXPIRED
        elif "cancel" in code:
            outcome = Outcome.CANCELED
        return Result(custom_id, outcome, error_code=code, error_message=str(error.get("message") or "")[:2000])

    def cancel(self, batch_id: str) -> BatchInfo:
        with self.guard(f"cancel {batch_id}"):
            return _info(self.client.batches.cancel(batch_id))

    def live(self, line: dict[str, Any]) -> Result:
        with self.guard("chat completion"):
            completion = self.client.chat.completions.create(**line["body"])
        return _parse_completion(str(line["custom_id"]), completion.model_dump(mode="json"))


class WideReads(io.RawIOBase):
    """A binary file read `block` bytes at a time however little is asked (the multipart encoder asks 64 KB):
    each read is one socket send, so a 200 MB upload hands the GIL over a few dozen times instead of 3,200
    while the main thread renders the next shard."""

    def __init__(self, fh: BinaryIO, block: int = 2 << 20) -> None:
        super().__init__()
        self._fh, self._block = fh, block

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(-1 if size is None or size < 0 else max(size, self._block))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def fileno(self) -> int:
        return self._fh.fileno()


def _parse_completion(custom_id: str, body: dict[str, Any]) -> Result:
    choices = body.get("choices") or [{}]
    choice = choices[0] or {}
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    if message.get("refusal"):
        finish = "refusal"
    return Result(
        custom_id,
        Outcome.SUCCEEDED,
        text=message.get("content") or message.get("refusal") or "",
        finish=finish,
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cache_read_tokens=int(details.get("cached_tokens") or 0),
    )


def _info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    errors = []
    if batch.errors and batch.errors.data:
        errors = [{"code": e.code, "message": e.message, "line": e.line} for e in batch.errors.data]
    return BatchInfo(
        id=batch.id,
        status=batch.status,
        is_final=batch.status in FINAL,
        total=counts.total if counts else None,
        done=counts.completed if counts else None,
        failed=counts.failed if counts else None,
        created_at=float(batch.created_at),
        expires_at=float(batch.expires_at) if batch.expires_at else None,
        output_file_id=batch.output_file_id or None,
        error_file_id=batch.error_file_id or None,
        errors=errors,
        metadata=dict(batch.metadata or {}),
        model=getattr(batch, "model", None),
    )
