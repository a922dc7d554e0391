"""What each command does, from its options to its result: the orchestration behind `cli.py`.

Each command's options arrive as one frozen dataclass; each function takes the shared `Context`, its options
and an `Out` (where messages go), runs the stages under the state-dir lock, and returns what the command's view
prints. Nothing here parses arguments or formats tables.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from hipbatch import poll
from hipbatch.errors import NoState, UsageError
from hipbatch.records import RETRY_DEFAULT, RequestState, ShardState
from hipbatch.views import Out

if TYPE_CHECKING:
    from hipbatch.config import Config
    from hipbatch.cost import Ledger, PriceTable
    from hipbatch.dataset import KeptPrompts
    from hipbatch.prepare import Source
    from hipbatch.queue import Windows
    from hipbatch.render import Template
    from hipbatch.report import ReportSummary
    from hipbatch.store import Store

DEFAULT_OUTPUT = Path("data/generated_prompts.json")
P = ParamSpec("P")
R = TypeVar("R")


def tells_retries(fn: Callable[P, R]) -> Callable[P, R]:
    """Retries that wait more than a few seconds inside the command are told on its `Out` (attempt, next try)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        out = next((a for a in [*args, *kwargs.values()] if isinstance(a, Out)), None)
        with poll.notifying(out.retrying if out is not None else None):
            return fn(*args, **kwargs)

    return wrapper


SUBMIT_CACHE_MB = 8  # SQLite page cache of a submit: with the default 32 MB, peak RSS grew 30 MB from 10^4 to 10^5


@dataclass(frozen=True)
class Context:
    """What every command shares: the state dir, the config file, and the clock its waits go through."""

    state_dir: Path
    config_path: Path | None = None
    clock: poll.Clock = poll.REAL_CLOCK

    def config(self, out: Out) -> Config:
        """The config file (warnings about it go to `out`)."""
        from hipbatch.config import load_config

        config = load_config(self.config_path)
        for warning in config.warnings:
            out.warn(warning)
        return config

    def store(self) -> Store:
        """The state dir's store, made if it is missing (commands that send)."""
        from hipbatch.store import Store

        return Store(self.state_dir)

    def existing_store(self) -> Store:
        """The state dir's store for commands that only look (status, cost, report): nothing is created,
        NoState when there is none."""
        from hipbatch.store import Store

        return Store.open_existing(self.state_dir)


@contextmanager
def locked(store: Store) -> Iterator[None]:
    """Hold the state dir's lock (commands take turns; HIPBATCH_LOCK_TIMEOUT bounds the wait)."""
    with store.lock.held():
        yield


def job_name(input_dir: Path, job: str | None) -> str:
    """--job, else the input folder's name."""
    return job or (input_dir.resolve().name or "job")


def windows(config: Config, max_in_flight: int | None = None, max_tokens: int | None = None) -> Windows:
    """Every provider's capacity window for this run (the options apply to all)."""
    from hipbatch.queue import Windows

    return Windows(config, max_in_flight, max_tokens)


# ---- submit ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """Which files `submit` and `run` take, how they are read, and the template that renders them."""

    input_dir: Path
    glob: str = "**/*.hip"
    limit: int | None = None
    job: str | None = None
    template: str | None = None  # a built-in template by name
    template_dir: Path | None = None  # or a folder of one's own (None and no name: the built-in default)
    follow_symlinks: bool = False
    max_file_bytes: int | None = None

    def template_path(self) -> Path | None:
        """The template folder to load (None: the built-in default); both a name and a folder is an error."""
        from hipbatch.defaults import builtin_template_dir

        if self.template is not None and self.template_dir is not None:
            raise UsageError("--template and --template-dir: give one (a built-in name, or your own folder)")
        return builtin_template_dir(self.template) if self.template is not None else self.template_dir

    def source(self) -> Source:
        """The files to read (a bad INPUT_DIR fails here, before anything is written)."""
        from hipbatch.prepare import Source
        from hipbatch.render import iter_discover

        iter_discover(self.input_dir, self.glob)
        job = job_name(self.input_dir, self.job)
        return Source(self.input_dir, job, self.glob, self.limit, self.follow_symlinks, self.max_file_bytes)


