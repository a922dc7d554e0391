"""Anthropic Message Batches adapter: the only module that imports the anthropic SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK takes ~1 s to import: only calls that reach the provider load it
    import anthropic

from hipbatch.errors import ProviderError, ResultsGone, TransientError, UnreadableResults
from hipbatch.providers.base import AdapterBase, connection_error, status_error, transport_errors
from hipbatch.records import BatchInfo, Outcome, Result

FINISH = {"max_tokens": "length", "refusal": "refusal", "model_context_window_exceeded": "length"}


@contextmanager
def translate(what: str) -> Iterator[None]:
    """SDK exceptions -> hipbatch errors: transient ones can be retried, the rest are final."""
    import anthropic

    try:
        yield
    except anthropic.APIConnectionError as e:  # includes timeouts; a refused connection is Unreachable
        raise connection_error(what, e) from e
    except anthropic.APIStatusError as e:
        raise status_error(what, e) from e
    except TypeError as e:  # the SDK resolves auth lazily and fails with a TypeError
        if "authentication" in str(e).lower():
            raise ProviderError(f"{what}: no API key: {e}") from e
        raise
    except (anthropic.AnthropicError, json.JSONDecodeError) as e:
        raise TransientError(f"{what}: {e}") from e
    except transport_errors() as e:  # raised while the results stream (a cut download)
        raise TransientError(f"{what}: {type(e).__name__}: {e}") from e


class Adapter(AdapterBase):
    """Anthropic Message Batches: requests travel inline, results stream from results_url."""

    name = "anthropic"
    endpoint = "/v1/messages"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024 - 64 * 1024  # leave room for the JSON envelope around the requests
    has_metadata = False
    body_block = 2 << 20  # bytes of a create body read and sent at a time (see request_body)

    @cached_property
    def client(self) -> anthropic.Anthropic:
        import anthropic

        return anthropic.Anthropic(
            api_key=self.settings.api_key(),
            base_url=self.settings.checked_base_url(),
            max_retries=0,
            timeout=anthropic.Timeout(self.settings.timeout, connect=self.settings.connect_timeout),
        )

    translate = staticmethod(translate)

    def to_line(self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model}
        for key, value in params.items():
            if key == "json_schema" and value is not None:  # render.JSON_SCHEMA_PARAM: structured output
                body["output_config"] = {"format": {"type": "json_schema", "schema": value["schema"]}}
            elif value is not None:
                body[key] = value
        if system:
            # The system prompt is the long part shared by every request: cache it (1 h, batches are slow).
            body["system"] = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
        body["messages"] = [{"role": "user", "content": user}]
        return {"custom_id": custom_id, "params": body}

    def request_parts(self, line: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
        params = dict(line["params"])
        model, messages = str(params.pop("model")), params.pop("messages")
        system = "".join(str(block.get("text", "")) for block in params.pop("system", None) or [])
        return model, params, system, str(messages[0]["content"])

    def upload(self, path: Path) -> str | None:
        return None  # requests travel inline in the create call

    def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> BatchInfo:
        # The body is streamed from the shard file through the SDK's own client (its auth, headers, base URL
        # and errors): messages.batches.create(requests=[...]) would hold every request parsed and then
        # serialised again, about 4x the shard (1 GB for a 256 MB shard).
        from anthropic.types.messages import MessageBatch

        length, body = request_body(path, self.body_block)
        headers = {"Content-Type": "application/json", "Content-Length": str(length)}
        with self.guard(f"create batch for {path.name}"):
            batch = self.client.post(
                "/v1/messages/batches", cast_to=MessageBatch, content=body, options={"headers": headers}
            )
        return _info(batch)

    def find(self, tag: dict[str, str], since: float, n_requests: int) -> list[BatchInfo]:
        # No metadata on Message Batches: a candidate is one created after the intent with the same size.
        found = []
        with self.guard("list batches"):
            for batch in self.client.messages.batches.list(limit=100):
                created = batch.created_at.timestamp()
                if created < since - 600:
                    break
                counts = batch.request_counts
                total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
                if created >= since - 5 and total == n_requests:
                    found.append(_info(batch))
        return found

    def status(self, batch_id: str) -> BatchInfo:
        with self.guard(f"status of {batch_id}"):
            return _info(self.client.messages.batches.retrieve(batch_id))

    def ping(self) -> None:
        self.client.messages.batches.list(limit=1)

    def download(self, info: BatchInfo, dest: Path) -> int:
        with self.guard(f"status of {info.id}"):
            batch = self.client.messages.batches.retrieve(info.id)
        if batch.archived_at is not None:
            raise ResultsGone(f"results of {info.id}: the batch was archived, its results are no longer available")
        if not batch.results_url:
            raise UnreadableResults(f"results of {info.id}: the batch has {batch.processing_status}, no results yet")
        lines = 0
        with self.guard(f"results of {info.id}", gone_on_404=True), dest.open("w", encoding="utf-8") as out:
            decoder = self.client.messages.batches.results(info.id)
            try:
                for item in decoder:
                    out.write(json.dumps(item.model_dump(mode="json", exclude_unset=True), ensure_ascii=False))
                    out.write("\n")
                    lines += 1
            except json.JSONDecodeError as e:  # the SDK parses each line as it streams: name the line
                raise UnreadableResults(f"results of {info.id}: line {lines + 1} is not valid JSON ({e})") from e
            finally:
                decoder.close()  # the SDK leaves the response open on a decode error
        return lines

    def parse(self, line: dict[str, Any]) -> Result:
        custom_id = str(line.get("custom_id"))
        result = line.get("result") or {}
        kind = result.get("type")
        if kind == "succeeded":
            return _parse_message(custom_id, result.get("message") or {})
        if kind == "errored":
            outer = result.get("error") or {}
            nested = outer.get("error")
            inner: dict[str, Any] = nested if isinstance(nested, dict) else outer
            return Result(
                custom_id,
                Outcome.ERRORED,
                error_code=str(inner.get("type") or "errored"),
                error_message=str(inner.get("message") or "")[:2000],
            )
        if kind == "canceled":
            return Result(custom_id, Outcome.CANCELED, error_code="canceled", error_message="batch was canceled")
        if kind == "expired":
            return Result(
                custom_id,
                Outcome.EXPIRED,
                error_code="expired",
                error_message="batch ended (24 h) before this request ran",
            )
        return Result(custom_id, Outcome.ERRORED, error_code="unknown_result", error_message=str(kind))

    def cancel(self, batch_id: str) -> BatchInfo:
        with self.guard(f"cancel {batch_id}"):
            return _info(self.client.messages.batches.cancel(batch_id))

    def live(self, line: dict[str, Any]) -> Result:
        # Same JSON body as the batch line: the SDK's create() has no keyword for some request fields
        # (temperature in 2.14), so everything beyond the required three travels as extra_body.
        params = dict(line["params"])
        required = {k: params.pop(k) for k in ("model", "max_tokens", "messages") if k in params}
        with self.guard("message"):
            message = self.client.messages.create(**required, extra_body=params or None)
        return _parse_message(str(line["custom_id"]), message.model_dump(mode="json"))


BODY_HEAD, BODY_TAIL = b'{"requests":[', b"]}"


def request_body(path: Path, block: int = 2 << 20) -> tuple[int, Iterator[bytes]]:
    """The create call's JSON body, `{"requests":[<line>,<line>,...]}`, streamed from a shard file (one JSON
    request per line, each ending in a newline, as every shard writer writes them): its length in bytes, and
    its bytes about `block` at a time (each one socket send: a few MB keeps memory flat and hands the GIL over
    rarely while another thread renders). The length comes from counting the newlines first, at C speed."""
    size = newlines = 0
    last = b""
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            size += len(chunk)
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    commas = newlines - (last == b"\n")  # one between each two lines
    return len(BODY_HEAD) + size + commas + len(BODY_TAIL), _body_blocks(path, block)


def _body_blocks(path: Path, block: int) -> Iterator[bytes]:
    yield BODY_HEAD
    with path.open("rb") as fh:
        chunk = fh.read(block)
        while chunk:
            after = fh.read(block)
            if after or not chunk.endswith(b"\n"):  # every newline here has a line after it
                yield chunk.replace(b"\n", b"\n,")
            else:
                yield chunk[:-1].replace(b"\n", b"\n,") + b"\n"
            chunk = after
    yield BODY_TAIL


def _parse_message(custom_id: str, message: dict[str, Any]) -> Result:
    text = "".join(block.get("text", "") for block in message.get("content") or [] if block.get("type") == "text")
    usage = message.get("usage") or {}
    return Result(
        custom_id,
        Outcome.SUCCEEDED,
        text=text,
        finish=FINISH.get(message.get("stop_reason") or "", "stop"),
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
        cache_read_tokens=int(usage.get("cache_read_input_tokens") or 0),
        cache_write_tokens=int(usage.get("cache_creation_input_tokens") or 0),
    )


def _info(batch: Any) -> BatchInfo:
    c = batch.request_counts
    ended = batch.processing_status == "ended"
    total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
    return BatchInfo(
        id=batch.id,
        status=batch.processing_status,
        is_final=ended,
        total=total,
        done=c.succeeded if ended else None,
        failed=(c.errored + c.canceled + c.expired) if ended else None,
        counts_final_only=True,
        created_at=batch.created_at.timestamp(),
        expires_at=batch.expires_at.timestamp() if batch.expires_at else None,
    )
