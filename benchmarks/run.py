"""hipbatch's own cost against the least any tool must do, on generated data. One command:

    python benchmarks/run.py [--quick] [--only NAME ...] [--readme]

Prints a markdown table (and --json FILE writes the numbers). Every measured command runs in its own child
process (imports included); time is wall-clock seconds, best of --repeat runs; peak RSS is the child's
ru_maxrss from wait4(). Inputs are generated under $HIPBATCH_BENCH_DIR (default /tmp/hipbatch-bench) and kept
for the next run (about 1.3 GB for the full sizes). The local batch server runs in this process, on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpus import CACHE, corpus_bytes, hip_corpus  # noqa: E402

REPO = HERE.parent
PY = sys.executable
SIZES = {
    "full": {
        "dry": [10_000, 100_000],
        "collect": [10_000, 30_000, 100_000],
        "resubmit": 100_000,
        "status": 1_000_000,
        "cycle": 10_000,
        "drain": 20_000,
        "submit": [10_000, 100_000],
    },
    "quick": {
        "dry": [1_000, 10_000],
        "collect": [2_000, 6_000, 10_000],
        "resubmit": 10_000,
        "status": 100_000,
        "cycle": 2_000,
        "drain": 2_000,
        "submit": [1_000, 10_000],
    },
}
NAMES = ("dry-run", "submit", "help", "collect", "resubmit", "status", "cycle", "drain")
SUBMIT_TARGETS = (1.3, 1.2)  # submit against its floor: the small size, the large size
RSS_LIMIT = 150.0  # MB, any command


@dataclass
class Measure:
    seconds: float
    rss_mb: float
    code: int
    stdout: str
    stderr: str
    cpu: float = 0.0  # user + system seconds of the command's process


@dataclass
class Row:
    name: str
    size: str
    seconds: float
    rss_mb: float | None = None
    floor: float | None = None  # seconds of the reference it is compared with
    floor_label: str = ""
    floor_rss_mb: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.seconds / self.floor if self.floor else None


# Linux starts a forked child's peak RSS at its parent's current RSS, and this process holds the local batch
# server's data: every command is therefore forked from a tiny launcher, which reports the wall time and the
# peak RSS of its own child (wait4).
LAUNCHER = """import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    cpu = usage.ru_utime + usage.ru_stime
    json.dump([time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status), cpu], fh)
"""


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> Measure:
    """Run one command in a child process; its wall time and its own peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "measure.json"
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("wb") as fo, err.open("wb") as fe:
            subprocess.run(
                [PY, "-S", "-c", LAUNCHER, str(result), *cmd],
                cwd=cwd,
                env=env or child_env(),
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=True,
            )
        seconds, rss_kb, code, cpu = json.loads(result.read_text())
        m = Measure(seconds, rss_kb / 1024, code, out.read_text(errors="replace"), err.read_text(errors="replace"), cpu)
    if m.code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {m.code}\n{m.stderr[-3000:]}")
    return m


def best(n: int, fn: Callable[[], Measure]) -> Measure:
    """The fastest of n runs (the machine is shared), with the largest peak RSS seen."""
    return fastest([fn() for _ in range(n)])


def fastest(runs: list[Measure]) -> Measure:
    """The fastest run, with the largest peak RSS of them all."""
    top = min(runs, key=lambda m: m.seconds)
    top.rss_mb = max(m.rss_mb for m in runs)
    return top


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "HIPBATCH_"))}
    env.update(extra)
    return env


def hipbatch(state: Path, *args: str) -> list[str]:
    return [PY, "-m", "hipbatch", "--state-dir", str(state), *args]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the benchmarks -----------------------------------------------------------------------------------


