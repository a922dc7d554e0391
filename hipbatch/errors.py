"""The hipbatch error tree; the CLI turns any of these into one line on stderr and a non-zero exit.

HipbatchError
 ├── UsageError            bad input the user can fix: a folder, an option, a template, a config file
 │    ├── TemplateError    a template with a syntax error or an undefined variable (names file and line)
 │    └── MissingKey       the API key variable is not set
 ├── ProviderError         the provider refused or failed a call after retries
 │    └── TransientError   worth retrying: 429, 5xx, connection reset, timeout
 │         └── Unreachable no connection to the base URL (refused, unknown host): final for the model check
 ├── AmbiguousSubmit       a batch may exist for a shard and could not be matched; rerun with --force
 ├── StoreLocked           another hipbatch process holds the state dir
 └── BudgetExceeded        the estimated worst case is over --max-cost
"""

from __future__ import annotations


class HipbatchError(Exception):
    """Base class: every error hipbatch reports to the user."""

    exit_code = 1


class UsageError(HipbatchError):
    """Bad input the user can fix (exit code 2)."""

    exit_code = 2


class TemplateError(UsageError):
    """A template file failed to parse or render."""


class MissingKey(UsageError):
    """The environment variable holding the provider's API key is not set."""


class ProviderError(HipbatchError):
    """A provider call failed for good."""

    status_code: int | None = None  # the HTTP status, when the provider answered
    retry_after: float | None = None  # seconds the provider asked us to wait, when it said
    error_code: str | None = None  # the provider's own error code or type (model_not_found, not_found_error)


class TransientError(ProviderError):
    """A provider call failed in a way worth retrying."""


class Unreachable(TransientError):
    """No connection could be made to the base URL (refused, unknown host, unusable URL)."""

    url: str = ""  # the URL the call went to
    reason: str = ""  # "connection refused", "unknown host", ...


class AmbiguousSubmit(HipbatchError):
    """A shard's batch may already exist at the provider and could not be identified."""


class StoreLocked(HipbatchError):
    """Another hipbatch command is working on the same state dir."""


class BudgetExceeded(HipbatchError):
    """The run's estimated worst-case cost is over the budget given with --max-cost."""
