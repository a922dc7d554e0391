"""Kill trials: a job of >= 1,000 requests through `hipbatch submit`, `collect` and `retry` in real processes,
each killed with SIGKILL at random moments and rerun, against an in-process local batch server that injects
transport faults on every endpoint. Prints what the server counted: nothing sent twice, nothing lost.

    python benchmarks/kill_trials.py                      # 1,200 files, 30 kills per provider, 10% faults
    python benchmarks/kill_trials.py --files 2000 --kills 50 --provider openai

A kill lands either as the server takes the client's n-th API call (the call is processed, its answer never
read: the "batch accepted, id not saved" window), a random while after the client's first call (inside
SQLite writes, downloads, the dataset write), or at any moment at all (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from hipbatch.emulator import EmulatorConfig
from hipbatch.emulator.config import FAULT_KINDS
from hipbatch.emulator.trap import TrapServer
from hipbatch.store import Store

KERNEL = """#include <hip/hip_runtime.h>
// kernel {i}
__global__ void scale_{i}(float* x, int n) {{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) x[idx] = x[idx] * {i}.0f + 1.0f;
}}
"""


class Runner:
    """Runs hipbatch commands in subprocesses, some of them with a kill trap set."""

    def __init__(self, server: TrapServer, env: dict[str, str], cwd: Path, rng: random.Random) -> None:
        self.server, self.env, self.cwd, self.rng = server, env, cwd, rng
        self.kills: dict[str, int] = {}
        self.runs = 0
        self.failed_runs: list[str] = []  # reruns that exited non-zero (neither killed nor done)
        self.log = cwd / "children.log"

    def run(self, args: list[str], trap_calls: int | None = None) -> tuple[int, str]:
        """(exit code, stdout); -9 when killed. With trap_calls, a kill is set up (see the module doc)."""
        self.runs += 1
        with self.log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hipbatch", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                cwd=self.cwd,
            )
        if trap_calls is not None:
            mode = self.rng.random()
            if mode < 0.45:
                self.server.arm(proc.pid, at_call=self.rng.randint(1, trap_calls))
            elif mode < 0.9:
                self.server.arm(proc.pid, after_first=self.rng.uniform(0.0, 0.5))
            else:
                self.server.arm(proc.pid)
                threading.Timer(self.rng.uniform(0.3, 3.0), self.server.kill, args=(proc.pid,)).start()
        try:
            out, _ = proc.communicate(timeout=900)
        finally:
            self.server.disarm()
        if proc.returncode == -signal.SIGKILL:
            self.kills[args[0]] = self.kills.get(args[0], 0) + 1
        elif proc.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            self.failed_runs.append(f"{args[0]} exit {proc.returncode}: {tail[0][:200]}")
        return proc.returncode, out.decode()

    def finish(self, args: list[str]) -> str:
        """Run to completion (a rerun that fails after all its retries is run again)."""
        for _ in range(5):
            code, out = self.run(args)
            if code == 0:
                return out
        raise SystemExit(f"`hipbatch {' '.join(args)}` kept failing; see {self.log}")


def trial(provider: str, files: int, per_batch: int, kills: int, fault_rate: float, seed: int) -> dict[str, Any]:
    """One provider's run: returns the figures of the table."""
    rng = random.Random(seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"hipbatch-kills-{provider}-") as tmp_name:
        tmp = Path(tmp_name)
        config = EmulatorConfig(
            seed=seed,
            polls_to_complete=3,
            forms="tag",
            request_error_rate=0.02,
            fault_rate=fault_rate,
            fault_kinds=FAULT_KINDS,
        )
        with TrapServer(port=0, config=config) as server:
            ours = ("OPENAI_", "ANTHROPIC_", "HIPBATCH_")
            env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
            env.update(
                HIPBATCH_STATE_DIR=str(tmp / "state"),
                ANTHROPIC_CONFIG_DIR=str(tmp),
                OPENAI_API_KEY="bench-key",
                OPENAI_BASE_URL=server.openai_base_url,
                ANTHROPIC_API_KEY="bench-key",
                ANTHROPIC_BASE_URL=server.anthropic_base_url,
            )
            runner = Runner(server, env, tmp, rng)
            root = tmp / "kernels"
            root.mkdir()
            # About three kills land per round: spread the files so the late rounds still have work.
            step = -(-files // max(-(-kills // 3), 1))
            shards = -(-step // per_batch)  # new shards per round: the range of the n-th-call trap
            collect = ["collect", "--wait", "--poll-interval", "0.05", "--json"]
            plan: list[tuple[list[str], int]] = [
                (
                    ["submit", str(root), "--provider", provider, "--max-requests-per-batch", str(per_batch)],
                    1 + 2 * shards,
                ),
                (collect, 4 * shards),
                (["retry", "--json"], 4),
            ]
            added = 0
            while sum(runner.kills.values()) < kills:
                # Each round adds files, so every submit has new work to be killed in.
                for i in range(added, min(added + step, files)):
                    (root / f"k{i:05d}.hip").write_text(KERNEL.format(i=i), encoding="utf-8")
                added = min(added + step, files)
                for args, calls in plan:
                    for _ in range(2):  # the rerun after a kill may be killed too
                        code, _ = runner.run(args, trap_calls=calls)
                        if code != -signal.SIGKILL:
                            break
                    if code != 0:
                        runner.finish(args)
            for i in range(added, files):
                (root / f"k{i:05d}.hip").write_text(KERNEL.format(i=i), encoding="utf-8")
            runner.finish(plan[0][0])
            summary: dict[str, Any] = json.loads(runner.finish(collect))
            for _ in range(10):  # resend what the provider failed until everything has an answer
                resent = json.loads(runner.finish(["retry", "--json"]))["requests"]
                summary = json.loads(runner.finish(collect))
                if not resent and not summary["pending"] and not summary["failed"]:
                    break
            stats = server.stats
            store = Store(tmp / "state")
            batches = len(store.batches())
            store.close()
            ledger = Database(tmp / "state" / "hipbatch.db")  # the ledger read as it is on disk
            rows = {r["custom_id"]: r for r in ledger.table("requests").rows}
            ledger.close()
            records = json.loads((tmp / "data/generated_prompts.json").read_text(encoding="utf-8"))
    dataset_ids = [r["custom_id"] for r in records]
    over_sent = sum(max(0, stats.sent[cid] - int(row["attempts"])) for cid, row in rows.items())
    over_answered = sum(max(0, n - 1) for n in stats.answered.values())
    paid_unrecorded = sum(1 for cid in stats.answered if rows.get(cid, {}).get("state") != "succeeded")
    return {
        "provider": provider,
        "requests": len(rows),
        "trials": sum(runner.kills.values()),
        "kills": dict(runner.kills),
        "runs": runner.runs,
        "failed_runs": runner.failed_runs,
        "faults": sum(stats.faults.values()),
        "faults_by_kind": dict(stats.faults),
        "sent": sum(stats.sent.values()),
        "resent_failed": sum(int(r["attempts"]) for r in rows.values()) - len(rows),
        "batches": stats.batches_created,
        "orphans": stats.batches_created - batches,
        "duplicates": over_sent + over_answered + (len(dataset_ids) - len(set(dataset_ids))),
        "lost": (files - len(set(dataset_ids))) + paid_unrecorded,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1200, help="requests in the job (default 1200)")
    parser.add_argument("--per-batch", type=int, default=50, help="--max-requests-per-batch (default 50)")
    parser.add_argument("--kills", type=int, default=30, help="SIGKILL trials per provider (default 30)")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="share of HTTP calls faulted (0.1)")
    parser.add_argument("--provider", choices=["openai", "anthropic", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    providers = ["openai", "anthropic"] if args.provider == "both" else [args.provider]
    results = []
    for provider in providers:
        print(
            f"{provider}: {args.files} requests, {args.kills} kills, {args.fault_rate:.0%} faults ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(trial(provider, args.files, args.per_batch, args.kills, args.fault_rate, args.seed))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    head = (
        "provider",
        "requests",
        "trials",
        "faults injected",
        "requests sent",
        "resent (failed)",
        "duplicates",
        "lost",
        "seconds",
    )
    rows = [
        (
            r["provider"],
            r["requests"],
            r["trials"],
            r["faults"],
            r["sent"],
            r["resent_failed"],
            r["duplicates"],
            r["lost"],
            r["seconds"],
        )
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for line in (head, tuple("-" * w for w in widths), *rows):
        print(" | ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))
    for r in results:
        print(
            f"{r['provider']}: kills by command {r['kills']}; faults {r['faults_by_kind']}; "
            f"{r['batches']} batches created, {r['orphans']} unknown to the store; {r['runs']} processes"
        )
    if any(r["duplicates"] or r["lost"] or r["orphans"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
