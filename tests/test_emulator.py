"""The local batch server, driven by the real openai and anthropic SDKs over a socket on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import anthropic
import openai
import pytest
from anthropic.types.messages.batch_create_params import Request

from hipbatch.emulator import EmulatorConfig, LocalBatchServer
from hipbatch.emulator import fake_model as fm
from hipbatch.emulator.common import live_key

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

    def make(**config: Any) -> LocalBatchServer:
        server = LocalBatchServer(port=0, config=EmulatorConfig(**config)).start()
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
            ("GET", "/_emulator/stats", {}),
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
    try:
        conn.request("POST", "/_emulator/complete-all")
        assert conn.getresponse().read() == b'{"ok": true}'
        conn.request("POST", "/_emulator/config", body=json.dumps({"forms": "fenced"}))
        assert json.loads(conn.getresponse().read())["forms"] == "fenced"
        conn.request("POST", "/_emulator/config", body=json.dumps({"forms": "nope"}))
        response = conn.getresponse()
        assert response.status == 400 and "unknown reply form" in json.loads(response.read())["error"]["message"]
        conn.request("POST", "/_emulator/reset-stats")
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
        conn.request("POST", "/_emulator/config", body=body, encode_chunked=True)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["forms"]) == (200, "bare")
        conn.request("GET", "/_emulator/health")
        assert json.loads(conn.getresponse().read()) == {"ok": True, "url": server.url}
    finally:
        conn.close()
