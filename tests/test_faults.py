"""Transient faults on every call (429 with Retry-After, 5xx, dropped connections, truncated downloads, a
create whose answer is lost) are retried by one policy and never lose a result or pay twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.emulator.config import FAULT_KINDS
from hipbatch.errors import ProviderError, TransientError
from hipbatch.poll import MAX_RETRY_AFTER, Policy, retrying
from hipbatch.providers import ProviderSettings, get_provider
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--json")
CREATE = {"openai": "openai.batches.create", "anthropic": "anthropic.batches.create", "gemini": "gemini.batches.create"}
RETRIEVE = {
    "openai": "openai.batches.retrieve",
    "anthropic": "anthropic.batches.retrieve",
    "gemini": "gemini.batches.get",
}
DOWNLOAD = {
    "openai": "openai.files.content",
    "anthropic": "anthropic.batches.results",
    "gemini": "gemini.files.download",
}


def all_ids() -> set[str]:
    store = Store(Path("state"))
    try:
        return {r["custom_id"] for r in ledger_db(store).table("requests").rows}
    finally:
        store.close()


def assert_each_answered_once(server: LocalBatchServer, n: int) -> None:
    ids = all_ids()
    assert len(ids) == n
    assert set(server.stats.answered) == ids and all(v == 1 for v in server.stats.answered.values())
    assert set(server.stats.sent) == ids and all(v == 1 for v in server.stats.sent.values())


@pytest.mark.slow
def test_ten_percent_faults_on_every_endpoint(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 40)
    server.config.seed = 7
    server.config.polls_to_complete = 2
    server.config.fault_kinds = FAULT_KINDS  # 429, 500, drop, truncate and drop_after
    server.config.fault_rate = 0.1
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", "5")
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["succeeded"] == 40 and summary["records"] == 40 and summary["pending"] == 0
    assert sum(server.stats.faults.values()) >= 5 and len(server.stats.faults) >= 3
    assert_each_answered_once(server, 40)
    assert server.stats.batches_created == 8  # one per shard: a create whose answer was lost was adopted
    records = read_dataset(Path("data/generated_prompts.json"))
    assert len({r["file_name"] for r in records}) == 40


def test_lost_create_answer_is_adopted_not_created_again(
    provider: str, server: LocalBatchServer, hip_dir: Path
) -> None:
    # The provider creates the batch, then the connection drops before the answer: the classic duplicate.
    server.config.fault_routes = (CREATE[provider],)
    server.config.fault_kinds = ("drop_after",)
    server.config.fault_rate = 1.0
    out = cli("submit", hip_dir, "--provider", provider, "--max-requests-per-batch", "3")
    assert server.stats.batches_created == 2 and server.stats.faults["drop_after"] == 2
    assert "Created 2 batch(es)" in out.stderr
    server.config.fault_rate = 0.0
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 6
    assert_each_answered_once(server, 6)


def test_create_refused_with_5xx_is_retried(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    server.config.fault_routes = (CREATE[provider],)
    server.config.fault_kinds = ("500", "429")
    server.config.fault_rate = 0.5
    cli("submit", hip_dir, "--provider", provider, "--max-requests-per-batch", "2")
    assert server.stats.batches_created == 3 and sum(server.stats.faults.values()) > 0
    server.config.fault_rate = 0.0
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 6
    assert_each_answered_once(server, 6)


def adapter(server: LocalBatchServer, name: str) -> Any:
    url = {"openai": server.openai_base_url, "anthropic": server.anthropic_base_url, "gemini": server.gemini_base_url}
    return get_provider(ProviderSettings(name=name, key_env=f"{name.upper()}_API_KEY", base_url=url[name]))


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_retry_after_is_honoured_and_capped(
    server: LocalBatchServer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{name.upper()}_API_KEY", "test-key")
    provider = adapter(server, name)
    server.config.fault_routes = (RETRIEVE[name],)
    server.config.fault_kinds = ("429",)
    server.config.fault_rate = 1.0
    server.config.retry_after_ms = 2500
    slept: list[float] = []
    with pytest.raises(TransientError, match="429"):
        retrying(provider.status, "batch_whatever", sleep=slept.append, rule=Policy(attempts=3))
    assert slept == [2.5, 2.5]
    server.config.retry_after_ms = 3_600_000  # an hour: waited only up to the cap
    slept.clear()
    with pytest.raises(TransientError):
        retrying(provider.status, "batch_whatever", sleep=slept.append, rule=Policy(attempts=3))
    assert slept == [MAX_RETRY_AFTER, MAX_RETRY_AFTER]
    assert server.stats.faults["429"] == 6


def test_backoff_without_retry_after_and_no_retry_on_a_final_error() -> None:
    slept: list[float] = []
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise TransientError("connection reset")
        return "ok"

    assert retrying(flaky, sleep=slept.append) == "ok"
    assert len(slept) == 3 and slept[0] < slept[1] < slept[2] <= 30.0

    def broken() -> str:
        calls.append(1)
        raise ProviderError("HTTP 400: bad request")

    calls.clear()
    with pytest.raises(ProviderError):
        retrying(broken, sleep=slept.append)
    assert len(calls) == 1  # a final error is not retried


def test_failed_status_check_leaves_the_batch_as_it_was(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    server.config.polls_to_complete = 2
    cli("submit", hip_dir, "--provider", provider)
    before = json.loads(cli("status", "--json").stdout)[0]
    assert not before["is_final"]
    server.config.fault_routes = (RETRIEVE[provider],)
    server.config.fault_kinds = ("500",)
    server.config.fault_rate = 1.0
    result = cli("status", "--json")
    assert "status check failed, batch left as it was" in result.stderr
    after = json.loads(result.stdout)[0]
    assert (after["status"], after["is_final"]) == (before["status"], False)
    summary = json.loads(cli("collect", "--json").stdout)  # one pass, no wait: still nothing lost
    assert summary["pending"] == 6 and summary["failed"] == 0
    server.config.fault_rate = 0.0
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 6
    assert_each_answered_once(server, 6)


def test_truncated_downloads_are_fetched_again(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 12)
    server.config.fault_routes = (DOWNLOAD[provider],)
    server.config.fault_kinds = ("truncate",)
    server.config.fault_rate = 0.35
    cli("submit", root, "--provider", provider, "--max-requests-per-batch", "3")
    summary = json.loads(cli(*WAIT).stdout)
    assert server.stats.faults["truncate"] >= 1
    assert summary["succeeded"] == 12 and summary["records"] == 12
    assert_each_answered_once(server, 12)


def test_download_that_stays_corrupt_leaves_the_batch_uncollected(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    openai_env.config.fault_routes = ("openai.files.content",)
    openai_env.config.fault_kinds = ("truncate",)
    openai_env.config.fault_rate = 1.0
    result = cli("collect", "--json")
    assert "left uncollected" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["pending"] == 6 and summary["failed"] == 0  # not marked missing or failed
    store = Store(Path("state"))
    assert [b.collected for b in store.batches()] == [False]
    store.close()
    openai_env.config.fault_rate = 0.0
    assert json.loads(cli("collect", "--json").stdout)["succeeded"] == 6