def _template(files: Files, out: Out) -> Template:
    from hipbatch.render import load_template

    template = load_template(files.template_path())
    for warning in template.warnings:
        out.warn(warning)
    return template


@dataclass(frozen=True)
class SubmitOptions:
    """`hipbatch submit`."""

    files: Files
    provider: str = "openai"
    model: str | None = None
    max_requests_per_batch: int | None = None
    max_in_flight_batches: int | None = None
    max_enqueued_tokens: int | None = None
    dry_run: bool = False
    force: bool = False
    max_cost: float | None = None


@tells_retries
def submit(ctx: Context, opts: SubmitOptions, out: Out) -> dict[str, Any]:
    """Render, pack and record every file's request, then send the new ones (nothing with --dry-run)."""
    from hipbatch import cost
    from hipbatch.prepare import prepare
    from hipbatch.providers.registry import Adapters, provider_for_job
    from hipbatch.submit import Feeder

    config = ctx.config(out)
    template = _template(opts.files, out)
    adapter, model, params = provider_for_job(config, template, opts.provider, opts.model)
    source = opts.files.source()
    if not opts.dry_run:
        adapter.check_key()  # before anything is written or sent
        unchecked = poll.retrying(adapter.check_model, model, rule=poll.CHECK, sleep=ctx.clock.sleep)
        if unchecked:
            out.warn(unchecked)
    pack = partial(prepare, template=template, provider=adapter, model=model, params=params, source=source)
    pack = partial(pack, max_requests_per_batch=opts.max_requests_per_batch)
    store = ctx.store()
    with locked(store):
        prices = cost.load_prices(config)
        if opts.max_cost is not None and not opts.dry_run:
            # The budget is checked on a dry run first, so an over-budget run leaves nothing queued behind.
            trial = pack(store, dry_run=True)
            cost.check_budget(
                cost.for_prepare(store, prices, trial), opts.max_cost, cost.queued_commitment(store, prices)
            )
        if opts.dry_run:
            prep = pack(store, dry_run=True, progress=out.progress())
            est = cost.for_prepare(store, prices, prep)
            out.prepared(prep, est)
            if opts.max_cost is not None:
                cost.check_budget(est, opts.max_cost, cost.queued_commitment(store, prices))
            return {"prepare": asdict(prep), "estimate": asdict(est)}
        store.limit_cache(SUBMIT_CACHE_MB)
        window = windows(config, opts.max_in_flight_batches, opts.max_enqueued_tokens)
        adapters = Adapters(config, ready=[adapter])  # the adapter (and SDK client) that checked the model
        # Each shard is sent while the next one is rendered; its requests' worst-case cost is recorded with them
        # (and settled once, before the first send, for shards queued earlier).
        est_cost = cost.request_estimator(store, prices, adapter.name, model)
        with Feeder(store, adapters, window, opts.force, ctx.clock.sleep, partial(cost.settle, prices=prices)) as f:
            prep = pack(f.store, progress=out.progress(), on_shard=f.put, est_cost=est_cost)
            est = cost.for_prepare(f.store, prices, prep)
            out.prepared(prep, est)
        fed = f.report
        result: dict[str, Any] = {"prepare": asdict(prep), "estimate": asdict(est)}
    result["feed"] = asdict(fed)
    out.fed(fed, prep)
    out.feed_problems(fed)
    return result


def unsent(result: dict[str, Any]) -> bool:
    """Whether feeding left shards unsent for a reason the user must see (ambiguous, or failed after retries)."""
    fed = result.get("feed") or {}
    return bool(fed.get("ambiguous") or fed.get("errors"))


# ---- status ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusOptions:
    """`hipbatch status`."""

    job: str | None = None
    watch: bool = False
    interval: float = 30.0


@dataclass
class StatusResult:
    rows: list[dict[str, Any]]
    queued_shards: int

    @property
    def finished(self) -> bool:
        return all(r["is_final"] for r in self.rows)