def bench_dry_run(n: int, work: Path, repeat: int) -> Row:
    corpus = hip_corpus(n)
    state = work / f"dry-{n}"
    floor_out = work / f"floor-{n}.jsonl"
    runs = alternate(
        repeats(n, repeat),
        {
            "hipbatch": lambda: run(hipbatch(state, "submit", str(corpus), "--dry-run", "--json"), work),
            "floor": lambda: run([PY, str(HERE / "floor_submit.py"), str(corpus), str(floor_out)], work),
        },
        lambda label: warm(corpus) or log(f"dry-run {n}: {label}"),
    )
    m, f = fastest(runs["hipbatch"]), fastest(runs["floor"])
    last = runs["hipbatch"][-1]  # its shards are the ones on disk (each dry run replaces the last one)
    shards = [Path(path) for path in json.loads(last.stdout)["prepare"]["shards"]]  # in the order written
    same = _same_lines(shards, floor_out) if n <= 20_000 else None
    floor_out.unlink(missing_ok=True)
    ratio = m.seconds / f.seconds
    mb = corpus_bytes(corpus) / 1e6 if n <= 20_000 else n * 0.0114  # ~11.4 KB a file
    row = Row(
        "submit --dry-run",
        f"{n:,} files ({mb:,.0f} MB)",
        m.seconds,
        m.rss_mb,
        f.seconds,
        "read+format+write",
        f.rss_mb,
        "<= 1.5x floor, < 150 MB",
        ratio <= 1.5 and m.rss_mb < 150,
    )
    if same is not None:
        row.note = "lines identical to the floor's" if same else "LINES DIFFER from the floor's"
    return row


def _same_lines(shards: list[Path], floor: Path) -> bool:
    """hipbatch's shards and the floor's file hold the same request lines (custom_id recipes differ)."""

    def strip(line: bytes) -> bytes:
        return re.sub(rb'^\{"custom_id":"[^"]*"', b"", line)

    ours = [strip(line) for s in shards for line in s.open("rb")]
    theirs = [strip(line) for line in floor.open("rb")]
    return ours == theirs


def collect_dir(work: Path, n: int) -> Path:
    """The state dir bench_collect collects n results in (left collected after its last run)."""
    return work / f"collect-{n}"


def bench_collect(n: int, work: Path, repeat: int) -> Row:
    from fixtures import collect_state

    log(f"collect {n}: building the state (cached)")
    pristine = collect_state(n)
    results = sorted((pristine / "results").glob("*.jsonl"))
    state = collect_dir(work, n)

    def once() -> Measure:
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(pristine, state)
        m = run(hipbatch(state, "collect", "--json", "--output-file", str(work / "collect.json")), work)
        summary = json.loads(m.stdout)
        if summary["records"] != n:
            raise RuntimeError(f"collect wrote {summary['records']} records, expected {n}")
        return m

    def floor() -> Measure:
        return run([PY, str(HERE / "floor_collect.py"), str(work / "floor.json"), *map(str, results)], work)

    log(f"collect {n}: hipbatch and floor, alternately")
    runs = alternate(repeat if n >= 100_000 else max(repeat, 5), {"hipbatch": once, "floor": floor}, lambda _: None)
    m, f = fastest(runs["hipbatch"]), fastest(runs["floor"])
    ratio = m.seconds / f.seconds
    return Row(
        "collect (results downloaded)",
        f"{n:,} result lines",
        m.seconds,
        m.rss_mb,
        f.seconds,
        "parse+tag+write",
        f.rss_mb,
        "<= 2x floor",
        ratio <= 2.0,
    )


def collect_rows(sizes: list[int], work: Path, repeat: int) -> list[Row]:
    """collect at each size, the per-line slope between the two smaller sizes against the floor's, the fixed
    start-up that slope leaves (the intercept), and a collect with nothing left to download (no SDK imported)."""
    rows = [bench_collect(n, work, repeat) for n in sizes]
    small, mid = rows[0], rows[1]
    assert small.floor is not None and mid.floor is not None
    lines = sizes[1] - sizes[0]
    slope, floor_slope = (mid.seconds - small.seconds) / lines, (mid.floor - small.floor) / lines
    ratio = slope / floor_slope if floor_slope > 0 else float("inf")
    rows.insert(
        2,
        Row(
            "collect, per result line: slope between the two sizes (seconds added, and ratio of per-line costs)",
            f"{small.size} -> {mid.size}",
            mid.seconds - small.seconds,
            floor=mid.floor - small.floor,
            floor_label="the floor's",
            target="<= 2x the floor's slope",
            ok=ratio <= 2.0,
            note=f"{slope * 1e6:.1f} us a line, floor {floor_slope * 1e6:.1f} us",
        ),
    )
    intercept = small.seconds - slope * sizes[0]
    state = collect_dir(work, sizes[-1])  # collected by the last run: nothing left to download
    again = best(
        max(repeat, 5),
        lambda: run(hipbatch(state, "collect", "--json", "--output-file", str(work / "again.json")), work),
    )
    imported = run(
        [PY, "-X", "importtime", *hipbatch(state, "collect", "--output-file", str(work / "again.json"))[1:]], work
    ).stderr
    sdks = [m for m in ("openai", "anthropic", "google.genai") if re.search(rf"\|\s+{m}$", imported, re.M)]
    rows.insert(
        3,
        Row(
            "collect, fixed start-up (the slope's intercept)",
            small.size,
            intercept,
            target="<= 1.0 s",
            ok=intercept <= 1.0,
        ),
    )
    rows.append(
        Row(
            "collect again, nothing to download (dataset rewritten)",
            f"{sizes[-1]:,} records",
            again.seconds,
            again.rss_mb,
            target="no SDK imported",
            ok=not sdks,
            note="no SDK imported" if not sdks else "IMPORTS " + ", ".join(sdks),
        )
    )
    return rows


