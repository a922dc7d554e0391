"""The typer app: each command parses its options into one options object, calls one function of `ops`, and hands
the result to a view. The only module that exits."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from hipbatch import __version__, ops, views
from hipbatch.commandline import (
    Fields,
    FollowSymlinks,
    Force,
    Format,
    FormatOpt,
    Glob,
    InputDir,
    Job,
    JobName,
    JsonOut,
    Limit,
    MaxFileBytes,
    MaxInFlight,
    MaxTokens,
    Model,
    OutputFile,
    PollInterval,
    Provider,
    ProviderName,
    RetryReason,
    TemplateDir,
    TemplateName,
    Timeout,
    opt,
    registrar,
)
from hipbatch.views import Out, print_json

# Plain help (rich_markup_mode=None): typer's rich panels cost ~100 ms of imports on every --help (measured),
# over the 150 ms start-up budget.
app = typer.Typer(
    help="Turn folders of HIP kernels into English prompts through the OpenAI, Anthropic and Gemini Batch APIs.\n\n"
    "Start with `hipbatch demo` (no key needed). Real runs: `hipbatch submit DIR`, `hipbatch status`, "
    "`hipbatch collect --wait`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

command = registrar(app)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"hipbatch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    state_dir: Annotated[
        Path, opt("PATH", "Where the store, shards and results live (any command).", envvar="HIPBATCH_STATE_DIR")
    ] = Path("state"),
    config: Annotated[
        Path | None, opt("PATH", "Config file (default: ./hipbatch.toml or ./config.json if present).", "--config")
    ] = None,
    version: Annotated[
        bool, opt(None, "Print the version and exit.", "--version", callback=version_callback, is_eager=True)
    ] = False,
) -> None:
    """hipbatch: batch LLM prompt generation for HIP kernels."""
    ctx.obj = ops.Context(state_dir=state_dir, config_path=config)


@command()
def submit(
    ctx: typer.Context,
    input_dir: InputDir,
    provider: Provider = ProviderName.openai,
    model: Model = None,
    template: TemplateName = None,
    template_dir: TemplateDir = None,
    glob: Glob = "**/*.hip",
    limit: Limit = None,
    job: JobName = None,
    follow_symlinks: FollowSymlinks = False,
    max_file_bytes: MaxFileBytes = None,
    max_requests_per_batch: Annotated[int | None, opt("INTEGER", "Cap per batch (else the provider's).", min=1)] = None,
    max_in_flight_batches: MaxInFlight = None,
    max_enqueued_tokens: MaxTokens = None,
    dry_run: Annotated[bool, opt(None, "Render and write shards only: no network, no key.", "--dry-run")] = False,
    force: Force = False,
    max_cost: Annotated[
        float | None, opt("USD", "Budget: refuse, before any upload, when the estimated worst case is over it.", min=0)
    ] = None,
    json_out: JsonOut = False,
) -> None:
    """Render every file of INPUT_DIR and send the requests not sent before, in batches.

    Example: hipbatch submit kernels/ --provider openai --model gpt-4o-mini
    """
    files = ops.Files(input_dir, glob, limit, job, template, template_dir, follow_symlinks, max_file_bytes)
    opts = ops.SubmitOptions(
        files, provider.value, model, max_requests_per_batch, max_in_flight_batches, max_enqueued_tokens, dry_run,
        force, max_cost,
    )  # fmt: skip
    result = ops.submit(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(result)
    if ops.unsent(result):
        raise typer.Exit(1)


@command()
def status(
    ctx: typer.Context,
    job: Job = None,
    json_out: Annotated[bool, opt(None, "Print a JSON array of batches (of files with --failed).", "--json")] = False,
    watch: Annotated[
        bool, opt(None, "Refresh until every batch is finished, sending queued shards.", "--watch")
    ] = False,
    interval: Annotated[float, opt("SECONDS", "Seconds between refreshes with --watch.", min=0.05)] = 30.0,
    show_all: Annotated[
        bool, opt(None, f"List every batch (past {views.TABLE_ROWS}, older collected ones are summed up).", "--all")
    ] = False,
    failed: Annotated[
        bool, opt(None, "List every file whose request has no good answer: file, state, error.", "--failed")
    ] = False,
) -> None:
    """Refresh unfinished batches and show where every batch stands (--failed: which files failed, and why).

    Example: hipbatch status --watch --interval 60
    """
    if failed:
        rows = ops.failed_files(ctx.obj, job)
        print_json(rows) if json_out else views.failed_table(rows)
        return
    live = views.StatusLive()

    def show(result: ops.StatusResult) -> None:
        if json_out:
            if not watch or result.finished:
                print_json(result.rows)
            return
        out = views.console()
        renderable = views.status_renderable(result.rows, result.queued_shards, show_all, out.width)
        if watch and sys.stdout.isatty():
            live.show(renderable)  # redrawn in place
        else:
            out.print(renderable)

    try:
        ops.status(ctx.obj, ops.StatusOptions(job, watch, interval), Out(quiet=json_out), show)
    finally:
        live.stop()


@command()
def collect(
    ctx: typer.Context,
    output_file: OutputFile = ops.DEFAULT_OUTPUT,
    format: FormatOpt = Format.json,
    job: Annotated[str | None, opt("NAME", "Only this job's records.")] = None,
    wait: Annotated[bool, opt(None, "Poll until every batch is finished.", "--wait")] = False,
    poll_interval: PollInterval = 60.0,
    timeout: Timeout = None,
    reextract: Annotated[
        bool, opt(None, "Re-run the extractor over stored replies (no network).", "--reextract")
    ] = False,
    fields: Fields = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail kept prompts that still look suspicious.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Download finished batches, extract the prompts and write the dataset.

    Example: hipbatch collect --wait --poll-interval 60 --output-file data/prompts.json
    """
    opts = ops.CollectOptions(output_file, format.value, job, wait, poll_interval, timeout, reextract, fields, strict)
    summary = ops.collect(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(summary)


@command()
def drain(
    ctx: typer.Context,
    output_file: OutputFile = ops.DEFAULT_OUTPUT,
    format: FormatOpt = Format.json,
    job: Annotated[str | None, opt("NAME", "Only this job's records in the dataset.")] = None,
    poll_interval: PollInterval = 60.0,
    timeout: Timeout = None,
    max_in_flight_batches: MaxInFlight = None,
    max_enqueued_tokens: MaxTokens = None,
    fields: Fields = None,
    json_out: JsonOut = False,
) -> None:
    """Send queued shards as capacity frees and collect batches as they finish, until nothing is left.

    A batch refused for the enqueued-token quota goes back to the queue (not counted as an attempt) and
    that model's window shrinks until its batches succeed again. Writes the dataset like `collect`.

    Example: hipbatch drain --max-enqueued-tokens 2000000 --poll-interval 60
    """
    opts = ops.CollectOptions(
        output_file, format.value, job, True, poll_interval, timeout, fields=fields,
        max_in_flight_batches=max_in_flight_batches, max_enqueued_tokens=max_enqueued_tokens,
    )  # fmt: skip
    summary = ops.collect(ctx.obj, opts, Out(quiet=json_out))
    if json_out:
        print_json(summary)


@command("cost")
def cost_command(
    ctx: typer.Context,
    job: Job = None,
    json_out: Annotated[bool, opt(None, 'Print {"rows": [...], "total": {...}} on stdout.', "--json")] = False,
) -> None:
    """Show what each job and model cost: tokens, actual cost, cost still in flight, and the live price.

    Example: hipbatch cost --job kernels --json
    """
    led = ops.cost_ledger(ctx.obj, job, Out(quiet=json_out))  # None: no store in the state dir (it said so)
    if json_out:
        print_json(led.as_json() if led else {"rows": [], "total": None})
    elif led is not None:
        views.cost_table(led)


@command("report")
def report_command(
    ctx: typer.Context,
    job: Annotated[str | None, opt("NAME", "Job to report on (default: the only job).")] = None,
    output: Annotated[Path | None, opt("PATH", "HTML file to write (default: report-JOB.html).", "--output")] = None,
    json_out: JsonOut = False,
) -> None:
    """Write a self-contained HTML page for a job: timeline, cost, failure reasons, sample prompts.

    Example: hipbatch report --job kernels --output kernels.html
    """
    done = ops.report(ctx.obj, job, output, Out(quiet=json_out))
    if json_out:
        print_json(asdict(done))
    else:
        Out().reported(done)


@command()
def retry(
    ctx: typer.Context,
    only: Annotated[
        list[RetryReason] | None,
        opt(
            "REASON",
            "Only requests in this state: failed, expired, canceled, extraction_failed, truncated or missing; "
            "repeat for several (default: all but missing, which needs --yes).",
            "--only",
        ),
    ] = None,
    max_attempts: Annotated[int | None, opt("INTEGER", "Skip requests already sent this many times.", min=1)] = None,
    max_tokens: Annotated[
        int | None,
        opt("INTEGER", "Send truncated requests with this max_tokens (new requests: new custom_ids).", min=1),
    ] = None,
    job: Annotated[str | None, opt("NAME", "Only this job's requests.")] = None,
    yes: Annotated[
        bool, opt(None, "With --only missing: resend requests whose results the provider lost.", "--yes")
    ] = False,
    force: Force = False,
    json_out: JsonOut = False,
) -> None:
    """Resubmit, in new batches, only the requests with no good answer (answers already paid are kept).

    Example: hipbatch retry --only expired --only failed --max-attempts 3  (or: --only truncated --max-tokens 2048)
    """
    reasons = tuple(r.value for r in only) if only else ops.RetryOptions().reasons
    out = Out(quiet=json_out)
    result = ops.retry(ctx.obj, ops.RetryOptions(reasons, max_attempts, job, force, max_tokens, yes), out)
    if json_out:
        print_json(asdict(result))
    out.retried(result, max_attempts, ctx.obj.state_dir)
    if result.feed is not None and ops.unsent({"feed": asdict(result.feed)}):
        raise typer.Exit(1)


@command()
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
    yes: Annotated[bool, opt(None, "Do not ask for confirmation (for scripts).", "--yes", "-y")] = False,
    job: Annotated[str | None, opt("NAME", "Only this job's batches.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Cancel batches at the provider; results they already produced are collected later by `collect`.

    Example: hipbatch cancel --yes   (or: hipbatch cancel batch_abc123 msgbatch_def456)
    """
    if not batch_ids and not yes:
        plan = ops.cancel_plan(ctx.obj, job)
        if not views.cancel_confirmed(plan, json_out, asks=sys.stdin.isatty()):  # no terminal: pass --yes
            raise typer.Exit(0 if plan.empty else 1)
    out = Out(quiet=json_out)
    result = ops.cancel(ctx.obj, ops.CancelOptions(tuple(batch_ids or ()), job), out)
    if json_out:
        print_json(asdict(result))
    out.cancelled(result)


@command()
def run(
    ctx: typer.Context,
    input_dir: InputDir,
    provider: Annotated[
        ProviderName,
        opt("PROVIDER", "openai, anthropic or gemini (any OpenAI-compatible server through OPENAI_BASE_URL)."),
    ] = ProviderName.openai,
    model: Model = None,
    template: TemplateName = None,
    template_dir: TemplateDir = None,
    glob: Glob = "**/*.hip",
    limit: Limit = None,
    job: JobName = None,
    follow_symlinks: FollowSymlinks = False,
    max_file_bytes: MaxFileBytes = None,
    max_workers: Annotated[int, opt("INTEGER", "Live calls at once.", min=1, max=256)] = 10,
    max_requests_per_minute: Annotated[
        int | None, opt("INTEGER", "Pace the calls to this many per minute.", min=1)
    ] = None,
    max_tokens_per_minute: Annotated[
        int | None, opt("INTEGER", "Pace the calls to this many estimated tokens (input + max output) a minute.", min=1)
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
    files = ops.Files(input_dir, glob, limit, job, template, template_dir, follow_symlinks, max_file_bytes)
    opts = ops.RunOptions(
        files, provider.value, model, max_workers, max_requests_per_minute, max_tokens_per_minute, output_file,
        format.value,
    )  # fmt: skip
    summary = ops.run(ctx.obj, opts, Out(quiet=json_out), show_progress=not json_out and sys.stderr.isatty())
    if json_out:
        print_json(summary)
    code = Out().run_ended(summary)
    if code:
        raise typer.Exit(code)


@command(global_options=False)
def emulator(
    port: Annotated[int, opt("INTEGER", "Port on 127.0.0.1 (0 picks a free one).", min=0, max=65535)] = 8765,
    seed: Annotated[int, opt("INTEGER", "Seed for the fake model and injected faults.")] = 0,
    polls_to_complete: Annotated[int, opt("INTEGER", "Status checks before a batch ends.", min=1)] = 2,
    fault_rate: Annotated[float, opt("FLOAT", "Share of HTTP calls that fail.", min=0, max=1)] = 0.0,
    request_error_rate: Annotated[float, opt("FLOAT", "Share of requests that error.", min=0, max=1)] = 0.0,
    forms: Annotated[str, opt("TEXT", "Reply forms: mixed, or one of tag, fenced, label, ...")] = "mixed",
    enqueued_token_limit: Annotated[int | None, opt("INTEGER", "Per-model enqueued token quota.")] = None,
    live_latency: Annotated[float, opt("SECONDS", "Seconds before each live answer.")] = 0.0,
    control: Annotated[
        bool,
        opt(
            None,
            "Serve the /_emulator/ control endpoints (stats, config, complete-all). On by default, guarded by a "
            "token printed at start; their POSTs must be Content-Type: application/json.",
        ),
    ] = True,
    control_token: Annotated[
        str | None,
        opt("TEXT", "Use this control token (16+ characters), not a random one.", envvar="HIPBATCH_EMULATOR_TOKEN"),
    ] = None,
) -> None:
    """Run the local batch server (OpenAI, Anthropic and Gemini batch APIs, fake model) until Ctrl-C.

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


@command(global_options=False)
def demo(
    provider: Annotated[ProviderName, opt("PROVIDER", "Which batch API to rehearse: openai, anthropic or gemini.")] = (
        ProviderName.openai
    ),
    output_file: Annotated[Path | None, opt("PATH", "Dataset file (default: data/demo-PROVIDER.json).")] = None,
) -> None:
    """Run submit, status and collect on the bundled examples against a local batch server. No key needed.

    Example: hipbatch demo --provider anthropic
    """
    views.demo_end(ops.demo(provider.value, output_file, Out(), views.demo_status, views.demo_cost))


# ---- built-in templates: `templates` and `init` ---------------------------------------------------
# One self-contained block (the logic is in hipbatch/defaults.py), to be ported as is.


@command("templates", global_options=False)
def templates_command() -> None:
    """List the built-in templates, for `--template NAME` (`default` when no template is given).

    Example: hipbatch templates
    """
    views.templates(ops.templates())


@command("init", global_options=False)
def init_command(
    directory: Annotated[Path | None, typer.Argument(metavar="DIR", help="Folder to write (default: ./NAME).")] = None,
    template: Annotated[str, opt("NAME", "Built-in template to copy (see `hipbatch templates`).")] = "default",
) -> None:
    """Write a copy of a built-in template and a commented hipbatch.toml to start from. Never overwrites a file.

    Example: hipbatch init my-template --template json
    """
    views.initialised(*ops.init(directory, template))


def main() -> None:
    app(prog_name="hipbatch")


if __name__ == "__main__":  # pragma: no cover
    main()
