"""EmulatorConfig: the knobs of the local batch server (timing, injected failures, limits).

It is mutable at runtime: the server reads it on every request. Set knobs in-process with
`EmulatorConfig(...)`, `server.config.update({...})` or plain attribute assignment, or through the control
endpoint (`POST /_emulator/config` with the server's token and a JSON object of the fields to change); the
fields in IN_PROCESS_ONLY can only be set in-process.

Misbehaving downloads (`download_fault`), one kind at a time, for the results download of every provider
(OpenAI `GET /v1/files/{id}/content` of a batch's output and error files, Anthropic's results_url, and any other
route the server marks as a download):

  short      the body ends at a line boundary but the last third of its lines (at least one) are left out
  empty      a 200 answer with an empty body
  cut        the headers promise the whole body, about half of it is sent (stopping inside a line), then the
             connection closes: the client sees httpx2.RemoteProtocolError (an incomplete read)
  duplicate  the first line is sent again at the end (same custom_id, identical bytes)
  conflict   a second line for the first custom_id whose answer can differ is added at the end: the same
             envelope with every text field ("text", "content", "refusal", "message") changed and every token
             count doubled. The server billed only the first one
  malformed  the middle line is replaced by its own first half (not JSON); every other line is intact
  no_output  OpenAI: a final batch is shown with request_counts as they are but output_file_id and
             error_file_id None. Anthropic: an `ended` batch is shown with results_url null. Each batch
             retrieve that hides the files counts as one injection (listing shows the same, uncounted)
  gone       the results are no longer available: the download answers 404 (OpenAI: the output/error file is
             also 404 for files.retrieve; Anthropic: the batch shows archived_at). The signal for
             `retry --only missing`

`download_fault_times` K makes each download target (one OpenAI file, one Anthropic batch) misbehave for its
first K downloads, then heal; None keeps it misbehaving. `download_fault_fraction` picks which batches are hit,
by seed and batch creation order (1.0: every batch). Counting starts again whenever one of download_fault,
download_fault_times, download_fault_fraction or seed changes.

`auth_after` N: the first N provider API calls that pass the key check after the knob is set are served; every
later one answers 401 (a key rotated mid-run) until it is set back to None. Setting it again restarts the count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from hipbatch.emulator.fake_model import FORMS

#: Transport fault kinds understood by the server. "drop_after" is an extension: the request is processed
#: (a batch may be created) and then the socket is closed without a response.
FAULT_KINDS: tuple[str, ...] = ("429", "500", "drop", "truncate", "drop_after")

#: Values of EmulatorConfig.download_fault (see the module docstring).
DOWNLOAD_FAULTS: tuple[str, ...] = ("short", "empty", "cut", "duplicate", "conflict", "malformed", "no_output", "gone")

#: Fields the control endpoint refuses to change: where the server points clients (an Anthropic results_url
#: carries the caller's key to whatever host it names) and the request-body cap.
IN_PROCESS_ONLY: frozenset[str] = frozenset({"results_base_url", "max_body_bytes"})

MAX_BODY_BYTES = 300 * 1024 * 1024  # the largest real batch input is 256 MB (an Anthropic create body)


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
    results_base_url: str | None = None  # in-process only: base of the absolute results URLs handed out
    # extension beyond the brief: when set, only these route names (the keys of stats.hits) get faults
    fault_routes: tuple[str, ...] | None = None
    download_fault: str | None = None  # one of DOWNLOAD_FAULTS, applied to results downloads
    download_fault_times: int | None = None  # downloads of each target that misbehave before it heals; None: all
    download_fault_fraction: float = 1.0  # share of batches (by seed and creation order) the fault hits
    auth_after: int | None = None  # API calls served before every call answers 401; None: keys stay valid
    models_route: bool = True  # False: GET /v1/models/{id} is a 404 "no such route", as on many compatible servers
    max_body_bytes: int = MAX_BODY_BYTES  # in-process only: larger request bodies get 413 before being read

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail fast on a misspelt form or fault kind, or a knob out of range (ValueError)."""
        if self.forms != "mixed" and self.forms not in FORMS:
            raise ValueError(f"unknown reply form {self.forms!r}; use 'mixed' or one of {', '.join(FORMS)}")
        unknown = sorted(set(self.fault_kinds) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; use any of {', '.join(FAULT_KINDS)}")
        if self.download_fault is not None and self.download_fault not in DOWNLOAD_FAULTS:
            raise ValueError(
                f"unknown download_fault {self.download_fault!r}; use null or one of {', '.join(DOWNLOAD_FAULTS)}"
            )
        for name in ("download_fault_times", "auth_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be null or a whole number >= 0, got {value!r}")
        if not 0.0 <= self.download_fault_fraction <= 1.0:
            raise ValueError(f"download_fault_fraction must be between 0 and 1, got {self.download_fault_fraction!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be a whole number >= 0, got {self.max_body_bytes!r}")

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
