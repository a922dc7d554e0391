"""What the commands show: summary lines on stderr (for people), tables, and JSON on stdout (for scripts).

Text from outside (file, job and model names, provider error messages) is shown as text: control characters
are stripped and nothing is read as rich markup.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from hipbatch.progress import Progress, default_progress

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from hipbatch.cancel import CancelReport
    from hipbatch.collect import CollectReport
    from hipbatch.cost import Estimate, Ledger
    from hipbatch.live import LiveReport
    from hipbatch.ops import DemoResult
    from hipbatch.poll import Round
    from hipbatch.prepare import PrepareReport
    from hipbatch.retry import RetryReport
    from hipbatch.submit import FeedReport

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
TABLE_ROWS = 20  # batches listed by default; running and uncollected ones are always listed


def plain(text: object) -> str:
    """Text safe for a terminal: no control characters (escape sequences, bidi overrides); newlines kept."""
    return _CONTROL.sub("?", str(text))


def err(message: str) -> None:
    """One message on stderr."""
    typer.echo(plain(message), err=True)


def print_json(data: Any) -> None:
    """JSON on stdout, for scripts."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@dataclass
class Out:
    """Where a command's messages go: stderr for people; `quiet` (--json) keeps only warnings and errors."""

    quiet: bool = False

    def note(self, message: str) -> None:
        if not self.quiet:
            err(message)

    def warn(self, message: str) -> None:
        err(f"Warning: {message}")

    def notice(self, message: str) -> None:
        """A line shown even with --json (stderr): why there is nothing to show."""
        err(message[:1].upper() + message[1:] + ("" if message.endswith(".") else "."))

    def error(self, message: str) -> None:
        err(f"Error: {message}")

    def progress(self) -> Progress:
        return default_progress(quiet=self.quiet)

    # ---- submit --------------------------------------------------------------------------------

    def prepared(self, prep: PrepareReport, est: Estimate | None = None) -> None:
        if self.quiet:
            return
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
            for line in estimate_lines(est):
                err(line)

    def fed(self, fed: FeedReport, prep: PrepareReport | None = None) -> None:
        if self.quiet:
            return
        if fed.adopted:
            err(f"Adopted {len(fed.adopted)} batch(es) created by an interrupted run: {', '.join(fed.adopted)}")
        if fed.tentative:
            err(
                f"  matched by creation time and size only: {', '.join(fed.tentative)} (never cancelled; used only "
                "if its results are the shard's requests, else released and the shard sent again)"
            )
        if fed.created:
            err(f"Created {len(fed.created)} batch(es): {', '.join(fed.created)}")
        elif prep is not None and prep.new == 0 and not fed.adopted:
            err("No batch created.")
        if fed.queued:
            err(f"{fed.queued} shard(s) wait in the local queue for capacity; `hipbatch drain` feeds them.")
        for line in fed.blocked:
            err(f"Warning: {line}")
        if fed.created or fed.adopted:
            err("Next: `hipbatch status` to watch, `hipbatch collect --wait` to write the dataset.")

    def feed_problems(self, fed: FeedReport, prefix: str = "Error") -> None:
        """Shards refused as ambiguous or failed after retries, and duplicate batches cancelled."""
        if fed.duplicates_cancelled:
            err(f"Warning: cancelled duplicate batch(es) of one shard: {', '.join(fed.duplicates_cancelled)}")
        for line in fed.ambiguous + fed.errors:
            err(f"{prefix}: {line}")

    # ---- collect -------------------------------------------------------------------------------

    def collected(self, report: CollectReport) -> None:
        if report.batches and not self.quiet:
            err(f"Collected {len(report.batches)} batch(es), {report.lines} result lines.")

    def waiting(self, last: Round, pause: float) -> None:
        self.note(
            f"Waiting: {last.unfinished} batch(es) running, {last.finished} finished, {last.queued} shard(s) "
            f"queued; next check in {pause:g}s"
        )

    def wait_ended(self, reason: str, last: Round, timeout: float | None) -> None:
        if reason == "stalled":
            err(
                f"Stopped waiting: {last.queued} shard(s) queued could not be sent (see the warnings above); "
                "fix the cause and run the same command again."
            )
        elif reason == "deadline":
            err(f"Stopped waiting after {timeout}s; {last.unfinished} batch(es) still running.")
        if last.stuck:
            err(
                "Some finished batches could not be read (see the warnings above): their requests stay submitted "
                "and are never sent again; `hipbatch status` shows why, and the next `hipbatch collect` fetches "
                "them again."
            )

    def collect_summary(self, summary: dict[str, Any], spent: dict[str, Any] | None) -> None:
        if self.quiet:
            return
        from hipbatch.cost import usd

        err(f"Wrote {summary['records']} records to {summary['output_file']}")
        err(
            f"succeeded {summary['succeeded']}, failed {summary['failed']}, pending {summary['pending']}"
            + (f", skipped files {summary['skipped_files']}" if summary["skipped_files"] else "")
        )
        for reason, n in summary["failed_by_reason"].items():
            err(f"  {reason}: {n}")
        if summary["failed"]:
            err("Resend the failed ones with `hipbatch retry`.")
        if spent is not None and spent["cost_usd"] is not None:
            err(
                f"Cost so far {usd(spent['cost_usd'])} (live calls would have cost "
                f"{usd(spent['live_equivalent_usd'])}); details: `hipbatch cost`"
            )

    # ---- retry and cancel ----------------------------------------------------------------------

    def retried(self, report: RetryReport, max_attempts: int | None, state_dir: object = "state") -> None:
        fed = report.feed
        if report.unreadable:
            err(
                f"Warning: {len(report.unreadable)} request(s) could not be resent: their line is missing from "
                f"the shard files under {state_dir}/shards (first: {report.unreadable[0]})"
            )
        if report.missing_left and not self.quiet:
            err(
                f"{report.missing_left} `missing` request(s) were not resent: the provider no longer has their "
                "results, so they may be paid for already; `hipbatch retry --only missing --yes` sends them."
            )
        if not self.quiet:
            picked = ", ".join(f"{k} {v}" for k, v in sorted(report.selected.items())) or "none"
            err(f"Requests to send again: {report.requests} ({picked}) in {len(report.shards)} new shard(s).")
            if report.skipped_max_attempts:
                err(
                    f"Skipped {report.skipped_max_attempts} request(s) already sent {max_attempts} times "
                    "(--max-attempts)."
                )
            if fed is not None and (fed.created or fed.adopted):
                ids = fed.created + fed.adopted
                err(f"Created {len(ids)} batch(es): {', '.join(ids)}")
                err("Next: `hipbatch collect --wait` to write the dataset.")
            elif fed is not None and fed.queued:
                err(f"{fed.queued} shard(s) wait in the local queue for capacity; `hipbatch collect` feeds them.")
            for line in fed.blocked if fed is not None else []:
                err(f"Warning: {line}")

    def cancelled(self, report: CancelReport) -> None:
        if not self.quiet:
            for row in report.cancelled:
                err(f"Cancel requested: {row['batch_id']} ({row['status']})")
            for batch_id in report.already_final:
                err(f"Already finished, nothing to cancel: {batch_id}")
            if report.adopted:
                err(f"Found {len(report.adopted)} batch(es) of an interrupted submit: {', '.join(report.adopted)}")
            for batch_id in report.unproven:
                err(
                    f"Not cancelled: {batch_id} was matched by creation time and size only and may be another "
                    "state dir's batch on this account; `collect` checks it against its shard when it ends."
                )
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
            if not (
                report.cancelled
                or report.already_final
                or report.adopted
                or report.unqueued_shards
                or report.errors
                or report.unproven
            ):
                err("Nothing to cancel: no unfinished batch and nothing queued.")
        for line in report.errors:
            err(f"Warning: {line}")

    # ---- run -----------------------------------------------------------------------------------

    def ran(self, report: LiveReport, output_file: str, records: int) -> None:
        if self.quiet:
            return
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