def bench_resubmit(n: int, work: Path, repeat: int, dry: Row | None) -> list[Row]:
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    corpus = hip_corpus(n)
    state = work / f"resubmit-{n}"
    shutil.rmtree(state, ignore_errors=True)
    rows = []
    # Batches never finish here: only the first submit talks to the server beyond a model check.
    with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=10**9)) as server:
        env = child_env(OPENAI_BASE_URL=server.openai_base_url, OPENAI_API_KEY="bench-key")
        log(f"resubmit {n}: first submit (to the local batch server)")
        warm(corpus)
        first = run(hipbatch(state, "submit", str(corpus), "--json"), work, env)
        sent = sum(server.stats.sent.values())
        rows.append(
            Row(
                "submit (first, sent to local server)",
                f"{n:,} files",
                first.seconds,
                first.rss_mb,
                note=f"{server.stats.files_uploaded} uploads, {sent:,} requests sent",
            )
        )
        log(f"resubmit {n}: unchanged folder")
        m = best(repeat, lambda: warm(corpus) or run(hipbatch(state, "submit", str(corpus), "--json"), work, env))
        report = json.loads(m.stdout)
        assert report["prepare"]["new"] == 0 and sum(server.stats.sent.values()) == sent, "re-submit sent requests"
    if dry is None:
        dry = bench_dry_run(n, work, repeat)
    ratio = m.seconds / dry.seconds
    rows.append(
        Row(
            "re-submit, unchanged folder",
            f"{n:,} files",
            m.seconds,
            m.rss_mb,
            dry.seconds,
            "submit --dry-run",
            dry.rss_mb,
            "<= 1.2x dry-run",
            ratio <= 1.2,
            "nothing sent",
        )
    )
    return rows


def server_env(server: Any, provider: str) -> dict[str, str]:
    """The child environment pointing one provider's SDK at the local batch server."""
    if provider == "openai":
        return child_env(OPENAI_BASE_URL=server.openai_base_url, OPENAI_API_KEY="bench-key")
    return child_env(ANTHROPIC_BASE_URL=server.anthropic_base_url, ANTHROPIC_API_KEY="bench-key")


def repeats(n: int, repeat: int) -> int:
    """Runs per measurement: at least 5 for the small sizes (a few seconds each, and the noisiest ratios)."""
    return repeat if n >= 100_000 else max(repeat, 5)


def alternate(
    n: int, commands: dict[str, Callable[[], Measure]], before: Callable[[str], object]
) -> dict[str, list[Measure]]:
    """n runs of each command, in turns (a b, b a, a b, ...) so that both see the same load; `before(label)`
    runs before each."""
    runs: dict[str, list[Measure]] = {label: [] for label in commands}
    labels = list(commands)
    for i in range(n):
        for label in labels if i % 2 == 0 else labels[::-1]:
            before(label)
            runs[label].append(commands[label]())
    return runs


def submit_target(n: int) -> float:
    """The issue's target for a submit of n files against its floor."""
    return SUBMIT_TARGETS[1] if n >= 100_000 else SUBMIT_TARGETS[0]


def warm(corpus: Path) -> None:
    """Read every file once, so that neither hipbatch nor the floor pays for the disk (the page cache of this
    shared machine is not kept for long)."""
    for path in corpus.rglob("*.hip"):
        path.read_bytes()


