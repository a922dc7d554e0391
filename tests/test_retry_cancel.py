"""Expired, cancelled and failed batches keep what was paid for; `retry` sends exactly the rest; `cancel`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hipbatch.cli import app
from hipbatch.emulator import LocalBatchServer
from hipbatch.emulator.fake_model import prompt_tokens
from hipbatch.emulator.openai_api import split_chat_messages
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--json")


def requests_by_state(state_dir: Path = Path("state")) -> dict[str, dict[str, Any]]:
    store = Store(state_dir)
    try:
        return {r["custom_id"]: r for r in ledger_db(store).table("requests").rows}
    finally:
        store.close()


def ids_in(rows: dict[str, dict[str, Any]], state: str) -> set[str]:
    return {cid for cid, r in rows.items() if r["state"] == state}


def test_expiry_keeps_the_done_half_and_retry_sends_exactly_the_rest(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 24)
    server.config.expire_fraction = 0.5
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", "8")
    first = json.loads(cli(*WAIT).stdout)
    rows = requests_by_state()
    done, expired = ids_in(rows, "succeeded"), ids_in(rows, "expired")
    assert done and expired and len(done) + len(expired) == 24
    assert first["records"] == len(done) and first["failed"] == len(expired)
    assert all(reason.startswith("expired") for reason in first["failed_by_reason"])
    assert {r["custom_id"] for r in read_dataset(Path("data/generated_prompts.json"))} == done
    assert all(server.stats.answered[cid] == 1 for cid in done)
    assert not any(server.stats.answered[cid] for cid in expired)  # nothing billed for them

    server.config.expire_fraction = None
    batches_before = server.stats.batches_created
    report = json.loads(cli("retry", "--json").stdout)
    assert report["requests"] == len(expired) and report["selected"] == {"expired": len(expired)}
    assert server.stats.batches_created > batches_before
    assert {cid for cid, n in server.stats.sent.items() if n == 2} == expired  # exactly the rest, once more
    assert all(server.stats.sent[cid] == 1 for cid in done)  # the done half is never resubmitted

    final = json.loads(cli(*WAIT).stdout)
    assert final["succeeded"] == 24 and final["records"] == 24 and final["failed"] == 0
    assert set(server.stats.answered) == done | expired
    assert all(n == 1 for n in server.stats.answered.values())
    rows = requests_by_state()
    assert all(rows[cid]["attempts"] == 1 for cid in done)
    assert all(rows[cid]["attempts"] == 2 for cid in expired)
    again = json.loads(cli("retry", "--json").stdout)  # nothing left without a good answer
    assert again["requests"] == 0 and again["feed"]["created"] == []


def test_validation_failure_marks_requests_retryable_with_the_message(
    openai_env: LocalBatchServer, hip_dir: Path
) -> None:
    openai_env.config.validation_error_rate = 1.0
    cli("submit", hip_dir)
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 0 and summary["failed"] == 6
    rows = requests_by_state()
    assert {r["state"] for r in rows.values()} == {"failed"}
    assert all(
        "failed validation" in r["error_message"] and "invalid_request" in r["error_message"] for r in rows.values()
    )
    assert not openai_env.stats.sent  # a batch refused at validation processed nothing

    openai_env.config.validation_error_rate = 0.0
    report = json.loads(cli("retry", "--only", "failed", "--json").stdout)
    assert report["requests"] == 6
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 6 and summary["records"] == 6


def test_quota_refusal_requeues_without_counting_an_attempt(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    cli("submit", root, "--dry-run", "--max-requests-per-batch", "3")
    per_shard = []
    for shard in sorted((tmp_path / "state/dry-run").rglob("*.jsonl")):
        lines = [json.loads(line) for line in shard.read_text().splitlines()]
        per_shard.append(sum(prompt_tokens(*split_chat_messages(ln["body"]["messages"])) for ln in lines))
    assert len(per_shard) == 2
    # Room for one shard at a time: the second batch is refused while the first is still running.
    openai_env.config.enqueued_token_limit = max(per_shard) + min(per_shard) // 2
    openai_env.config.polls_to_complete = 3
    cli("submit", root, "--max-requests-per-batch", "3")
    assert openai_env.stats.batches_created == 2
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 6 and summary["failed"] == 0
    status = json.loads(cli("status", "--json").stdout)
    assert sorted(b["status"] for b in status) == ["completed", "completed", "failed"]
    rows = requests_by_state()
    assert all(r["attempts"] == 1 for r in rows.values())  # the quota refusal was not the requests' fault
    assert all(n == 1 for n in openai_env.stats.sent.values()) and len(openai_env.stats.sent) == 6


def test_retry_only_and_max_attempts(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 30)
    openai_env.config.request_error_rate = 0.4
    cli("submit", root)
    cli(*WAIT)
    failed = ids_in(requests_by_state(), "failed")
    assert 0 < len(failed) < 30
    sent = dict(openai_env.stats.sent)

    nothing = json.loads(cli("retry", "--only", "expired", "--json").stdout)
    assert nothing["requests"] == 0 and nothing["feed"]["created"] == []
    capped = json.loads(cli("retry", "--max-attempts", "1", "--json").stdout)
    assert capped["requests"] == 0 and capped["skipped_max_attempts"] == len(failed)
    assert dict(openai_env.stats.sent) == sent

    openai_env.config.request_error_rate = 0.0
    out = cli("retry", "--only", "failed", "--only", "truncated", "--max-attempts", "2")
    assert f"Requests to send again: {len(failed)} (failed {len(failed)})" in out.stderr
    assert {cid for cid, n in openai_env.stats.sent.items() if n == 2} == failed
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 30


def test_retry_rejects_an_unknown_reason(tmp_path: Path) -> None:
    result = cli("retry", "--only", "bogus", code=2)
    assert "--only" in result.stderr


def test_retry_resends_the_original_lines(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.request_error_rate = 1.0
    cli("submit", hip_dir)
    cli(*WAIT)
    original = {
        json.loads(line)["custom_id"]: line
        for shard in Path("state/shards").rglob("*.jsonl")
        for line in shard.read_text().splitlines()
    }
    openai_env.config.request_error_rate = 0.0
    cli("retry")
    store = Store(Path("state"))
    retry_shards = [s for s in ledger_db(store).table("shards").rows if "-retry-" in s["key"]]
    assert len(retry_shards) == 1 and retry_shards[0]["n_requests"] == 6
    lines = Path(retry_shards[0]["path"]).read_text().splitlines()
    assert sorted(lines) == sorted(original.values())  # byte for byte the request sent the first time


def test_cancel_all_keeps_partial_results_and_retry_sends_the_rest(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 16)
    server.config.polls_to_complete = 1000
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", "8")
    cli("status")  # the batches start running, so cancelling them leaves work done
    report = json.loads(cli("cancel", "--yes", "--json").stdout)
    assert len(report["cancelled"]) == 2
    # Gemini has no cancelling state: a cancelled job is final at once (what it finished is kept all the same).
    assert {c["status"] for c in report["cancelled"]} <= {"cancelling", "canceling", "JOB_STATE_CANCELLED"}
    summary = json.loads(cli(*WAIT).stdout)
    rows = requests_by_state()
    done, canceled = ids_in(rows, "succeeded"), ids_in(rows, "canceled")
    assert done and canceled and len(done) + len(canceled) == 16
    assert summary["records"] == len(done)  # what finished before the cancel is kept
    assert set(server.stats.answered) == done

    server.config.polls_to_complete = 1
    retried = json.loads(cli("retry", "--only", "canceled", "--json").stdout)
    assert retried["requests"] == len(canceled)
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 16
    assert all(n == 1 for n in server.stats.answered.values()) and len(server.stats.answered) == 16


def test_cancel_takes_unsent_shards_out_of_the_queue(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 9)
    openai_env.config.polls_to_complete = 1000
    out = cli("submit", root, "--max-requests-per-batch", "3", "--max-in-flight-batches", "1")
    assert "2 shard(s) wait in the local queue" in out.stderr
    report = json.loads(cli("cancel", "--yes", "--json").stdout)
    assert report["unqueued_shards"] == 2 and report["unqueued_requests"] == 6
    assert len(report["cancelled"]) == 1
    cli(*WAIT)
    assert openai_env.stats.batches_created == 1  # collect did not send what was cancelled
    assert len(ids_in(requests_by_state(), "canceled")) == 9  # cancelled before it started: nothing done
    openai_env.config.polls_to_complete = 1
    assert json.loads(cli("retry", "--json").stdout)["requests"] == 9
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 9


def test_cancel_asks_first_and_names_unknown_ids(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.polls_to_complete = 1000
    cli("submit", hip_dir)
    result = CliRunner().invoke(app, ["cancel"], input="n\n")
    assert result.exit_code == 1 and "Cancel 1 unfinished batch(es)?" in result.stderr
    assert json.loads(cli("status", "--json").stdout)[0]["status"] == "in_progress"  # nothing was cancelled
    result = cli("cancel", "batch_nope", code=2)
    assert "Error: BATCH_ID batch_nope" in result.stderr
    batch_id = json.loads(cli("status", "--json").stdout)[0]["batch_id"]
    result = CliRunner().invoke(app, ["cancel", batch_id])  # named ids need no confirmation
    assert result.exit_code == 0 and f"Cancel requested: {batch_id}" in result.stderr
    cli(*WAIT)
    again = cli("cancel", batch_id)
    assert "Already finished" in again.stderr
    assert "Nothing to cancel" in cli("cancel").stderr


@pytest.mark.parametrize("command", ["retry", "cancel"])
def test_help_has_an_example(command: str) -> None:
    assert "Example:" in cli(command, "--help").stdout
