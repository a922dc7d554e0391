"""Plain records passed between the stages (render -> pack -> submit -> store -> poll -> collect -> extract ->
dataset): ledger states, a provider batch and one result in neutral fields, and the typed rows the store hands
out (ShardRow, BatchRow, JobRow), each built in one place in store.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RequestState(StrEnum):
    """Where one request (one custom_id) stands in the ledger."""

    PENDING = "pending"  # rendered and written to a shard, not yet in a provider batch
    SUBMITTED = "submitted"  # in a provider batch that has not been collected
    SUCCEEDED = "succeeded"  # a reply was received and a prompt extracted
    FAILED = "failed"  # the provider answered with an error
    EXPIRED = "expired"  # the batch window passed before this request ran
    CANCELED = "canceled"  # the batch was cancelled before this request ran
    EXTRACTION_FAILED = "extraction_failed"  # a reply came back but held no usable prompt
    TRUNCATED = "truncated"  # the reply was cut off by max_tokens
    MISSING = "missing"  # sent, and the provider has no result line for it (results gone, or never run)


#: Reasons `retry --only` accepts; every state that has no good answer and is not in flight.
RETRYABLE = (
    RequestState.FAILED,
    RequestState.EXPIRED,
    RequestState.CANCELED,
    RequestState.EXTRACTION_FAILED,
    RequestState.TRUNCATED,
    RequestState.MISSING,
)

#: What a bare `retry` resends: a `missing` request may have been answered and billed (its results are gone),
#: so it is resent only when asked for by name (`retry --only missing --yes`).
RETRY_DEFAULT = tuple(s for s in RETRYABLE if s is not RequestState.MISSING)


#: The ledger columns one result line sets, after its custom_id and a flag `full` (results.result_row makes them,
#: Store.stage_results reads them in this order): the first FAILED_COLUMNS for every result; the rest (the reply
#: and what the extractor kept) only for an answer (`full` 1).
RESULT_COLUMNS = (
    "via", "answered_at", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "error_code",
    "error_message", "cost_usd", "state", "reply_text", "finish", "prompt", "detail", "method", "suspect",
)  # fmt: skip
FAILED_COLUMNS = 10


class ShardState(StrEnum):
    """Life of one JSONL shard, each step committed before the next provider call."""

    QUEUED = "queued"  # written to disk and recorded; waiting for capacity
    UPLOADING = "uploading"  # intent: an upload was started
    UPLOADED = "uploaded"  # the provider holds the input file (OpenAI)
    CREATING = "creating"  # intent: a batch create call was started
    SUBMITTED = "submitted"  # the provider batch id is recorded
    AMBIGUOUS = "ambiguous"  # a create may have happened and could not be matched; needs --force
    CANCELED = "canceled"  # taken out of the local queue by `cancel` before it was sent
    ANSWERED = "answered"  # never sent: answered live before its turn (the rest moved to a new queued shard)


class Outcome(StrEnum):
    """What the provider said about one request, mapped from its own words."""

    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    EXPIRED = "expired"
    CANCELED = "canceled"


@dataclass
class BatchInfo:
    """A provider batch, mapped to neutral fields (`status` keeps the provider's own word)."""

    id: str
    status: str
    is_final: bool
    total: int | None = None
    done: int | None = None
    failed: int | None = None
    counts_final_only: bool = False  # Anthropic: counts only exist once the batch has ended
    created_at: float | None = None
    expires_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # batch-level errors (code, message)
    metadata: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    proven: bool = True  # False: matched by creation time and size only, not yet checked against the shard


@dataclass
class Result:
    """One result line, mapped to neutral fields."""

    custom_id: str
    outcome: Outcome
    text: str | None = None
    finish: str | None = None  # "stop", "length" (cut by max_tokens), "refusal"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class JobRow:
    """One job of the ledger (a --job name and what it was last submitted with)."""

    name: str
    provider: str | None = None
    model: str | None = None
    input_dir: str | None = None
    template_dir: str | None = None
    created_at: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class ShardRow:
    """One JSONL shard of the ledger and where its submit stands."""

    id: int
    key: str
    job: str
    provider: str
    model: str
    endpoint: str
    path: str
    n_requests: int
    n_bytes: int
    est_tokens: int
    state: str
    file_id: str | None = None
    batch_id: str | None = None
    intent_at: float | None = None
    requeues: int = 0
    created_at: float = 0.0

    @property
    def name(self) -> str:
        """The shard file's name, for messages."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def tag(self) -> dict[str, str]:
        """What a batch carries to name its shard (OpenAI metadata, Gemini display name)."""
        return {"hipbatch_shard": self.key, "hipbatch_job": self.job[:500]}


@dataclass(frozen=True)
class BatchRow:
    """One provider batch as the ledger last saw it."""

    id: str
    shard_id: int
    job: str
    provider: str
    model: str
    status: str
    is_final: bool
    total: int | None
    done: int | None
    failed: int | None
    counts_final_only: bool
    created_at: float | None
    expires_at: float | None
    finished_at: float | None
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]]
    collected: bool
    adopted: bool
    read_error: str | None = None  # why its results could not be read yet (it stays uncollected)
    read_attempts: int = 0  # collects that failed to read them
    proven: bool = True  # False: adopted by creation time and size only; never cancelled, checked at collect

    def info(self) -> BatchInfo:
        """The provider-neutral view of this batch, as its adapter last reported it."""
        return BatchInfo(
            id=self.id,
            status=self.status,
            is_final=self.is_final,
            total=self.total,
            done=self.done,
            failed=self.failed,
            counts_final_only=self.counts_final_only,
            created_at=self.created_at,
            expires_at=self.expires_at,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            errors=list(self.errors),
            proven=self.proven,
        )
