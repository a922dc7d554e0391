"""EmulatorConfig: the knobs of the local batch server (timing, injected failures, limits).

It is mutable at runtime: the server reads it on every request."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from hipbatch.emulator.fake_model import FORMS

#: Transport fault kinds understood by the server. "drop_after" is an extension: the request is processed
#: (a batch may be created) and then the socket is closed without a response.
FAULT_KINDS: tuple[str, ...] = ("429", "500", "drop", "truncate", "drop_after")


@dataclass
class EmulatorConfig:
    """Behaviour of a LocalBatchServer. Every random choice is reproducible from `seed`."""

    seed: int = 0
    polls_to_complete: int = 1  # batch retrieves after creation until the batch is final
    forms: str = "mixed"  # "mixed" or one fake_model form name used for every reply (a marker still wins)
    request_error_rate: float = 0.0  # fraction of requests answered with a server error
    expire_fraction: float | None = None  # when set, every batch expires with about this fraction undone
    validation_error_rate: float = 0.0  # fraction of OpenAI batches that fail validation
    enqueued_token_limit: int | None = None  # OpenAI per-model enqueued input token quota
    fault_rate: float = 0.0  # probability of a transport fault per HTTP request
    fault_kinds: tuple[str, ...] = ("429", "500", "drop", "truncate")
    retry_after_ms: int = 50
    max_requests_per_file: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    anthropic_max_requests: int = 100_000
    live_latency_s: float = 0.0
    live_429_rate: float = 0.0
    results_base_url: str | None = None
    # extension beyond the brief: when set, only these route names (the keys of stats.hits) get faults
    fault_routes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail fast on a misspelt form or fault kind (ValueError)."""
        if self.forms != "mixed" and self.forms not in FORMS:
            raise ValueError(f"unknown reply form {self.forms!r}; use 'mixed' or one of {', '.join(FORMS)}")
        unknown = sorted(set(self.fault_kinds) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; use any of {', '.join(FAULT_KINDS)}")

    def update(self, changes: dict[str, Any]) -> None:
        """Set the named fields (used by POST /_emulator/config); unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        values: dict[str, Any] = {
            name: tuple(value) if name in ("fault_kinds", "fault_routes") and value is not None else value
            for name, value in changes.items()
        }
        replace(self, **values)  # validates the result before anything here changes
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready copy."""
        data = asdict(self)
        data["fault_kinds"] = list(self.fault_kinds)
        data["fault_routes"] = None if self.fault_routes is None else list(self.fault_routes)
        return data
