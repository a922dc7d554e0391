"""Time hipbatch.extract.extract over 100,000 mixed replies (the per-result cost inside `collect`).

    python benchmarks/extract_speed.py [--n 100000]

The replies mix the forms real models send (mostly clean tags, then chatter, fences, labels, headings, quotes,
sign-offs, refusals, cut and empty replies) around prompts of realistic length (~80-300 words).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hipbatch.extract import extract  # noqa: E402

WORDS = (
    "kernel launch block grid shared memory tile float array bounds check stride warp reduction atomic host "
    "device copy buffer allocate verify result thread index element size constant loop synchronize"
).split()

FORMS: list[tuple[int, str, str]] = [  # weight, text ({p} = prompt), finish
    (70, "<prompt>{p}</prompt>", "stop"),
    (5, "Sure! Here is the prompt:\n<prompt>{p}</prompt>\nLet me know if you need changes.", "stop"),
    (3, "```\n{p}\n```", "stop"),
    (3, "Sure! Here's the prompt:\n\n```text\n{p}\n```", "stop"),
    (2, "English prompt: {p}", "stop"),
    (2, "## English prompt\n\n{p}", "stop"),
    (2, "{p}", "stop"),
    (2, "Here is the rewritten prompt:\n\n{p}\n\nLet me know if you'd like any changes.", "stop"),
    (2, '"{p}"', "stop"),
    (3, "<prompt>{half}", "length"),
    (2, "", "stop"),
    (1, "I'm sorry, but I can't help with that.", "refusal"),
    (1, "I'm sorry, but I can't help with that.", "stop"),
    (2, "**Prompt**\n{p}", "stop"),
]


def make_replies(n: int, seed: int = 1) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = [w for w, _, _ in FORMS]
    out = []
    for i in range(n):
        words = rng.randint(80, 300)
        p = f"Write a HIP kernel `k{i}` that " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        _, text, finish = rng.choices(FORMS, weights)[0]
        out.append((text.format(p=p, half=p[: len(p) // 2]), finish))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    replies = make_replies(args.n)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        for text, finish in replies:
            extract(text, finish)
        times.append(time.perf_counter() - start)
    best = min(times)
    print(
        f"{args.n} replies: best {best:.3f} s ({best / args.n * 1e6:.2f} us/reply), "
        f"median {statistics.median(times):.3f} s, mean reply {sum(len(t) for t, _ in replies) / args.n:.0f} chars"
    )


if __name__ == "__main__":
    main()
