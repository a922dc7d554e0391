"""`hipbatch demo`: the first command a new user types must always work, with no key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hipbatch.emulator import EmulatorConfig, LocalBatchServer
from tests.conftest import cli, point_at


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_demo_runs_the_cycle_without_a_key(provider: str, tmp_path: Path) -> None:
    out = cli("demo", "--provider", provider)
    records = json.loads((tmp_path / f"data/demo-{provider}.json").read_text(encoding="utf-8"))
    examples = {
        p.relative_to(Path(__file__).parent.parent / "examples/hip").as_posix()
        for p in (Path(__file__).parent.parent / "examples/hip").rglob("*.hip")
    }
    assert 10 <= len(records) <= len(examples)
    assert {r["file_name"] for r in records} <= examples
    assert all(r["english_prompt"] and r["provider"] == provider for r in records)
    shown = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(shown) == 3 and shown[0]["file_name"] == records[0]["file_name"]


def test_anthropic_status_says_counts_come_at_the_end(hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=3, forms="tag")) as server:
        point_at(server, "anthropic", monkeypatch)
        cli("submit", hip_dir, "--provider", "anthropic")
        out = cli("status")
        assert "? / ? / 6 (counts at end)" in out.stdout
        [batch] = json.loads(cli("status", "--json").stdout)
        assert batch["status"] == "in_progress" and batch["done"] is None and batch["counts_final_only"]


def test_status_table_sums_up_old_collected_batches(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir, "--max-requests-per-batch", "1")
    for i in range(20):
        (hip_dir / f"extra{i}.hip").write_text(f"__global__ void extra{i}() {{}}\n")
    cli("collect")
    cli("submit", hip_dir, "--max-requests-per-batch", "1")  # 26 batches: 6 collected, 20 not yet
    out = cli("status").stdout
    # every running batch is listed, plus the 5 most recent collected ones; the oldest is summed up
    assert "... and 1 older finished and collected batches" in out
    assert out.count("batch_") == 25
    assert cli("status", "--all").stdout.count("batch_") == 26
    assert len(json.loads(cli("status", "--json").stdout)) == 26
