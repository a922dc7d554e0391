"""The command-line habits every command shares: option types with the usual metavars (PATH, INTEGER, NAME),
the global options (--state-dir, --config) also accepted after the command name, HipbatchError as one line and
its exit code, Ctrl-C as a hint. cli.py declares the commands with these."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from hipbatch.errors import HipbatchError, disk_error
from hipbatch.views import err

F = TypeVar("F", bound=Callable[..., Any])


class Command(TyperCommand):
    """A typer command whose usage line names its arguments the usual way (INPUT_DIR, not {INPUT_DIR})."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


class ProviderName(StrEnum):
    openai = "openai"
    anthropic = "anthropic"
    gemini = "gemini"


class Format(StrEnum):
    json = "json"
    jsonl = "jsonl"
    parquet = "parquet"


class RetryReason(StrEnum):
    failed = "failed"
    expired = "expired"
    canceled = "canceled"
    extraction_failed = "extraction_failed"
    truncated = "truncated"
    missing = "missing"


# Options several commands share. Metavars are the usual words (TEXT, INTEGER, PATH), not typer's <str>.
def opt(metavar: str | None, help: str, *names: str, **kw: Any) -> Any:
    """A typer option with a usual metavar (None for flags) and its help."""
    return typer.Option(*names, metavar=metavar, help=help, **kw)


JsonOut = Annotated[bool, opt(None, "Print a JSON summary on stdout.", "--json")]
Job = Annotated[str | None, opt("NAME", "Only this job.")]
JobName = Annotated[str | None, opt("NAME", "Job name (default: the input folder's name).")]
InputDir = Annotated[Path, typer.Argument(metavar="INPUT_DIR", help="Folder of source files.", show_default=False)]
Provider = Annotated[ProviderName, opt("PROVIDER", "Batch API to use: openai, anthropic or gemini.")]
Model = Annotated[str | None, opt("NAME", "Model (default: config, then template).")]
TemplateDir = Annotated[Path | None, opt("PATH", "Your own template folder (see `hipbatch init`).")]
TemplateName = Annotated[
    str | None, opt("NAME", "Built-in template by name: default, json (see `hipbatch templates`).", "--template")
]
FollowSymlinks = Annotated[
    bool, opt(None, "Also read files that links lead to outside INPUT_DIR.", "--follow-symlinks")
]
MaxFileBytes = Annotated[int | None, opt("BYTES", "Skip larger files, with a reason (default: 2 MiB).", min=1)]
Glob = Annotated[str, opt("PATTERN", "Files to take, relative to INPUT_DIR.", "--glob")]
Limit = Annotated[int | None, opt("INTEGER", "Take only the first N files (sorted).", min=1)]
OutputFile = Annotated[Path, opt("PATH", "Dataset file.")]
FormatOpt = Annotated[Format, opt("FORMAT", "json (one array), jsonl, or parquet (needs pyarrow).", "--format")]
Fields = Annotated[str | None, opt("KEYS", "Keys of each record, e.g. file_name,english_prompt (default: all).")]
PollInterval = Annotated[float, opt("SECONDS", "Seconds between polls.", min=0.01)]
Timeout = Annotated[float | None, opt("SECONDS", "Give up waiting after this many seconds (rerun to go on).")]
Force = Annotated[bool, opt(None, "Resubmit ambiguous shards (a submit that could not be matched).", "--force")]
MaxInFlight = Annotated[
    int | None, opt("INTEGER", "Batches at the provider at once (default: config, else 100).", min=1)
]
MaxTokens = Annotated[int | None, opt("INTEGER", "Estimated input tokens enqueued per model (the quota).", min=1)]
StateDir = Annotated[
    Path | None, opt("PATH", "Where the store lives (default: $HIPBATCH_STATE_DIR, ./state).", "--state-dir")
]
ConfigFile = Annotated[Path | None, opt("PATH", "Config file (default: ./hipbatch.toml, ./config.json).", "--config")]
GLOBALS = [
    inspect.Parameter("state_dir_option", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=StateDir),
    inspect.Parameter("config_option", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile),
]


def reports_errors(fn: F) -> F:
    """Turn HipbatchError (and an OSError of a full or read-only disk) into `Error: ...` on stderr and its exit
    code; Ctrl-C into a hint and 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (HipbatchError, OSError) as e:
            state_dir = getattr(getattr(kwargs.get("ctx"), "obj", None), "state_dir", None)
            problem = e if isinstance(e, HipbatchError) else disk_error(e, state_dir)
            if problem is None:
                raise
            err(f"Error: {problem}")
            raise typer.Exit(problem.exit_code) from None
        except KeyboardInterrupt:
            err("Interrupted. Everything done so far is recorded; run the same command again to continue.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def takes_global_options(fn: F) -> F:
    """Also accept --state-dir and --config after the command name (`hipbatch submit DIR --state-dir S`)."""
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, state_dir_option: Path | None = None, config_option: Path | None = None, **kw: Any) -> Any:
        ctx = kw["ctx"]
        if state_dir_option is not None:
            ctx.obj = dataclasses.replace(ctx.obj, state_dir=state_dir_option)
        if config_option is not None:
            ctx.obj = dataclasses.replace(ctx.obj, config_path=config_option)
        return fn(*args, **kw)

    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *GLOBALS])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in GLOBALS}}
    return wrapper  # type: ignore[return-value]


def registrar(app: typer.Typer) -> Callable[..., Callable[[F], F]]:
    """`command(name=None, global_options=True)`: `app.command` with the house habits: errors as one line, the
    global options also after the command name, the usual usage line."""

    def command(name: str | None = None, global_options: bool = True) -> Callable[[F], F]:
        def register(fn: F) -> F:
            wrapped = reports_errors(fn)
            app.command(name, cls=Command)(takes_global_options(wrapped) if global_options else wrapped)
            return fn

        return register

    return command
