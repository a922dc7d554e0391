"""The typer app: each command parses its options into one options object, calls one function of `ops`, and hands
the result to a view. The only module that exits."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hipbatch import __version__, ops, views
from hipbatch.errors import HipbatchError, disk_error
from hipbatch.views import Out, err, print_json

app = typer.Typer(
    help="Turn folders of HIP kernels into English prompts through the OpenAI and Anthropic Batch APIs.\n\n"
    "Start with `hipbatch demo` (no key needed). Real runs: `hipbatch submit DIR`, `hipbatch status`, "
    "`hipbatch collect --wait`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


class ProviderName(StrEnum):
    openai = "openai"
    anthropic = "anthropic"


class Format(StrEnum):
    json = "json"
    jsonl = "jsonl"


class RetryReason(StrEnum):
    failed = "failed"
    expired = "expired"
    canceled = "canceled"
    extraction_failed = "extraction_failed"
    truncated = "truncated"
    missing = "missing"


# Options several commands share.
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
Job = Annotated[str | None, typer.Option(help="Only this job.")]
JobName = Annotated[str | None, typer.Option(help="Job name (default: the input folder's name).")]
InputDir = Annotated[Path, typer.Argument(help="Folder of source files.", show_default=False)]
Model = Annotated[str | None, typer.Option(help="Model (default: config, then template).")]
TemplateDir = Annotated[Path, typer.Option(help="Template folder.")]
Glob = Annotated[str, typer.Option("--glob", help="Files to take, relative to INPUT_DIR.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Take only the first N files (sorted).")]
OutputFile = Annotated[Path, typer.Option(help="Dataset file.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="json (one array) or jsonl.")]
Force = Annotated[
    bool, typer.Option("--force", help="Resubmit shards whose earlier submit cannot be told apart at the provider.")
]
MaxInFlight = Annotated[
    int | None, typer.Option(min=1, help="Batches at the provider at once; the rest wait in the local queue.")
]
MaxTokens = Annotated[
    int | None, typer.Option(min=1, help="Estimated input tokens enqueued per model at once (the provider's quota).")
]


def reports_errors(fn: F) -> F:
    """Turn HipbatchError into `Error: ...` on stderr and its exit code; Ctrl-C into a hint and 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (HipbatchError, OSError) as e:  # an OSError of a full or read-only disk is one line too
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


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hipbatch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    state_dir: Annotated[
        Path, typer.Option(envvar="HIPBATCH_STATE_DIR", help="Where the store, shards and results live.")
    ] = Path("state"),
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Config file (default: ./hipbatch.toml or ./config.json if present)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """hipbatch: batch LLM prompt generation for HIP kernels."""
    ctx.obj = ops.Context(state_dir=state_dir, config_path=config)


