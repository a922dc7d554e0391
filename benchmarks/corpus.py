"""Generated inputs for the benchmarks: folders of unique .hip files (2-20 KB), cached between runs."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HIPBATCH_BENCH_DIR", "/tmp/hipbatch-bench"))
FORMAT_VERSION = 1  # bump when the generated content changes, so cached folders are rebuilt

_KERNEL = """
// {name}: {comment}
__global__ void {name}(const {t}* __restrict__ in, {t}* __restrict__ out, int n, {t} alpha)
{{
    __shared__ {t} tile[{tile}];
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    int stride = gridDim.x * blockDim.x;
    for (int i = gid; i < n; i += stride) {{
        tile[threadIdx.x % {tile}] = in[i] * alpha + ({t}){k};
        __syncthreads();
        out[i] = tile[(threadIdx.x + {shift}) % {tile}] - in[(i + {shift}) % n];
    }}
}}
"""

_HOST = """
int main_{name}()
{{
    const int n = {n};
    {t} *d_in = nullptr, *d_out = nullptr;
    HIP_CHECK(hipMalloc(&d_in, n * sizeof({t})));
    HIP_CHECK(hipMalloc(&d_out, n * sizeof({t})));
    dim3 block({block});
    dim3 grid((n + block.x - 1) / block.x);
    hipLaunchKernelGGL({name}, grid, block, 0, 0, d_in, d_out, n, ({t}){k});
    HIP_CHECK(hipDeviceSynchronize());
    HIP_CHECK(hipFree(d_in));
    HIP_CHECK(hipFree(d_out));
    return 0;
}}
"""

_WORDS = (
    "scale",
    "shift",
    "tile",
    "reduce",
    "scan",
    "stencil",
    "blend",
    "saxpy",
    "norm",
    "softmax",
    "gather",
    "scatter",
    "histogram",
    "transpose",
    "convolve",
    "filter",
    "pack",
    "unpack",
    "prefix",
    "bitonic",
)


def _seeds() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted((REPO / "examples" / "hip").rglob("*.hip"))]


def hip_source(i: int, seeds: list[str]) -> str:
    """One unique, plausible HIP file of 2-20 KB, the same for the same i."""
    rng = random.Random(i)
    target = rng.randint(2048, 20480)
    parts = [
        f"// generated kernel file {i}\n#include <hip/hip_runtime.h>\n#include <cstdio>\n"
        "#define HIP_CHECK(x) do { hipError_t e = (x); if (e != hipSuccess) { "
        'printf("%s\\n", hipGetErrorString(e)); return 1; } } while (0)\n'
    ]
    size = len(parts[0])
    seed = seeds[i % len(seeds)]
    if size + len(seed) < target:
        parts.append(seed.replace("main(", f"main_seed_{i}("))
        size += len(parts[-1])
    j = 0
    while size < target:
        name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{i}_{j}"
        t = rng.choice(("float", "double", "int"))
        fields = {
            "name": name,
            "t": t,
            "tile": rng.choice((64, 128, 256)),
            "k": rng.randint(1, 99),
            "shift": rng.randint(1, 31),
            "n": rng.choice((1 << 16, 1 << 20, 1000003)),
            "block": rng.choice((128, 256, 512)),
            "comment": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))),
        }
        text = (_KERNEL if j % 2 == 0 else _KERNEL + _HOST).format(**fields)
        parts.append(text[: target - size] if size + len(text) > target + 512 else text)
        size += len(parts[-1])
        j += 1
    return "".join(parts)


def hip_corpus(n: int, per_dir: int = 1000) -> Path:
    """A folder of n generated .hip files in subfolders of per_dir, built once and reused."""
    root = CACHE / f"corpus-{n}"
    marker = root / ".complete"
    meta = {"n": n, "per_dir": per_dir, "version": FORMAT_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return root
    if root.exists():
        shutil.rmtree(root)
    seeds = _seeds()
    for i in range(n):
        sub = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"k{i:07d}.hip").write_text(hip_source(i, seeds), encoding="utf-8")
    marker.write_text(json.dumps(meta))
    return root


def corpus_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.hip"))
