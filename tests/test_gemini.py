"""`--provider gemini` end to end: the CLI, the real google-genai SDK and the local server's Gemini Batch Mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hipbatch.emulator import EmulatorConfig, LocalBatchServer
from hipbatch.emulator.fake_model import expected_prompt
from hipbatch.emulator.trap import TrapServer
from hipbatch.render import REPO_ROOT, load_template
from hipbatch.store import Store
from hipbatch.submit import feed
from tests.conftest import cli, make_hip_dir, needs_gemini_port, point_at, read_dataset
from tests.test_crash import Killed, assert_nothing_lost_nothing_twice, crashing, ledger, prepare_only

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--json")
GEMINI = ("--provider", "gemini")

needs_port = needs_gemini_port


@pytest.fixture
def gemini(server: LocalBatchServer, monkeypatch: pytest.MonkeyPatch) -> LocalBatchServer:
    point_at(server, "gemini", monkeypatch)
    return server


def user_text(path: Path, root: Path) -> str:
    template = load_template(Path("templates/default"))
    return template.render(path.read_text(encoding="utf-8"), path.relative_to(root).as_posix())[1]


def assert_exact_dataset(root: Path) -> list[dict[str, Any]]:
    records = read_dataset(Path("data/generated_prompts.json"))
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.hip"))
    assert [r["file_name"] for r in records] == files
    for record in records:
        assert record["english_prompt"] == expected_prompt(user_text(root / record["file_name"], root))
        assert (record["provider"], record["model"]) == ("gemini", "gemini-2.5-flash")
    return records


def real_kernels(root: Path, n: int) -> Path:
    """n files made of the bundled real kernels, each copy with its own one-line variant comment."""
    sources = sorted((REPO_ROOT / "examples" / "hip").rglob("*.hip"))
    root.mkdir(parents=True)
    for i in range(n):
        src = sources[i % len(sources)]
        text = src.read_text(encoding="utf-8") + f"\n// variant {i // len(sources)}\n"
        (root / f"{i:03d}_{src.name}").write_text(text, encoding="utf-8")
    return root


# ---- the cycle ------------------------------------------------------------------------------------------------


def test_cycle_on_80_real_kernels_writes_an_exact_dataset_and_a_second_submit_sends_nothing(
    gemini: LocalBatchServer, tmp_path: Path
) -> None:
    root = real_kernels(tmp_path / "kernels", 80)
    out = cli("submit", root, *GEMINI, "--max-requests-per-batch", "30")
    assert "80 new requests in 3 shards" in out.stderr
    assert gemini.stats.batches_created_by_provider == {"gemini": 3} and gemini.stats.files_uploaded == 3
    status = json.loads(cli("status", "--json").stdout)
    assert {b["status"] for b in status} == {"JOB_STATE_SUCCEEDED"} and sum(b["total"] for b in status) == 80
    summary = json.loads(cli(*WAIT).stdout)
    assert (summary["succeeded"], summary["records"], summary["pending"]) == (80, 80, 0)
    assert_exact_dataset(root)
    hits = Counter(gemini.stats.hits)
    again = cli("submit", root, *GEMINI)
    assert "Nothing new to send" in again.stderr
    assert Counter(gemini.stats.hits) - hits == Counter({"gemini.models.get": 1})  # the model check, nothing else
    assert gemini.stats.batches_created == 3 and gemini.stats.files_uploaded == 3
    assert set(gemini.stats.sent.values()) == {1} and len(gemini.stats.sent) == 80


def test_the_request_carries_the_model_and_generation_config(gemini: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir, *GEMINI, "--model", "gemini-2.5-flash-lite")
    shard = next((Path("state") / "shards").rglob("*.jsonl"))
    line = json.loads(shard.read_text().splitlines()[0])
    assert set(line) == {"key", "request"} and line["key"].startswith("hb-")
    request = line["request"]
    assert request["model"] == "models/gemini-2.5-flash-lite"
    assert request["generationConfig"] == {"maxOutputTokens": 1024, "temperature": 0.2}
    assert request["systemInstruction"]["parts"][0]["text"] and request["contents"][0]["role"] == "user"
    cli(*WAIT)
    records = read_dataset(Path("data/generated_prompts.json"))
    assert {r["model"] for r in records} == {"gemini-2.5-flash-lite"} and len(records) == 6


def test_reply_forms_map_to_states(gemini: LocalBatchServer, tmp_path: Path) -> None:
    root = tmp_path / "forms"
    root.mkdir()
    forms = {"tag": "succeeded", "truncated": "truncated", "refusal": "failed", "empty": "failed", "bare": "succeeded"}
    for form in forms:
        (root / f"{form}.hip").write_text(
            f"// hipbatch-emulator: form={form}\n__global__ void {form}_k(float* x) {{ x[0] = 1; }}\n"
        )
    cli("submit", root, *GEMINI)
    cli(*WAIT)
    rows = {Path(r["file_name"]).stem: r for r in ledger().values()}
    assert {name: rows[name]["state"] for name in forms} == forms
    assert rows["refusal"]["error_code"] == "SAFETY" and rows["empty"]["error_code"] == "no_content"
    assert rows["truncated"]["finish"] == "length"
    assert all(rows[name]["input_tokens"] > 0 for name in forms)  # billed either way


# ---- crashes and orphans --------------------------------------------------------------------------------------


def test_orphan_found_by_display_name_among_other_jobs(gemini: LocalBatchServer, tmp_path: Path) -> None:
    from google import genai
    from google.genai import types

    root = make_hip_dir(tmp_path / "kernels", 8)
    prepare_only(root, "gemini", 4)
    store = Store(Path("state"))
    with pytest.raises(Killed):
        feed(store, crashing("before_create"))
    shard = store.shards_in_states(["creating"])[0]
    store.close()
    sdk = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=gemini.url, api_version="v1beta"))
    uploaded = sdk.files.upload(file=shard.path, config={"mime_type": "jsonl"})
    model = "models/gemini-2.5-flash"
    other = sdk.batches.create(model=model, src=str(uploaded.name), config={"display_name": "someone-else"})
    ours = sdk.batches.create(
        model=model, src=str(uploaded.name), config={"display_name": f"hipbatch_shard={shard.key}"}
    )
    cli("status")  # finishes the interrupted submit: adopts ours, leaves the other tool's job alone
    store = Store(Path("state"))
    assert {f"batches/{b.id}" for b in store.batches()} == {ours.name}
    store.close()
    cli("submit", root, *GEMINI)
    assert gemini.stats.batches_created == 3 and other.name != ours.name
    cli(*WAIT)
    for cid, row in ledger().items():
        assert row["state"] == "succeeded" and row["attempts"] == 1 and gemini.stats.answered[cid] == 1


def test_sigkill_right_after_the_job_is_created_then_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_hip_dir(tmp_path / "kernels", 5)
    with TrapServer(port=0, config=EmulatorConfig(forms="tag")) as server:
        point_at(server, "gemini", monkeypatch)
        proc = subprocess.Popen(
            [sys.executable, "-m", "hipbatch", "submit", str(root), *GEMINI],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ),
        )
        # Calls: models.get, upload start, upload chunk, create. The 4th is processed, then the client dies.
        server.arm(proc.pid, at_call=4)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -9, err.decode()[-2000:]
        assert server.stats.batches_created == 1 and server.stats.hits["gemini.batches.create"] == 1
        out = cli("submit", root, *GEMINI)
        assert "Adopted 1 batch(es)" in out.stderr
        assert server.stats.batches_created == 1  # found through batches.list, never created twice
        assert json.loads(cli(*WAIT).stdout)["succeeded"] == 5
        assert_nothing_lost_nothing_twice(server, 5)


# ---- faults ---------------------------------------------------------------------------------------------------


def test_create_refused_with_5xx_and_429_is_retried(gemini: LocalBatchServer, hip_dir: Path) -> None:
    gemini.config.fault_routes = ("gemini.batches.create", "gemini.files.upload")
    gemini.config.fault_kinds = ("500", "429")
    gemini.config.fault_rate = 0.5
    cli("submit", hip_dir, *GEMINI, "--max-requests-per-batch", "2")
    assert gemini.stats.batches_created == 3 and sum(gemini.stats.faults.values()) > 0
    gemini.config.fault_rate = 0.0
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 6
    assert_nothing_lost_nothing_twice(gemini, 6)


def test_failed_status_check_names_a_dead_base_url(
    gemini: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gemini.config.polls_to_complete = 3
    cli("submit", hip_dir, *GEMINI)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    out = cli("status", "--json")
    assert "status check failed" in out.stderr
    assert "http://127.0.0.1:9" in out.stderr and "GOOGLE_GEMINI_BASE_URL" in out.stderr
    [batch] = json.loads(out.stdout)
    assert batch["status"] == "JOB_STATE_PENDING" and not batch["is_final"]


# ---- keys and models ----------------------------------------------------------------------------------------


def test_no_key_names_gemini_api_key(server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.gemini_base_url)
    out = cli("submit", hip_dir, *GEMINI, code=2)
    assert "GEMINI_API_KEY is not set" in out.stderr and "Traceback" not in out.stderr
    assert sum(server.stats.hits.values()) == 0
    assert not (Path("state") / "shards").exists()


def test_google_api_key_works_alone(server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.gemini_base_url)
    monkeypatch.setenv("GOOGLE_API_KEY", "google-key")
    cli("submit", hip_dir, *GEMINI)
    assert server.stats.batches_created == 1


def test_unknown_model_is_refused_before_anything_is_sent(gemini: LocalBatchServer, hip_dir: Path) -> None:
    out = cli("submit", hip_dir, *GEMINI, "--model", "unknown-model-9", code=2)
    assert "--model unknown-model-9" in out.stderr and "does not know" in out.stderr
    assert gemini.stats.files_uploaded == 0 and gemini.stats.batches_created == 0


def test_a_rejected_key_is_one_line_naming_the_variable(
    gemini: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "invalid-key-123")  # the local server refuses keys named invalid*
    out = cli("submit", hip_dir, *GEMINI, code=1)
    assert "GEMINI_API_KEY" in out.stderr and "rejected the API key" in out.stderr
    assert "Traceback" not in out.stderr and "invalid-key-123" not in out.stderr
    assert gemini.stats.files_uploaded == 0


# ---- live, demo, cost ---------------------------------------------------------------------------------------


def test_live_run_then_batch_sends_each_request_once(gemini: LocalBatchServer, hip_dir: Path) -> None:
    first = json.loads(cli("run", hip_dir, *GEMINI, "--limit", "2", "--json").stdout)
    assert (first["succeeded"], first["records"]) == (2, 2)
    assert sum(gemini.stats.live_calls.values()) == 2 and gemini.stats.batches_created == 0
    submitted = json.loads(cli("submit", hip_dir, *GEMINI, "--json").stdout)
    assert submitted["prepare"]["new"] == 4 and submitted["prepare"]["known"] == 2
    cli(*WAIT)
    records = assert_exact_dataset(hip_dir)
    assert sorted(r["via"] for r in records) == ["batch"] * 4 + ["live"] * 2


def test_live_429s_and_faults_are_retried_and_each_request_answered_once(
    gemini: LocalBatchServer, tmp_path: Path
) -> None:
    gemini.config.live_429_rate = 0.3
    gemini.config.retry_after_ms = 20
    gemini.config.update(
        {"fault_rate": 0.2, "fault_kinds": ["500", "drop"], "fault_routes": ["gemini.generate_content"]}
    )
    root = make_hip_dir(tmp_path / "kernels", 16)
    report = json.loads(cli("run", root, *GEMINI, "--max-workers", "4", "--json").stdout)
    faults = gemini.stats.faults
    assert report["succeeded"] == 16 and report["left"] == 0
    assert faults["live_429"] >= 1 and report["rate_limited"] == faults["live_429"]
    assert report["calls"] == 16 + sum(faults.values())
    assert set(gemini.stats.live_calls.values()) == {1} and len(gemini.stats.live_calls) == 16
    assert_exact_dataset(root)


def test_cost_ledger_matches_what_the_server_billed_with_cache_and_thinking(
    gemini: LocalBatchServer, tmp_path: Path
) -> None:
    template = tmp_path / "long"
    shutil.copytree(REPO_ROOT / "templates" / "default", template)
    system = (template / "system.j2").read_text(encoding="utf-8")
    (template / "system.j2").write_text(system + "\n" + "Keep the prompt precise and self-contained. " * 200)
    root = make_hip_dir(tmp_path / "kernels", 8)
    cli("submit", root, *GEMINI, "--template-dir", template, "--max-requests-per-batch", "4")
    cli(*WAIT)
    led = json.loads(cli("cost", "--json").stdout)
    s = gemini.stats
    billed = {
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "cache_read_tokens": s.cache_read_tokens,
    }
    assert {k: led["total"][k] for k in billed} == billed
    assert s.cache_read_tokens > 0 and s.output_tokens > 0
    from hipbatch.cost import load_prices

    price = load_prices().lookup("gemini", "gemini-2.5-flash")
    assert price is not None and price.input_includes_cache
    expected = price.cost(s.input_tokens, s.output_tokens, s.cache_read_tokens)
    assert led["total"]["cost_usd"] == pytest.approx(expected, abs=5e-7)  # the JSON rounds to 6 places
    live = price.cost(s.input_tokens, s.output_tokens, s.cache_read_tokens, live=True)
    assert live == pytest.approx(2 * expected)


def test_max_enqueued_tokens_from_the_config_keeps_refusals_away(gemini: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 12)
    cli("submit", root, *GEMINI, "--max-requests-per-batch", "4", "--dry-run")
    per_shard = _shard_tokens(root)
    gemini.config.enqueued_token_limit = int(per_shard * 1.5)  # the server's quota: one shard at a time
    dry = json.loads(cli("submit", root, *GEMINI, "--dry-run", "--max-requests-per-batch", "4", "--json").stdout)
    estimate = dry["prepare"]["est_input_tokens"] / 3  # hipbatch's own estimate of one shard
    Path("hipbatch.toml").write_text(f"[providers.gemini]\nmax_enqueued_tokens = {int(estimate * 1.5)}\n")
    gemini.config.polls_to_complete = 2
    out = cli("submit", root, *GEMINI, "--max-requests-per-batch", "4")
    assert "2 shard(s) wait in the local queue" in out.stderr
    assert gemini.stats.hits["gemini.batches.create"] == 1  # the others were never sent to be refused
    cli("drain", "--poll-interval", "0.02")
    assert gemini.stats.hits["gemini.batches.create"] == gemini.stats.batches_created == 3
    assert_exact_dataset(root)
    rows = ledger()
    assert {r["state"] for r in rows.values()} == {"succeeded"} and {r["attempts"] for r in rows.values()} == {1}


# ---- expiry, cancel, quota: these need collect to know the JOB_STATE_* words -------------------------------------


@needs_port
def test_expired_job_keeps_its_answers_and_retry_sends_the_rest(gemini: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 20)
    gemini.config.expire_fraction = 0.5
    cli("submit", root, *GEMINI)
    summary = json.loads(cli(*WAIT).stdout)
    expired = summary["failed_by_reason"].get("expired", 0)
    assert 0 < expired < 20 and summary["succeeded"] + expired == 20
    assert json.loads(cli("status", "--json").stdout)[0]["status"] == "JOB_STATE_EXPIRED"
    gemini.config.expire_fraction = None
    cli("retry", "--only", "expired")
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 20
    assert_nothing_lost_nothing_twice(gemini, 20)


@needs_port
def test_expired_job_without_a_results_file(gemini: LocalBatchServer, hip_dir: Path) -> None:
    gemini.config.expire_fraction = 1.0  # nothing ran: the job has no responses file at all
    cli("submit", hip_dir, *GEMINI)
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["failed_by_reason"] == {"expired": 6} and gemini.stats.hits["gemini.files.download"] == 0
    gemini.config.expire_fraction = None
    cli("retry", "--only", "expired")
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 6
    assert_nothing_lost_nothing_twice(gemini, 6)


@needs_port
def test_cancel_keeps_what_finished_and_retry_sends_the_rest(gemini: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 20)
    gemini.config.polls_to_complete = 5
    cli("submit", root, *GEMINI)
    cli("status")  # one poll: the job is running
    cli("cancel", "--yes")
    status = json.loads(cli("status", "--json").stdout)[0]
    assert status["status"] == "JOB_STATE_CANCELLED"
    summary = json.loads(cli(*WAIT).stdout)
    canceled = summary["failed_by_reason"].get("canceled", 0)
    assert 0 < canceled < 20 and summary["succeeded"] + canceled == 20
    cli("retry", "--only", "canceled")
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 20
    assert_nothing_lost_nothing_twice(gemini, 20)


@needs_port
def test_quota_refusal_puts_the_shard_back_without_counting_an_attempt(
    gemini: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 12)
    gemini.config.polls_to_complete = 2
    cli("submit", root, *GEMINI, "--max-requests-per-batch", "4", "--dry-run")
    shard_tokens = _shard_tokens(root)
    gemini.config.enqueued_token_limit = shard_tokens + shard_tokens // 2  # one shard at a time
    out = cli("submit", root, *GEMINI, "--max-requests-per-batch", "4")
    assert gemini.stats.batches_created == 1 and "Created 3 batch(es)" in out.stderr  # two refused
    cli("drain", "--poll-interval", "0.02")
    assert gemini.stats.batches_created == 3
    rows = ledger()
    assert {r["state"] for r in rows.values()} == {"succeeded"} and {r["attempts"] for r in rows.values()} == {1}


def _shard_tokens(root: Path) -> int:
    from hipbatch.emulator import fake_model

    shard = sorted((Path("state") / "dry-run").rglob("*.jsonl"))[0]
    total = 0
    for raw in shard.read_text(encoding="utf-8").splitlines():
        request = json.loads(raw)["request"]
        system = request.get("systemInstruction", {}).get("parts", [{}])[0].get("text", "")
        user = request["contents"][0]["parts"][0]["text"]
        total += fake_model.prompt_tokens(system, user)
    return total
