"""The batch cycle end to end through the CLI, the real SDKs and the local batch server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.emulator.fake_model import expected_prompt
from hipbatch.render import load_template
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

FINAL = {"openai": "completed", "anthropic": "ended", "gemini": "JOB_STATE_SUCCEEDED"}


def user_text(path: Path, root: Path) -> str:
    template = load_template(Path("templates/default"))
    return template.render(path.read_text(encoding="utf-8"), path.relative_to(root).as_posix())[1]


def test_full_cycle_writes_exact_prompts(
    provider: str, server: LocalBatchServer, hip_dir: Path, tmp_path: Path
) -> None:
    out = cli("submit", hip_dir, "--provider", provider)
    assert "6 new requests in 1 shards" in out.stderr
    assert server.stats.batches_created == 1
    status = json.loads(cli("status", "--json").stdout)
    assert [b["status"] for b in status] == [FINAL[provider]]
    assert status[0]["provider"] == provider and status[0]["total"] == 6
    result = cli("collect", "--wait", "--poll-interval", "0.05")
    assert "succeeded 6, failed 0, pending 0" in result.stderr
    records = read_dataset(tmp_path / "data/generated_prompts.json")
    files = sorted(p for p in hip_dir.rglob("*.hip"))
    assert [r["file_name"] for r in records] == sorted(p.relative_to(hip_dir).as_posix() for p in files)
    for record in records:
        source = hip_dir / record["file_name"]
        assert record["english_prompt"] == expected_prompt(user_text(source, hip_dir))
        assert record["provider"] == provider
        assert record["custom_id"].startswith("hb-") and len(record["custom_id"]) <= 64


def test_resubmit_sends_nothing_and_change_sends_one(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir, "--provider", provider)
    uploads, batches = server.stats.files_uploaded, server.stats.batches_created
    again = cli("submit", hip_dir, "--provider", provider)
    assert "Nothing new to send" in again.stderr and "No batch created" in again.stderr
    assert (server.stats.files_uploaded, server.stats.batches_created) == (uploads, batches)
    changed = hip_dir / "k0001.hip"
    changed.write_text(changed.read_text() + "// edited\n", encoding="utf-8")
    sent_before = sum(server.stats.sent.values())
    cli("submit", hip_dir, "--provider", provider)
    assert server.stats.batches_created == batches + 1
    assert sum(server.stats.sent.values()) == sent_before + 1
    cli("collect", "--wait", "--poll-interval", "0.05")
    records = read_dataset(Path("data/generated_prompts.json"))
    assert len(records) == 6  # the edited file appears once, with its new prompt
    edited = next(r for r in records if r["file_name"] == "k0001.hip")
    assert edited["english_prompt"] == expected_prompt(user_text(changed, hip_dir))


def test_model_change_sends_everything_again(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    cli("submit", hip_dir, "--model", "gpt-other")
    assert openai_env.stats.batches_created == 2
    assert sum(openai_env.stats.sent.values()) == 12


def test_collect_twice_is_idempotent(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    cli("collect", "--wait", "--poll-interval", "0.05")
    first = Path("data/generated_prompts.json").read_bytes()
    cli("collect")
    assert Path("data/generated_prompts.json").read_bytes() == first
    assert len(json.loads(first)) == 6


def test_jsonl_format(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    cli("collect", "--wait", "--poll-interval", "0.05", "--format", "jsonl", "--output-file", "out.jsonl")
    lines = Path("out.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and all(json.loads(line)["english_prompt"] for line in lines)


def test_partial_failures_are_recorded_and_left_out(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "many", 40)
    openai_env.config.request_error_rate = 0.3
    cli("submit", root)
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    failed = summary["failed_by_reason"].get("failed:server_error", 0)
    assert 0 < failed < 40
    assert summary["succeeded"] + failed == 40
    assert summary["records"] == summary["succeeded"]
    store = Store(Path("state"))
    rows = list(ledger_db(store).table("requests").rows_where("state = 'failed'"))
    assert len(rows) == failed and all(r["error_message"] for r in rows)


def test_completed_with_only_an_error_file(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.request_error_rate = 1.0
    cli("submit", hip_dir)
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    status = json.loads(cli("status", "--json").stdout)
    assert status[0]["status"] == "completed" and status[0]["failed"] == 6
    assert summary["records"] == 0 and summary["failed"] == 6
    assert json.loads(Path("data/generated_prompts.json").read_text()) == []


def test_mixed_reply_forms_and_reextract(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "mixed", 60)
    openai_env.config.forms = "mixed"
    cli("submit", root)
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    assert summary["succeeded"] + summary["failed"] == 60
    before = Path("data/generated_prompts.json").read_bytes()
    hits = dict(openai_env.stats.hits)
    again = json.loads(cli("collect", "--reextract", "--json").stdout)
    assert dict(openai_env.stats.hits) == hits  # no network at all
    assert sum(again["reextracted"].values()) == 60
    assert Path("data/generated_prompts.json").read_bytes() == before


def test_dry_run_writes_valid_jsonl_without_network_or_key(tmp_path: Path, hip_dir: Path) -> None:
    out = cli("submit", hip_dir, "--dry-run", "--max-requests-per-batch", "4")
    assert "6 requests to send in 2 shards" in out.stderr
    shards = sorted((tmp_path / "state/dry-run").rglob("*.jsonl"))
    lines = [json.loads(line) for s in shards for line in s.read_text().splitlines()]
    assert len(lines) == 6 and len({ln["custom_id"] for ln in lines}) == 6
    assert all(ln["url"] == "/v1/chat/completions" and ln["method"] == "POST" for ln in lines)
    assert Store(tmp_path / "state").request_counts() == {}  # a dry run records nothing


def test_shards_respect_byte_limit(tmp_path: Path, hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hipbatch.providers import openai as adapter

    monkeypatch.setattr(adapter.Adapter, "max_bytes", 9000)  # our own limit constant, not the SDK
    cli("submit", hip_dir, "--dry-run")
    shards = sorted((tmp_path / "state/dry-run").rglob("*.jsonl"))
    assert len(shards) > 1 and all(s.stat().st_size <= 9000 for s in shards)