def bench_submit(provider: str, sizes: list[int], work: Path, repeat: int) -> list[Row]:
    """A first submit (render, pack, ledger, upload, create) against the floor: the same lines written to
    files at the same limits, then the same SDK calls, one after the other. Default (largest) shard sizes;
    a fresh local batch server for every run, and every run checked to have sent each request once. The
    runs alternate (hipbatch, floor, floor, hipbatch, ...), each after reading the corpus once."""
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    def once(n: int, cmd: Callable[[Path], list[str]]) -> Measure:
        state = work / f"submit-{provider}-{n}"
        shutil.rmtree(state, ignore_errors=True)
        with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=10**9)) as server:
            m = run(cmd(state), work, server_env(server, provider))
            sent = server.stats.sent
            if len(sent) != n or set(sent.values()) != {1}:
                raise RuntimeError(f"{cmd(state)[:4]}: {len(sent)} requests sent, {sum(sent.values())} times")
        shutil.rmtree(state, ignore_errors=True)
        return m

    rows = []
    for n in sizes:
        corpus, target = hip_corpus(n), submit_target(n)
        args = ["submit", str(corpus), "--provider", provider, "--json"]
        floor = [str(HERE / "floor_upload.py"), str(corpus)]
        runs = alternate(
            repeats(n, repeat),
            {
                "hipbatch": lambda n=n, a=args: once(n, lambda s: hipbatch(s, *a)),
                "floor": lambda n=n, f=floor: once(n, lambda s: [PY, *f, str(s), provider]),
            },
            lambda label, n=n, c=corpus: warm(c) or log(f"submit {provider} {n}: {label}"),
        )
        m, f = fastest(runs["hipbatch"]), fastest(runs["floor"])
        report = json.loads(m.stdout)
        rows.append(
            Row(
                f"submit, {provider} (to local server)",
                f"{n:,} files",
                m.seconds,
                m.rss_mb,
                f.seconds,
                "write+upload+create",
                f.rss_mb,
                f"<= {target}x floor, < {RSS_LIMIT:.0f} MB",
                m.seconds / f.seconds <= target and m.rss_mb < RSS_LIMIT,
                f"{len(report['feed']['created'])} batches",
                extra={"cpu": m.cpu, "floor_cpu": f.cpu}
                | {label: [x.seconds for x in measures] for label, measures in runs.items()},
            )
        )
    return rows


def slope_row(name: str, small: Row, large: Row) -> Row:
    """Per-file cost between two sizes (start-up cancels out), against the floor's: shown, no target."""
    assert small.floor is not None and large.floor is not None
    return Row(
        f"{name}: slope between the two sizes (seconds added, and ratio of per-file costs)",
        f"{small.size} -> {large.size}",
        large.seconds - small.seconds,
        floor=large.floor - small.floor,
        floor_label="the floor's",
    )


def rss_rows(rows: list[Row], sizes: list[int]) -> list[Row]:
    """The largest peak RSS of any command measured, and its growth between the two sizes."""
    small, large = (f"{n:,} files" for n in sizes)
    by_size = {
        label: [r for r in rows if r.rss_mb is not None and r.size.startswith(label)] for label in (small, large)
    }
    top = max((r for group in by_size.values() for r in group), key=lambda r: r.rss_mb or 0.0)
    growth = max((r.rss_mb or 0.0) for r in by_size[large]) - max((r.rss_mb or 0.0) for r in by_size[small])
    assert top.rss_mb is not None
    return [
        Row(
            "peak RSS, largest of the rows above",
            f"{small} to {large}",
            0.0,
            top.rss_mb,
            target=f"< {RSS_LIMIT:.0f} MB",
            ok=top.rss_mb < RSS_LIMIT,
            note=f"MB, not seconds; {top.name}, {top.size}",
        ),
        Row(
            "peak RSS growth, largest command",
            f"{small} -> {large}",
            0.0,
            growth,
            target="flat (< 20 MB)",
            ok=growth < 20,
            note="MB, not seconds",
        ),
    ]


def bench_help(work: Path, repeat: int) -> Row:
    """`hipbatch --help` against starting Python itself; and no provider SDK among the modules it imports."""
    n = max(repeat, 5)
    m = best(n, lambda: run([PY, "-m", "hipbatch", "--help"], work))
    f = best(n, lambda: run([PY, "-c", "pass"], work))
    imported = run([PY, "-X", "importtime", "-m", "hipbatch", "--help"], work).stderr
    sdks = [m for m in ("openai", "anthropic", "google.genai", "httpx2") if re.search(rf"\|\s+{m}$", imported, re.M)]
    return Row(
        "hipbatch --help",
        "",
        m.seconds,
        m.rss_mb,
        f.seconds,
        "python -c pass",
        f.rss_mb,
        "<= 0.15 s, no SDK imported",
        m.seconds <= 0.15 and not sdks,
        "no SDK imported" if not sdks else "IMPORTS " + ", ".join(sdks),
    )


