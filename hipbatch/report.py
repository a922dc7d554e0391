"""`hipbatch report`: one self-contained HTML page per job (timeline, cost, failures, sample prompts).

Plots are plain SVG written here; the page carries no script and a Content-Security-Policy that forbids
loading anything, so it opens offline and shows the same figures as `hipbatch cost`.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch.cost import Ledger, PriceTable, ledger, usd
from hipbatch.errors import UsageError
from hipbatch.records import RequestState
from hipbatch.status import job_summaries
from hipbatch.store import Store

BUCKETS = 60
SAMPLE_PROMPTS = 12
COLORS: dict[str, str] = {
    RequestState.PENDING: "#b0b7c3",
    RequestState.SUBMITTED: "#5b8def",
    RequestState.SUCCEEDED: "#2e9e5b",
    RequestState.FAILED: "#d64545",
    RequestState.EXPIRED: "#e08a2c",
    RequestState.CANCELED: "#8c6bb1",
    RequestState.EXTRACTION_FAILED: "#c2569b",
    RequestState.TRUNCATED: "#e5b627",
    RequestState.MISSING: "#6b6b6b",
}
LABELS: dict[str, str] = {RequestState.PENDING: "queued", RequestState.SUBMITTED: "in flight"}
STACK = [
    RequestState.SUCCEEDED,
    RequestState.FAILED,
    RequestState.EXPIRED,
    RequestState.CANCELED,
    RequestState.EXTRACTION_FAILED,
    RequestState.TRUNCATED,
    RequestState.MISSING,
    RequestState.SUBMITTED,
    RequestState.PENDING,
]


@dataclass
class Timeline:
    """Requests per state at the end of each of BUCKETS equal time slices."""

    start: float
    end: float
    states: list[str]
    counts: dict[str, list[int]] = field(default_factory=dict)


def timeline(store: Store, job: str, now: float | None = None) -> Timeline | None:
    """Queued at created_at, in flight from its batch's creation, final when answered (or last updated)."""
    in_flight = [RequestState.PENDING, RequestState.SUBMITTED]
    span_row = store.timeline_span(job)
    if span_row is None:
        return None
    start, last, running = span_row
    end = last or start
    if running:
        end = max(end, time.time() if now is None else now)
    end = max(end, start + 1.0)
    span = end - start
    deltas: dict[str, list[int]] = {}

    def move(state: str, at: int, by: int) -> None:
        if at < BUCKETS:
            deltas.setdefault(state, [0] * BUCKETS)[at] += by

    for state, t_created, sent, done, n in store.timeline_histories(job, start, span, BUCKETS):
        t_done = BUCKETS if done is None else done
        t_sent = BUCKETS if sent is None else min(sent, t_done)
        move(RequestState.PENDING, t_created or 0, n)
        move(RequestState.PENDING, t_sent if t_sent < BUCKETS else t_done, -n)
        if t_sent < BUCKETS:
            move(RequestState.SUBMITTED, t_sent, n)
            move(RequestState.SUBMITTED, t_done, -n)
        if state not in in_flight:
            move(state, t_done, n)
    out = Timeline(start=start, end=end, states=[s for s in STACK if s in deltas])
    for state in out.states:
        running, series = 0, []
        for d in deltas[state]:
            running += d
            series.append(running)
        out.counts[state] = series
    return out


# ---- SVG ------------------------------------------------------------------------------------------


def _fmt_time(t: float, start: float, span: float) -> str:
    if t > start and span < 600:  # a short run: seconds since the start read better than repeated clocks
        return f"+{t - start:.1f}s" if span < 60 else f"+{(t - start) / 60:.1f}m"
    return time.strftime("%H:%M:%S" if span < 86400 else "%m-%d %H:%M", time.localtime(t))


