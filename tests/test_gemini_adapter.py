"""The Gemini adapter through the real google-genai SDK against the local server, and its pure mappings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.emulator.fake_model import expected_prompt
from hipbatch.errors import MissingKey, ProviderError, TransientError, UsageError
from hipbatch.poll import Policy, retrying
from hipbatch.providers.base import ProviderSettings, line_id
from hipbatch.providers.gemini import (
    REFUSED_PREFIX,
    STATES,
    Adapter,
    info_of,
    parse_response,
    retry_delay_of,
)
from hipbatch.records import Outcome

TAG = {"hipbatch_shard": "kernels-000001-0123456789ab", "hipbatch_job": "kernels"}
PARAMS = {"max_tokens": 256, "temperature": 0.2}


@pytest.fixture
def adapter(server: LocalBatchServer, monkeypatch: pytest.MonkeyPatch) -> Adapter:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    return Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY", base_url=server.gemini_base_url))


def kernel(i: int) -> str:
    return f"__global__ void k{i}(float* x) {{ x[{i}] *= 2.0f; }}\n"


def write_shard(adapter: Adapter, path: Path, n: int, model: str = "gemini-2.5-flash", tag: str = "") -> Path:
    lines = [adapter.to_line(f"hb-{tag}{i:03d}", model, PARAMS, "You write prompts.", kernel(i)) for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def submit(adapter: Adapter, path: Path, tag: dict[str, str] = TAG) -> Any:
    return adapter.create(path, adapter.upload(path), tag)


# ---- the cycle through the SDK -------------------------------------------------------------------------------


def test_upload_create_status_download_parse(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    server.config.request_error_rate = 0.3
    shard = write_shard(adapter, tmp_path / "s.jsonl", 10)
    file_id = adapter.upload(shard)
    assert file_id is not None and file_id.startswith("files/")
    assert server.gemini.files[file_id.removeprefix("files/")].mime_type == "jsonl"  # given explicitly
    created = adapter.create(shard, file_id, TAG)
    assert (created.status, created.is_final) == ("JOB_STATE_PENDING", False)
    assert created.metadata == {"hipbatch_shard": TAG["hipbatch_shard"]}  # read back from the display name
    assert "/" not in created.id and created.model == "gemini-2.5-flash"
    assert created.expires_at is not None and created.created_at is not None
    assert created.expires_at - created.created_at == 48 * 3600
    info = adapter.status(created.id)
    assert info.status == "JOB_STATE_SUCCEEDED" and info.is_final and info.total == 10
    assert info.done is not None and info.failed is not None and info.done + info.failed == 10 and info.failed > 0
    assert info.output_file_id == f"files/batch-{created.id}"
    dest = tmp_path / "out.jsonl"
    assert adapter.download(info, dest) == 10
    results = {r.custom_id: r for r in (adapter.parse(json.loads(line)) for line in dest.read_text().splitlines())}
    assert set(results) == {f"hb-{i:03d}" for i in range(10)}  # matched by key, whatever the order
    ok = [r for r in results.values() if r.outcome is Outcome.SUCCEEDED]
    bad = [r for r in results.values() if r.outcome is Outcome.ERRORED]
    assert (len(ok), len(bad)) == (info.done, info.failed)
    for r in ok:
        assert r.text == f"<prompt>{expected_prompt(kernel(int(r.custom_id[3:])))}</prompt>" and r.finish == "stop"
        assert r.input_tokens > 0 and r.output_tokens > 0
    assert {r.error_code for r in bad} == {"INTERNAL"}
    assert server.stats.input_tokens == sum(r.input_tokens for r in ok)
    assert server.stats.output_tokens == sum(r.output_tokens for r in ok)  # thinking tokens included


def test_multi_part_replies_are_joined_into_the_exact_prompt(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path
) -> None:
    server.config.forms = "tag"
    shard = write_shard(adapter, tmp_path / "s.jsonl", 3)
    info = adapter.status(submit(adapter, shard).id)
    dest = tmp_path / "out.jsonl"
    adapter.download(info, dest)
    raw = [json.loads(line) for line in dest.read_text().splitlines()]
    assert all(len(r["response"]["candidates"][0]["content"]["parts"]) == 2 for r in raw)
    for line in raw:
        result = adapter.parse(line)
        assert result.text == f"<prompt>{expected_prompt(kernel(int(result.custom_id[3:])))}</prompt>"


def test_find_matches_the_shard_tag_exactly(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 2)
    ours = submit(adapter, shard)
    other = submit(adapter, shard, {"hipbatch_shard": TAG["hipbatch_shard"] + "0", "hipbatch_job": "x"})
    for _ in range(3):
        submit(adapter, shard, {"hipbatch_shard": "someone-else", "hipbatch_job": "y"})
    assert ours.created_at is not None
    found = adapter.find(TAG, ours.created_at, 2)
    assert [b.id for b in found] == [ours.id] and other.id != ours.id
    assert adapter.find(TAG, ours.created_at + 3600, 2) == []  # created long before the intent: not ours


def test_list_pages_through_every_job(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 1)
    made = [submit(adapter, shard).id for _ in range(5)]
    listed = [job.name for job in adapter.client.batches.list(config={"page_size": 2})]
    assert listed == [f"batches/{i}" for i in reversed(made)]  # newest first, across three pages
    assert server.stats.hits["gemini.batches.list"] == 3


def test_delete_hides_a_job_but_does_not_stop_it(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    server.config.polls_to_complete = 5
    created = submit(adapter, write_shard(adapter, tmp_path / "s.jsonl", 3))
    adapter.client.batches.delete(name=f"batches/{created.id}")
    assert list(adapter.client.batches.list()) == []
    assert len(server.stats.answered) == 3  # it still ran, and was billed
    with pytest.raises(ProviderError, match="404"):
        adapter.status(created.id)


def test_cancel_keeps_what_finished(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    server.config.polls_to_complete = 5
    shard = write_shard(adapter, tmp_path / "s.jsonl", 20)
    created = submit(adapter, shard)
    assert adapter.status(created.id).status == "JOB_STATE_RUNNING"
    info = adapter.cancel(created.id)
    assert info.status == "JOB_STATE_CANCELLED" and info.is_final
    assert info.done is not None and info.failed is not None and 0 < info.done + info.failed < 20
    assert adapter.download(info, tmp_path / "out.jsonl") == info.done + info.failed
    again = adapter.cancel(created.id)  # already final: answered with the job as it is
    assert again.status == "JOB_STATE_CANCELLED"


def test_cancel_before_it_ran_leaves_no_results_file(adapter: Adapter, tmp_path: Path) -> None:
    created = submit(adapter, write_shard(adapter, tmp_path / "s.jsonl", 4))
    info = adapter.cancel(created.id)
    assert (info.status, info.output_file_id, info.done, info.failed) == ("JOB_STATE_CANCELLED", None, 0, 0)


@pytest.mark.parametrize(("fraction", "with_file"), [(0.5, True), (1.0, False)])
def test_expired_job_with_and_without_a_results_file(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path, fraction: float, with_file: bool
) -> None:
    server.config.expire_fraction = fraction
    created = submit(adapter, write_shard(adapter, tmp_path / "s.jsonl", 12))
    info = adapter.status(created.id)
    assert info.status == "JOB_STATE_EXPIRED" and info.is_final and info.total == 12
    assert bool(info.output_file_id) is with_file
    assert info.done is not None and (info.done > 0) is with_file and info.done < 12


def test_quota_refusal_creates_nothing_and_reads_as_a_failed_job(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path
) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 4)
    server.config.enqueued_token_limit = 30  # less than one shard
    refused = submit(adapter, shard)
    assert refused.id.startswith(REFUSED_PREFIX) and refused.status == "JOB_STATE_PENDING" and not refused.is_final
    assert server.stats.batches_created == 0 and server.stats.hits["gemini.batches.create"] == 1
    info = adapter.status(refused.id)  # no call: nothing exists at the provider
    assert (info.status, info.is_final) == ("JOB_STATE_FAILED", True)
    assert [e["code"] for e in info.errors] == ["RESOURCE_EXHAUSTED"]
    assert adapter.cancel(refused.id).status == "JOB_STATE_FAILED"
    assert "gemini.batches.get" not in server.stats.hits


def test_an_injected_429_on_create_is_transient_not_a_quota_refusal(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path
) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 2)
    file_id = adapter.upload(shard)
    server.config.fault_routes = ("gemini.batches.create",)
    server.config.fault_kinds = ("429",)
    server.config.fault_rate = 1.0
    with pytest.raises(TransientError, match="429 RESOURCE_EXHAUSTED") as caught:
        adapter.create(shard, file_id, TAG)
    assert caught.value.retry_after == 0.05 and caught.value.status_code == 429


def test_failed_validation_carries_the_reason(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    server.config.validation_error_rate = 1.0
    info = adapter.status(submit(adapter, write_shard(adapter, tmp_path / "s.jsonl", 2)).id)
    assert info.status == "JOB_STATE_FAILED" and info.errors[0]["code"] == "INVALID_ARGUMENT"
    assert "validation" in str(info.errors[0]["message"])


def test_a_file_uploaded_without_the_jsonl_type_is_refused(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path
) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 2)
    uploaded = adapter.client.files.upload(file=str(shard), config={"mime_type": "text/plain"})
    with pytest.raises(ProviderError, match="not JSONL") as caught:
        adapter.create(shard, str(uploaded.name), TAG)
    assert not isinstance(caught.value, TransientError) and caught.value.status_code == 400


# ---- retries, errors, keys ---------------------------------------------------------------------------------------


def test_one_attempt_per_call_and_retry_after_honoured(
    adapter: Adapter, server: LocalBatchServer, tmp_path: Path
) -> None:
    created = submit(adapter, write_shard(adapter, tmp_path / "s.jsonl", 2))
    server.config.fault_routes = ("gemini.batches.get",)
    server.config.fault_kinds = ("429",)
    server.config.fault_rate = 1.0
    server.config.retry_after_ms = 2500
    slept: list[float] = []
    with pytest.raises(TransientError, match="429"):
        retrying(adapter.status, created.id, sleep=slept.append, rule=Policy(attempts=3))
    assert slept == [2.5, 2.5]
    assert server.stats.hits["gemini.batches.get"] == 3  # the SDK itself never retried
    server.config.fault_kinds = ("500",)
    with pytest.raises(TransientError, match="500 INTERNAL"):
        adapter.status(created.id)
    assert server.stats.hits["gemini.batches.get"] == 4


def test_a_dropped_connection_is_transient(adapter: Adapter, server: LocalBatchServer, tmp_path: Path) -> None:
    shard = write_shard(adapter, tmp_path / "s.jsonl", 2)
    server.config.fault_routes = ("gemini.files.upload",)
    server.config.fault_kinds = ("drop",)
    server.config.fault_rate = 1.0
    with pytest.raises(TransientError, match="cannot reach the Gemini API"):
        adapter.upload(shard)
    assert server.stats.hits["gemini.files.upload"] == 1


def test_retry_delay_from_google_retry_info() -> None:
    details = {
        "error": {"code": 429, "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}]}
    }
    assert retry_delay_of(details) == 31.0
    assert retry_delay_of({"error": {"code": 429}}) is None
    assert retry_delay_of(None) is None


def test_a_dead_base_url_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    adapter = Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY", base_url="http://127.0.0.1:9"))
    with pytest.raises(TransientError) as caught:
        adapter.check_model("gemini-2.5-flash")
    assert "http://127.0.0.1:9" in str(caught.value) and "GOOGLE_GEMINI_BASE_URL" in str(caught.value)


def test_model_check_tolerates_a_server_without_the_route(
    adapter: Adapter, server: LocalBatchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UsageError, match="--model unknown-x: the provider does not know this model"):
        adapter.check_model("unknown-x")
    server.config.models_route = False  # the model route is missing, the batch routes are there
    assert "cannot be checked here" in str(adapter.check_model("unknown-x"))
    gateway = Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY", base_url=server.url + "/gateway"))
    with pytest.raises(UsageError, match="no gemini batch API at"):  # no batch routes either: a wrong base URL
        gateway.check_model("unknown-x")
    assert server.stats.hits["unknown"] == 2


def test_keys_come_from_the_environment_google_api_key_first(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY"))
    with pytest.raises(MissingKey, match="GEMINI_API_KEY is not set") as caught:
        adapter.check_key()
    assert "GOOGLE_API_KEY" in str(caught.value)
    monkeypatch.setenv("GEMINI_API_KEY", "gemini")
    assert adapter.api_key() == "gemini"
    monkeypatch.setenv("GOOGLE_API_KEY", "google")
    assert adapter.api_key() == "google"  # as the SDK does when both are set
    custom = Adapter(ProviderSettings(name="gemini", key_env="TEAM_GEMINI_KEY"))
    with pytest.raises(MissingKey, match="TEAM_GEMINI_KEY is not set"):
        custom.check_key()


def test_an_injected_client_replaces_the_lazily_built_one(server: LocalBatchServer) -> None:
    from google import genai
    from google.genai import types

    sdk = genai.Client(api_key="injected", http_options=types.HttpOptions(base_url=server.url, api_version="v1beta"))
    adapter = Adapter(ProviderSettings(name="gemini", key_env="NO_SUCH_VARIABLE"), client=sdk)
    adapter.check_model("gemini-2.5-flash")  # no key in the environment is needed: the client has one
    assert adapter.client is sdk and server.stats.hits["gemini.models.get"] == 1


def test_live_sends_the_batch_request(adapter: Adapter, server: LocalBatchServer) -> None:
    server.config.forms = "tag"
    line = adapter.to_line("hb-live", "gemini-2.5-flash", PARAMS, "You write prompts.", kernel(7))
    result = adapter.live(line)
    assert result.custom_id == "hb-live" and result.outcome is Outcome.SUCCEEDED
    assert result.text == f"<prompt>{expected_prompt(kernel(7))}</prompt>"
    assert sum(server.stats.live_calls.values()) == 1
    assert (server.stats.input_tokens, server.stats.output_tokens) == (result.input_tokens, result.output_tokens)


# ---- pure mappings -----------------------------------------------------------------------------------------


def test_to_line_is_a_rest_generate_content_request() -> None:
    adapter = Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY"))
    params = {"max_tokens": 64, "top_p": 0.9, "stop": "END", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    line = adapter.to_line("hb-1", "gemini-2.5-pro", params, "", "user")
    assert line_id(line) == "hb-1"
    assert line["request"] == {
        "model": "models/gemini-2.5-pro",
        "contents": [{"role": "user", "parts": [{"text": "user"}]}],
        "generationConfig": {
            "maxOutputTokens": 64,
            "topP": 0.9,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object"},
        },
    }


def usage(**counts: int) -> dict[str, Any]:
    return {"usageMetadata": counts}


def test_parse_response_joins_parts_and_maps_finish_and_usage() -> None:
    body = {
        "candidates": [
            {
                "content": {
                    "parts": [{"text": "plan", "thought": True}, {"text": "<prompt>Wr"}, {"text": "ite</prompt>"}]
                },
                "finishReason": "STOP",
            }
        ],
        **usage(promptTokenCount=100, candidatesTokenCount=20, thoughtsTokenCount=30, cachedContentTokenCount=60),
    }
    result = parse_response("k", body)
    assert (result.outcome, result.text, result.finish) == (Outcome.SUCCEEDED, "<prompt>Write</prompt>", "stop")
    assert (result.input_tokens, result.output_tokens, result.cache_read_tokens) == (100, 50, 60)
    cut = parse_response("k", {"candidates": [{"finishReason": "MAX_TOKENS"}], **usage(promptTokenCount=5)})
    assert (cut.outcome, cut.finish, cut.text) == (Outcome.SUCCEEDED, "length", "")
    for finish in ("SAFETY", "RECITATION", "PROHIBITED_CONTENT"):
        blocked = parse_response("k", {"candidates": [{"finishReason": finish}], **usage(promptTokenCount=5)})
        assert (blocked.outcome, blocked.error_code, blocked.input_tokens) == (Outcome.ERRORED, finish, 5)
    empty = parse_response("k", {"candidates": [{"content": {"role": "model"}, "finishReason": "STOP"}]})
    assert (empty.outcome, empty.error_code) == (Outcome.ERRORED, "no_content")
    prompt_blocked = parse_response("k", {"promptFeedback": {"blockReason": "SAFETY"}, **usage(promptTokenCount=9)})
    assert (prompt_blocked.outcome, prompt_blocked.error_code) == (Outcome.ERRORED, "SAFETY")


def test_parse_error_line() -> None:
    adapter = Adapter(ProviderSettings(name="gemini", key_env="GEMINI_API_KEY"))
    result = adapter.parse({"key": "k", "error": {"code": 500, "message": "boom", "status": "INTERNAL"}})
    assert (result.custom_id, result.outcome, result.error_code, result.error_message) == (
        "k",
        Outcome.ERRORED,
        "INTERNAL",
        "boom",
    )


def test_info_of_maps_states_counts_and_errors() -> None:
    base = {"name": "batches/abc", "metadata": {"createTime": "2026-12-01T10:00:00.5Z", "displayName": "x"}}
    for state in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"):
        op = json.loads(json.dumps(base))
        op["metadata"]["state"] = f"BATCH_STATE_{state}"
        info = info_of(op)
        assert info.status == f"JOB_STATE_{state}" and info.status in STATES and info.id == "abc"
        assert info.is_final is (state not in ("PENDING", "RUNNING"))
    done = info_of(
        {
            "name": "batches/abc",
            "metadata": {
                "state": "BATCH_STATE_SUCCEEDED",
                "batchStats": {"requestCount": "5", "successfulRequestCount": "5"},
            },
        }
    )
    assert (done.total, done.done, done.failed) == (5, 5, 0)  # proto3 JSON leaves zero counts out
    failed = info_of(
        {"name": "batches/abc", "metadata": {"state": "BATCH_STATE_FAILED"}, "error": {"code": 8, "message": "quota"}}
    )
    assert failed.errors == [{"code": "RESOURCE_EXHAUSTED", "message": "quota"}]