def bench_status(n: int, work: Path, repeat: int) -> list[Row]:
    from fixtures import status_state

    log(f"status {n}: building the state (cached; slow the first time)")
    state = status_state(n)
    rows = []
    for args, label in (((), "status"), (("--json",), "status --json")):
        log(f"{label} {n}")
        m = best(repeat, lambda args=args: run(hipbatch(state, "status", *args), work))
        rows.append(Row(label, f"{n:,} requests", m.seconds, m.rss_mb, target="< 0.5 s", ok=m.seconds < 0.5))
    return rows


def bench_cycle(n: int, work: Path) -> list[Row]:
    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    corpus = hip_corpus(n)
    state = work / f"cycle-{n}"
    shutil.rmtree(state, ignore_errors=True)
    out = work / "cycle.json"
    with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=1, forms="tag")) as server:
        env = child_env(OPENAI_BASE_URL=server.openai_base_url, OPENAI_API_KEY="bench-key")
        log(f"cycle {n}: submit")
        s = run(hipbatch(state, "submit", str(corpus), "--json"), work, env)
        log(f"cycle {n}: collect --wait")
        c = run(
            hipbatch(state, "collect", "--wait", "--poll-interval", "0.2", "--json", "--output-file", str(out)),
            work,
            env,
        )
        summary = json.loads(c.stdout)
        sent = server.stats.sent
    ok = summary["records"] == n and len(sent) == n and set(sent.values()) == {1}
    total = s.seconds + c.seconds
    return [
        Row("cycle: submit (to local server)", f"{n:,} files", s.seconds, s.rss_mb),
        Row("cycle: collect --wait", f"{n:,} requests", c.seconds, c.rss_mb),
        Row(
            "cycle: submit -> collect",
            f"{n:,} requests",
            total,
            max(s.rss_mb, c.rss_mb),
            target="all answered, each sent once",
            ok=ok,
            note=f"{summary['records']:,} records, {sum(sent.values()):,} sent",
        ),
    ]