@tells_retries
def status(ctx: Context, opts: StatusOptions, out: Out, show: Callable[[StatusResult], None]) -> None:
    """Refresh unfinished batches and show them; with watch, again every interval until all are final
    (sending queued shards as capacity frees). With no store in the state dir, says so and shows nothing."""
    config = ctx.config(out)  # a bad config file is an error even with no store yet
    try:
        store = ctx.existing_store()
    except NoState as e:
        out.notice(str(e))
        show(StatusResult([], 0))
        return
    store.read_mapped()
    kept = windows(config) if opts.watch else None  # kept across refreshes

    def step() -> bool:
        result = status_once(store, config, opts.job, out, kept)
        show(result)
        return not opts.watch or result.finished

    poll.repeat(step, opts.interval, ctx.clock)


def status_once(store: Store, config: Config, job: str | None, out: Out, kept: Windows | None = None) -> StatusResult:
    """One refresh; with windows (status --watch), also send queued shards that now fit."""
    from hipbatch.providers.registry import Adapters
    from hipbatch.status import batch_rows, refresh
    from hipbatch.submit import feed

    adapters = Adapters(config)
    with locked(store):
        if kept is None and store.shards_in_states([ShardState.UPLOADING, ShardState.UPLOADED, ShardState.CREATING]):
            out.feed_problems(feed(store, adapters, resume_only=True), "Warning")  # finish interrupted submits
        report = refresh(store, adapters, kept)
        if kept is not None:
            out.feed_problems(feed(store, adapters, kept), "Warning")  # interrupted submits first, then the queue
    for line in report.errors:
        out.warn(f"status check failed, batch left as it was: {line}")
    return StatusResult(batch_rows(store, job), len(store.shards_in_states([ShardState.QUEUED])))


# ---- collect and drain ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectOptions:
    """`hipbatch collect` and `hipbatch drain`."""

    output_file: Path = DEFAULT_OUTPUT
    format: str = "json"
    job: str | None = None
    wait: bool = False
    poll_interval: float = 60.0
    timeout: float | None = None
    reextract: bool = False
    fields: str | None = None  # the record's keys, comma-separated (default: the full record)
    strict: bool = False  # kept prompts that still look suspicious become failures (extraction_failed)
    max_in_flight_batches: int | None = None
    max_enqueued_tokens: int | None = None


@tells_retries
def collect(ctx: Context, opts: CollectOptions, out: Out, kept: Windows | None = None) -> dict[str, Any]:
    """Poll (once, or until done with wait), download and record what finished, then write the dataset.
    `kept`: capacity windows to use (and keep shrunk or grown) across polls, else built from the options.
    --timeout bounds the whole command: no download starts or retries past it."""
    from hipbatch import cost
    from hipbatch.collect import reextract
    from hipbatch.config import check_output_path
    from hipbatch.dataset import parse_fields

    parse_fields(opts.fields)  # a bad --fields, output path or config value fails before anything is read or sent
    check_output_path(opts.output_file, "--output-file")
    config = ctx.config(out)
    try:
        store = ctx.existing_store()  # nothing was ever submitted from here: write nothing, create nothing
    except NoState as e:
        out.notice(f"{e}; {opts.output_file} left as it was")
        return {"output_file": str(opts.output_file), "records": 0, "written": False, "state_dir": str(ctx.state_dir)}
    _check_job(store, ctx.state_dir, opts.job)
    summary: dict[str, Any] = {}
    prices = None
    if opts.reextract:
        with locked(store):
            summary["reextracted"] = reextract(store, opts.job)
    else:
        prices = cost.load_prices(config)
        if kept is None:
            kept = windows(config, opts.max_in_flight_batches, opts.max_enqueued_tokens)
        deadline = ctx.clock.monotonic() + opts.timeout if opts.timeout else None
        poll_once = _poller(ctx, store, config, prices, out, kept, poll.time_left(deadline, ctx.clock))
        reason, last = poll.wait_for_batches(
            poll_once, opts.wait, opts.poll_interval, opts.timeout, ctx.clock, out.waiting
        )
        out.wait_ended(reason, last, opts.timeout)
    summary.update(_write_dataset(store, opts, prices, out))
    return summary


