"""Live mode at 1, 10 and 50 workers against the local batch server with 200 ms per call; prints a table.

Each row runs `hipbatch run` (in-process, through the real OpenAI SDK over 127.0.0.1) on the same folder of
synthetic kernels with a fresh state dir, so every row sends the same requests. One short warm-up run first
pays the SDK's one-time import and model-building cost (about 1 s) so it is not charged to the first row.

Usage: python benchmarks/live_bench.py [--requests 100] [--latency 0.2] [--workers 1,10,50]
       [--rate-limited 0.1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from hipbatch.cli import app
from hipbatch.emulator import EmulatorConfig, LocalBatchServer

KERNEL = """#include <hip/hip_runtime.h>
// benchmark kernel {i}
__global__ void scale_{i}(float* x, int n) {{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) x[idx] = x[idx] * {i}.0f + 1.0f;
}}
"""


def make_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"k{i:05d}.hip").write_text(KERNEL.format(i=i), encoding="utf-8")
    return root


def run_once(folder: Path, state: Path, workers: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    started = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "--state-dir",
            str(state),
            "run",
            str(folder),
            "--max-workers",
            str(workers),
            "--model",
            model,
            "--output-file",
            str(state / "out.json"),
            "--json",
        ],
        catch_exceptions=False,
    )
    total = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"hipbatch run failed ({result.exit_code}): {result.stderr}")
    report = json.loads(result.stdout)
    report["command_s"] = round(total, 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="files (= requests) per row")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per live call")
    parser.add_argument("--workers", default="1,10,50", help="comma-separated --max-workers values")
    parser.add_argument(
        "--rate-limited",
        type=float,
        default=0.0,
        help="also run the largest pool with this share of calls answered 429",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    rows: list[dict[str, Any]] = []
    config = EmulatorConfig(live_latency_s=args.latency, forms="tag")
    with (
        tempfile.TemporaryDirectory(prefix="hipbatch-live-bench-") as tmp,
        LocalBatchServer(port=0, config=config) as server,
    ):
        root = Path(tmp)
        os.environ.update(OPENAI_BASE_URL=server.openai_base_url, OPENAI_API_KEY="bench-key-not-secret")
        os.chdir(root)  # no stray hipbatch.toml is read
        folder = make_folder(root / "kernels", args.requests)
        run_once(make_folder(root / "warmup", 2), root / "state-warmup", 2)
        cases = [(w, 0.0) for w in workers]
        if args.rate_limited:
            cases.append((max(workers), args.rate_limited))
        for i, (w, rate) in enumerate(cases):
            server.config.live_429_rate = rate
            server.config.retry_after_ms = 200
            server.stats.reset()
            report = run_once(folder, root / f"state-{i}", w)
            assert report["succeeded"] == args.requests, report
            assert sum(server.stats.live_calls.values()) == args.requests  # each request answered once
            rows.append(
                {
                    "workers": w,
                    "rate_429": rate,
                    "requests": args.requests,
                    "wall_s": report["wall_s"],
                    "per_second": report["per_second"],
                    "calls": report["calls"],
                    "rate_limited": report["rate_limited"],
                    "paused_s": report["paused_s"],
                    "command_s": report["command_s"],
                }
            )
            print(
                f"  {w} workers{f', {rate:.0%} 429s' if rate else ''}: {report['wall_s']:.2f}s",
                file=sys.stderr,
            )
    base = rows[0]["wall_s"]
    for row in rows:
        row["speedup"] = round(base / row["wall_s"], 1) if row["wall_s"] else None
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.requests} requests, {args.latency * 1000:.0f} ms per live call (local batch server, OpenAI SDK)\n")
    print("| --max-workers | server | live phase | answers/s | speedup | HTTP calls | whole command |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        server_note = (
            f"{row['rate_429']:.0%} of calls 429 ({row['rate_limited']} seen, pool paused {row['paused_s']:.1f}s)"
            if row["rate_429"]
            else "no errors"
        )
        print(
            f"| {row['workers']} | {server_note} | {row['wall_s']:.2f} s | {row['per_second']:.1f} | "
            f"{row['speedup']}x | {row['calls']} | {row['command_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
