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
from hipbatch.errors import HipbatchError

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
    state_dir: Annotated[Path, typer.Option(envvar="HIPBATCH_STATE_DIR", help="Where the store, shards and "
                                            "results live.")] = Path("state"),
    config: Annotated[Path | None, typer.Option("--config", help="Config file (default: ./hipbatch.toml or "
                                                 "./config.json if present).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
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
    max_requests_per_batch: Annotated[int | None, typer.Option(min=1, help="Cap per batch (the provider's "
                                                               "limit applies anyway).")] = None,
    max_in_flight_batches: Annotated[int | None, typer.Option(min=1, help="Batches at the provider at once; "
                                                              "the rest wait in the local queue.")] = None,
    max_enqueued_tokens: Annotated[int | None, typer.Option(min=1, help="Estimated input tokens enqueued per "
                                                            "model at once (the provider's quota).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Render and write shards only: no network, "
                                          "no key.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Resubmit shards whose earlier submit cannot be "
                                        "told apart at the provider.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Render every file of INPUT_DIR and send the requests not sent before, in batches.

    Example: hipbatch submit kernels/ --provider openai --model gpt-4o-mini
    """
    settings: Settings = ctx.obj
    report = do_submit(settings, input_dir, provider.value, model, template_dir, glob, limit, job,
                       max_requests_per_batch, max_in_flight_batches, max_enqueued_tokens, dry_run, force,
                       json_out)
    if json_out:
        _print_json(report)


def do_submit(settings: Settings, input_dir: Path, provider: str, model: str | None, template_dir: Path,
              glob: str, limit: int | None, job: str | None, max_requests_per_batch: int | None,
              max_in_flight_batches: int | None, max_enqueued_tokens: int | None, dry_run: bool,
              force: bool, quiet: bool) -> dict[str, Any]:
    from hipbatch.poll import retrying
    from hipbatch.render import discover, load_template
    from hipbatch.submit import Adapters, feed, prepare, provider_for_job

    config = settings.config()
    template = load_template(template_dir)
    adapter, chosen_model, params = provider_for_job(config, template, provider, model)
    job_name = job or (input_dir.resolve().name or "job")
    discover(input_dir, glob)  # bad INPUT_DIR fails here, before anything is written
    if not dry_run:
        adapter.check_key()  # before anything is written or sent
        retrying(adapter.check_model, chosen_model)
    store = settings.store()
    with _locked(store):
        prep = prepare(store, template, adapter, chosen_model, params, input_dir, job_name, glob, limit,
                       max_requests_per_batch, dry_run, _progress(quiet))
        out: dict[str, Any] = {"prepare": asdict(prep)}
        if not quiet:
            _print_prepare(prep)
        if dry_run:
            return out
        window = _window(config, provider, max_in_flight_batches, max_enqueued_tokens)
        fed = feed(store, Adapters(config), window, force=force)
    out["feed"] = asdict(fed)
    if not quiet:
        _print_feed(fed, prep)
    return out


def _window(config: Any, provider: str, max_in_flight: int | None, max_tokens: int | None) -> Any:
    from hipbatch.submit import DEFAULT_MAX_IN_FLIGHT, Window

    table = config.provider(provider)
    return Window(
        max_in_flight_batches=max_in_flight or int(table.get("max_in_flight_batches", DEFAULT_MAX_IN_FLIGHT)),
        max_enqueued_tokens=max_tokens or table.get("max_enqueued_tokens"),
    )


def _print_prepare(prep: Any) -> None:
    err(f"{prep.files} files in job {prep.job}: {prep.requests} requests for {prep.provider} / {prep.model}")
    for name, reason in prep.skipped:
        err(f"  skipped {name}: {reason}")
    if prep.dry_run:
        err(f"Dry run: {prep.new} requests to send in {len(prep.shards)} shards "
            f"({prep.known} already in the store); estimated input tokens {prep.est_input_tokens:,}, "
            f"output at most {prep.new * prep.max_tokens:,}")
        for shard in prep.shards:
            err(f"  {shard}")
    elif prep.new == 0:
        err(f"Nothing new to send: all {prep.requests} requests are already in the store.")
    else:
        err(f"{prep.new} new requests in {len(prep.shards)} shards ({prep.known} already in the store); "
            f"estimated input tokens {prep.est_input_tokens:,}")


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


# ---- status ---------------------------------------------------------------------------------------


@app.command()
@reports_errors
def status(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Option(help="Only this job.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON array of batches.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until every batch is finished.")] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes with --watch.")] = 30.0,
) -> None:
    """Refresh unfinished batches and show where every batch stands.

    Example: hipbatch status --watch --interval 60
    """
    settings: Settings = ctx.obj
    store = settings.store()
    while True:
        rows = do_status(settings, store, job)
        if json_out:
            if not watch or all(r["is_final"] for r in rows):
                _print_json(rows)
        else:
            _print_status_table(rows, store, job)
        if not watch or all(r["is_final"] for r in rows):
            return
        time.sleep(interval)


def do_status(settings: Settings, store: Any, job: str | None) -> list[dict[str, Any]]:
    from hipbatch.collect import refresh
    from hipbatch.submit import Adapters, feed

    config = settings.config()
    adapters = Adapters(config)
    with _locked(store):
        if store.shards_in_states(["uploading", "uploaded", "creating"]):
            feed(store, adapters, resume_only=True)  # finish interrupted submits
        report = refresh(store, adapters)
    for line in report.errors:
        err(f"Warning: status check failed, batch left as it was: {line}")
    now = time.time()
    rows = []
    for b in store.batches(job=job):
        rows.append({
            "job": b["job"], "batch_id": b["id"], "provider": b["provider"], "model": b["model"],
            "status": b["status"], "is_final": bool(b["is_final"]), "done": b["done"], "failed": b["failed"],
            "total": b["total"], "counts_final_only": bool(b["counts_final_only"]),
            "created_at": b["created_at"], "age_seconds": round(now - (b["created_at"] or now), 1),
            "expires_at": b["expires_at"], "collected": bool(b["collected"]),
        })
    return rows


def _fmt_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _print_status_table(rows: list[dict[str, Any]], store: Any, job: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=200)  # scripts and logs get full rows
    if not rows:
        console.print("No batches yet. Send some with `hipbatch submit DIR`.")
        return
    table = Table("job", "batch id", "provider", "model", "status", "done / failed / total", "created", "age")
    for r in rows:
        if r["counts_final_only"] and not r["is_final"]:
            counts = f"? / ? / {r['total']} (counts at end)"
        else:
            counts = f"{r['done'] or 0} / {r['failed'] or 0} / {r['total'] or 0}"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])) if r["created_at"] else "-"
        table.add_row(r["job"], r["batch_id"], r["provider"], r["model"], r["status"], counts, created,
                      _fmt_age(r["age_seconds"]))
    console.print(table)
    counts = store.request_counts(job)
    queued = len(store.shards_in_states(["queued"]))
    console.print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                  + (f"; {queued} shard(s) queued locally" if queued else ""))


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
    reextract: Annotated[bool, typer.Option("--reextract", help="Re-run the extractor over stored replies "
                                            "(no network).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Download finished batches, extract the prompts and write the dataset.

    Example: hipbatch collect --wait --poll-interval 60 --output-file data/prompts.json
    """
    summary = do_collect(ctx.obj, output_file, format.value, job, wait, poll_interval, timeout, reextract,
                         json_out)
    if json_out:
        _print_json(summary)


def do_collect(settings: Settings, output_file: Path, fmt: str, job: str | None, wait: bool,
               poll_interval: float, timeout: float | None, reextract: bool, quiet: bool) -> dict[str, Any]:
    from hipbatch import collect as c
    from hipbatch.submit import Adapters, feed

    store = settings.store()
    summary: dict[str, Any] = {}
    if reextract:
        with _locked(store):
            summary["reextracted"] = c.reextract(store, job)
    else:
        config = settings.config()
        adapters = Adapters(config)
        windows: dict[str, Any] = {}
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            with _locked(store):
                fed = feed(store, adapters, _queue_window(config, windows))
                refreshed = c.refresh(store, adapters, windows.get("openai"))
                collected = c.collect_batches(store, adapters, _progress(quiet))
                unfinished = store.batches(unfinished_only=True)
                queued = store.shards_in_states(["queued"])
            for line in refreshed.errors + fed.blocked:
                err(f"Warning: {line}")
            if collected.batches and not quiet:
                err(f"Collected {len(collected.batches)} batch(es), {collected.lines} result lines.")
            if not wait or (not unfinished and not queued):
                break
            if deadline is not None and time.monotonic() > deadline:
                err(f"Stopped waiting after {timeout}s; {len(unfinished)} batch(es) still running.")
                break
            if not quiet:
                done = sum(1 for _ in store.batches()) - len(unfinished)
                err(f"Waiting: {len(unfinished)} batch(es) running, {done} finished, {len(queued)} shard(s) "
                    f"queued; next check in {poll_interval:g}s")
            time.sleep(poll_interval)
    with _locked(store):
        records = c.write_dataset(store, output_file, fmt, job)
        counts = store.request_counts(job)
        reasons = store.failure_reasons(job)
        skipped = store.skipped_files(job)
    pending = counts.get("pending", 0) + counts.get("submitted", 0)
    summary.update(output_file=str(output_file), records=records, succeeded=counts.get("succeeded", 0),
                   failed=sum(reasons.values()), failed_by_reason=reasons, pending=pending,
                   skipped_files=len(skipped))
    if not quiet:
        err(f"Wrote {records} records to {output_file}")
        err(f"succeeded {summary['succeeded']}, failed {summary['failed']}, pending {pending}"
            + (f", skipped files {len(skipped)}" if skipped else ""))
        for reason, n in reasons.items():
            err(f"  {reason}: {n}")
        if summary["failed"]:
            err("Resend the failed ones with `hipbatch retry`.")
    return summary


def _queue_window(config: Any, windows: dict[str, Any]) -> Any:
    if "openai" not in windows:
        windows["openai"] = _window(config, "openai", None, None)
    return windows["openai"]


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

    config = EmulatorConfig(seed=seed, polls_to_complete=polls_to_complete, fault_rate=fault_rate,
                            request_error_rate=request_error_rate, forms=forms,
                            enqueued_token_limit=enqueued_token_limit, live_latency_s=live_latency)
    server = LocalBatchServer(port=port, config=config)
    err(f"hipbatch emulator on {server.url}\n"
        f"  OPENAI_BASE_URL={server.openai_base_url} OPENAI_API_KEY=test\n"
        f"  ANTHROPIC_BASE_URL={server.anthropic_base_url} ANTHROPIC_API_KEY=test\n"
        "Ctrl-C to stop.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


@app.command()
@reports_errors
def demo(
    ctx: typer.Context,
    provider: Annotated[ProviderName, typer.Option(help="Which batch API to rehearse.")] = ProviderName.openai,
    output_file: Annotated[Path | None, typer.Option(help="Dataset file (default: data/demo-PROVIDER.json)."
                                                     )] = None,
) -> None:
    """Run submit, status and collect on the bundled examples against a local batch server. No key needed.

    Example: hipbatch demo --provider anthropic
    """
    import tempfile

    from hipbatch.emulator import EmulatorConfig, LocalBatchServer
    from hipbatch.render import REPO_ROOT

    examples = REPO_ROOT / "examples" / "hip"
    output = output_file or Path("data") / f"demo-{provider.value}.json"
    key_env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}[provider.value]
    url_env = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}[provider.value]
    with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=2)) as server, \
            tempfile.TemporaryDirectory(prefix="hipbatch-demo-") as tmp, \
            _env({key_env: "demo-key-not-secret", url_env: server.openai_base_url
                  if provider.value == "openai" else server.anthropic_base_url,
                  "ANTHROPIC_CONFIG_DIR": tmp}):
        settings = Settings(state_dir=Path(tmp) / "state", config_path=None)
        err(f"Local batch server on {server.url}; state in a temporary folder.\n")
        err(f"$ hipbatch submit {examples} --provider {provider.value}")
        do_submit(settings, examples, provider.value, None, Path("templates/default"), "**/*.hip", None,
                  "demo", None, None, None, False, False, False)
        err("\n$ hipbatch status")
        _print_status_table(do_status(settings, settings.store(), None), settings.store(), None)
        err(f"\n$ hipbatch collect --wait --poll-interval 0.2 --output-file {output}")
        do_collect(settings, output, "json", None, True, 0.2, 60, False, False)
    records = json.loads(output.read_text(encoding="utf-8"))
    err(f"\nDataset: {output} ({len(records)} records). A few of them:")
    for record in records[:3]:
        typer.echo(json.dumps({"file_name": record["file_name"], "english_prompt": record["english_prompt"]},
                              ensure_ascii=False))
    err("\nNext: point OPENAI_API_KEY (or ANTHROPIC_API_KEY) at a real account and run "
        "`hipbatch submit DIR` then `hipbatch collect --wait`.")


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


def main() -> None:
    app(prog_name="hipbatch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