def _poller(
    ctx: Context,
    store: Store,
    config: Config,
    prices: PriceTable,
    out: Out,
    kept: Windows,
    left: Callable[[], float] | None = None,
) -> Callable[[], poll.Round]:
    """One poll of collect --wait: refresh, collect, settle the cost, send what now fits."""
    from hipbatch import cost
    from hipbatch.collect import collect_batches
    from hipbatch.providers.registry import Adapters
    from hipbatch.queue import stalled
    from hipbatch.status import refresh
    from hipbatch.submit import feed

    adapters = Adapters(config)

    def poll_once() -> poll.Round:
        with locked(store):
            # Refresh and collect first: capacity freed by finished batches is used in the same poll.
            refreshed = refresh(store, adapters, kept, ctx.clock.sleep)
            collected = collect_batches(store, adapters, out.progress(), ctx.clock.sleep, left)
            cost.settle(store, prices)  # cost of the answers just read, from their tokens
            fed = feed(store, adapters, kept, sleep=ctx.clock.sleep, progress=out.progress())
            unfinished = len(store.batches(unfinished_only=True))
            queued = len(store.shards_in_states([ShardState.QUEUED]))
            finished = len(store.batches()) - unfinished
        for line in refreshed.errors + fed.blocked + collected.errors + collected.gone + collected.released:
            out.warn(line)
        out.feed_problems(fed, "Warning")
        out.collected(collected)
        idle = stalled(unfinished, queued, len(fed.created), len(fed.adopted))
        return poll.Round(unfinished, queued, finished, stuck=bool(collected.errors), stalled=idle)

    return poll_once


FAILED_FILES_SHOWN = 10  # failed files named in collect's summary (`status --failed` lists them all)


def _write_dataset(store: Store, opts: CollectOptions, prices: PriceTable | None, out: Out) -> dict[str, Any]:
    from hipbatch import cost
    from hipbatch.dataset import KeptPrompts, parse_fields, write_dataset
    from hipbatch.extract import OVERLONG_FACTOR

    fields = parse_fields(opts.fields)
    with locked(store):
        if opts.strict:  # the suspects fail first, so the dataset holds none
            kept = _kept_prompts(store, opts.job, opts.strict)
            written = write_dataset(store, opts.output_file, opts.format, opts.job, fields)
        else:  # the suspects and the medians seen while the dataset is written: no pass of their own
            seen = KeptPrompts(OVERLONG_FACTOR)
            written = write_dataset(store, opts.output_file, opts.format, opts.job, fields, kept=seen)
            kept = _seen_prompts(store, opts.job, seen)
        counts = store.request_counts(opts.job)  # current requests: one per file, what the dataset can hold
        reasons = store.failure_reasons(opts.job)
        failed_files = [r for r in store.failed_files(opts.job, FAILED_FILES_SHOWN + 1) if r["reason"] != "skipped"]
        skipped = store.skipped_files(opts.job)
        superseded = store.superseded_count(opts.job)
        spent = cost.ledger(store, prices, opts.job).total if prices is not None else None
    pending = counts.get("pending", 0) + counts.get("submitted", 0)
    summary = {
        "output_file": str(opts.output_file),
        "records": written.records,
        "written": written.replaced,
        "kept_because": written.kept_because,
        "succeeded": counts.get("succeeded", 0),
        "failed": sum(reasons.values()),
        "failed_by_reason": reasons,
        "failed_files": [r["file_name"] for r in failed_files[:FAILED_FILES_SHOWN]],  # the first ones, by name
        "pending": pending,
        "skipped_files": len(skipped),
        "superseded": superseded,  # old requests of changed files: paid, counted in cost, not in the dataset
        **kept,
    }
    out.collect_summary(summary, spent)
    return summary


SHOWN_FILES = 10  # file names a summary lists before pointing at where to see all


