"""State dirs for the benchmarks, built through hipbatch's own Store (cached where slow to build).

- collect_state(n): one job of n requests in batches of 50,000 that have finished, with their output files
  (OpenAI format, fake-model replies in <prompt> tags) already downloaded into results/: what `collect` finds
  after a download, so it measures reading, extracting, recording and writing the dataset.
- status_state(n): a store of n requests in shards of 10,000, every batch finished and collected, with a mix
  of final states: what `status` finds on a large, long-running project.
- small_corpus(n): n small unique .hip files (a few hundred bytes) for runs through the emulator.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

from corpus import CACHE

from hipbatch import cost
from hipbatch.config import load_config
from hipbatch.emulator import fake_model
from hipbatch.emulator.openai_api import _result_line, chat_completion_body
from hipbatch.records import BatchInfo, ShardRow
from hipbatch.render import load_template
from hipbatch.store import Store

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"
FIXTURE_VERSION = 5  # 4: stores with m007 (request_stats); 5: 16 KB pages

SMALL_KERNEL = """#include <hip/hip_runtime.h>
// benchmark kernel {i}
__global__ void scale_{i}(float* x, int n) {{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) x[idx] = x[idx] * {i}.0f + 1.0f;
}}
"""


def _cid(i: int, salt: str) -> str:
    return "hb-" + hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:48]


def _name(i: int) -> str:
    return f"d{i // 1000:04d}/k{i:07d}.hip"


def _fill(store: Store, job: str, n: int, per_shard: int, salt: str) -> list[tuple[ShardRow, int]]:
    """n requests of job in shards of per_shard, each in a provider batch; returns (shard, first index)."""
    template = load_template(REPO / "templates" / "default")
    store.upsert_job(job, provider="openai", model=MODEL, input_dir="/nonexistent", template_dir=str(template.path))
    stamp = 1.0
    store.record_files(
        ({"job": job, "file_name": _name(i), "custom_id": _cid(i, salt), "skip_reason": None} for i in range(n)),
        stamp,
    )
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        stop = min(n, start + per_shard)
        rows = (
            {
                "custom_id": _cid(i, salt),
                "job": job,
                "file_name": _name(i),
                "provider": "openai",
                "model": MODEL,
                "endpoint": "/v1/chat/completions",
                "est_input_tokens": 1500,
                "max_tokens": 1024,
            }
            for i in range(start, stop)
        )
        key = f"{job}-{k:06d}"
        shard_id = store.add_shard(
            {
                "key": key,
                "job": job,
                "provider": "openai",
                "model": MODEL,
                "endpoint": "/v1/chat/completions",
                "path": f"/nonexistent/{key}.jsonl",
                "n_requests": stop - start,
                "n_bytes": 0,
                "est_tokens": 1500 * (stop - start),
            },
            rows,
        )
        shard = store.shard(shard_id)
        batch_id = f"batch_{salt}{k:06d}"
        store.attach_batch(
            shard,
            BatchInfo(
                id=batch_id,
                status="in_progress",
                is_final=False,
                total=stop - start,
                done=0,
                failed=0,
                created_at=1_700_000_000.0 + k,
            ),
        )
        store.update_batch(
            BatchInfo(
                id=batch_id,
                status="completed",
                is_final=True,
                total=stop - start,
                done=stop - start,
                failed=0,
                output_file_id=f"file-{salt}{k:06d}",
            )
        )
        shards.append((store.shard(shard_id), start))
    cost.settle(store, cost.load_prices(load_config(None)))  # as submit does: each request's worst-case cost
    return shards


def collect_state(n: int) -> Path:
    """A pristine state dir for the collect benchmark (copy it before use: collect changes it)."""
    root = CACHE / f"collect-{n}-v{FIXTURE_VERSION}"
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    store = Store(root)
    shards = _fill(store, "bench", n, 50_000, "c")
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    template = load_template(REPO / "templates" / "default")
    for k, (shard, start) in enumerate(shards):
        batch_id = shard.batch_id
        lines = []
        for i in range(start, start + shard.n_requests):
            system, user = template.render(SMALL_KERNEL.format(i=i), _name(i))
            answer = fake_model.reply(system, user, 1024, forms="tag")
            lines.append(
                json.dumps(
                    _result_line(
                        _cid(i, "c"),
                        {
                            "status_code": 200,
                            "request_id": f"req_{i}",
                            "body": chat_completion_body(MODEL, answer),
                        },
                    )
                )
            )
        random.Random(k).shuffle(lines)  # results come in any order, as from the providers (and the emulator)
        (results / f"{batch_id}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    store.close()
    (root / ".complete").write_text("ok")
    return root


def status_state(n: int) -> Path:
    """A state dir of n requests, all batches finished and collected (status reads it, changes nothing)."""
    root = CACHE / f"status-{n}-v{FIXTURE_VERSION}"
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    store = Store(root)
    shards = _fill(store, "bench", n, 10_000, "s")
    # Outcomes as collect would leave them: mostly answers, some failures and expiries.
    for k, (shard, _) in enumerate(shards):
        rows = [
            {
                "custom_id": cid,
                "state": "succeeded" if j % 20 else ("failed" if k % 2 else "expired"),
                "prompt": "Write a HIP kernel that scales a vector." if j % 20 else None,
                "input_tokens": 1500,
                "output_tokens": 200,
            }
            for j, cid in enumerate(sorted(store.batch_request_ids(shard.batch_id)))
        ]
        store.save_results(rows, keep_success=False)
        store.mark_collected(shard.batch_id)
    cost.settle(store, cost.load_prices(load_config(None)))  # as collect does: the cost of the answers
    store.close()
    (root / ".complete").write_text("ok")
    return root


def small_corpus(n: int) -> Path:
    """n small unique .hip files, built once."""
    root = CACHE / f"small-{n}"
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        path = root / _name(i)
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SMALL_KERNEL.format(i=i), encoding="utf-8")
    (root / ".complete").write_text("ok")
    return root