def timeline_svg(tl: Timeline, width: int = 760, height: int = 260) -> str:
    left, right, top, bottom = 48, 150, 12, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(tl.counts[s][i] for s in tl.states) for i in range(BUCKETS)]
    peak = max(max(totals, default=0), 1)

    def x(i: float) -> float:
        return left + plot_w * i / BUCKETS

    def y(v: float) -> float:
        return top + plot_h - plot_h * v / peak

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="Requests over time by state" class="chart" id="timeline">'
    ]
    for k in range(5):  # horizontal grid and counts
        v = peak * k / 4
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{round(v)}</text>'
        )
    lower = [0] * BUCKETS
    for state in tl.states:
        upper = [lower[i] + tl.counts[state][i] for i in range(BUCKETS)]
        # Steps: each bucket holds its end-of-slice count across its whole width.
        top_pts = [f"{x(i):.1f},{y(upper[i]):.1f} {x(i + 1):.1f},{y(upper[i]):.1f}" for i in range(BUCKETS)]
        low_pts = [f"{x(i + 1):.1f},{y(lower[i]):.1f} {x(i):.1f},{y(lower[i]):.1f}" for i in reversed(range(BUCKETS))]
        parts.append(
            f'<polygon points="{" ".join(top_pts + low_pts)}" fill="{COLORS.get(state, "#999")}" '
            f'data-state="{state}"><title>{LABELS.get(state, state)}</title></polygon>'
        )
        lower = upper
    span = tl.end - tl.start
    for k in range(5):
        t = tl.start + span * k / 4
        parts.append(
            f'<text x="{x(BUCKETS * k / 4):.1f}" y="{height - 12}" text-anchor="middle">'
            f"{_fmt_time(t, tl.start, span)}</text>"
        )
    for n, state in enumerate(reversed(tl.states)):
        ly = top + 14 + n * 18
        final = tl.counts[state][-1]
        parts.append(
            f'<rect x="{width - right + 14}" y="{ly - 10}" width="12" height="12" '
            f'fill="{COLORS.get(state, "#999")}"/><text x="{width - right + 32}" y="{ly}">'
            f"{html.escape(LABELS.get(state, state))} ({final})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(
    items: list[tuple[str, float, str]], fmt: Any = str, width: int = 760, label_w: int = 240, ident: str = ""
) -> str:
    """Horizontal bars: (label, value, colour)."""
    bar_h, gap = 20, 8
    height = max(1, len(items)) * (bar_h + gap) + gap
    peak = max((v for _, v, _ in items), default=0) or 1
    room = width - label_w - 120
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart"'
        + (f' id="{ident}"' if ident else "")
        + ">"
    ]
    for n, (label, value, color) in enumerate(items):
        top = gap + n * (bar_h + gap)
        w = max(1.0, room * value / peak) if value > 0 else 0
        parts.append(
            f'<text x="{label_w - 8}" y="{top + 15}" text-anchor="end">'
            f"{html.escape(label[:40])}</text>"
            f'<rect x="{label_w}" y="{top}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{top + 15}">{html.escape(fmt(value))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ---- the page -------------------------------------------------------------------------------------


def _cost_parts(store: Store, prices: PriceTable, job: str) -> list[tuple[str, float, str]]:
    """The actual cost split into input, cache reads, cache writes and output (all models of the job)."""
    parts = {"input": 0.0, "cache reads": 0.0, "cache writes": 0.0, "output": 0.0}
    for provider, model, live, tin, tout, tcr, tcw in store.token_sums_by_model(job):
        price = prices.lookup(provider, model)
        if price is None:
            continue
        f = price.factor(bool(live)) / 1_000_000
        plain = (tin or 0) - (tcr or 0) if price.input_includes_cache else (tin or 0)
        parts["input"] += plain * price.input * f
        parts["cache reads"] += (tcr or 0) * price.cache_read * f
        parts["cache writes"] += (tcw or 0) * price.cache_write * f
        parts["output"] += (tout or 0) * price.output * f
    colors = {"input": "#5b8def", "cache reads": "#8fb3f5", "cache writes": "#3b5fb0", "output": "#2e9e5b"}
    return [(k, v, colors[k]) for k, v in parts.items()]


def _cell(key: str, value: Any, money: bool) -> str:
    shown = usd(value) if money else (f"{value:,}" if isinstance(value, int) else html.escape(str(value)))
    raw = "" if value is None else html.escape(str(value))
    return f'<td data-key="{key}" data-value="{raw}">{shown}</td>'


def _ledger_table(led: Ledger) -> str:
    heads = [
        "job",
        "provider",
        "model",
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cost_usd",
        "committed_usd",
        "live_equivalent_usd",
    ]
    out = [
        "<table class='ledger'><thead><tr>"
        + "".join(f"<th>{h.replace('_', ' ')}</th>" for h in heads)
        + "</tr></thead><tbody>"
    ]
    for row in led.rows:
        out.append("<tr>" + "".join(_cell(h, row[h], h.endswith("_usd")) for h in heads) + "</tr>")
    total = "".join(_cell(f"total-{h}", led.total[h], h.endswith("_usd")) for h in heads[3:])
    out.append(f"</tbody><tfoot><tr class='total'><td colspan='3'>total</td>{total}</tr></tfoot></table>")
    return "".join(out)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1000px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ec}