@app.command()
@reports_errors
def submit(
    ctx: typer.Context,
    input_dir: InputDir,
    provider: Annotated[ProviderName, typer.Option(help="Batch API to use.")] = ProviderName.openai,
    model: Model = None,
    template_dir: TemplateDir = ops.DEFAULT_TEMPLATE,
    glob: Glob = "**/*.hip",
    limit: Limit = None,
    job: JobName = None,
    max_requests_per_batch: Annotated[
        int | None, typer.Option(min=1, help="Cap per batch (the provider's limit applies anyway).")
    ] = None,
    max_in_flight_batches: MaxInFlight = None,
    max_enqueued_tokens: MaxTokens = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Render and write shards only: no network, no key.")
    ] = False,
    force: Force = False,
    max_cost: Annotated[
        float | None,
        typer.Option(
            "--max-cost",
            min=0,
            help="Budget in USD: refuse, before any upload, when the estimated worst case is over it.",
        ),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Render every file of INPUT_DIR and send the requests not sent before, in batches.

    Example: hipbatch submit kernels/ --provider openai --model gpt-4o-mini
    """
    opts = ops.SubmitOptions(
        input_dir, provider.value, model, template_dir, glob, limit, job, max_requests_per_batch,
        max_in_flight_batches, max_enqueued_tokens, dry_run, force, max_cost,
    )  # fmt: skip
    result = ops.submit(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(result)
    if ops.unsent(result):
        raise typer.Exit(1)


@app.command()
@reports_errors
def status(
    ctx: typer.Context,
    job: Job = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array of batches.")] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Refresh until every batch is finished, sending queued shards as capacity frees."),
    ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes with --watch.")] = 30.0,
    show_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help=f"List every batch (by default, past {views.TABLE_ROWS} "
            "batches, older collected ones are summed up in one line).",
        ),
    ] = False,
) -> None:
    """Refresh unfinished batches and show where every batch stands.

    Example: hipbatch status --watch --interval 60
    """
    live = views.StatusLive()

    def show(result: ops.StatusResult) -> None:
        if json_out:
            if not watch or result.finished:
                print_json(result.rows)
            return
        renderable = views.status_renderable(result.rows, result.queued_shards, show_all)
        if watch and sys.stdout.isatty():
            live.show(renderable)  # redrawn in place
        else:
            views.console().print(renderable)

    try:
        ops.status(ctx.obj, ops.StatusOptions(job, watch, interval), Out(quiet=json_out), show)
    finally:
        live.stop()


@app.command()
@reports_errors
def collect(
    ctx: typer.Context,
    output_file: OutputFile = ops.DEFAULT_OUTPUT,
    format: FormatOpt = Format.json,
    job: Annotated[str | None, typer.Option(help="Only this job's records.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Poll until every batch is finished.")] = False,
    poll_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls with --wait.")] = 60.0,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    reextract: Annotated[
        bool, typer.Option("--reextract", help="Re-run the extractor over stored replies (no network).")
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Download finished batches, extract the prompts and write the dataset.

    Example: hipbatch collect --wait --poll-interval 60 --output-file data/prompts.json
    """
    opts = ops.CollectOptions(output_file, format.value, job, wait, poll_interval, timeout, reextract)
    summary = ops.collect(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(summary)


@app.command()
@reports_errors
def drain(
    ctx: typer.Context,
    output_file: OutputFile = ops.DEFAULT_OUTPUT,
    format: FormatOpt = Format.json,
    job: Annotated[str | None, typer.Option(help="Only this job's records in the dataset.")] = None,
    poll_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 60.0,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds (rerun to go on).")] = None,
    max_in_flight_batches: Annotated[
        int | None, typer.Option(min=1, help="Batches at the provider at once (default: config, else 100).")
    ] = None,
    max_enqueued_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Estimated input tokens enqueued per model at once (default: config, else no limit)."),
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Send queued shards as capacity frees and collect batches as they finish, until nothing is left.

    A batch refused for the enqueued-token quota goes back to the queue (not counted as an attempt) and
    that model's window shrinks until its batches succeed again. Writes the dataset like `collect`.

    Example: hipbatch drain --max-enqueued-tokens 2000000 --poll-interval 60
    """
    opts = ops.CollectOptions(
        output_file, format.value, job, True, poll_interval, timeout, False, max_in_flight_batches, max_enqueued_tokens
    )
    summary = ops.collect(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(summary)


@app.command("cost")
@reports_errors
def cost_command(
    ctx: typer.Context,
    job: Job = None,
    json_out: Annotated[bool, typer.Option("--json", help='Print {"rows": [...], "total": {...}} on stdout.')] = False,
) -> None:
    """Show what each job and model cost: tokens, actual cost, cost still in flight, and the live price.

    Example: hipbatch cost --job kernels --json
    """
    led = ops.cost_ledger(ctx.obj, job, Out(quiet=json_out))  # None: no store in the state dir (it said so)
    if json_out:
        print_json(led.as_json() if led else {"rows": [], "total": None})
    elif led is not None:
        views.cost_table(led)


@app.command("report")
@reports_errors
def report_command(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Job to report on (default: the only job).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="HTML file to write (default: report-JOB.html).")
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Write a self-contained HTML page for a job: timeline, cost, failure reasons, sample prompts.

    Example: hipbatch report --job kernels --output kernels.html
    """
    from hipbatch.cost import usd

    done = ops.report(ctx.obj, job, output, Out(quiet=json_out))
    if json_out:
        print_json(asdict(done))
    else:
        err(
            f"Wrote {done.output} ({done.bytes:,} bytes): cost {usd(done.cost_usd)}, live equivalent "
            f"{usd(done.live_equivalent_usd)}. Open it in any browser; it needs no network."
        )


@app.command()
@reports_errors
def retry(
    ctx: typer.Context,
    only: Annotated[
        list[RetryReason] | None,
        typer.Option(
            "--only",
            metavar="REASON",
            help="Only requests in this state: failed, expired, canceled, extraction_failed, truncated or "
            "missing; repeat for several (default: all but missing, which needs --yes).",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="With --only missing: resend requests whose results the provider lost.")
    ] = False,
    max_attempts: Annotated[int | None, typer.Option(min=1, help="Skip requests already sent this many times.")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job's requests.")] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also resubmit shards whose earlier submit cannot be told apart at the provider."),
    ] = False,
    json_out: JsonOut = False,
) -> None:
    """Resubmit, in new batches, only the requests with no good answer (answers already paid are kept).

    Example: hipbatch retry --only expired --only failed --max-attempts 3
    """
    reasons = tuple(r.value for r in only) if only else ops.RetryOptions().reasons
    out = Out(quiet=json_out)
    result = ops.retry(ctx.obj, ops.RetryOptions(reasons, max_attempts, job, force, yes), out)
    if json_out:
        print_json(asdict(result))
    out.retried(result, max_attempts, ctx.obj.state_dir)
    if result.feed is not None and ops.unsent({"feed": asdict(result.feed)}):
        raise typer.Exit(1)


@app.command()
@reports_errors
def cancel(
    ctx: typer.Context,
    batch_ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="BATCH_ID",
            help="Batches to cancel (default: every unfinished batch, and the local queue).",
            show_default=False,
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for scripts).")] = False,
    job: Annotated[str | None, typer.Option(help="Only this job's batches.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Cancel batches at the provider; results they already produced are collected later by `collect`.

    Example: hipbatch cancel --yes   (or: hipbatch cancel batch_abc123 msgbatch_def456)
    """
    if not batch_ids and not yes:
        plan = ops.cancel_plan(ctx.obj, job)
        if not plan.batches and not plan.queued_shards:
            err("Nothing to cancel: no unfinished batch and nothing queued.")
            if json_out:
                print_json({"cancelled": [], "already_final": [], "errors": []})
            return
        for batch_id, provider, state, job_name in plan.batches:
            err(f"  {batch_id}  {provider}  {state}  job {job_name}")
        queued = f" and {plan.queued_shards} shard(s) not sent yet" if plan.queued_shards else ""
        typer.confirm(f"Cancel {len(plan.batches)} unfinished batch(es){queued}?", abort=True, err=True)
    out = Out(quiet=json_out)
    result = ops.cancel(ctx.obj, ops.CancelOptions(tuple(batch_ids or ()), job), out)
    if json_out:
        print_json(asdict(result))
    out.cancelled(result)


@app.command()
@reports_errors
def run(
    ctx: typer.Context,
    input_dir: InputDir,
    provider: Annotated[
        ProviderName, typer.Option(help="API to call (any OpenAI-compatible server through OPENAI_BASE_URL).")
    ] = ProviderName.openai,
    model: Model = None,
    template_dir: TemplateDir = ops.DEFAULT_TEMPLATE,
    glob: Glob = "**/*.hip",
    limit: Limit = None,
    job: JobName = None,
    max_workers: Annotated[int, typer.Option(min=1, max=256, help="Live calls at once.")] = 10,
    max_requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Pace the calls to this many per minute.")
    ] = None,
    max_tokens_per_minute: Annotated[
        int | None,
        typer.Option(min=1, help="Pace the calls to this many estimated tokens (input + max output) per minute."),
    ] = None,
    output_file: OutputFile = ops.DEFAULT_OUTPUT,
    format: FormatOpt = Format.json,
    json_out: JsonOut = False,
) -> None:
    """Answer the requests of INPUT_DIR now with concurrent live calls (no batch), then write the dataset.

    Same requests, store and dataset as submit and collect: a file answered live is never sent in a batch
    later, and files already answered or in a batch are skipped. Ctrl-C stops sending and keeps every
    answer received; run it again to continue.

    Example: hipbatch run kernels/ --limit 5 --max-workers 10
    """
    opts = ops.RunOptions(
        input_dir, provider.value, model, template_dir, glob, limit, job, max_workers, max_requests_per_minute,
        max_tokens_per_minute, output_file, format.value,
    )  # fmt: skip
    summary = ops.run(ctx.obj, opts, Out(quiet=json_out), show_progress=not json_out and sys.stderr.isatty())
    if json_out:
        print_json(summary)
    if summary["fatal"]:
        err(f"Error: {summary['fatal']}")
        err("Stopped sending: every other request would fail the same way. Fix it and run again.")
        raise typer.Exit(1)
    if summary["interrupted"]:
        err("Interrupted. Every answer received is recorded; run the same command again to continue.")
        raise typer.Exit(130)


@app.command()
@reports_errors
def emulator(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1 (0 picks a free one).")] = 8765,
    seed: Annotated[int, typer.Option(help="Seed for the fake model and injected faults.")] = 0,
    polls_to_complete: Annotated[int, typer.Option(min=1, help="Status checks before a batch ends.")] = 2,
    fault_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of HTTP calls that fail.")] = 0.0,
    request_error_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of requests that error.")] = 0.0,
    forms: Annotated[str, typer.Option(help="Reply forms: mixed, or one of tag, fenced, label, ...")] = "mixed",
    enqueued_token_limit: Annotated[int | None, typer.Option(help="Per-model enqueued token quota.")] = None,
    live_latency: Annotated[float, typer.Option(help="Seconds before each live answer.")] = 0.0,
    control: Annotated[
        bool,
        typer.Option(
            help="Serve the /_emulator/ control endpoints (stats, config, complete-all). On by default, guarded by "
            "a token printed at start; their POSTs must be Content-Type: application/json."
        ),
    ] = True,
    control_token: Annotated[
        str | None,
        typer.Option(
            envvar="HIPBATCH_EMULATOR_TOKEN", help="Use this control token (16+ characters) instead of a random one."
        ),
    ] = None,
) -> None:
    """Run the local batch server (OpenAI and Anthropic batch APIs, fake model) until Ctrl-C.

    It listens on 127.0.0.1 only and answers 413 to bodies over 300 MB. Fault knobs (download_fault, auth_after,
    ...: hipbatch/emulator/config.py) can be changed at runtime with POST /_emulator/config.

    Example: hipbatch emulator --port 8765, then in another shell:
    OPENAI_BASE_URL=http://127.0.0.1:8765/v1 OPENAI_API_KEY=test hipbatch submit examples/hip
    """
    settings = {
        "seed": seed, "polls_to_complete": polls_to_complete, "fault_rate": fault_rate,
        "request_error_rate": request_error_rate, "forms": forms, "enqueued_token_limit": enqueued_token_limit,
        "live_latency_s": live_latency,
    }  # fmt: skip
    ops.emulator(ops.EmulatorOptions(port, settings, control, control_token), Out())


@app.command()
@reports_errors
def demo(
    provider: Annotated[ProviderName, typer.Option(help="Which batch API to rehearse.")] = ProviderName.openai,
    output_file: Annotated[Path | None, typer.Option(help="Dataset file (default: data/demo-PROVIDER.json).")] = None,
) -> None:
    """Run submit, status and collect on the bundled examples against a local batch server. No key needed.

    Example: hipbatch demo --provider anthropic
    """

    def show_status(result: ops.StatusResult) -> None:
        views.console().print(views.status_renderable(result.rows, result.queued_shards))

    def show_cost(led: Any) -> None:
        views.cost_table(led, views.console(stderr=True))

    views.demo_end(ops.demo(provider.value, output_file, Out(), show_status, show_cost))


def main() -> None:
    app(prog_name="hipbatch")


if __name__ == "__main__":  # pragma: no cover
    main()
