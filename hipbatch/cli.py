"""The typer app: parse options, call one function, print. The only module that prints or exits."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hipbatch import __version__
from hipbatch.errors import HipbatchError, UsageError

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


@dataclass
class Settings:
    """Options shared by every command, put on ctx.obj by the callback."""

    state_dir: Path
    config_path: Path | None

    def store(self) -> Any:
        from hipbatch.store import Store

        return Store(self.state_dir)

    def config(self) -> Any:
        from hipbatch.config import load_config

        config = load_config(self.config_path)
        for warning in config.warnings:
            err(f"Warning: {warning}")
        return config


def err(message: str) -> None:
    typer.echo(message, err=True)


def reports_errors(fn: F) -> F:
    """Turn HipbatchError into `Error: ...` on stderr and its exit code; Ctrl-C into a hint and 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HipbatchError as e:
            err(f"Error: {e}")
            raise typer.Exit(e.exit_code) from None
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
    ctx.obj = Settings(state_dir=state_dir, config_path=config)


def _progress(json_out: bool) -> Any:
    from hipbatch.progress import default_progress

    return default_progress(quiet=json_out)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@contextmanager
def _locked(store: Any) -> Iterator[None]:
    with store.lock.held(timeout=float(os.environ.get("HIPBATCH_LOCK_TIMEOUT", "600"))):
        yield


# ---- submit ---------------------------------------------------------------------------------------