.muted{color:#667085}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #e3e6ec;border-radius:8px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:18px}table{border-collapse:collapse;width:100%;margin:8px 0}
th,td{border-bottom:1px solid #eceef2;padding:4px 8px;text-align:left;vertical-align:top}
td[data-value]{text-align:right;font-variant-numeric:tabular-nums}tfoot td{font-weight:600}
.chart text{font-size:11px;fill:#475467}.chart .grid{stroke:#eceef2}
.prompt{white-space:pre-wrap}code{font-size:12px}
"""


def build_report(store: Store, prices: PriceTable, job: str, now: float | None = None) -> str:
    """The HTML page for one job."""
    job_row = store.job(job)
    if job_row is None:
        known = ", ".join(j.name for j in store.jobs()) or "none yet"
        raise UsageError(f"--job {job}: no such job in {store.state_dir} (jobs: {known})")
    led = ledger(store, prices, job)
    esc = html.escape
    generated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() if now is None else now))
    body = [
        f"<h1>hipbatch report: {esc(job)}</h1>",
        f"<p class='muted'>{esc(str(job_row.provider))} / {esc(str(job_row.model))} · input "
        f"{esc(str(job_row.input_dir))} · generated {generated} · prices checked "
        f"{esc(prices.checked)}</p>",
        _cards(store, job, led),
        "<h2>Timeline</h2>",
    ]
    tl = timeline(store, job, now)
    body.append(timeline_svg(tl) if tl is not None else "<p class='muted'>No requests yet.</p>")
    body += _cost_section(store, prices, job, led)
    body += _failure_section(store, job)
    body += _suspect_section(store, job)
    body += _sample_section(store, job)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>hipbatch report: "
        f"{esc(job)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _cards(store: Store, job: str, led: Ledger) -> str:
    empty = {"requests": 0, "done": 0, "failed": 0, "in_flight": 0, "queued": 0}
    summary = job_summaries(store, job).get(job) or empty
    cards = [
        ("requests", f"{summary['requests']:,}"),
        ("done", f"{summary['done']:,}"),
        ("failed", f"{summary['failed']:,}"),
        ("in flight", f"{summary['in_flight']:,}"),
        ("queued", f"{summary['queued']:,}"),
        *([("superseded", f"{summary['superseded']:,}")] if summary.get("superseded") else []),
        ("cost", usd(led.total["cost_usd"])),
        ("live equivalent", usd(led.total["live_equivalent_usd"])),
        ("committed in flight", usd(led.total["committed_usd"])),
    ]
    esc = html.escape
    inner = "".join(f"<div class='card'><span class='muted'>{esc(k)}</span><b>{esc(v)}</b></div>" for k, v in cards)
    return f"<div class='cards'>{inner}</div>"


def _cost_section(store: Store, prices: PriceTable, job: str, led: Ledger) -> list[str]:
    body = ["<h2>Cost</h2>", _ledger_table(led)]
    body += [f"<p class='muted'>Warning: {html.escape(warning)}</p>" for warning in led.warnings]
    if led.total["cost_usd"] is not None:
        bars = [
            *_cost_parts(store, prices, job),
            ("actual total", led.total["cost_usd"] or 0.0, "#1d2330"),
            ("live equivalent", led.total["live_equivalent_usd"] or 0.0, "#b0b7c3"),
        ]
        body.append("<p class='muted'>Where the money went, and what the same tokens cost live:</p>")
        body.append(bars_svg(bars, usd, ident="cost-bars"))
    return body


def _failure_section(store: Store, job: str) -> list[str]:
    esc = html.escape
    body = ["<h2>Failure reasons</h2>"]
    reasons = store.failure_reasons(job)
    if not reasons:
        return [*body, "<p class='muted'>No failures.</p>"]
    bars = [(r, float(n), "#d64545") for r, n in reasons.items()]
    body.append(bars_svg(bars, lambda v: f"{int(v):,}", ident="failure-bars"))
    body.append("<table><thead><tr><th>reason</th><th>requests</th><th>example</th></tr></thead><tbody>")
    for reason, n, message in store.failure_examples(job):
        body.append(
            f"<tr><td>{esc(reason)}</td><td data-value='{n}'>{n:,}</td><td>{esc((message or '')[:300])}</td></tr>"
        )
    body.append("</tbody></table>")
    return body


SUSPECTS_LISTED = 500


def _suspect_section(store: Store, job: str) -> list[str]:
    """Kept prompts that still look suspicious (a fence line, a label, a wrapping quote, chatter, overlong)."""
    from hipbatch.extract import OVERLONG_FACTOR

    overlong = OVERLONG_FACTOR * (store.median_prompt_length(job) or float("inf"))
    n = store.count_suspects(job, overlong)
    body = ["<h2>Suspect prompts</h2>"]
    if not n:
        return [*body, "<p class='muted'>None: every kept prompt looks clean.</p>"]
    body.append(
        f"<p class='muted'>{n:,} kept prompt(s) still look suspicious; <code>hipbatch collect --strict</code> "
        "turns them into failures that <code>hipbatch retry</code> asks again.</p>"
    )
    body.append("<table id='suspects'><thead><tr><th>file</th><th>why</th></tr></thead><tbody>")
    for name, why in store.suspect_files(job, overlong, SUSPECTS_LISTED):
        body.append(f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(why)}</td></tr>")
    body.append("</tbody></table>")
    if n > SUSPECTS_LISTED:
        body.append(f"<p class='muted'>... and {n - SUSPECTS_LISTED:,} more.</p>")
    return body


def _sample_section(store: Store, job: str) -> list[str]:
    esc = html.escape
    body = ["<h2>Sample of extracted prompts</h2><table><thead><tr><th>file</th><th>prompt</th></tr></thead><tbody>"]
    for n, row in enumerate(store.dataset_rows(job)):
        if n >= SAMPLE_PROMPTS:
            break
        body.append(
            f"<tr><td><code>{esc(row['file_name'])}</code></td>"
            f"<td class='prompt'>{esc(row['english_prompt'] or '')}</td></tr>"
        )
    shown = len(body) - 1
    body.append("</tbody></table>" + ("" if shown else "<p class='muted'>No prompts extracted yet.</p>"))
    return body


@dataclass
class ReportSummary:
    job: str
    output: str
    bytes: int
    cost_usd: float | None
    live_equivalent_usd: float | None


def write_report(store: Store, prices: PriceTable, job: str, output: Path) -> ReportSummary:
    """Write the page atomically (temp file + rename)."""
    page = build_report(store, prices, job)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        part.write_text(page, encoding="utf-8")
        os.replace(part, output)
    finally:
        part.unlink(missing_ok=True)
    total = ledger(store, prices, job).total
    return ReportSummary(
        job=job,
        output=str(output),
        bytes=len(page.encode("utf-8")),
        cost_usd=total["cost_usd"],
        live_equivalent_usd=total["live_equivalent_usd"],
    )


def default_job(store: Store) -> str:
    """The only job in the store, or a UsageError asking for --job."""
    jobs = [j.name for j in store.jobs()]
    if len(jobs) == 1:
        return str(jobs[0])
    if not jobs:
        raise UsageError(f"no jobs in {store.state_dir} yet; run `hipbatch submit DIR` first")
    raise UsageError(f"--job is needed: {store.state_dir} holds {len(jobs)} jobs ({', '.join(jobs)})")