def bench_drain(n: int, work: Path) -> list[Row]:
    """The done-when check: a job much larger than the enqueued-token quota, drained to the end."""
    from fixtures import small_corpus
    from sqlite_utils import Database

    from hipbatch.emulator import EmulatorConfig, LocalBatchServer

    corpus = small_corpus(n)
    rows = []
    per_shard = max(n // 40, 10)
    # The local server counts ~850 tokens a request (hipbatch estimates ~1,020): the quota holds 3 shards.
    quota = per_shard * 850 * 3
    for label, window in (
        ("drain, quota found by refusals", []),
        ("drain, --max-enqueued-tokens", ["--max-enqueued-tokens", str(quota)]),
    ):
        state = work / f"drain-{n}-{len(window)}"
        shutil.rmtree(state, ignore_errors=True)
        out = work / "drain.json"
        cfg = EmulatorConfig(polls_to_complete=2, forms="tag", enqueued_token_limit=quota)
        with LocalBatchServer(port=0, config=cfg) as server:
            env = child_env(OPENAI_BASE_URL=server.openai_base_url, OPENAI_API_KEY="bench-key")
            log(f"{label} {n}: submit")
            s = run(
                hipbatch(
                    state,
                    "submit",
                    str(corpus),
                    "--max-requests-per-batch",
                    str(per_shard),
                    "--json",
                    *window,
                ),
                work,
                env,
            )
            log(f"{label} {n}: drain")
            d = run(
                hipbatch(
                    state,
                    "drain",
                    "--poll-interval",
                    "0.05",
                    "--timeout",
                    "1800",
                    "--json",
                    "--output-file",
                    str(out),
                    *window,
                ),
                work,
                env,
            )
            summary = json.loads(d.stdout)
            sent = dict(server.stats.sent)
            created = server.stats.batches_created
        ledger = Database(state / "hipbatch.db")  # the ledger read as it is on disk
        refused = sum(int(r["requeues"] or 0) for r in ledger.table("shards").rows)
        attempts = {r[0] for r in ledger.execute("SELECT DISTINCT attempts FROM requests")}
        ledger.close()
        records = json.loads(out.read_text())
        lost = n - len({r["custom_id"] for r in records})
        twice = sum(1 for v in sent.values() if v > 1)
        ok = lost == 0 and twice == 0 and len(sent) == n and attempts == {1}
        rows.append(
            Row(
                label,
                f"{n:,} requests, quota {quota:,} tokens",
                s.seconds + d.seconds,
                max(s.rss_mb, d.rss_mb),
                target="nothing lost or sent twice",
                ok=ok,
                note=f"{created} batches created, {refused} refused and requeued; lost {lost}, "
                f"sent twice {twice}, attempts {sorted(attempts)}",
                extra={"records": summary["records"], "created": created, "refused": refused},
            )
        )
    return rows


# ---- report -------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| benchmark | size | hipbatch s | reference s | ratio | peak RSS MB (reference) | target | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ref = f"{r.floor:.2f} ({r.floor_label})" if r.floor else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio else ""
        rss = f"{r.rss_mb:.0f}" if r.rss_mb is not None else ""
        if r.floor_rss_mb is not None:
            rss += f" ({r.floor_rss_mb:.0f})"
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        name = r.name + (f" ({r.note})" if r.note else "")
        seconds = "" if r.note.startswith("MB, not seconds") else f"{r.seconds:.2f}"
        lines.append(f"| {name} | {r.size} | {seconds} | {ref} | {ratio} | {rss} | {r.target} | {met} |")
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    """What the references are, and where the time goes where a target is missed."""
    dry = [r for r in rows if r.name == "submit --dry-run" and r.floor]
    lines = [
        "References: the dry-run floor (`benchmarks/floor_submit.py`) reads the same files and writes "
        "the same request lines (checked byte for byte, apart from the custom_id recipe), escaping each "
        "file's text once and the constant system prompt once; the submit floor (`benchmarks/floor_upload.py`) "
        "writes the same lines into files at the provider's limits (no fsync), then makes the same SDK calls "
        "one after the other (OpenAI `files.create` + `batches.create`, Anthropic one create whose body is "
        "streamed from the file), to the same local server; the collect floor "
        "(`benchmarks/floor_collect.py`) parses each result line, takes the `<prompt>` tag and streams "
        "a JSON array. None keeps a ledger. Every submit run starts on a fresh local server, after the corpus "
        "was read once; hipbatch and the floor run alternately.",
        "",
    ]
    lines += submit_notes(rows)
    if len(dry) >= 2:
        small, large = dry[0], dry[-1]
        assert small.floor and large.floor
        marginal = (large.seconds - small.seconds) / (large.floor - small.floor)
        fixed = small.seconds - small.floor * marginal
        lines.append(
            f"- submit --dry-run: per file, hipbatch costs {marginal:.2f}x the floor (the slope between "
            f"the two sizes); each run also pays about {max(fixed, 0):.1f} s of start-up (Python imports, "
            f"the store, the template), {max(fixed, 0) / small.floor:.0%} of the {small.size.split(' (')[0]} "
            "floor: the gap at the small size, which misses 1.5x whenever that floor runs fast. A dry run "
            "imports no SDK; typer is pinned below 0.29, whose pydantic-based option parsing added 0.3 s to "
            "every command."
        )
    resubmit = next((r for r in rows if r.name.startswith("re-submit") and r.floor), None)
    extra = f" ({resubmit.seconds - resubmit.floor:+.1f} s here)" if resubmit and resubmit.floor else ""
    lines += [
        "- re-submit: the request ids are recomputed from the rendered text, so a re-submit renders and "
        "escapes every file like a dry run, skips writing the JSONL, looks the ids up 500 at a time, "
        f"and also imports the SDK and checks the model with the provider{extra}.",
        "- collect: the floor keeps nothing. hipbatch also checks every download whole before using it "
        "(every line parses and names a custom_id, duplicates agree, the count matches the provider's), "
        "records every reply, its extracted prompt, usage, cost and state in the SQLite ledger and the "
        "request_stats counters, one transaction per batch, then writes the dataset from the ledger. A results "
        "file of 4 MB or more is read in a second process (JSON decode, provider parse, extractor: about 30 us "
        "a line there) while this one stages the rows and applies them 8,000 at a time (one UPDATE ... FROM in "
        "rowid order, about 15 us a line): on 2 cores the reading process is the bottleneck, and each batch "
        "then pays its commit (fsync), its counters and, once, the dataset (about 8 us a record) and the "
        "start-up (about 0.45 s, no SDK imported when nothing is to download). The per-line ceiling is "
        "therefore about 2.5-3x the floor, which does one JSON decode and one regex a line and keeps nothing; "
        "2x would need the extractor and the provider parse in C, or the ledger kept out of the per-result "
        "path (replies appended, state derived), which would cost `--reextract`, `retry` and `cost` working "
        "offline from one table.",
        "- status: the per-job and per-batch figures come from request_stats (counts and sums per job, "
        "model, batch, state, error and method, kept by every writer of the ledger in its own transaction), "
        "so its cost does not grow with the number of requests; the rest is start-up. The table lists "
        "running batches and the latest collected ones (`--all` for every one).",
        "- drain: the quota run starts with no window, so the first submit sends every shard and the "
        "server refuses most; they go back to the queue (attempts stay at 1) and the window then follows "
        "what the server accepted. With `--max-enqueued-tokens` at or under the quota nothing is refused.",
    ]
    missed = [r for r in rows if r.ok is False]
    if missed:
        lines.append("- Missed: " + "; ".join(_miss(r) for r in missed) + ".")
    lines.append("- The machine is shared: the same command varies by 10-20% from run to run." + spread(rows))
    indent = [
        textwrap.fill(line, 110, subsequent_indent="  " if line.startswith("- ") else "", break_on_hyphens=False)
        for line in lines
    ]
    return "\n".join(indent)


def submit_notes(rows: list[Row]) -> list[str]:
    """What submit does beyond the floor, and what it overlaps."""
    if not any(r.name.startswith("submit, ") for r in rows):
        return []
    return [
        "- submit: the shards are sent while the rest renders. A worker thread uploads and creates shard n "
        "(the network waits release the GIL) while the main thread renders and records shard n+1; both reach "
        "the one SQLite connection through a lock, one transaction per call, and every shard keeps its "
        "intent-before-call order. The first shard holds 16 MB and each next one twice the last, up to the "
        "provider's limit, so a job that fits one batch starts sending after 16 MB (10,000 files: 4 batches). "
        "Beyond the floor hipbatch pays start-up (typer, Jinja, sqlite-utils: ~0.25 s), the model check, the "
        "ledger (requests and files rows: ~20 us a request), and an fsync of every shard before it is recorded "
        "(fdatasync in the background every 16 MB while it is written, so the last one is short). On 2 cores "
        "the local server's own work (it parses every line) competes with the render for the second core, so "
        "the overlap is worth less here than against a remote provider.",
        "- Anthropic: the create call's body is streamed from the shard file through the SDK's own client "
        "(`client.post` with an iterable body and its length; same auth, headers and errors) instead of "
        "`messages.batches.create(requests=[...])`, which holds every request parsed and then serialised "
        "again (~1 GB for a shard at the 256 MB limit); shards keep the full 256 MB limit.",
    ]


def spread(rows: list[Row]) -> str:
    """How far apart the runs of each submit measurement were, as measured in this run."""
    parts = []
    for r in rows:
        runs = r.extra.get("hipbatch") if r.extra else None
        if runs and len(runs) > 1:
            parts.append(f"{r.name.split(' (')[0]} {r.size}: {min(runs):.2f}-{max(runs):.2f} s")
    return (" In this run, hipbatch's submits took " + "; ".join(parts) + ".") if parts else ""


def _miss(r: Row) -> str:
    if r.ratio is not None:
        return f"{r.name} on {r.size}, {r.ratio:.2f}x for a target of {r.target}"
    return f"{r.name} on {r.size}, {r.seconds:.2f} s for a target of {r.target}"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}"