def estimate_lines(est: Estimate) -> list[str]:
    """The estimate in words, for stderr."""
    from hipbatch.cost import usd

    lines = [
        f"Estimate for {est.requests} request(s) to {est.provider}/{est.model}: "
        f"{est.input_tokens:,} input tokens, output at most {est.output_ceiling:,} tokens "
        f"({est.calibration_note})"
    ]
    if est.batch_usd is None:
        lines.extend(f"Warning: {w}" for w in est.warnings)
        return lines
    lines.append(
        f"Estimated cost, worst case (no cache hits, every reply at max_tokens): batch {usd(est.batch_usd)}, "
        f"the same work live {usd(est.live_usd)} ({est.price_source})"
    )
    if est.likely_batch_usd is not None:
        lines.append(
            f"Likely cost at the {est.likely_output_tokens:,} output tokens replies of this model "
            f"averaged so far: batch {usd(est.likely_batch_usd)}, live {usd(est.likely_live_usd)}"
        )
    return lines


# ---- tables ---------------------------------------------------------------------------------------


def console(stderr: bool = False) -> Console:
    """A rich console; off a terminal, wide enough that scripts and logs get whole rows."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=200)


def _text(value: object) -> Text:
    """A table cell holding outside text as text (never markup)."""
    from rich.text import Text

    return Text(plain(value))


def fmt_age(seconds: float) -> str:
    """90s, 12m, 3h05m, 2d04h."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def summary_line(job: str, s: dict[str, Any]) -> str:
    """One line per job above the status table."""
    from hipbatch.cost import usd

    spent = usd(s["cost_usd"]) if s["cost_usd"] is not None else "unknown (no price for the model)"
    committed = ""
    if s["in_flight"] or s["queued"]:
        committed = f", up to {usd(s['committed_usd'])} committed in flight" if s["committed_usd"] is not None else ""
    return (
        f"{job}: {s['requests']} requests: {s['done']} done, {s['failed']} failed, {s['in_flight']} in "
        f"flight, {s['queued']} queued; cost so far {spent}{committed}"
    )