def _kept_prompts(store: Store, job: str | None, strict: bool) -> dict[str, Any]:
    """How the kept prompts were extracted, and the ones that still look suspicious (with --strict: failed)."""
    from hipbatch.extract import OVERLONG_FACTOR

    names = [job] if job else [j.name for j in store.jobs()]
    suspects: list[tuple[str, str]] = []
    n_suspect = failed = 0
    for name in names:
        overlong = OVERLONG_FACTOR * (store.median_prompt_length(name) or float("inf"))
        n_suspect += store.count_suspects(name, overlong)
        suspects += store.suspect_files(name, overlong, SHOWN_FILES - len(suspects))
        if strict:
            failed += store.fail_suspects(name, overlong)
    return {
        "methods": store.extraction_methods(job),
        "suspects": n_suspect,
        "suspect_files": [{"file_name": f, "why": why} for f, why in suspects],
        "failed_as_suspect": failed,
    }


def _seen_prompts(store: Store, job: str | None, seen: KeptPrompts) -> dict[str, Any]:
    """_kept_prompts from what the dataset pass saw (Store.suspect_files only to name overlong ones)."""
    suspects: list[tuple[str, str]] = []
    n_suspect = 0
    for name in [job] if job else [j.name for j in store.jobs()]:
        n, named = seen.suspects(name, SHOWN_FILES - len(suspects))
        n_suspect += n
        if named is None:
            named = store.suspect_files(name, seen.overlong(name), SHOWN_FILES - len(suspects))
        suspects += named
    return {
        "methods": store.extraction_methods(job),
        "suspects": n_suspect,
        "suspect_files": [{"file_name": f, "why": why} for f, why in suspects],
        "failed_as_suspect": 0,
    }


# ---- cost and report ------------------------------------------------------------------------------


def _check_job(store: Store, state_dir: Path, job: str | None) -> None:
    if job is not None and store.job(job) is None:
        raise UsageError(
            f"--job {job}: no such job in {state_dir} (jobs: {', '.join(j.name for j in store.jobs()) or 'none yet'})"
        )


def cost_ledger(ctx: Context, job: str | None, out: Out) -> Ledger | None:
    """`hipbatch cost`: settle what is not costed yet, then the ledger per job and model (None, after saying
    so, when the state dir holds no store)."""
    from hipbatch import cost

    prices = cost.load_prices(ctx.config(out))  # a bad config file is an error even with no store yet
    try:
        store = ctx.existing_store()
    except NoState as e:
        out.notice(str(e))
        return None
    _check_job(store, ctx.state_dir, job)
    with locked(store):
        cost.settle(store, prices)
        led = cost.ledger(store, prices, job)
    for warning in led.warnings:
        out.warn(warning)
    return led


def report(ctx: Context, job: str | None, output: Path | None, out: Out) -> ReportSummary:
    """`hipbatch report`: write the job's self-contained HTML page."""
    from hipbatch import cost
    from hipbatch.config import check_output_path
    from hipbatch.pack import safe_name
    from hipbatch.report import default_job, write_report

    if output is not None:
        check_output_path(output, "--output")
    store = ctx.existing_store()  # NoState (an error here: there is nothing to report on) creates nothing
    name = job or default_job(store)
    prices = cost.load_prices(ctx.config(out))
    with locked(store):
        cost.settle(store, prices)
        return write_report(store, prices, name, output or Path(f"report-{safe_name(name, '-_.')}.html"))


# ---- retry and cancel -----------------------------------------------------------------------------


def failed_files(ctx: Context, job: str | None) -> list[dict[str, Any]]:
    """`status --failed`: every file with no good answer (its reason and error), skipped files last."""
    store = ctx.store()
    _check_job(store, ctx.state_dir, job)
    return store.failed_files(job)


@dataclass(frozen=True)
class RetryOptions:
    """`hipbatch retry`."""

    reasons: tuple[str, ...] = tuple(str(r) for r in RETRY_DEFAULT)
    max_attempts: int | None = None
    job: str | None = None
    force: bool = False
    max_tokens: int | None = None  # truncated requests go again as new requests with this max_tokens
    yes: bool = False  # resend `missing` requests too (their results are gone: they may have been billed)