@app.command()
@reports_errors
def submit(
    ctx: typer.Context,
    input_dir: Annotated[Path, typer.Argument(help="Folder of source files.", show_default=False)],
    provider: Annotated[ProviderName, typer.Option(help="Batch API to use.")] = ProviderName.openai,
    model: Annotated[str | None, typer.Option(help="Model (default: config, then template).")] = None,
    template_dir: Annotated[Path, typer.Option(help="Template folder.")] = Path("templates/default"),
    glob: Annotated[str, typer.Option("--glob", help="Files to take, relative to INPUT_DIR.")] = "**/*.hip",
    limit: Annotated[int | None, typer.Option(min=1, help="Take only the first N files (sorted).")] = None,
    job: Annotated[str | None, typer.Option(help="Job name (default: the input folder's name).")] = None,
    max_requests_per_batch: Annotated[
        int | None, typer.Option(min=1, help="Cap per batch (the provider's limit applies anyway).")
    ] = None,
    max_in_flight_batches: Annotated[
        int | None, typer.Option(min=1, help="Batches at the provider at once; the rest wait in the local queue.")
    ] = None,
    max_enqueued_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Estimated input tokens enqueued per model at once (the provider's quota)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Render and write shards only: no network, no key.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Resubmit shards whose earlier submit cannot be told apart at the provider.")
    ] = False,
    max_cost: Annotated[
        float | None,
        typer.Option(
            "--max-cost",
            min=0,
            help="Budget in USD: refuse, before any upload, when the estimated worst case is over it.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Render every file of INPUT_DIR and send the requests not sent before, in batches.

    Example: hipbatch submit kernels/ --provider openai --model gpt-4o-mini
    """
    settings: Settings = ctx.obj
    report = do_submit(
        settings,
        input_dir,
        provider.value,
        model,
        template_dir,
        glob,
        limit,
        job,
        max_requests_per_batch,
        max_in_flight_batches,
        max_enqueued_tokens,
        dry_run,
        force,
        json_out,
        max_cost=max_cost,
    )
    if json_out:
        _print_json(report)
    _exit_if_unsent(report.get("feed"))


def _exit_if_unsent(fed: dict[str, Any] | None) -> None:
    """Exit 1 when feeding left shards unsent for a reason the user must see (errors printed already)."""
    if fed and (fed.get("ambiguous") or fed.get("errors")):
        raise typer.Exit(1)


def do_submit(
    settings: Settings,
    input_dir: Path,
    provider: str,
    model: str | None,
    template_dir: Path,
    glob: str,
    limit: int | None,
    job: str | None,
    max_requests_per_batch: int | None,
    max_in_flight_batches: int | None,
    max_enqueued_tokens: int | None,
    dry_run: bool,
    force: bool,
    quiet: bool,
    max_cost: float | None = None,
) -> dict[str, Any]:
    from hipbatch import cost
    from hipbatch.poll import retrying
    from hipbatch.render import iter_discover, load_template
    from hipbatch.submit import Adapters, feed, prepare, provider_for_job

    config = settings.config()
    template = load_template(template_dir)
    adapter, chosen_model, params = provider_for_job(config, template, provider, model)
    job_name = job or (input_dir.resolve().name or "job")
    iter_discover(input_dir, glob)  # bad INPUT_DIR fails here, before anything is written (nothing listed yet)
    if not dry_run:
        adapter.check_key()  # before anything is written or sent
        retrying(adapter.check_model, chosen_model)
    store = settings.store()
    with _locked(store):
        prices = cost.load_prices(config)
        if max_cost is not None and not dry_run:
            # The budget is checked on a dry run first, so an over-budget run leaves nothing queued behind.
            trial = prepare(
                store,
                template,
                adapter,
                chosen_model,
                params,
                input_dir,
                job_name,
                glob,
                limit,
                max_requests_per_batch,
                True,
                _progress(quiet),
            )
            cost.check_budget(cost.for_prepare(store, prices, trial), max_cost, cost.queued_commitment(store, prices))
        prep = prepare(
            store,
            template,
            adapter,
            chosen_model,
            params,
            input_dir,
            job_name,
            glob,
            limit,
            max_requests_per_batch,
            dry_run,
            _progress(quiet),
        )
        est = cost.for_prepare(store, prices, prep)
        out: dict[str, Any] = {"prepare": asdict(prep), "estimate": asdict(est)}
        if not quiet:
            _print_prepare(prep, est)
        if dry_run:
            if max_cost is not None:
                cost.check_budget(est, max_cost, cost.queued_commitment(store, prices))
            return out
        cost.settle(store, prices)  # record each new request's worst-case cost before it is sent
        window = _window(config, provider, max_in_flight_batches, max_enqueued_tokens)
        fed = feed(store, Adapters(config), window, force=force, progress=_progress(quiet))
    out["feed"] = asdict(fed)
    if not quiet:
        _print_feed(fed, prep)
    _print_feed_problems(fed)
    return out


def _window(config: Any, provider: str, max_in_flight: int | None, max_tokens: int | None) -> Any:
    from hipbatch.drain import Windows

    # Every provider's queued shards may be fed: each gets its own window; the options apply to all.
    return Windows(config, max_in_flight, max_tokens)


def _print_prepare(prep: Any, est: Any = None) -> None:
    err(f"{prep.files} files in job {prep.job}: {prep.requests} requests for {prep.provider} / {prep.model}")
    for name, reason in prep.skipped:
        err(f"  skipped {name}: {reason}")
    tokens = est.input_tokens if est is not None else prep.est_input_tokens  # calibrated once results exist
    if prep.dry_run:
        err(
            f"Dry run: {prep.new} requests to send in {len(prep.shards)} shards "
            f"({prep.known} already in the store); estimated input tokens {tokens:,}, "
            f"output at most {prep.new * prep.max_tokens:,}"
        )
        for shard in prep.shards:
            err(f"  {shard}")
    elif prep.new == 0:
        err(f"Nothing new to send: all {prep.requests} requests are already in the store.")
    else:
        err(
            f"{prep.new} new requests in {len(prep.shards)} shards ({prep.known} already in the store); "
            f"estimated input tokens {tokens:,}"
        )
    if est is not None and prep.new:
        from hipbatch.cost import estimate_lines

        for line in estimate_lines(est):
            err(line)


def _print_feed(fed: Any, prep: Any) -> None:
    if fed.adopted:
        err(f"Adopted {len(fed.adopted)} batch(es) created by an interrupted run: {', '.join(fed.adopted)}")
    if fed.created:
        err(f"Created {len(fed.created)} batch(es): {', '.join(fed.created)}")
    elif prep.new == 0 and not fed.adopted:
        err("No batch created.")
    if fed.queued:
        err(f"{fed.queued} shard(s) wait in the local queue for capacity; `hipbatch drain` feeds them.")
    for line in fed.blocked:
        err(f"Warning: {line}")
    if fed.created or fed.adopted:
        err("Next: `hipbatch status` to watch, `hipbatch collect --wait` to write the dataset.")


def _print_feed_problems(fed: Any, prefix: str = "Error") -> None:
    """Shards refused as ambiguous or failed after retries, and duplicate batches cancelled."""
    if fed.duplicates_cancelled:
        err(f"Warning: cancelled duplicate batch(es) of one shard: {', '.join(fed.duplicates_cancelled)}")
    for line in fed.ambiguous + fed.errors:
        err(f"{prefix}: {line}")


# ---- status ---------------------------------------------------------------------------------------


@app.command()
@reports_errors
def status(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Only this job.")] = None,
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
            help=f"List every batch (by default, past {TABLE_ROWS} "
            "batches, older collected ones are summed up in one line).",
        ),
    ] = False,
) -> None:
    """Refresh unfinished batches and show where every batch stands.

    Example: hipbatch status --watch --interval 60
    """
    settings: Settings = ctx.obj
    store = settings.store()
    store.read_mapped()
    live: Any = None
    windows = _window(settings.config(), "openai", None, None) if watch else None  # kept across refreshes
    try:
        while True:
            rows = do_status(settings, store, job, windows)
            if json_out:
                if not watch or all(r["is_final"] for r in rows):
                    _print_json(rows)
            elif watch and sys.stdout.isatty():
                live = _update_live(live, _status_renderable(rows, store, job, show_all))  # redrawn in place
            else:
                _print_status_table(rows, store, job, show_all)
            if not watch or all(r["is_final"] for r in rows):
                return
            time.sleep(interval)
    finally:
        if live is not None:
            live.stop()


def _update_live(live: Any, renderable: Any) -> Any:
    if live is None:
        from rich.live import Live

        live = Live(renderable, console=_status_console(), auto_refresh=False)
        live.start(refresh=True)
    else:
        live.update(renderable, refresh=True)
    return live


def do_status(settings: Settings, store: Any, job: str | None, windows: Any = None) -> list[dict[str, Any]]:
    """Refresh batches; with windows (status --watch), also send queued shards that now fit."""
    from hipbatch import cost
    from hipbatch.collect import refresh
    from hipbatch.submit import Adapters, feed

    config = settings.config()
    adapters = Adapters(config)
    with _locked(store):
        if windows is None and store.shards_in_states(["uploading", "uploaded", "creating"]):
            fed = feed(store, adapters, resume_only=True)  # finish interrupted submits
            _print_feed_problems(fed, "Warning")
        report = refresh(store, adapters, windows)
        if windows is not None:
            fed = feed(store, adapters, windows)  # interrupted submits first, then the queue
            _print_feed_problems(fed, "Warning")
    for line in report.errors:
        err(f"Warning: status check failed, batch left as it was: {line}")
    now = time.time()
    rows = []
    for b in store.batches(job=job):
        rows.append(
            {
                "job": b["job"],
                "batch_id": b["id"],
                "provider": b["provider"],
                "model": b["model"],
                "status": b["status"],
                "is_final": bool(b["is_final"]),
                "done": b["done"],
                "failed": b["failed"],
                "total": b["total"],
                "counts_final_only": bool(b["counts_final_only"]),
                "created_at": b["created_at"],
                "age_seconds": round(now - (b["created_at"] or now), 1),
                "expires_at": b["expires_at"],
                "collected": bool(b["collected"]),
            }
        )
    batch_figures, job_summaries = cost.glance(store, job, now)  # expiry, top error, per-job totals
    for row in rows:
        row.update(batch_figures.get(row["batch_id"], {}), job_summary=job_summaries.get(row["job"]))
    return rows


def _fmt_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def _status_console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)  # scripts and logs get full rows


def _print_status_table(rows: list[dict[str, Any]], store: Any, job: str | None, show_all: bool = False) -> None:
    _status_console().print(_status_renderable(rows, store, job, show_all))


TABLE_ROWS = 20  # batches listed by default; running and uncollected ones are always listed


def _status_renderable(rows: list[dict[str, Any]], store: Any, job: str | None, show_all: bool = False) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from hipbatch.cost import summary_line

    if not rows:
        return Text("No batches yet. Send some with `hipbatch submit DIR`.")
    summaries = {r["job"]: r.get("job_summary") for r in rows}
    lines: list[Any] = [Text(summary_line(name, s)) for name, s in summaries.items() if s]
    table = Table(
        "job",
        "batch id",
        "provider",
        "model",
        "status",
        "done / failed / total",
        "created",
        "age",
        "expires in",
        "top error",
    )
    hidden = 0
    if not show_all and len(rows) > TABLE_ROWS:
        done = [i for i, r in enumerate(rows) if r["is_final"] and r["collected"]]
        keep = max(TABLE_ROWS - (len(rows) - len(done)), 5)
        drop = set(done[:-keep])
        hidden, rows = len(drop), [r for i, r in enumerate(rows) if i not in drop]
    for r in rows:
        if r["counts_final_only"] and not r["is_final"]:
            counts = f"? / ? / {r['total']} (counts at end)"
        else:
            counts = f"{r['done'] or 0} / {r['failed'] or 0} / {r['total'] or 0}"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])) if r["created_at"] else "-"
        expires = r.get("expires_in_seconds")
        expires_text = "-" if expires is None else ("overdue" if expires <= 0 else _fmt_age(expires))
        top = r.get("top_error")
        top_text = f"{top['reason']} ({top['count']}): {top['message'] or ''}"[:90] if top else ""
        table.add_row(
            r["job"],
            r["batch_id"],
            r["provider"],
            r["model"],
            r["status"],
            counts,
            created,
            _fmt_age(r["age_seconds"]),
            expires_text,
            top_text,
        )
    lines.append(table)
    if hidden:
        lines.append(
            Text(
                f"... and {hidden} older finished and collected batches (`hipbatch status --all` lists "
                "them; `--json` always has every batch)"
            )
        )
    counts: dict[str, int] = {}  # per state, from the job summaries already computed (no second scan)
    for summary in summaries.values():
        for state, n in (summary or {}).get("states", {}).items():
            counts[state] = counts.get(state, 0) + n
    queued = len(store.shards_in_states(["queued"]))
    lines.append(
        Text(
            "requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + (f"; {queued} shard(s) queued locally" if queued else "")
        )
    )
    return Group(*lines)


# ---- collect --------------------------------------------------------------------------------------


@app.command()
@reports_errors
def collect(
    ctx: typer.Context,
    output_file: Annotated[Path, typer.Option(help="Dataset file.")] = Path("data/generated_prompts.json"),
    format: Annotated[Format, typer.Option("--format", help="json (one array) or jsonl.")] = Format.json,
    job: Annotated[str | None, typer.Option(help="Only this job's records.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Poll until every batch is finished.")] = False,
    poll_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls with --wait.")] = 60.0,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")] = None,
    reextract: Annotated[
        bool, typer.Option("--reextract", help="Re-run the extractor over stored replies (no network).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Download finished batches, extract the prompts and write the dataset.

    Example: hipbatch collect --wait --poll-interval 60 --output-file data/prompts.json
    """
    summary = do_collect(ctx.obj, output_file, format.value, job, wait, poll_interval, timeout, reextract, json_out)
    if json_out:
        _print_json(summary)


def do_collect(
    settings: Settings,
    output_file: Path,
    fmt: str,
    job: str | None,
    wait: bool,
    poll_interval: float,
    timeout: float | None,
    reextract: bool,
    quiet: bool,
    windows: Any = None,
) -> dict[str, Any]:
    from hipbatch import collect as c
    from hipbatch import cost
    from hipbatch.drain import Windows, stalled
    from hipbatch.submit import Adapters, feed

    store = settings.store()
    summary: dict[str, Any] = {}
    prices = None
    if reextract:
        with _locked(store):
            summary["reextracted"] = c.reextract(store, job)
    else:
        config = settings.config()
        adapters = Adapters(config)
        prices = cost.load_prices(config)
        # One set of windows for the whole wait, so a window shrunk after a quota refusal stays shrunk.
        windows = windows if windows is not None else Windows(config)
        deadline = time.monotonic() + timeout if timeout else None
        stuck = 0  # polls in a row where finished batches could not be read
        idle = 0  # polls in a row where shards wait, nothing runs and nothing could be sent
        while True:
            with _locked(store):
                # Refresh and collect first: capacity freed by finished batches is used in the same poll.
                refreshed = c.refresh(store, adapters, windows)
                collected = c.collect_batches(store, adapters, _progress(quiet))
                cost.settle(store, prices)  # cost of the answers just read, from their tokens
                fed = feed(store, adapters, windows, progress=_progress(quiet))
                unfinished = store.batches(unfinished_only=True)
                queued = store.shards_in_states(["queued"])
            idle = idle + 1 if stalled(len(unfinished), len(queued), len(fed.created), len(fed.adopted)) else 0
            for line in refreshed.errors + fed.blocked + collected.errors:
                err(f"Warning: {line}")
            _print_feed_problems(fed, "Warning")
            if collected.batches and not quiet:
                err(f"Collected {len(collected.batches)} batch(es), {collected.lines} result lines.")
            stuck = stuck + 1 if collected.errors else 0
            # A finished batch whose download failed is fetched again at the next poll, a few times.
            if not wait or (not unfinished and not queued and not 0 < stuck < 5):
                break
            if idle >= 5:
                err(
                    f"Stopped waiting: {len(queued)} shard(s) queued could not be sent (see the warnings above); "
                    "fix the cause and run the same command again."
                )
                break
            if deadline is not None and time.monotonic() > deadline:
                err(f"Stopped waiting after {timeout}s; {len(unfinished)} batch(es) still running.")
                break
            if not quiet:
                done = sum(1 for _ in store.batches()) - len(unfinished)
                err(
                    f"Waiting: {len(unfinished)} batch(es) running, {done} finished, {len(queued)} shard(s) "
                    f"queued; next check in {poll_interval:g}s"
                )
            time.sleep(poll_interval)
    with _locked(store):
        records = c.write_dataset(store, output_file, fmt, job)
        counts = store.request_counts(job)
        reasons = store.failure_reasons(job)
        skipped = store.skipped_files(job)
        spent = cost.ledger(store, prices, job).total if prices is not None else None
    pending = counts.get("pending", 0) + counts.get("submitted", 0)
    summary.update(
        output_file=str(output_file),
        records=records,
        succeeded=counts.get("succeeded", 0),
        failed=sum(reasons.values()),
        failed_by_reason=reasons,
        pending=pending,
        skipped_files=len(skipped),
    )
    if not quiet:
        err(f"Wrote {records} records to {output_file}")
        err(
            f"succeeded {summary['succeeded']}, failed {summary['failed']}, pending {pending}"
            + (f", skipped files {len(skipped)}" if skipped else "")
        )
        for reason, n in reasons.items():
            err(f"  {reason}: {n}")
        if summary["failed"]:
            err("Resend the failed ones with `hipbatch retry`.")
        if spent is not None and spent["cost_usd"] is not None:
            err(
                f"Cost so far {cost.usd(spent['cost_usd'])} (live calls would have cost "
                f"{cost.usd(spent['live_equivalent_usd'])}); details: `hipbatch cost`"
            )
    return summary


def _queue_window(config: Any, windows: Any = None) -> Any:
    return _window(config, "openai", None, None) if windows is None or not windows else windows


# ---- cost and report ------------------------------------------------------------------------------


@app.command("cost")
@reports_errors
def cost_command(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Only this job.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help='Print {"rows": [...], "total": {...}} on stdout.')] = False,
) -> None:
    """Show what each job and model cost: tokens, actual cost, cost still in flight, and the live price.

    Example: hipbatch cost --job kernels --json
    """
    from hipbatch import cost

    settings: Settings = ctx.obj
    store = settings.store()
    if job is not None and store.job(job) is None:
        raise UsageError(
            f"--job {job}: no such job in {settings.state_dir} "
            f"(jobs: {', '.join(j['name'] for j in store.jobs()) or 'none yet'})"
        )
    prices = cost.load_prices(settings.config())
    with _locked(store):
        cost.settle(store, prices)
        led = cost.ledger(store, prices, job)
    for warning in led.warnings:
        err(f"Warning: {warning}")
    if json_out:
        _print_json(led.as_json())
        return
    _print_cost_table(led)


def _print_cost_table(led: Any, console: Any = None) -> None:
    from rich.table import Table

    from hipbatch.cost import usd

    console = console or _status_console()
    if not led.rows:
        console.print("No requests yet. Estimate a run with `hipbatch submit DIR --dry-run`.")
        return
    table = Table(
        "job",
        "provider / model",
        "requests",
        "input",
        "output",
        "cache read",
        "cache write",
        "cost",
        "committed",
        "live equivalent",
    )
    for r in [*led.rows, {**led.total, "job": "total", "provider": "", "model": ""}]:
        model = f"{r['provider']} / {r['model']}" if r["provider"] else ""
        table.add_row(
            r["job"],
            model,
            f"{r['requests']:,}",
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            f"{r['cache_read_tokens']:,}",
            f"{r['cache_write_tokens']:,}",
            usd(r["cost_usd"]),
            usd(r["committed_usd"]),
            usd(r["live_equivalent_usd"]),
        )
    console.print(table)
    err(
        f"Batch prices are half the live ones; price table checked {led.prices_checked} "
        '(override in hipbatch.toml under [prices.PROVIDER."MODEL"]). Committed = worst case of the '
        "requests still queued or in flight."
    )


@app.command("report")
@reports_errors
def report_command(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Job to report on (default: the only job).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="HTML file to write (default: report-JOB.html).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Write a self-contained HTML page for a job: timeline, cost, failure reasons, sample prompts.

    Example: hipbatch report --job kernels --output kernels.html
    """
    from hipbatch import cost
    from hipbatch.report import default_job, write_report

    settings: Settings = ctx.obj
    store = settings.store()
    name = job or default_job(store)
    prices = cost.load_prices(settings.config())
    with _locked(store):
        cost.settle(store, prices)
        done = write_report(store, prices, name, output or Path(f"report-{_safe_name(name)}.html"))
    if json_out:
        _print_json(asdict(done))
    else:
        err(
            f"Wrote {done.output} ({done.bytes:,} bytes): cost {cost.usd(done.cost_usd)}, live equivalent "
            f"{cost.usd(done.live_equivalent_usd)}. Open it in any browser; it needs no network."
        )


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "job"


# ---- retry and cancel -----------------------------------------------------------------------------


class RetryReason(StrEnum):
    failed = "failed"
    expired = "expired"
    canceled = "canceled"
    extraction_failed = "extraction_failed"
    truncated = "truncated"
    missing = "missing"


@app.command()
@reports_errors
def retry(
    ctx: typer.Context,
    only: Annotated[
        list[RetryReason] | None,
        typer.Option(
            "--only",
            metavar="REASON",
            help="Only requests in this state: failed, expired, canceled, "
            "extraction_failed, truncated or missing; repeat for several (default: all of them).",
        ),
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, help="Skip requests already sent this many times.")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job's requests.")] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also resubmit shards whose earlier submit cannot be told apart at the provider."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Resubmit, in new batches, only the requests with no good answer (answers already paid are kept).

    Example: hipbatch retry --only expired --only failed --max-attempts 3
    """
    from hipbatch.retry import retry as do_retry
    from hipbatch.submit import Adapters

    settings: Settings = ctx.obj
    config = settings.config()
    reasons = [r.value for r in only] if only else [r.value for r in RetryReason]
    store = settings.store()
    with _locked(store):
        report = do_retry(store, Adapters(config), reasons, max_attempts, job, _queue_window(config, {}), force=force)
    fed = report.feed
    if json_out:
        _print_json(asdict(report))
    else:
        picked = ", ".join(f"{k} {v}" for k, v in sorted(report.selected.items())) or "none"
        err(f"Requests to send again: {report.requests} ({picked}) in {len(report.shards)} new shard(s).")
        if report.skipped_max_attempts:
            err(f"Skipped {report.skipped_max_attempts} request(s) already sent {max_attempts} times (--max-attempts).")
        if fed is not None and (fed.created or fed.adopted):
            ids = fed.created + fed.adopted
            err(f"Created {len(ids)} batch(es): {', '.join(ids)}")
            err("Next: `hipbatch collect --wait` to write the dataset.")
        elif fed is not None and fed.queued:
            err(f"{fed.queued} shard(s) wait in the local queue for capacity; `hipbatch collect` feeds them.")
        for line in fed.blocked if fed is not None else []:
            err(f"Warning: {line}")
    if report.unreadable:
        err(
            f"Warning: {len(report.unreadable)} request(s) could not be resent: their line is missing from "
            f"the shard files under {settings.state_dir}/shards (first: {report.unreadable[0]})"
        )
    if fed is not None:
        _print_feed_problems(fed)
        _exit_if_unsent(asdict(fed))


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
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Cancel batches at the provider; results they already produced are collected later by `collect`.

    Example: hipbatch cancel --yes   (or: hipbatch cancel batch_abc123 msgbatch_def456)
    """
    from hipbatch.retry import cancel as do_cancel
    from hipbatch.retry import cancel_targets
    from hipbatch.submit import Adapters

    settings: Settings = ctx.obj
    config = settings.config()
    store = settings.store()
    if not batch_ids and not yes:
        targets = cancel_targets(store, None, job)
        queued = [
            s
            for s in store.shards_in_states(["queued", "uploading", "uploaded", "creating"])
            if not job or s["job"] == job
        ]
        if not targets and not queued:
            err("Nothing to cancel: no unfinished batch and nothing queued.")
            if json_out:
                _print_json({"cancelled": [], "already_final": [], "errors": []})
            return
        for row in targets:
            err(f"  {row['id']}  {row['provider']}  {row['status']}  job {row['job']}")
        typer.confirm(
            f"Cancel {len(targets)} unfinished batch(es)"
            + (f" and {len(queued)} shard(s) not sent yet" if queued else "")
            + "?",
            abort=True,
            err=True,
        )
    with _locked(store):
        report = do_cancel(store, Adapters(config), batch_ids or None, job)
    if json_out:
        _print_json(asdict(report))
    else:
        for row in report.cancelled:
            err(f"Cancel requested: {row['batch_id']} ({row['status']})")
        for batch_id in report.already_final:
            err(f"Already finished, nothing to cancel: {batch_id}")
        if report.adopted:
            err(f"Found {len(report.adopted)} batch(es) of an interrupted submit: {', '.join(report.adopted)}")
        if report.unqueued_shards:
            err(
                f"Took {report.unqueued_shards} shard(s) ({report.unqueued_requests} requests) out of the "
                "local queue; `hipbatch retry --only canceled` sends them later."
            )
        if report.cancelled:
            err(
                "Next: `hipbatch collect --wait` keeps what they finished; `hipbatch retry --only canceled` "
                "sends the rest again."
            )
        if not (report.cancelled or report.already_final or report.adopted or report.unqueued_shards or report.errors):
            err("Nothing to cancel: no unfinished batch and nothing queued.")
    for line in report.errors:
        err(f"Warning: {line}")


# ---- run (live mode) ------------------------------------------------------------------------------


@app.command()
@reports_errors
def run(
    ctx: typer.Context,
    input_dir: Annotated[Path, typer.Argument(help="Folder of source files.", show_default=False)],
    provider: Annotated[
        ProviderName, typer.Option(help="API to call (any OpenAI-compatible server through OPENAI_BASE_URL).")
    ] = ProviderName.openai,
    model: Annotated[str | None, typer.Option(help="Model (default: config, then template).")] = None,
    template_dir: Annotated[Path, typer.Option(help="Template folder.")] = Path("templates/default"),
    glob: Annotated[str, typer.Option("--glob", help="Files to take, relative to INPUT_DIR.")] = "**/*.hip",
    limit: Annotated[int | None, typer.Option(min=1, help="Take only the first N files (sorted).")] = None,
    job: Annotated[str | None, typer.Option(help="Job name (default: the input folder's name).")] = None,
    max_workers: Annotated[int, typer.Option(min=1, max=256, help="Live calls at once.")] = 10,
    max_requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Pace the calls to this many per minute.")
    ] = None,
    max_tokens_per_minute: Annotated[
        int | None,
        typer.Option(min=1, help="Pace the calls to this many estimated tokens (input + max output) per minute."),
    ] = None,
    output_file: Annotated[Path, typer.Option(help="Dataset file.")] = Path("data/generated_prompts.json"),
    format: Annotated[Format, typer.Option("--format", help="json (one array) or jsonl.")] = Format.json,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Answer the requests of INPUT_DIR now with concurrent live calls (no batch), then write the dataset.

    Same requests, store and dataset as submit and collect: a file answered live is never sent in a batch
    later, and files already answered or in a batch are skipped. Ctrl-C stops sending and keeps every
    answer received; run it again to continue.

    Example: hipbatch run kernels/ --limit 5 --max-workers 10
    """
    summary = do_run(
        ctx.obj,
        input_dir,
        provider.value,
        model,
        template_dir,
        glob,
        limit,
        job,
        max_workers,
        max_requests_per_minute,
        max_tokens_per_minute,
        output_file,
        format.value,
        json_out,
    )
    if json_out:
        _print_json(summary)
    if summary["fatal"]:
        err(f"Error: {summary['fatal']}")
        err("Stopped sending: every other request would fail the same way. Fix it and run again.")
        raise typer.Exit(1)
    if summary["interrupted"]:
        err("Interrupted. Every answer received is recorded; run the same command again to continue.")
        raise typer.Exit(130)


def do_run(
    settings: Settings,
    input_dir: Path,
    provider: str,
    model: str | None,
    template_dir: Path,
    glob: str,
    limit: int | None,
    job: str | None,
    max_workers: int,
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    output_file: Path,
    fmt: str,
    quiet: bool,
) -> dict[str, Any]:
    from hipbatch import cost
    from hipbatch.collect import write_dataset
    from hipbatch.live import run_live
    from hipbatch.render import discover, load_template
    from hipbatch.submit import provider_for_job

    config = settings.config()
    template = load_template(template_dir)
    adapter, chosen_model, params = provider_for_job(config, template, provider, model)
    job_name = job or (input_dir.resolve().name or "job")
    discover(input_dir, glob)  # bad INPUT_DIR fails here, before anything is written
    adapter.check_key()
    store = settings.store()
    # Held for the whole run: a request taken from a queued shard must not go in a batch meanwhile.
    with _locked(store):
        report = run_live(
            store,
            template,
            adapter,
            chosen_model,
            params,
            input_dir,
            job_name,
            glob,
            limit,
            max_workers,
            requests_per_minute,
            tokens_per_minute,
            show_progress=not quiet and sys.stderr.isatty(),
        )
        cost.settle(store, cost.load_prices(config))
        records = write_dataset(store, output_file, fmt)
    summary = {**asdict(report), "output_file": str(output_file), "records": records}
    if not quiet:
        _print_run(report, output_file, records)
    return summary


def _print_run(report: Any, output_file: Path, records: int) -> None:
    prep = report.prepare
    err(
        f"{report.files} files in job {report.job}: {prep['requests']} requests for {report.provider} / "
        f"{report.model}; {report.to_answer} to answer live (the others are answered or in a batch)"
    )
    for name, reason in prep["skipped"]:
        err(f"  skipped {name}: {reason}")
    err(
        f"Live: succeeded {report.succeeded}, unusable {report.unusable}, failed {report.failed}, "
        f"left {report.left} in {report.wall_s:.1f}s ({report.per_second:.1f}/s, {report.calls} calls)"
    )
    if report.rate_limited:
        err(
            f"  rate limited {report.rate_limited} times: paused {report.paused_s:.1f}s, "
            f"pool cut to {report.min_workers} at the lowest"
        )
    for code, n in sorted(report.errors.items()):
        err(f"  {code}: {n}")
    if report.changed:
        err(f"  {report.changed} file(s) changed while running: run again to send their new version")
    if report.abandoned:
        err(f"  {report.abandoned} call(s) still in flight were abandoned; their answers are lost")
    err(f"Wrote {records} records to {output_file}")
    if report.left and not report.interrupted and not report.fatal:
        err("Not answered yet: run again, or send them in a batch with `hipbatch submit`.")


# ---- drain ----------------------------------------------------------------------------------------


@app.command()
@reports_errors
def drain(
    ctx: typer.Context,
    output_file: Annotated[Path, typer.Option(help="Dataset file.")] = Path("data/generated_prompts.json"),
    format: Annotated[Format, typer.Option("--format", help="json (one array) or jsonl.")] = Format.json,
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
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Send queued shards as capacity frees and collect batches as they finish, until nothing is left.

    A batch refused for the enqueued-token quota goes back to the queue (not counted as an attempt) and
    that model's window shrinks until its batches succeed again. Writes the dataset like `collect`.

    Example: hipbatch drain --max-enqueued-tokens 2000000 --poll-interval 60
    """
    from hipbatch.drain import Windows

    settings: Settings = ctx.obj
    windows = Windows(settings.config(), max_in_flight_batches, max_enqueued_tokens)
    summary = do_collect(
        settings, output_file, format.value, job, True, poll_interval, timeout, False, json_out, windows
    )
    if json_out:
        _print_json(summary)


# ---- emulator and demo ----------------------------------------------------------------------------


@app.command()
@reports_errors
def emulator(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0 picks a free one).")] = 8765,
    seed: Annotated[int, typer.Option(help="Seed for the fake model and injected faults.")] = 0,
    polls_to_complete: Annotated[int, typer.Option(min=1, help="Status checks before a batch ends.")] = 2,
    fault_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of HTTP calls that fail.")] = 0.0,
    request_error_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of requests that error.")] = 0.0,
    forms: Annotated[str, typer.Option(help="Reply forms: mixed, or one of tag, fenced, label, ...")] = "mixed",
    enqueued_token_limit: Annotated[int | None, typer.Option(help="Per-model enqueued token quota.")] = None,
    live_latency: Annotated[float, typer.Option(help="Seconds before each live answer.")] = 0.0,
) -> None:
    """Run the local batch server (OpenAI and Anthropic batch APIs, fake model) until Ctrl-C.

    Example: hipbatch emulator --port 8765, then in another shell:
    OPENAI_BASE_URL=http://127.0.0.1:8765/v1 OPENAI_API_KEY=test hipbatch submit examples/hip
    """
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    config = EmulatorConfig(
        seed=seed,
        polls_to_complete=polls_to_complete,
        fault_rate=fault_rate,
        request_error_rate=request_error_rate,
        forms=forms,
        enqueued_token_limit=enqueued_token_limit,
        live_latency_s=live_latency,
    )
    server = LocalBatchServer(port=port, config=config)
    err(
        f"hipbatch emulator on {server.url}\n"
        f"  OPENAI_BASE_URL={server.openai_base_url} OPENAI_API_KEY=test\n"
        f"  ANTHROPIC_BASE_URL={server.anthropic_base_url} ANTHROPIC_API_KEY=test\n"
        "Ctrl-C to stop."
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@app.command()
@reports_errors
def demo(
    ctx: typer.Context,
    provider: Annotated[ProviderName, typer.Option(help="Which batch API to rehearse.")] = ProviderName.openai,
    output_file: Annotated[Path | None, typer.Option(help="Dataset file (default: data/demo-PROVIDER.json).")] = None,
) -> None:
    """Run submit, status and collect on the bundled examples against a local batch server. No key needed.

    Example: hipbatch demo --provider anthropic
    """
    import tempfile

    from hipbatch.defaults import examples_dir
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    examples = examples_dir()
    output = output_file or Path("data") / f"demo-{provider.value}.json"
    key_env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}[provider.value]
    url_env = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}[provider.value]
    with (
        LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=2)) as server,
        tempfile.TemporaryDirectory(prefix="hipbatch-demo-") as tmp,
        _env(
            {
                key_env: "demo-key-not-secret",
                url_env: server.openai_base_url if provider.value == "openai" else server.anthropic_base_url,
                "ANTHROPIC_CONFIG_DIR": tmp,
            }
        ),
    ):
        settings = Settings(state_dir=Path(tmp) / "state", config_path=None)
        err(f"Local batch server on {server.url}; state in a temporary folder.\n")
        err(f"$ hipbatch submit {examples} --provider {provider.value}")
        do_submit(
            settings,
            examples,
            provider.value,
            None,
            Path("templates/default"),
            "**/*.hip",
            None,
            "demo",
            None,
            None,
            None,
            False,
            False,
            False,
        )
        err("\n$ hipbatch status")
        _print_status_table(do_status(settings, settings.store(), None), settings.store(), None)
        err(f"\n$ hipbatch collect --wait --poll-interval 0.2 --output-file {output}")
        do_collect(settings, output, "json", None, True, 0.2, 60, False, False)
        _demo_cost(settings, server, output.with_name(f"{output.stem}-report.html"))
    records = json.loads(output.read_text(encoding="utf-8"))
    err(f"\nDataset: {output} ({len(records)} records). A few of them:")
    for record in records[:3]:
        typer.echo(
            json.dumps(
                {"file_name": record["file_name"], "english_prompt": record["english_prompt"]}, ensure_ascii=False
            )
        )
    err(
        "\nNext: point OPENAI_API_KEY (or ANTHROPIC_API_KEY) at a real account and run "
        "`hipbatch submit DIR` then `hipbatch collect --wait`."
    )


def _demo_cost(settings: Settings, server: Any, report_path: Path) -> None:
    """`hipbatch cost` and `hipbatch report` after the demo, checked against what the emulator billed."""
    from rich.console import Console

    from hipbatch import cost
    from hipbatch.report import write_report

    store = settings.store()
    prices = cost.load_prices(None)
    with _locked(store):
        cost.settle(store, prices)
        led = cost.ledger(store, prices, "demo")
        err("\n$ hipbatch cost")
        _print_cost_table(led, Console(stderr=True, width=None if sys.stderr.isatty() else 200))
        err(f"\n$ hipbatch report --job demo --output {report_path}")
        done = write_report(store, prices, "demo", report_path)
    err(f"Wrote {done.output}: cost {cost.usd(done.cost_usd)}, live equivalent {cost.usd(done.live_equivalent_usd)}")
    stats = server.stats
    billed = (stats.input_tokens, stats.output_tokens, stats.cache_read_tokens, stats.cache_write_tokens)
    ours = tuple(led.total[k] for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"))
    err(
        f"The local server billed {billed[0]:,} input, {billed[1]:,} output, {billed[2]:,} cache-read and "
        f"{billed[3]:,} cache-write tokens: "
        + ("the ledger holds exactly the same." if billed == ours else f"the ledger differs: {ours}")
    )


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- built-in templates: `templates` and `init` ---------------------------------------------------
# One self-contained block (the logic is in hipbatch/defaults.py), to be ported as is.


@app.command("templates")
@reports_errors
def templates_command() -> None:
    """List the built-in templates: name and description. `default` is used when --template-dir is not given.

    Example: hipbatch templates
    """
    from hipbatch.defaults import builtin_templates
    from hipbatch.files import shown

    found = builtin_templates()
    width = max((len(name) for name, _ in found), default=0)
    for name, description in found:
        typer.echo(f"{shown(name).ljust(width)}  {shown(description)}".rstrip())


@app.command("init")
@reports_errors
def init_command(
    directory: Annotated[
        Path | None, typer.Argument(help="Folder to write into (default: ./NAME).", show_default=False)
    ] = None,
    template: Annotated[
        str, typer.Option("--template", help="Built-in template to copy (see `hipbatch templates`).")
    ] = "default",
) -> None:
    """Write a copy of a built-in template and a commented hipbatch.toml to start from. Never overwrites a file.

    Example: hipbatch init my-template --template default
    """
    from hipbatch.defaults import init_template
    from hipbatch.files import shown

    dest = directory if directory is not None else Path(template)
    for path in init_template(dest, template):
        err(f"Wrote {shown(str(path))}")
    where = shown(str(dest))
    err(
        f"Next: edit the templates, then `hipbatch submit DIR --template-dir {where}`; for settings, move "
        f"{where}/hipbatch.toml to the folder you run hipbatch from, or pass --config {where}/hipbatch.toml."
    )


def main() -> None:
    app(prog_name="hipbatch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