def write_readme(text: str) -> None:
    readme = REPO / "README.md"
    body = readme.read_text(encoding="utf-8") if readme.exists() else ""
    start = body.find("## Benchmarks")
    if start == -1:
        body = body.rstrip("\n") + "\n\n## Benchmarks\n\n" + text + "\n"
    else:
        nxt = body.find("\n## ", start + 1)
        body = body[:start] + "## Benchmarks\n\n" + text + "\n" + (body[nxt:] if nxt != -1 else "")
    readme.write_text(body, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--only", action="append", choices=NAMES, help="run only these benchmarks")
    parser.add_argument("--provider", action="append", choices=("openai", "anthropic"), help="submit: only these")
    parser.add_argument("--submit-size", action="append", type=int, help="submit: these sizes (files), not the default")
    parser.add_argument("--repeat", type=int, default=None, help="runs per measurement (best is kept)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--from-json", type=Path, help="measure nothing: report the rows saved by --json")
    parser.add_argument("--readme", action="store_true", help="put the report under '## Benchmarks' in README.md")
    parser.add_argument(
        "--keep", type=Path, help="report with this run the rows of the other benchmarks saved by an earlier --json"
    )
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        header, rows = data["header"], [Row(**r) for r in data["rows"]]
    else:
        header, rows = measure(args)
    if args.keep and not args.from_json:
        header, rows = keep_others(header, rows, json.loads(args.keep.read_text()), set(args.only or NAMES))
    text = header + "\n\n" + table(rows) + "\n\n" + notes(rows)
    print(text)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=2))
    if args.readme:
        write_readme(text)