@tells_retries
def retry(ctx: Context, opts: RetryOptions, out: Out) -> Any:
    """Resend, in new batches, the requests with no good answer (`missing` ones only when named, with yes)."""
    from hipbatch.providers.registry import Adapters
    from hipbatch.retry import retry as resend

    config = ctx.config(out)
    store = ctx.store()
    with locked(store):
        _check_missing(store, opts)
        result = resend(
            store, Adapters(config), list(opts.reasons), opts.max_attempts, opts.job, windows(config), opts.force,
            ctx.clock.sleep, opts.max_tokens,
        )  # fmt: skip
    if result.feed is not None:
        out.feed_problems(result.feed)
    return result


def _check_missing(store: Store, opts: RetryOptions) -> None:
    """`--only missing` resends answers that may already be paid for: only with --yes."""
    missing = store.request_counts(opts.job).get(RequestState.MISSING, 0) if "missing" in opts.reasons else 0
    if missing and not opts.yes:
        raise UsageError(
            f"--only missing: {missing} request(s) are missing: the provider no longer has their batch's results "
            "(or returned no line for them), so they may have been answered and billed already and sending them "
            "again may pay twice; add --yes to send them anyway"
        )


@dataclass(frozen=True)
class CancelOptions:
    """`hipbatch cancel`."""

    batch_ids: tuple[str, ...] = ()
    job: str | None = None


@dataclass
class CancelPlan:
    """What `cancel` with no ids would stop, shown before the user confirms."""

    batches: list[tuple[str, str, str, str]] = field(default_factory=list)  # id, provider, status, job
    queued_shards: int = 0

    @property
    def empty(self) -> bool:
        return not self.batches and not self.queued_shards


def cancel_plan(ctx: Context, job: str | None) -> CancelPlan:
    """Every unfinished batch and unsent shard (of the job): what a bare `cancel` stops."""
    from hipbatch.cancel import cancel_targets

    store = ctx.store()
    targets = cancel_targets(store, None, job)
    states = [ShardState.QUEUED, ShardState.UPLOADING, ShardState.UPLOADED, ShardState.CREATING]
    return CancelPlan([(b.id, b.provider, b.status, b.job) for b in targets], len(store.shards_in_states(states, job)))


@tells_retries
def cancel(ctx: Context, opts: CancelOptions, out: Out) -> Any:
    """Cancel batches at the provider (default: every unfinished one, and the local queue)."""
    from hipbatch.cancel import cancel as stop
    from hipbatch.providers.registry import Adapters

    config = ctx.config(out)
    store = ctx.store()
    with locked(store):
        return stop(store, Adapters(config), list(opts.batch_ids) or None, opts.job, ctx.clock.sleep)


# ---- run (live mode) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """`hipbatch run`."""

    files: Files
    provider: str = "openai"
    model: str | None = None
    max_workers: int = 10
    max_requests_per_minute: int | None = None
    max_tokens_per_minute: int | None = None
    output_file: Path = DEFAULT_OUTPUT
    format: str = "json"


def run(ctx: Context, opts: RunOptions, out: Out, show_progress: bool = False) -> dict[str, Any]:
    """Answer the folder's requests now with concurrent live calls, then write the dataset."""
    from hipbatch import cost
    from hipbatch.config import check_output_path
    from hipbatch.dataset import write_dataset
    from hipbatch.live import run_live
    from hipbatch.providers.registry import provider_for_job

    config = ctx.config(out)
    check_output_path(opts.output_file, "--output-file")
    template = _template(opts.files, out)
    adapter, model, params = provider_for_job(config, template, opts.provider, opts.model)
    source = opts.files.source()
    adapter.check_key()
    store = ctx.store()
    # Held for the whole run: a request taken from a queued shard must not go in a batch meanwhile.
    with locked(store):
        result = run_live(
            store, template, adapter, model, params, source, opts.max_workers, opts.max_requests_per_minute,
            opts.max_tokens_per_minute, show_progress=show_progress,
        )  # fmt: skip
        cost.settle(store, cost.load_prices(config))
        written = write_dataset(store, opts.output_file, opts.format)
    out.ran(result, str(opts.output_file), written.records)
    return {**asdict(result), "output_file": str(opts.output_file), "records": written.records}


# ---- demo and the emulator ------------------------------------------------------------------------


