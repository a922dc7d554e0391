"""The hipbatch error tree; the CLI turns any of these into one line on stderr and a non-zero exit.

HipbatchError
 ├── UsageError            bad input the user can fix: a folder, an option, a template, a config file
 │    ├── TemplateError    a template with a syntax error or an undefined variable (names file and line)
 │    └── MissingKey       the API key variable is not set
 ├── ProviderError         the provider refused or failed a call after retries
 │    ├── TransientError   worth retrying: 429, 5xx, connection reset, timeout, a cut download
 │    │    ├── Unreachable no connection to the base URL (refused, unknown host): final for the model check
 │    │    └── UnreadableResults  a finished batch's download is short, empty, malformed or inconsistent
 │    ├── AuthFailed       the provider refused the API key (401/403): the command stops, nothing is marked failed
 │    └── ResultsGone      the provider says a finished batch's results are no longer available (404, archived)
 ├── StoreError            the state dir or its SQLite store cannot be used (names the path)
 │    └── NoState          a read-only command found no store in the state dir
 ├── AmbiguousSubmit       a batch may exist for a shard and could not be matched; rerun with --force
 ├── StoreLocked           another hipbatch process holds the state dir
 └── BudgetExceeded        the estimated worst case is over --max-cost
"""

from __future__ import annotations

import errno


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


class UnreadableResults(TransientError):
    """A finished batch's results came back short, empty, malformed or inconsistent: fetched again later."""


class AuthFailed(ProviderError):
    """The provider refused the API key (HTTP 401 or 403): every later call would fail the same way."""

    def __init__(self, what: str, status: int, message: str, key_env: str | None = None) -> None:
        super().__init__(what, status, message, key_env)
        self.what, self.message, self.key_env = what, message, key_env
        self.status_code = status

    def __str__(self) -> str:
        refused = "rejected the API key" if self.status_code == 401 else "refused this API key access"
        where = f" in {self.key_env}" if self.key_env else ""
        fix = f"set a valid key in {self.key_env}" if self.key_env else "set a valid API key"
        return (
            f"{self.what}: the provider {refused}{where} (HTTP {self.status_code}: {self.message}); {fix} and run "
            "the same command again (nothing was marked failed)"
        )


class ResultsGone(ProviderError):
    """The provider says the results of a finished batch are no longer available (deleted, expired, archived)."""


class StoreError(HipbatchError):
    """The state dir or its store cannot be used: missing, not a hipbatch store, read-only, corrupt, newer, full."""


class NoState(StoreError):
    """A command that only reads found no hipbatch store in the state dir (exit code 2 where it is an error)."""

    exit_code = 2


class AmbiguousSubmit(HipbatchError):
    """A shard's batch may already exist at the provider and could not be identified."""


class StoreLocked(HipbatchError):
    """Another hipbatch command is working on the same state dir."""


class BudgetExceeded(HipbatchError):
    """The run's estimated worst-case cost is over the budget given with --max-cost."""


#: OSError numbers of a disk that cannot take a write: reported as one line, the command safe to rerun.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def disk_error(e: OSError, state_dir: object = None) -> StoreError | None:
    """The one-line error for an OSError of a full, read-only or failing disk; None for any other OSError.
    `state_dir` names where the command was writing when the error names no file."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = f"{e.filename}: " if e.filename else f"writing under {state_dir} or the output file: " if state_dir else ""
    return StoreError(
        f"{where}{e.strerror or e}; free some space or fix the permissions, then run the same command again "
        "(everything recorded before this write is kept)"
    )