#: Which benchmark (a --only name) a row comes from, by the start of its name.
ROW_BENCH = (
    ("submit --dry-run", "dry-run"),
    ("peak RSS growth, dry-run", "dry-run"),
    ("peak RSS", "rss"),
    ("submit, ", "submit"),
    ("hipbatch --help", "help"),
    ("submit (first", "resubmit"),
    ("re-submit", "resubmit"),
    ("collect", "collect"),
    ("status", "status"),
    ("cycle", "cycle"),
    ("drain", "drain"),
)


def bench_of(name: str) -> str:
    return next(bench for start, bench in ROW_BENCH if name.startswith(start))


def keep_others(header: str, rows: list[Row], earlier: dict[str, Any], measured: set[str]) -> tuple[str, list[Row]]:
    """This run's rows, and an earlier run's rows of the benchmarks not measured now, in the usual order."""
    kept = [Row(**r) for r in earlier["rows"] if bench_of(r["name"]) not in measured | {"rss"}]
    if not kept:
        return header, rows
    order = ["dry-run", "submit", "help", "resubmit", "rss", "collect", "status", "cycle", "drain"]
    merged = sorted([*rows, *kept], key=lambda r: order.index(bench_of(r.name)))  # stable: each keeps its order
    names = sorted({bench_of(r.name) for r in kept}, key=order.index)
    earlier_header = earlier["header"].rstrip(".")
    return f"{header} Rows of {', '.join(names)}: from an earlier run ({earlier_header}).", merged


def measure(args: argparse.Namespace) -> tuple[str, list[Row]]:
    sizes = SIZES["quick" if args.quick else "full"]
    only = set(args.only or NAMES)
    repeat = args.repeat or (3 if args.quick else 2)
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free / 1e9
    if not args.quick and free < 5:
        sys.exit(f"Error: only {free:.1f} GB free under {CACHE}; the full run needs about 5 GB (or use --quick)")
    rows: list[Row] = []
    dry: dict[int, Row] = {}
    with tempfile.TemporaryDirectory(prefix="hipbatch-bench-") as tmp:
        work = Path(tmp)
        if "dry-run" in only:
            for n in sizes["dry"]:
                dry[n] = bench_dry_run(n, work, repeat)
                rows.append(dry[n])
            small, large = (dry[n] for n in sizes["dry"])
            assert small.rss_mb is not None and large.rss_mb is not None
            growth = large.rss_mb - small.rss_mb
            span = f"{sizes['dry'][0]:,} -> {sizes['dry'][1]:,} files"
            rows.append(
                Row(
                    "peak RSS growth, dry-run",
                    span,
                    0.0,
                    growth,
                    target="nearly flat (< 20 MB)",
                    ok=growth < 20,
                    note="MB, not seconds",
                )
            )
        if "submit" in only:
            for provider in args.provider or ("openai", "anthropic"):
                sub = bench_submit(provider, args.submit_size or sizes["submit"], work, repeat)
                rows += sub
                if len(sub) > 1:
                    rows.append(slope_row(f"submit, {provider}", sub[0], sub[-1]))
        if "help" in only:
            rows.append(bench_help(work, repeat))
        if "resubmit" in only:
            rows += bench_resubmit(sizes["resubmit"], work, repeat, dry.get(sizes["resubmit"]))
        if ("submit" in only and not args.submit_size) or "dry-run" in only:
            rows += rss_rows(rows, sizes["submit"] if "submit" in only else sizes["dry"])
        if "collect" in only:
            rows += collect_rows(sizes["collect"], work, repeat)
        if "status" in only:
            rows += bench_status(sizes["status"], work, repeat)
        if "cycle" in only:
            rows += bench_cycle(sizes["cycle"], work)
        if "drain" in only:
            rows += bench_drain(sizes["drain"], work)
    picked = "".join(f" --only {name}" for name in NAMES if name in only) if args.only else ""
    command = f"python benchmarks/run.py{' --quick' if args.quick else ''}{picked}"
    header = (
        f"`{command}` on {machine()}; best of {repeat} runs (of {max(repeat, 5)} below 100,000 files, where a "
        "run takes seconds), each command in its own process (imports included)."
    )
    return header, rows


if __name__ == "__main__":
    main()