@dataclass
class DemoResult:
    output: Path
    report: ReportSummary
    billed: tuple[int, int, int, int]  # input, output, cache read, cache write tokens the local server billed
    ledger_tokens: tuple[int, int, int, int]  # the same, as the ledger holds them


def demo(
    provider: str,
    output_file: Path | None,
    out: Out,
    show_status: Callable[[StatusResult], None],
    show_cost: Callable[[Ledger], None],
) -> DemoResult:
    """submit, status, collect, cost and report on the bundled examples against an in-process local server."""
    import tempfile  # here: 8 ms off every other command's start

    from hipbatch.defaults import examples_dir
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    examples = examples_dir()
    output = output_file or Path("data") / f"demo-{provider}.json"
    key_env, url_env = DEMO_ENV[provider]
    with (
        LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=2)) as server,
        tempfile.TemporaryDirectory(prefix="hipbatch-demo-") as tmp,
        _env(
            {
                key_env: "demo-key-not-secret",
                url_env: getattr(server, f"{provider}_base_url"),
                "ANTHROPIC_CONFIG_DIR": tmp,
            }
        ),
    ):
        ctx = Context(state_dir=Path(tmp) / "state")
        out.note(f"Local batch server on {server.url}; state in a temporary folder.\n")
        out.note(f"$ hipbatch submit {examples} --provider {provider}")
        submit(ctx, SubmitOptions(Files(examples, job="demo"), provider), out)
        out.note("\n$ hipbatch status")
        show_status(status_once(ctx.store(), ctx.config(out), None, out))
        out.note(f"\n$ hipbatch collect --wait --poll-interval 0.2 --output-file {output}")
        collect(ctx, CollectOptions(output, wait=True, poll_interval=0.2, timeout=60), out)
        out.note("\n$ hipbatch cost")
        led = cost_ledger(ctx, "demo", out)
        assert led is not None  # the demo's store was just made
        show_cost(led)
        report_path = output.with_name(f"{output.stem}-report.html")
        out.note(f"\n$ hipbatch report --job demo --output {report_path}")
        done = report(ctx, "demo", report_path, out)
        stats = server.stats
        billed = (stats.input_tokens, stats.output_tokens, stats.cache_read_tokens, stats.cache_write_tokens)
    kinds = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    ours = (led.total[kinds[0]], led.total[kinds[1]], led.total[kinds[2]], led.total[kinds[3]])
    return DemoResult(output, done, billed, ours)


@dataclass(frozen=True)
class EmulatorOptions:
    """`hipbatch emulator`."""

    port: int = 8765
    settings: dict[str, Any] = field(default_factory=dict)  # EmulatorConfig fields
    control: bool = True
    control_token: str | None = None


def templates() -> list[tuple[str, str]]:
    """`hipbatch templates`: the built-in templates, (name, description)."""
    from hipbatch.defaults import builtin_templates

    return builtin_templates()


def init(directory: Path | None, template: str) -> tuple[Path, list[Path]]:
    """`hipbatch init`: a copy of a built-in template and a commented hipbatch.toml; (folder, files written)."""
    from hipbatch.defaults import init_template

    dest = directory if directory is not None else Path(template)
    return dest, init_template(dest, template)


def emulator(opts: EmulatorOptions, out: Out) -> None:
    """`hipbatch emulator`: the local batch server on 127.0.0.1:port until Ctrl-C."""
    import errno

    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    try:
        config = EmulatorConfig(**opts.settings)
        server = LocalBatchServer(port=opts.port, config=config, control_token=opts.control_token, control=opts.control)
    except ValueError as exc:  # a misspelt --forms, a --control-token the server refuses
        raise UsageError(f"{exc}.") from None
    except OSError as exc:
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise UsageError(
            f"Cannot listen on 127.0.0.1:{opts.port}: {reason}. Pick another --port (0 picks a free one)."
        ) from None
    out.note(server.banner(show_token=opts.control_token is None))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


#: provider -> (key variable, base URL variable) the demo points at its local server.
DEMO_ENV = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL"),
    "anthropic": ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
    "gemini": ("GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"),  # GOOGLE_API_KEY wins over GEMINI_API_KEY: set it
}


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
