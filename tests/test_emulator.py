"""The local batch server, driven by the real openai and anthropic SDKs over a socket on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import anthropic
import httpx2
import openai
import pytest
from anthropic.types.messages.batch_create_params import Request

from hipbatch.emulator import EmulatorConfig, LocalBatchServer
from hipbatch.emulator import fake_model as fm
from hipbatch.emulator.common import live_key
from tests.conftest import cli

CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
SYSTEM = "You turn HIP kernels into English prompts. Answer inside <prompt> tags."
ServerFactory = Callable[..., LocalBatchServer]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    config_dir = tmp_path / "anthropic-config"
    config_dir.mkdir()
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(config_dir))


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    servers: list[LocalBatchServer] = []

    def make(control: bool = True, **config: Any) -> LocalBatchServer:
        server = LocalBatchServer(port=0, config=EmulatorConfig(**config), control=control).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def oai(server: LocalBatchServer, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=server.openai_base_url, max_retries=max_retries)


def ant(server: LocalBatchServer, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test", base_url=server.anthropic_base_url, max_retries=max_retries)


def kernel(name: str, form: str | None = None) -> str:
    marker = f"// hipbatch-emulator: form={form}\n" if form else ""
    return f"{marker}__global__ void {name}(float* x, int n) {{ x[threadIdx.x] *= 2.0f; }}\n"


def chat_line(custom_id: str, user: str, model: str = "gpt-emu", url: str = CHAT, **body: Any) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": url,
            "body": {"model": model, "messages": messages, "max_completion_tokens": 400, **body},
        }
    )


def submit(client: openai.OpenAI, lines: list[str], **create: Any) -> openai.types.Batch:
    data = ("\n".join(lines) + "\n").encode()
    uploaded = client.files.create(file=("input.jsonl", data, "application/jsonl"), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", **create)


def poll(client: openai.OpenAI, batch_id: str, final: tuple[str, ...] = ("completed",)) -> openai.types.Batch:
    for _ in range(20):
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            assert batch.status in final
            return batch
    raise AssertionError("batch never finished")


def read_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if not file_id:
        return {}
    text = client.files.content(file_id).text
    assert text.endswith("\n") and "\n\n" not in text and "\r" not in text
    return {line["custom_id"]: line for line in map(json.loads, text.splitlines())}


def anthropic_request(custom_id: str, user: str, model: str = "claude-emu", **params: Any) -> Request:
    request = {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 400,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": user}],
            **params,
        },
    }
    return cast(Request, request)


def results_by_id(client: anthropic.Anthropic, batch_id: str) -> dict[str, Any]:
    return {line.custom_id: line.result for line in client.messages.batches.results(batch_id)}


# ---- fake model -------------------------------------------------------------------------------------------


def test_fake_model_prompt_forms_and_tokens() -> None:
    assert fm.count_tokens("x[i] = a*b;") == 9
    code = "template <int N>\n__global__ void __launch_bounds__(256) saxpy(float a) {}\n__global__ void k2() {}"
    prompt = fm.expected_prompt(code)
    assert prompt.startswith("Write a HIP kernel named `saxpy` together with the kernel(s) `k2`")
    assert fm.fingerprint(code) in prompt and "\n" not in prompt and "<" not in prompt and ">" not in prompt
    assert fm.expected_prompt("int main() { return 0; }").startswith("Write a HIP host program")
    assert fm.expected_prompt(code + " ") != prompt

    assert fm.choose_form("hipbatch-emulator: form=fenced\n" + code, "tag") == "fenced"
    assert fm.choose_form(code, "label") == "label"
    counts = Counter(fm.choose_form(f"__global__ void k{i}() {{}}", "mixed", seed=7) for i in range(4000))
    assert set(counts) == set(fm.FORMS)
    assert 0.66 < counts["tag"] / 4000 < 0.74 and counts["refusal"] < counts["empty"] < counts["truncated"]
    assert fm.choose_form(code, seed=1) == fm.choose_form(code, seed=1)

    p = fm.expected_prompt(code)
    assert fm.reply("", code, 400, "chatter_tag").text == (
        f"Sure! Here is the prompt:\n<prompt>{p}</prompt>\nLet me know if you need changes."
    )
    assert fm.reply("", code, 400, "fenced").text == f"```\n{p}\n```"
    truncated = fm.reply("", code, 400, "truncated")
    assert (truncated.text, truncated.finish) == ("<prompt>" + p[: len(p) // 2], "length")
    refusal = fm.reply("sys", code, 400, "refusal")
    assert (refusal.text, refusal.finish) == (fm.REFUSAL_TEXT, "refusal")
    assert refusal.prompt_tokens == fm.count_tokens("sys") + fm.count_tokens(code) + 6
    cut = fm.reply("", code, 5, "tag")
    assert (cut.text, cut.finish, cut.completion_tokens) == ("<prompt>Write a", "length", 5)
    assert fm.reply("", code, 400, "empty").text == ""


# ---- OpenAI -----------------------------------------------------------------------------------------------


def test_openai_batch_lifecycle_output_and_error_files(make_server: ServerFactory) -> None:
    server = make_server(polls_to_complete=3)
    client = oai(server)
    forms = ["tag", "chatter_tag", "fenced", "label", "bare", "truncated", "empty", "refusal"]
    lines = [chat_line(f"k{i}-{form}", kernel(f"kern{i}", form)) for i, form in enumerate(forms)]
    lines.append(chat_line("lost-model", kernel("x"), model="no-such-model"))
    batch = submit(client, lines, metadata={"job": "t1"})
    assert (batch.status, batch.metadata, batch.output_file_id) == ("validating", {"job": "t1"}, None)
    assert batch.expires_at == batch.created_at + 86_400

    statuses = [client.batches.retrieve(batch.id).status for _ in range(4)]
    assert statuses == ["in_progress", "finalizing", "completed", "completed"]
    done = client.batches.retrieve(batch.id)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (9, 8, 1)
    assert done.completed_at is not None and done.model == "gpt-emu"

    outputs = read_lines(client, done.output_file_id)
    assert set(outputs) == {f"k{i}-{form}" for i, form in enumerate(forms)}
    for i, form in enumerate(forms):
        line = outputs[f"k{i}-{form}"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        message = completion.choices[0].message
        user = kernel(f"kern{i}", form)
        expected = fm.reply(SYSTEM, user, 400, form)
        if form == "refusal":
            assert (message.content, message.refusal) == (None, fm.REFUSAL_TEXT)
        else:
            assert message.content == expected.text and message.refusal is None
        assert completion.choices[0].finish_reason == ("length" if form == "truncated" else "stop")
        assert completion.usage is not None and completion.usage.prompt_tokens == expected.prompt_tokens

    errors = read_lines(client, done.error_file_id)
    assert list(errors) == ["lost-model"]
    response = errors["lost-model"]["response"]
    assert response["status_code"] == 404 and response["body"]["error"]["code"] == "model_not_found"

    files = {f.id: f for f in client.files.list(purpose="batch_output")}
    assert set(files) == {done.output_file_id, done.error_file_id}
    assert client.files.retrieve(done.input_file_id).purpose == "batch"
    assert client.files.delete(done.input_file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.input_file_id)

    stats = server.stats
    assert stats.sent["lost-model"] == 1 and sum(stats.sent.values()) == 9
    assert sum(stats.answered.values()) == 8 and "lost-model" not in stats.answered
    assert stats.batches_created_by_provider == {"openai": 1} and stats.files_uploaded == 1
    assert stats.hits["openai.batches.retrieve"] == 5


def test_openai_list_pagination_walks_every_page_without_advancing(make_server: ServerFactory) -> None:
    server = make_server()
    client = oai(server)
    created = [submit(client, [chat_line("a", kernel("k"))], metadata={"n": str(i)}).id for i in range(5)]
    seen = [(b.id, b.status) for b in client.batches.list(limit=2)]
    assert seen == [(batch_id, "validating") for batch_id in reversed(created)]
    assert server.stats.hits["openai.batches.list"] == 3
    page = client.batches.list(limit=2, after=created[3])
    assert [b.id for b in page.data] == [created[2], created[1]] and page.has_more is True


def test_openai_cancel(make_server: ServerFactory) -> None:
    server = make_server(polls_to_complete=5)
    client = oai(server)
    lines = [chat_line(f"c{i}", kernel(f"k{i}", "tag")) for i in range(20)]
    batch = submit(client, lines)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    outputs = read_lines(client, cancelled.output_file_id)
    assert 0 < len(outputs) < 20 and set(outputs) <= {f"c{i}" for i in range(20)}
    assert cancelled.request_counts is not None and cancelled.request_counts.completed == len(outputs)
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)

    early = submit(client, lines)  # cancelled while still validating: nothing ran
    client.batches.cancel(early.id)
    final = client.batches.retrieve(early.id)
    assert (final.status, final.output_file_id, final.error_file_id) == ("cancelled", None, None)


def test_openai_validation_failures(make_server: ServerFactory) -> None:
    server = make_server()
    client = oai(server)
    mismatch = submit(client, [chat_line("a", kernel("k")), chat_line("b", kernel("k"), url="/v1/responses")])
    failed = client.batches.retrieve(mismatch.id)
    assert failed.status == "failed" and failed.failed_at is not None and failed.output_file_id is None
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.code, e.line, e.param) for e in failed.errors.data] == [("invalid_url", 2, "url")]

    dupes = submit(client, [chat_line("a", kernel("k")), chat_line("b", kernel("k")), chat_line("a", "x")])
    errors = client.batches.retrieve(dupes.id).errors
    assert errors is not None and errors.data is not None
    assert [(e.code, e.line) for e in errors.data] == [("duplicate_custom_id", 3)]
    assert "'a'" in (errors.data[0].message or "")
    assert server.stats.sent == Counter() and server.stats.batches_created == 2

    uploaded = client.files.create(file=("i.jsonl", chat_line("a", "x").encode()), purpose="batch")
    bad_calls: list[tuple[dict[str, Any], str]] = [
        ({"input_file_id": "file-missing", "endpoint": CHAT, "completion_window": "24h"}, "Cannot find file"),
        ({"input_file_id": uploaded.id, "endpoint": "/v1/nope", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "48h"}, "completion_window"),
        (
            {
                "input_file_id": uploaded.id,
                "endpoint": CHAT,
                "completion_window": "24h",
                "metadata": {str(i): "v" for i in range(17)},
            },
            "16",
        ),
    ]
    for params, words in bad_calls:
        with pytest.raises(openai.BadRequestError) as info:
            client.batches.create(**params)
        assert words in info.value.message
    with pytest.raises(openai.BadRequestError, match="must be a string"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"n": 3},  # type: ignore[dict-item]
        )
    assert server.stats.batches_created == 2

    server.config.max_requests_per_file = 2
    too_many = submit(client, [chat_line(f"r{i}", "x") for i in range(3)])
    errors = client.batches.retrieve(too_many.id).errors
    assert errors is not None and errors.data is not None and errors.data[0].code == "too_many_requests"

    server.config.max_requests_per_file = 50_000
    server.config.validation_error_rate = 1.0
    injected = client.batches.retrieve(submit(client, [chat_line("ok", "x")]).id)
    assert injected.errors is not None and injected.errors.data is not None
    assert [(e.code, e.line, e.param) for e in injected.errors.data] == [("invalid_request", None, None)]


def test_openai_enqueued_token_limit(make_server: ServerFactory) -> None:
    user = kernel("big")
    per_line = fm.prompt_tokens(SYSTEM, user)
    server = make_server(polls_to_complete=3, enqueued_token_limit=per_line * 3)
    client = oai(server)
    first = submit(client, [chat_line(f"a{i}", user) for i in range(2)])
    assert client.batches.retrieve(first.id).status == "in_progress"
    second = submit(client, [chat_line(f"b{i}", user) for i in range(2)])
    assert second.status == "validating"  # create itself succeeds, as on the real service
    failed = client.batches.retrieve(second.id)
    assert failed.status == "failed" and failed.errors is not None and failed.errors.data is not None
    assert failed.errors.data[0].code == "token_limit_exceeded"
    assert "Enqueued token limit reached for gpt-emu" in (failed.errors.data[0].message or "")
    other_model = submit(client, [chat_line(f"m{i}", user, model="gpt-other") for i in range(2)])
    assert client.batches.retrieve(other_model.id).status == "in_progress"  # the quota is per model
    poll(client, first.id)
    third = submit(client, [chat_line(f"b{i}", user) for i in range(2)])
    assert client.batches.retrieve(third.id).status == "in_progress"
    assert "b0" in server.stats.sent and server.stats.sent["b0"] == 1


def test_openai_expire_fraction_and_error_only_batch(make_server: ServerFactory) -> None:
    server = make_server(expire_fraction=0.5)
    client = oai(server)
    ids = [f"e{i}" for i in range(30)]
    batch = poll(client, submit(client, [chat_line(cid, kernel(cid, "tag")) for cid in ids]).id, ("expired",))
    assert batch.expired_at is not None
    outputs, errors = read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)
    assert 5 <= len(errors) <= 25 and set(outputs) | set(errors) == set(ids) and not set(outputs) & set(errors)
    for line in errors.values():
        assert line["response"] is None and line["error"]["code"] == "batch_expired"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(outputs), len(errors))
    assert set(server.stats.answered) == set(outputs)

    server.config.expire_fraction = None
    server.config.request_error_rate = 1.0
    all_failed = poll(client, submit(client, [chat_line(f"f{i}", "x") for i in range(3)]).id)
    assert all_failed.status == "completed" and all_failed.output_file_id is None
    errors = read_lines(client, all_failed.error_file_id)
    assert set(errors) == {"f0", "f1", "f2"}
    for line in errors.values():
        assert line["error"] is None and line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["code"] == "server_error"


def test_openai_outcomes_are_reproducible_from_the_seed(make_server: ServerFactory) -> None:
    runs = []
    for _ in range(2):
        server = make_server(seed=11, request_error_rate=0.3)
        client = oai(server)
        batch = poll(client, submit(client, [chat_line(f"s{i}", kernel(f"k{i}")) for i in range(12)]).id)
        text = client.files.content(batch.output_file_id or "").text
        output_order = [json.loads(line)["custom_id"] for line in text.splitlines()]
        runs.append((output_order, sorted(read_lines(client, batch.error_file_id))))
    assert runs[0] == runs[1] and 0 < len(runs[0][0]) < 12
    assert runs[0][0] != sorted(runs[0][0])  # shuffled, not in input order


# ---- Anthropic --------------------------------------------------------------------------------------------


def test_anthropic_batch_results_of_every_type(make_server: ServerFactory) -> None:
    server = make_server(polls_to_complete=2)
    client = ant(server)
    requests = [
        anthropic_request("ok-tag", kernel("a", "tag")),
        anthropic_request("ok-refusal", kernel("b", "refusal")),
        anthropic_request("ok-cut", kernel("c", "tag"), max_tokens=4),
        anthropic_request("bad-model", kernel("d"), model="unknown-claude"),
    ]
    batch = client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 4 and batch.expires_at > batch.created_at
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert ended.results_url == f"{server.url}/v1/messages/batches/{batch.id}/results"
    counts = ended.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 3, 1)

    results = results_by_id(client, batch.id)
    tag = results["ok-tag"]
    assert tag.type == "succeeded" and tag.message.stop_reason == "end_turn"
    assert tag.message.content[0].text == f"<prompt>{fm.expected_prompt(kernel('a', 'tag'))}</prompt>"
    assert results["ok-refusal"].message.stop_reason == "refusal"
    assert results["ok-refusal"].message.content[0].text == fm.REFUSAL_TEXT
    assert results["ok-cut"].message.stop_reason == "max_tokens"
    assert results["ok-cut"].message.usage.output_tokens == 4
    bad = results["bad-model"]
    assert bad.type == "errored" and bad.error.error.type == "not_found_error"

    canceled_batch = client.messages.batches.create(
        requests=[anthropic_request(f"c{i}", kernel(f"k{i}", "tag")) for i in range(20)]
    )
    client.messages.batches.retrieve(canceled_batch.id)  # one poll: work has started
    assert client.messages.batches.cancel(canceled_batch.id).processing_status == "canceling"
    after_cancel = client.messages.batches.retrieve(canceled_batch.id)
    assert after_cancel.processing_status == "ended" and after_cancel.cancel_initiated_at is not None
    kinds = Counter(result.type for result in results_by_id(client, canceled_batch.id).values())
    assert set(kinds) == {"canceled", "succeeded"}
    assert kinds["canceled"] == after_cancel.request_counts.canceled

    server.config.expire_fraction = 0.5
    server.config.request_error_rate = 0.3
    mixed = client.messages.batches.create(
        requests=[anthropic_request(f"x{i}", kernel(f"k{i}", "tag")) for i in range(30)]
    )
    server.complete_all()
    final = client.messages.batches.retrieve(mixed.id)
    kinds = Counter(result.type for result in results_by_id(client, mixed.id).values())
    assert set(kinds) == {"expired", "errored", "succeeded"}
    assert (final.request_counts.expired, final.request_counts.errored) == (
        kinds["expired"],
        kinds["errored"],
    )

    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    listed = [b.id for b in client.messages.batches.list(limit=1)]
    assert listed == [mixed.id, canceled_batch.id]
    page = client.messages.batches.list(limit=5, before_id=canceled_batch.id)
    assert [b.id for b in page.data] == [mixed.id] and page.has_more is False
    assert server.stats.batches_created_by_provider == {"anthropic": 3}


def test_anthropic_create_validation(make_server: ServerFactory) -> None:
    server = make_server(anthropic_max_requests=3)
    client = ant(server)
    bad: list[tuple[list[Request], str]] = [
        (
            [anthropic_request("x" * 65, "u")],
            "requests.0.custom_id: String should have at most 64 characters",
        ),
        ([anthropic_request("ok", "u"), anthropic_request("has space", "u")], "requests.1.custom_id"),
        ([anthropic_request("a", "u"), anthropic_request("a", "u")], "Duplicate custom_id"),
        ([anthropic_request("a", "u", max_tokens=0)], "max_tokens"),
        ([anthropic_request(f"n{i}", "u") for i in range(4)], "between 1 and 3"),
    ]
    for requests, words in bad:
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.batches.create(requests=requests)
        assert info.value.type == "invalid_request_error" and words in info.value.message
    assert server.stats.batches_created == 0 and not server.stats.sent


def test_anthropic_prompt_caching_usage(make_server: ServerFactory) -> None:
    server = make_server()
    client = ant(server)
    rubric = "A long shared rubric about HIP kernels. " * 20
    cached_system = [{"type": "text", "text": rubric, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    users = [kernel(f"k{i}", "tag") for i in range(3)]
    requests = [anthropic_request(f"c{i}", user, system=cached_system) for i, user in enumerate(users)]
    requests.append(anthropic_request("plain", users[0], system=rubric))
    batch = client.messages.batches.create(requests=requests)
    client.messages.batches.retrieve(batch.id)
    usage = {cid: result.message.usage for cid, result in results_by_id(client, batch.id).items()}
    rubric_tokens = fm.count_tokens(rubric)
    user_only = fm.prompt_tokens(rubric, users[0]) - rubric_tokens
    assert (usage["c0"].cache_creation_input_tokens, usage["c0"].cache_read_input_tokens) == (
        rubric_tokens,
        0,
    )
    for cid in ("c1", "c2"):
        assert (usage[cid].cache_creation_input_tokens, usage[cid].cache_read_input_tokens) == (
            0,
            rubric_tokens,
        )
    assert usage["c0"].input_tokens == user_only
    assert usage["plain"].input_tokens == fm.prompt_tokens(rubric, users[0])
    assert (usage["plain"].cache_read_input_tokens, usage["plain"].cache_creation_input_tokens) == (0, 0)
    assert (server.stats.cache_write_tokens, server.stats.cache_read_tokens) == (
        rubric_tokens,
        2 * rubric_tokens,
    )


# ---- live calls -------------------------------------------------------------------------------------------


def test_live_endpoints_of_both_providers(make_server: ServerFactory) -> None:
    server = make_server(live_latency_s=0.05)
    messages = [{"role": "user", "content": kernel("live", "label")}]
    started = time.monotonic()
    completion = oai(server).chat.completions.create(model="gpt-emu", messages=messages)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.05
    assert completion.choices[0].message.content == f"English prompt: {fm.expected_prompt(messages[0]['content'])}"
    assert completion.usage is not None and completion.usage.prompt_tokens == fm.prompt_tokens(
        "", kernel("live", "label")
    )
    message = ant(server).messages.create(
        model="claude-emu",
        max_tokens=100,
        system=SYSTEM,
        messages=messages,  # type: ignore[arg-type]
    )
    assert message.content[0].type == "text" and message.content[0].text.startswith("English prompt: ")
    assert message.usage.input_tokens == fm.prompt_tokens(SYSTEM, kernel("live", "label"))
    assert server.stats.live_calls == Counter({live_key(messages): 2})
    assert server.stats.answered[live_key(messages)] == 2

    server.config.live_429_rate = 1.0
    with pytest.raises(openai.RateLimitError) as info:
        oai(server).chat.completions.create(model="gpt-emu", messages=messages)  # type: ignore[arg-type]
    assert info.value.response.headers["retry-after-ms"] == "50"
    with pytest.raises(anthropic.RateLimitError):
        ant(server).messages.create(model="claude-emu", max_tokens=10, messages=messages)  # type: ignore[arg-type]
    assert server.stats.faults["live_429"] == 2


# ---- transport faults, auth, robustness -------------------------------------------------------------------


def test_429_faults_are_retried_after_the_hinted_delay(make_server: ServerFactory) -> None:
    server = make_server(seed=3, fault_rate=0.5, fault_kinds=("429",), retry_after_ms=40)
    client = oai(server, max_retries=6)
    started = time.monotonic()
    for i in range(8):
        assert client.models.retrieve(f"gpt-{i}").id == f"gpt-{i}"
    elapsed = time.monotonic() - started
    faults = server.stats.faults["429"]
    assert faults >= 2 and server.stats.hits["models.retrieve"] == 8 + faults
    assert faults * 0.04 <= elapsed < faults * 0.04 + 3  # the hint, not the SDK's 0.5 s+ backoff

    server.config.fault_rate = 1.0
    server.stats.reset()
    with pytest.raises(anthropic.RateLimitError) as info:
        ant(server, max_retries=2).models.retrieve("claude-emu")
    assert server.stats.faults == Counter({"429": 3})
    assert info.value.response.headers["retry-after"] == "1" and info.value.type == "rate_limit_error"


def test_truncate_drop_and_500_faults(make_server: ServerFactory) -> None:
    server = make_server()
    client = oai(server)
    batch = poll(client, submit(client, [chat_line(f"t{i}", kernel(f"k{i}", "tag")) for i in range(10)]).id)
    full = client.files.content(batch.output_file_id or "").content
    anthropic_batch = ant(server).messages.batches.create(
        requests=[anthropic_request(f"a{i}", kernel(f"k{i}", "tag")) for i in range(10)]
    )
    ant(server).messages.batches.retrieve(anthropic_batch.id)

    server.config.fault_rate = 1.0
    server.config.fault_kinds = ("truncate",)
    short = client.files.content(batch.output_file_id or "").content
    assert 0 < len(short) < len(full) and full.startswith(short) and not short.endswith(b"\n")
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.splitlines()[-1])
    with pytest.raises(openai.InternalServerError):  # truncate only cuts downloads; others get a 500
        client.batches.retrieve(batch.id)
    assert server.stats.faults == Counter({"truncate": 1, "500": 1})

    server.config.fault_routes = ("anthropic.batches.results",)  # let the retrieve inside results() pass
    decoded: list[str] = []
    with pytest.raises(json.JSONDecodeError):
        for line in ant(server).messages.batches.results(anthropic_batch.id):
            decoded.append(line.custom_id)
    assert len(decoded) < 10 and server.stats.faults["truncate"] == 2

    server.config.fault_routes = None
    server.config.fault_kinds = ("drop",)
    with pytest.raises(openai.APIConnectionError):
        client.batches.retrieve(batch.id)
    assert server.stats.faults["drop"] == 1
    server.config.fault_rate = 0.0
    assert client.batches.retrieve(batch.id).status == "completed"  # the server survives every fault


def test_unknown_models_auth_routes_and_keep_alive(make_server: ServerFactory) -> None:
    server = make_server()
    with pytest.raises(openai.NotFoundError) as info:
        oai(server).models.retrieve("unknown-gpt")
    assert info.value.code == "model_not_found" and "does not exist" in info.value.message
    with pytest.raises(anthropic.NotFoundError) as ant_info:
        ant(server).models.retrieve("no-such-claude")
    assert ant_info.value.type == "not_found_error"
    model = ant(server).models.retrieve("claude-emu")
    assert model.id == "claude-emu" and model.type == "model" and model.created_at.year == 2025

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        answers = []
        for method, path, headers in [
            ("GET", "/v1/batches", {}),
            ("GET", "/v1/messages/batches", {"anthropic-version": "2023-06-01"}),
            ("GET", "/v1/nowhere", {"Authorization": "Bearer k"}),
            ("PUT", "/v1/batches", {"Authorization": "Bearer k"}),
            ("GET", "/_emulator/stats", {"X-Emulator-Token": server.control_token}),
        ]:
            conn.request(method, path, headers=headers)  # one socket: keep-alive must work
            response = conn.getresponse()
            answers.append((response.status, json.loads(response.read())))
    finally:
        conn.close()
    missing_key = {"message": "Missing API key", "type": "invalid_request_error", "param": None}
    assert answers[0] == (401, {"error": {**missing_key, "code": "invalid_api_key"}})
    assert answers[1][0] == 401 and answers[1][1]["error"]["type"] == "authentication_error"
    assert answers[2][0] == 404 and "Unknown request URL" in answers[2][1]["error"]["message"]
    assert answers[3][0] == 405
    assert answers[4][0] == 200 and answers[4][1]["hits"]["unknown"] == 2


def test_control_endpoints(make_server: ServerFactory) -> None:
    server = make_server(polls_to_complete=10)
    client = oai(server)
    batch = submit(client, [chat_line("a", kernel("k", "bare"))])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    headers = server.control_headers()
    try:
        conn.request("POST", "/_emulator/complete-all", headers=headers)
        assert conn.getresponse().read() == b'{"ok": true}'
        conn.request("POST", "/_emulator/config", body=json.dumps({"forms": "fenced"}), headers=headers)
        assert json.loads(conn.getresponse().read())["forms"] == "fenced"
        conn.request("POST", "/_emulator/config", body=json.dumps({"forms": "nope"}), headers=headers)
        response = conn.getresponse()
        assert response.status == 400 and "unknown reply form" in json.loads(response.read())["error"]["message"]
        conn.request("POST", "/_emulator/reset-stats", headers=headers)
        conn.getresponse().read()
    finally:
        conn.close()
    assert client.batches.retrieve(batch.id).status == "completed" and server.config.forms == "fenced"
    assert server.stats.batches_created == 0 and server.stats.hits == Counter({"openai.batches.retrieve": 1})


def test_handler_crash_answers_500_and_chunked_bodies_are_read(make_server: ServerFactory) -> None:
    server = make_server()

    def crash(call: Any) -> Any:
        raise RuntimeError("boom")

    server._handlers["models.retrieve"] = crash  # our own server's route table, not the SDK or HTTP stack
    with pytest.raises(openai.InternalServerError) as info:
        oai(server).models.retrieve("gpt-emu")
    assert info.value.code == "server_error"

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        body = iter([b'{"forms": ', b'"bare"}'])
        conn.request("POST", "/_emulator/config", body=body, headers=server.control_headers(), encode_chunked=True)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["forms"]) == (200, "bare")
        conn.request("GET", "/_emulator/health", headers=server.control_headers())
        assert json.loads(conn.getresponse().read()) == {"ok": True, "url": server.url}
    finally:
        conn.close()


# ---- control endpoints locked down, request-body cap, the emulator command ---------------------------------


def control(
    server: LocalBatchServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def raw_answer(port: int, head: bytes, *chunks: bytes) -> tuple[int, bytes]:
    """Send request headers (and maybe some body bytes) on a plain socket, then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_control_endpoints_need_the_token_and_json(make_server: ServerFactory) -> None:
    server = make_server()
    token = server.control_token
    assert len(token) >= 32 and token != make_server().control_token  # a fresh random token per server
    status, body = control(server, "GET", "/_emulator/stats")
    assert status == 401 and "token" in body["error"]["message"]
    wrong = token[:-1] + ("x" if token[-1] != "x" else "y")
    assert control(server, "GET", "/_emulator/stats", headers={"Authorization": f"Bearer {wrong}"})[0] == 403
    assert control(server, "GET", "/_emulator/stats", headers={"X-Emulator-Token": wrong})[0] == 403
    status, body = control(server, "GET", "/_emulator/config", headers={"Authorization": f"Bearer {token}"})
    assert status == 200 and body["forms"] == "mixed"
    assert control(server, "GET", "/_emulator/health", headers={"X-Emulator-Token": token})[0] == 200

    # what a web page can send without a preflight: text/plain or a form, and no custom header
    change = json.dumps({"forms": "bare", "download_fault": "empty"}).encode()
    attempts = [
        ({"Content-Type": "text/plain"}, 401),
        ({"Content-Type": "text/plain", "X-Emulator-Token": token}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {token}"}, 415),
        ({"X-Emulator-Token": token}, 415),
    ]
    assert [control(server, "POST", "/_emulator/config", change, h)[0] for h, _ in attempts] == [s for _, s in attempts]
    assert control(server, "POST", "/_emulator/complete-all", None, {"Content-Type": "text/plain"})[0] == 401
    assert (server.config.forms, server.config.download_fault) == ("mixed", None)
    json_headers = {"X-Emulator-Token": token, "Content-Type": "application/json; charset=utf-8"}
    status, body = control(server, "POST", "/_emulator/config", change, json_headers)
    assert status == 200 and (server.config.forms, server.config.download_fault) == ("bare", "empty")
    status, body = control(server, "POST", "/_emulator/config", b'{"download_fault": "late"}', json_headers)
    assert status == 400 and "download_fault" in body["error"]["message"] and server.config.download_fault == "empty"
    assert server.stats.refused == Counter({"control_no_token": 3, "control_bad_token": 2, "control_not_json": 3})

    # refused before the body is read: the answer comes although the promised gigabyte never does
    head = (
        b"POST /_emulator/config HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n"
    )
    assert raw_answer(server.port, head)[0] == 401

    off = make_server(control=False)
    assert control(off, "GET", "/_emulator/stats", headers={"X-Emulator-Token": off.control_token})[0] == 404
    with pytest.raises(ValueError, match="control-token"):
        LocalBatchServer(port=0, control_token="short")


def test_results_base_url_and_body_cap_are_not_settable_remotely(make_server: ServerFactory) -> None:
    server = make_server()
    for change in (
        {"results_base_url": "http://127.0.0.1:1"},
        {"results_base_url": server.url},
        {"forms": "bare", "results_base_url": "http://attacker.example"},
        {"max_body_bytes": 10**12},
    ):
        status, body = control(
            server, "POST", "/_emulator/config", json.dumps(change).encode(), server.control_headers()
        )
        assert status == 403 and "in-process" in body["error"]["message"]
    assert (server.config.results_base_url, server.config.forms) == (None, "mixed")
    assert server.config.max_body_bytes == EmulatorConfig().max_body_bytes == 300 * 1024 * 1024
    claude = ant(server)
    batch = claude.messages.batches.create(requests=[anthropic_request("a", kernel("k"))])
    url = claude.messages.batches.retrieve(batch.id).results_url
    assert url is not None and url.startswith(server.url + "/v1/")


def test_body_over_the_cap_gets_413_before_it_is_read(make_server: ServerFactory) -> None:
    cap = 64 * 1024
    server = make_server(max_body_bytes=cap)
    head = (
        b"POST /v1/files HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000\r\n\r\n"
    )
    status, body = raw_answer(server.port, head)  # not one byte of the body is sent
    assert status == 413 and json.loads(body)["error"]["message"].startswith("Request body is over 65536 bytes")
    chunked = (
        b"POST /v1/messages/batches HTTP/1.1\r\nHost: t\r\nanthropic-version: 2023-06-01\r\nx-api-key: k\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 40_000
    status, body = raw_answer(server.port, chunked, b"%x\r\n%s\r\n" % (len(piece), piece), b"%x\r\n" % len(piece))
    assert status == 413 and json.loads(body)["error"]["type"] == "request_too_large"  # the size line was enough

    client = oai(server)
    with pytest.raises(openai.APIStatusError) as info:  # 4 MB: more than the socket buffers hold
        client.files.create(file=("big.jsonl", b"x" * (4 << 20), "application/jsonl"), purpose="batch")
    assert info.value.status_code == 413
    with pytest.raises(anthropic.RequestTooLargeError):
        ant(server).messages.batches.create(requests=[anthropic_request("big", "x" * cap)])
    assert client.files.create(file=("ok.jsonl", chat_line("a", "x").encode()), purpose="batch").bytes > 0
    assert server.stats.refused == Counter({"body_too_large": 4}) and server.stats.files_uploaded == 1


def test_emulator_command_port_and_token_errors_are_one_line() -> None:
    out = cli("emulator", "--port", "70000", code=2)
    errors = [line for line in out.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and "'--port'" in errors[0] and "65535" in errors[0] and "Traceback" not in out.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = cli("emulator", "--port", str(port), code=2)
    assert out.stderr.splitlines() == [out.stderr.strip()] and f"127.0.0.1:{port}" in out.stderr
    assert "already in use" in out.stderr and "--port" in out.stderr
    out = cli("emulator", "--port", "0", "--control-token", "short", code=2)
    assert out.stderr.startswith("Error: --control-token") and len(out.stderr.splitlines()) == 1
    out = cli("emulator", "--port", "0", "--forms", "nope", code=2)
    assert out.stderr.startswith("Error: unknown reply form 'nope'") and len(out.stderr.splitlines()) == 1


def emulator_banner(proc: subprocess.Popen[bytes]) -> str:
    """What `hipbatch emulator` printed on stderr up to its "Ctrl-C to stop." line (10 s at most)."""
    assert proc.stderr is not None
    text = b""
    deadline = time.monotonic() + 10
    while b"Ctrl-C to stop." not in text and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
        if ready and not chunk:
            break
        text += chunk
    return text.decode()


@pytest.mark.parametrize("flag", ["--control", "--no-control"])
def test_emulator_command_prints_a_token_that_works(flag: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HIPBATCH_EMULATOR_TOKEN"}
    args = [sys.executable, "-m", "hipbatch", "emulator", "--port", "0", flag]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, bufsize=0)
    try:
        banner = emulator_banner(proc)
        found = re.search(r"on http://127\.0\.0\.1:(\d+)\n", banner)
        assert found, banner
        conn = http.client.HTTPConnection("127.0.0.1", int(found.group(1)), timeout=5)
        token_found = re.search(r"need the token (\S+), e\.g\.:\n  curl -H 'Authorization: Bearer (\S+)'", banner)
        if flag == "--control":
            assert token_found and token_found.group(1) == token_found.group(2)
            for headers, status in (({}, 401), ({"Authorization": f"Bearer {token_found.group(1)}"}, 200)):
                conn.request("GET", "/_emulator/stats", headers=headers)
                response = conn.getresponse()
                response.read()
                assert response.status == status
        else:
            assert token_found is None and "Control endpoints off (--no-control)." in banner
            conn.request("GET", "/_emulator/stats", headers={"Authorization": "Bearer anything-at-all-16"})
            assert conn.getresponse().status == 404
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


# ---- misbehaving downloads and keys -----------------------------------------------------------------------


def finished_batches(server: LocalBatchServer, n: int = 6) -> tuple[openai.OpenAI, str, anthropic.Anthropic, str]:
    """One ended batch of `n` requests per provider: (client, its output file id, claude, batch id)."""
    client = oai(server)
    batch = poll(client, submit(client, [chat_line(f"o{i}", kernel(f"k{i}", "tag")) for i in range(n)]).id)
    assert batch.output_file_id is not None and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.error_file_id) == (n, None)
    claude = ant(server)
    created = claude.messages.batches.create(
        requests=[anthropic_request(f"a{i}", kernel(f"k{i}", "tag")) for i in range(n)]
    )
    assert claude.messages.batches.retrieve(created.id).request_counts.succeeded == n
    return client, batch.output_file_id, claude, created.id


def file_lines(client: openai.OpenAI, file_id: str) -> list[bytes]:
    return client.files.content(file_id).content.splitlines()


def result_ids(claude: anthropic.Anthropic, batch_id: str) -> list[str]:
    return [item.custom_id for item in claude.messages.batches.results(batch_id)]


def test_short_empty_and_duplicate_downloads(make_server: ServerFactory) -> None:
    server = make_server()
    client, file_id, claude, batch_id = finished_batches(server)
    full, full_ids = file_lines(client, file_id), result_ids(claude, batch_id)
    assert len(full) == 6 and sorted(full_ids) == [f"a{i}" for i in range(6)]

    server.config.download_fault = "short"
    short_body, short_ids = client.files.content(file_id).content, result_ids(claude, batch_id)
    short = short_body.splitlines()
    assert 0 < len(short) < 6 and set(short) < set(full) and short_body.endswith(b"\n")
    assert 0 < len(short_ids) < 6 and set(short_ids) < set(full_ids) and len(set(short_ids)) == len(short_ids)

    server.config.download_fault = "empty"
    assert client.files.content(file_id).content == b"" and result_ids(claude, batch_id) == []

    server.config.download_fault = "duplicate"
    doubled = file_lines(client, file_id)
    twice = [cid for cid, n in Counter(json.loads(line)["custom_id"] for line in doubled).items() if n > 1]
    assert len(doubled) == 7 and set(doubled) == set(full) and len(twice) == 1
    results = list(claude.messages.batches.results(batch_id))
    again = [cid for cid, n in Counter(r.custom_id for r in results).items() if n > 1]
    assert len(results) == 7 and len(again) == 1
    assert len({r.model_dump_json() for r in results if r.custom_id == again[0]}) == 1  # identical lines
    assert server.stats.faults == Counter({"short": 2, "empty": 2, "duplicate": 2})
    assert server.stats.downloads == Counter({"openai.files.content": 4, "anthropic.batches.results": 4})
    assert server.stats.billed_twice() == [] and sum(server.stats.answered.values()) == 12


def test_conflicting_answers_differ_and_only_the_first_was_billed(make_server: ServerFactory) -> None:
    server = make_server()
    client, file_id, claude, batch_id = finished_batches(server)
    server.config.download_fault = "conflict"
    lines = [json.loads(line) for line in file_lines(client, file_id)]
    ids = Counter(line["custom_id"] for line in lines)
    (cid,) = [c for c, n in ids.items() if n == 2]
    first, second = (line["response"]["body"] for line in lines if line["custom_id"] == cid)
    assert first["choices"][0]["message"]["content"] != second["choices"][0]["message"]["content"]
    assert second["usage"]["completion_tokens"] == 2 * first["usage"]["completion_tokens"] > 0
    billed = server.stats.billed_per_custom_id[cid]
    assert (billed.answers, billed.input_tokens, billed.output_tokens) == (
        1,
        first["usage"]["prompt_tokens"],
        first["usage"]["completion_tokens"],
    )

    results = list(claude.messages.batches.results(batch_id))
    (aid,) = [c for c, n in Counter(r.custom_id for r in results).items() if n == 2]
    a_first, a_second = (r.result for r in results if r.custom_id == aid)
    assert a_first.type == a_second.type == "succeeded"
    texts = [result.model_dump()["message"]["content"][0]["text"] for result in (a_first, a_second)]
    assert texts[0] != texts[1] and texts[0] in texts[1]
    assert a_second.message.usage.output_tokens == 2 * a_first.message.usage.output_tokens
    status, stats = control(server, "GET", "/_emulator/stats", headers=server.control_headers())
    assert status == 200 and stats["billed_per_custom_id"][aid]["answers"] == 1
    assert stats["billed_per_custom_id"][aid]["output_tokens"] == a_first.message.usage.output_tokens
    assert stats["faults"] == {"conflict": 2} and server.stats.billed_twice() == []

    poll(client, submit(client, [chat_line(cid, kernel("again", "tag"))]).id)  # the same request bought again
    assert server.stats.billed_twice() == [cid] and server.stats.billed_per_custom_id[cid].answers == 2


def test_cut_and_malformed_downloads(make_server: ServerFactory) -> None:
    server = make_server()
    client, file_id, claude, batch_id = finished_batches(server)
    server.config.download_fault = "cut"
    with pytest.raises(httpx2.RemoteProtocolError), client.files.with_streaming_response.content(file_id) as response:
        b"".join(response.iter_bytes())
    with pytest.raises(openai.APIConnectionError):  # read whole inside the SDK: a broken connection
        client.files.content(file_id)
    seen: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        for item in claude.messages.batches.results(batch_id):
            seen.append(item.custom_id)
    assert len(seen) < 6

    server.config.download_fault = "malformed"
    lines = file_lines(client, file_id)
    bad = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
    assert len(lines) == 6 and len(bad) == 1 and bad[0].startswith(b"{")
    with pytest.raises(json.JSONDecodeError):
        list(claude.messages.batches.results(batch_id))
    assert server.stats.faults == Counter({"cut": 3, "malformed": 2})
    server.config.download_fault = None
    assert len(file_lines(client, file_id)) == 6 and len(result_ids(claude, batch_id)) == 6


def test_completed_without_output_and_results_gone(make_server: ServerFactory) -> None:
    server = make_server()
    client, file_id, claude, batch_id = finished_batches(server)
    openai_batch = client.batches.list().data[0]
    server.config.update({"download_fault": "no_output", "download_fault_times": 2})
    hidden = client.batches.retrieve(openai_batch.id)
    assert hidden.status == "completed" and hidden.request_counts is not None
    assert (hidden.request_counts.completed, hidden.output_file_id, hidden.error_file_id) == (6, None, None)
    assert [b.output_file_id for b in client.batches.list()] == [None]  # listing shows it too, uncounted
    assert client.batches.retrieve(openai_batch.id).output_file_id is None
    assert client.batches.retrieve(openai_batch.id).output_file_id == file_id  # healed after 2 retrieves
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        result_ids(claude, batch_id)
    ended = claude.messages.batches.retrieve(batch_id)
    assert (ended.processing_status, ended.request_counts.succeeded, ended.results_url) == ("ended", 6, None)
    assert len(result_ids(claude, batch_id)) == 6
    assert server.stats.faults == Counter({"no_output": 4})

    server.config.update({"download_fault": "gone", "download_fault_times": None})
    with pytest.raises(openai.NotFoundError):
        client.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    assert client.batches.retrieve(openai_batch.id).output_file_id == file_id  # the batch still names it
    archived = claude.messages.batches.retrieve(batch_id)
    assert archived.archived_at is not None and archived.ended_at is not None
    assert archived.archived_at >= archived.ended_at
    with pytest.raises(anthropic.NotFoundError):
        result_ids(claude, batch_id)
    server.config.download_fault = None
    assert claude.messages.batches.retrieve(batch_id).archived_at is None
    assert len(file_lines(client, file_id)) == 6 and client.files.retrieve(file_id).id == file_id


def test_download_faults_heal_after_k_and_hit_a_seeded_share_of_batches(make_server: ServerFactory) -> None:
    server = make_server()
    client, file_id, claude, batch_id = finished_batches(server)
    change = json.dumps({"download_fault": "empty", "download_fault_times": 2}).encode()
    assert control(server, "POST", "/_emulator/config", change, server.control_headers())[0] == 200
    assert [len(file_lines(client, file_id)) for _ in range(3)] == [0, 0, 6]
    assert [len(result_ids(claude, batch_id)) for _ in range(3)] == [0, 0, 6]
    other = poll(client, submit(client, [chat_line("later", kernel("k", "tag"))]).id)
    assert file_lines(client, other.output_file_id or "") == []  # counted per file: a new one starts afresh
    server.config.download_fault_times = 1  # any change of the knobs starts the count again
    assert [len(file_lines(client, file_id)) for _ in range(2)] == [0, 6]
    assert server.stats.faults["empty"] == 6

    def hit_batches(seed: int) -> list[bool]:
        srv = make_server(seed=seed)
        c = oai(srv)
        outputs = [poll(c, submit(c, [chat_line(f"f{i}", kernel("k", "tag"))]).id).output_file_id for i in range(12)]
        srv.config.update({"download_fault": "empty", "download_fault_fraction": 0.5})
        return [c.files.content(fid or "").content == b"" for fid in outputs]

    hits = hit_batches(5)
    assert 0 < sum(hits) < 12 and hit_batches(5) == hits


def test_auth_after_n_calls_answers_401_until_reset(make_server: ServerFactory) -> None:
    server = make_server()
    client, claude = oai(server), ant(server)
    server.config.auth_after = 3
    assert [client.models.retrieve(f"gpt-{i}").id for i in range(2)] == ["gpt-0", "gpt-1"]
    assert claude.models.retrieve("claude-emu").id == "claude-emu"
    with pytest.raises(openai.AuthenticationError) as info:
        client.batches.list()
    assert info.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as ant_info:
        claude.messages.batches.list()
    assert ant_info.value.type == "authentication_error"
    status, stats = control(server, "GET", "/_emulator/stats", headers=server.control_headers())
    assert status == 200 and stats["faults"] == {"auth_after": 2}  # control calls are not API calls

    headers = server.control_headers()
    assert control(server, "POST", "/_emulator/config", b'{"auth_after": null}', headers)[0] == 200
    assert client.batches.list().data == [] and claude.messages.batches.list().data == []
    assert control(server, "POST", "/_emulator/config", b'{"auth_after": 1}', headers)[0] == 200
    assert client.models.retrieve("gpt-x").id == "gpt-x"
    with pytest.raises(openai.AuthenticationError):
        client.models.retrieve("gpt-y")
    assert server.stats.faults == Counter({"auth_after": 3})