def status_renderable(rows: list[dict[str, Any]], queued_shards: int, show_all: bool = False) -> RenderableType:
    """The per-job summary lines, the batch table and the request counts of `hipbatch status`."""
    from rich.console import Group
    from rich.table import Table

    if not rows:
        return _text("No batches yet. Send some with `hipbatch submit DIR`.")
    summaries = {r["job"]: r.get("job_summary") for r in rows}
    lines: list[Any] = [_text(summary_line(name, s)) for name, s in summaries.items() if s]
    table = Table(
        "job", "batch id", "provider", "model", "status", "done / failed / total", "created", "age", "expires in",
        "top error",
    )  # fmt: skip
    hidden = 0
    if not show_all and len(rows) > TABLE_ROWS:
        done = [i for i, r in enumerate(rows) if r["is_final"] and r["collected"]]
        keep = max(TABLE_ROWS - (len(rows) - len(done)), 5)
        drop = set(done[:-keep])
        hidden, rows = len(drop), [r for i, r in enumerate(rows) if i not in drop]
    for r in rows:
        table.add_row(*(_text(cell) for cell in _status_cells(r)))
    lines.append(table)
    if hidden:
        lines.append(
            _text(
                f"... and {hidden} older finished and collected batches (`hipbatch status --all` lists "
                "them; `--json` always has every batch)"
            )
        )
    counts: dict[str, int] = {}  # per state, from the job summaries already computed (no second scan)
    for summary in summaries.values():
        for state, n in (summary or {}).get("states", {}).items():
            counts[state] = counts.get(state, 0) + n
    lines.append(
        _text(
            "requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + (f"; {queued_shards} shard(s) queued locally" if queued_shards else "")
        )
    )
    return Group(*lines)


