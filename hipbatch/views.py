"""What the commands show: summary lines on stderr (for people), tables, and JSON on stdout (for scripts).

Text from outside (file, job and model names, provider error messages) is shown as text: control characters
are stripped and nothing is read as rich markup.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from hipbatch.progress import Progress, default_progress
from hipbatch.text import one_line, plain

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from hipbatch.cancel import CancelReport
    from hipbatch.collect import CollectReport
    from hipbatch.cost import Estimate, Ledger
    from hipbatch.live import LiveReport
    from hipbatch.ops import CancelPlan, DemoResult, StatusResult
    from hipbatch.poll import Round
    from hipbatch.prepare import PrepareReport
    from hipbatch.report import ReportSummary
    from hipbatch.retry import RetryReport
    from hipbatch.submit import FeedReport

TABLE_ROWS = 20  # batches listed by default; running and uncollected ones are always listed


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

    def retrying(self, attempt: int, attempts: int, pause: float, error: BaseException) -> None:
        """A call that keeps failing transiently, told once its retries have waited a few seconds."""
        err(f"Still trying: {one_line(error)} (attempt {attempt} of {attempts} failed; next try in {pause:.1f}s)")

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
        if not summary["written"]:  # said even with --json: the user expected a new file
            self.warn(f"left {summary['output_file']} as it was: {summary['kept_because']} (nothing would replace it)")
        if self.quiet:
            return
        from hipbatch.cost import usd

        if summary["written"]:
            err(f"Wrote {summary['records']} records to {summary['output_file']}")
        err(
            f"succeeded {summary['succeeded']}, failed {summary['failed']}, pending {summary['pending']}"
            + (f", skipped files {summary['skipped_files']}" if summary["skipped_files"] else "")
            + (
                f"; superseded {summary['superseded']} (replaced by newer requests for their files; paid, not in "
                "the dataset)"
                if summary.get("superseded")
                else ""
            )
        )
        for reason, n in summary["failed_by_reason"].items():
            err(f"  {reason}: {n}")
        self._kept(summary)
        if summary["failed"]:
            names = summary.get("failed_files") or []
            more = summary["failed"] - len(names)
            err(
                "Failed files: "
                + ", ".join(names)
                + (f" and {more} more (all of them, with the reasons:" if more > 0 else " (the reasons:")
                + " `hipbatch status --failed`)"
            )
            err("Resend the failed ones with `hipbatch retry`.")
        if spent is not None and spent["cost_usd"] is not None:
            err(
                f"Cost so far {usd(spent['cost_usd'])} (live calls would have cost "
                f"{usd(spent['live_equivalent_usd'])}); details: `hipbatch cost`"
            )

    def _kept(self, summary: dict[str, Any]) -> None:
        methods = summary.get("methods") or {}
        if methods:
            err("extracted by: " + ", ".join(f"{m} {n}" for m, n in methods.items()))
        if summary.get("suspects"):
            shown = ", ".join(f"{s['file_name']} ({s['why']})" for s in summary["suspect_files"])
            more = summary["suspects"] - len(summary["suspect_files"])
            what = "made failures by --strict" if summary.get("failed_as_suspect") else "kept, but look suspicious"
            err(f"{summary['suspects']} prompt(s) {what}: {shown}" + (f" and {more} more" if more > 0 else ""))
            err("  all of them: `hipbatch report`; `collect --strict` fails them, `hipbatch retry` asks again.")

    # ---- retry and cancel ----------------------------------------------------------------------

    def retried(self, report: RetryReport, max_attempts: int | None, state_dir: Path | None = None) -> None:
        fed = report.feed
        if report.missing_left and not self.quiet:
            err(
                f"{report.missing_left} `missing` request(s) were not resent: the provider no longer has their "
                "results, so they may be paid for already; `hipbatch retry --only missing --yes` sends them."
            )
        if not self.quiet:
            picked = ", ".join(f"{k} {v}" for k, v in sorted(report.selected.items())) or "none"
            err(f"Requests to send again: {report.requests} ({picked}) in {len(report.shards)} new shard(s).")
            if report.renewed:
                err(
                    f"  {report.renewed} truncated request(s) sent as new requests with max_tokens "
                    f"{report.max_tokens} (new custom_ids; the old answers stay in the ledger as superseded)"
                )
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
        if report.unreadable:
            err(
                f"Warning: {len(report.unreadable)} request(s) could not be resent: their line is missing from "
                f"the shard files under {state_dir or 'the state dir'}/shards (first: {report.unreadable[0]})"
            )

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

    def reported(self, done: ReportSummary) -> None:
        from hipbatch.cost import usd

        err(
            f"Wrote {done.output} ({done.bytes:,} bytes): cost {usd(done.cost_usd)}, live equivalent "
            f"{usd(done.live_equivalent_usd)}. Open it in any browser; it needs no network."
        )

    # ---- run -----------------------------------------------------------------------------------

    def run_ended(self, summary: dict[str, Any]) -> int:
        """How `run` ended, for people; returns the exit code (1 fatal, 130 interrupted, else 0)."""
        if summary["fatal"]:
            err(f"Error: {summary['fatal']}")
            err("Stopped sending: every other request would fail the same way. Fix it and run again.")
            return 1
        if summary["interrupted"]:
            err("Interrupted. Every answer received is recorded; run the same command again to continue.")
            return 130
        return 0

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


def cancel_question(plan: CancelPlan) -> str:
    queued = f" and {plan.queued_shards} shard(s) not sent yet" if plan.queued_shards else ""
    return f"Cancel {len(plan.batches)} unfinished batch(es){queued}?"


def cancel_confirmed(plan: CancelPlan, json_out: bool, asks: bool) -> bool:
    """Before a bare `cancel`: show what it stops and ask (only on a terminal: a script must pass --yes)."""
    if plan.empty:
        err("Nothing to cancel: no unfinished batch and nothing queued.")
        if json_out:
            print_json({"cancelled": [], "already_final": [], "errors": []})
        return False
    for batch_id, provider, state, job_name in plan.batches:
        err(f"  {batch_id}  {provider}  {state}  job {job_name}")
    if not asks:
        err(
            f"Error: {cancel_question(plan)} No terminal to ask on, so nothing was cancelled: pass --yes to "
            "cancel without a prompt."
        )
        return False
    if not typer.confirm(cancel_question(plan), err=True):
        err("Nothing cancelled.")
        return False
    return True


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
    superseded = f" (and {s['superseded']} superseded by newer ones)" if s.get("superseded") else ""
    return (
        f"{job}: {s['requests']} requests{superseded}: {s['done']} done, {s['failed']} failed, {s['in_flight']} in "
        f"flight, {s['queued']} queued; cost so far {spent}{committed}"
    )


TOP_ERROR_WIDTH = 60  # the top error cell of the table when the width is not known (one line, ellipsised)
TOP_ERROR_MIN = 24  # a table leaving less room than this for the top error is stacked instead


def status_renderable(
    rows: list[dict[str, Any]], queued_shards: int, show_all: bool = False, width: int | None = None
) -> RenderableType:
    """The per-job summary lines, the batches (a table when it fits `width`, else a few lines per batch: a batch
    id is never cut) and the request counts of `hipbatch status`."""
    from rich.console import Group

    if not rows:
        return _text("No batches yet. Send some with `hipbatch submit DIR`.")
    summaries = {r["job"]: r.get("job_summary") for r in rows}
    lines: list[Any] = [_text(summary_line(name, s)) for name, s in summaries.items() if s]
    hidden = 0
    if not show_all and len(rows) > TABLE_ROWS:
        done = [i for i, r in enumerate(rows) if r["is_final"] and r["collected"]]
        keep = max(TABLE_ROWS - (len(rows) - len(done)), 5)
        drop = set(done[:-keep])
        hidden, rows = len(drop), [r for i, r in enumerate(rows) if i not in drop]
    lines += _batch_table(rows, width) or _batch_stack(rows)
    if hidden:
        lines.append(
            _text(
                f"... and {hidden} older finished and collected batches (`hipbatch status --all` lists "
                "them; `--json` always has every batch)"
            )
        )
    lines.append(_text(request_counts_line(summaries, queued_shards)))
    return Group(*lines)


def request_counts_line(summaries: dict[str, Any], queued_shards: int) -> str:
    """The requests per ledger state under the table, from the job summaries already computed (no second scan)."""
    counts: dict[str, int] = {}
    superseded = 0
    for summary in summaries.values():
        for state, n in (summary or {}).get("states", {}).items():
            counts[state] = counts.get(state, 0) + n
        superseded += (summary or {}).get("superseded", 0)
    return (
        "requests: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (f"; superseded {superseded} (replaced by newer requests for their files)" if superseded else "")
        + (f"; {queued_shards} shard(s) queued locally" if queued_shards else "")
    )


_HEADERS = ("job", "batch id", "provider", "model", "status", "done / failed / total", "created", "age", "expires in",
            "top error")  # fmt: skip


def _batch_table(rows: list[dict[str, Any]], width: int | None = None) -> list[Any] | None:
    """One line per batch: every column, or without `created` and with provider and model in one column when
    that fits `width`; None when even that does not fit. The id never shrinks; the top error takes the room
    left (one line, ellipsised)."""
    from rich.table import Table

    cells = [dict(zip(_HEADERS, _status_cells(r), strict=True)) for r in rows]
    headers = list(_HEADERS)
    for narrower in (False, True):
        if narrower:
            headers.remove("created")
            headers[headers.index("provider") : headers.index("model") + 1] = ["provider / model"]
            for c in cells:
                c["provider / model"] = f"{c['provider']} / {c['model']}"
        natural = sum(max([len(h), *(len(plain(c[h])) for c in cells)]) + 3 for h in headers[:-1]) + 4
        if width is not None and natural + TOP_ERROR_MIN > width:
            continue
        table = Table(*headers)
        for column in table.columns:
            column.no_wrap, column.overflow = True, "ellipsis"
        table.columns[1].min_width = max(len(plain(c["batch id"])) for c in cells)  # the id, whole
        table.columns[-1].max_width = TOP_ERROR_WIDTH if width is None else width - natural
        for c in cells:
            table.add_row(*(_text(c[h]) for h in headers))
        return [table]
    return None


def _batch_stack(rows: list[dict[str, Any]]) -> list[Any]:
    """Narrow terminals: each batch on up to three lines; the first holds the whole id (folded only if the
    terminal is narrower than the id itself), the others are cut with an ellipsis."""
    from rich.text import Text

    out: list[Any] = [Text("batch id  status  done / failed / total  age", style="bold")]
    for r in rows:
        job, batch_id, provider, model, status, counts, created, age, expires, top = _status_cells(r)
        out.append(Text(plain(f"{batch_id}  {status}  {counts}  {age}"), overflow="fold"))
        detail = f"  job {job} · {provider} / {model} · expires in {expires} · created {created}"
        out.append(Text(plain(detail), no_wrap=True, overflow="ellipsis"))
        if top:
            out.append(Text(plain(f"  top error: {top}"), no_wrap=True, overflow="ellipsis"))
    return out


def _status_cells(r: dict[str, Any]) -> list[str]:
    if r["counts_final_only"] and not r["is_final"]:
        counts = f"? / ? / {r['total']} (counts at end)"
    else:
        counts = f"{r['done'] or 0} / {r['failed'] or 0} / {r['total'] or 0}"
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])) if r["created_at"] else "-"
    expires = r.get("expires_in_seconds")
    expires_text = "-" if expires is None else ("overdue" if expires <= 0 else fmt_age(expires))
    top = r.get("top_error")
    top_text = one_line(f"{top['reason']} ({top['count']}): {top['message'] or ''}", 200) if top else ""
    return [
        r["job"], r["batch_id"], r["provider"], r["model"], r["status"], counts, created,
        fmt_age(r["age_seconds"]), expires_text, top_text,
    ]  # fmt: skip


def failed_table(rows: list[dict[str, Any]], out: Console | None = None) -> None:
    """`status --failed`: every file whose request has no good answer, with its state and error (one line)."""
    from rich.table import Table

    out = out or console()
    if not rows:
        out.print(_text("No failed files: every file has a good answer or is still in flight."))
        return
    table = Table("job", "file", "state", "error")
    table.columns[1].overflow = "fold"
    table.columns[3].no_wrap = True
    table.columns[3].overflow = "ellipsis"
    for r in rows:
        table.add_row(*(_text(c) for c in (r["job"], r["file_name"], r["reason"], one_line(r["error"] or "", 300))))
    out.print(table)
    err(f"{len(rows)} file(s) with no good answer; `hipbatch retry` sends them again.")


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


def demo_status(result: StatusResult) -> None:
    console().print(status_renderable(result.rows, result.queued_shards, width=console().width))


def demo_cost(led: Ledger) -> None:
    cost_table(led, console(stderr=True))


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
        "\nNext: point OPENAI_API_KEY (or ANTHROPIC_API_KEY, GEMINI_API_KEY) at a real account and run "
        "`hipbatch submit DIR` then `hipbatch collect --wait`."
    )


def templates(found: list[tuple[str, str]]) -> None:
    """`hipbatch templates`: one line per built-in template (on stdout)."""
    width = max((len(name) for name, _ in found), default=0)
    for name, description in found:
        typer.echo(plain(f"{name.ljust(width)}  {description}".rstrip()))


def initialised(dest: Path, written: list[Path]) -> None:
    """`hipbatch init`: what was written, and what to do next."""
    for path in written:
        err(f"Wrote {path}")
    err(
        f"Next: edit the templates, then `hipbatch submit DIR --template-dir {dest}`; for settings, move "
        f"{dest}/hipbatch.toml to the folder you run hipbatch from, or pass --config {dest}/hipbatch.toml."
    )