def _status_cells(r: dict[str, Any]) -> list[str]:
    if r["counts_final_only"] and not r["is_final"]:
        counts = f"? / ? / {r['total']} (counts at end)"
    else:
        counts = f"{r['done'] or 0} / {r['failed'] or 0} / {r['total'] or 0}"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])) if r["created_at"] else "-"
    expires = r.get("expires_in_seconds")
    expires_text = "-" if expires is None else ("overdue" if expires <= 0 else fmt_age(expires))
    top = r.get("top_error")
    top_text = f"{top['reason']} ({top['count']}): {top['message'] or ''}"[:90] if top else ""
    return [
        r["job"], r["batch_id"], r["provider"], r["model"], r["status"], counts, created,
        fmt_age(r["age_seconds"]), expires_text, top_text,
    ]  # fmt: skip


class StatusLive:
    """`status --watch` on a terminal: the table redrawn in place."""

    def __init__(self) -> None:
        self._live: Any = None

    def show(self, renderable: RenderableType) -> None:
        if self._live is None:
            from rich.live import Live

            self._live = Live(renderable, console=console(), auto_refresh=False)
            self._live.start(refresh=True)
        else:
            self._live.update(renderable, refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()


def cost_table(led: Ledger, out: Console | None = None) -> None:
    """`hipbatch cost`: tokens and money per job and model, and the total."""
    from rich.table import Table

    from hipbatch.cost import usd

    out = out or console()
    if not led.rows:
        out.print(_text("No requests yet. Estimate a run with `hipbatch submit DIR --dry-run`."))
        return
    table = Table(
        "job", "provider / model", "requests", "input", "output", "cache read", "cache write", "cost", "committed",
        "live equivalent",
    )  # fmt: skip
    for r in [*led.rows, {**led.total, "job": "total", "provider": "", "model": ""}]:
        model = f"{r['provider']} / {r['model']}" if r["provider"] else ""
        cells = [r["job"], model, *(f"{r[k]:,}" for k in ("requests", "input_tokens", "output_tokens"))]
        cells += [f"{r['cache_read_tokens']:,}", f"{r['cache_write_tokens']:,}"]
        cells += [usd(r["cost_usd"]), usd(r["committed_usd"]), usd(r["live_equivalent_usd"])]
        table.add_row(*(_text(c) for c in cells))
    out.print(table)
    err(
        f"Batch prices are half the live ones; price table checked {led.prices_checked} "
        '(override in hipbatch.toml under [prices.PROVIDER."MODEL"]). Committed = worst case of the '
        "requests still queued or in flight."
    )


def demo_end(done: DemoResult) -> None:
    """The end of `hipbatch demo`: the report, the ledger against the server's bill, a few records, what next."""
    from hipbatch.cost import usd

    rep, billed, ours = done.report, done.billed, done.ledger_tokens
    err(f"Wrote {rep.output}: cost {usd(rep.cost_usd)}, live equivalent {usd(rep.live_equivalent_usd)}")
    err(
        f"The local server billed {billed[0]:,} input, {billed[1]:,} output, {billed[2]:,} cache-read and "
        f"{billed[3]:,} cache-write tokens: "
        + ("the ledger holds exactly the same." if billed == ours else f"the ledger differs: {ours}")
    )
    output = done.output
    records = json.loads(output.read_text(encoding="utf-8"))
    err(f"\nDataset: {output} ({len(records)} records). A few of them:")
    for record in records[:3]:
        sample = {"file_name": record["file_name"], "english_prompt": record["english_prompt"]}
        typer.echo(plain(json.dumps(sample, ensure_ascii=False)))
    err(
        "\nNext: point OPENAI_API_KEY (or ANTHROPIC_API_KEY) at a real account and run "
        "`hipbatch submit DIR` then `hipbatch collect --wait`."
    )
