"""The local queue: in-flight windows, quota refusals sent back to the queue, and `drain` to the end.

Everything goes through the CLI, the real OpenAI SDK and the local batch server on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hipbatch.config import Config
from hipbatch.emulator import LocalBatchServer
from hipbatch.emulator.fake_model import prompt_tokens
from hipbatch.queue import Window, Windows, stalled
from hipbatch.render import load_template
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset


def emulator_tokens(root: Path, name: str) -> int:
    """Input tokens of one request as the local server's quota counts them."""
    template = load_template(Path("templates/default"))
    system, user = template.render((root / name).read_text(encoding="utf-8"), name)
    return prompt_tokens(system, user)


def shard_states(store: Store) -> list[str]:
    return [s["state"] for s in ledger_db(store).table("shards").rows_where(order_by="id")]


def test_max_in_flight_batches_leaves_the_rest_queued(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 30)
    openai_env.config.polls_to_complete = 1000  # batches stay in flight for the whole test
    out = cli("submit", root, "--max-requests-per-batch", "5", "--max-in-flight-batches", "2")
    assert openai_env.stats.batches_created == 2
    assert "4 shard(s) wait in the local queue" in out.stderr
    store = Store(Path("state"))
    assert shard_states(store).count("queued") == 4
    assert store.request_counts() == {"submitted": 10, "pending": 20}
    # A status refresh (not --watch) and a second submit do not push past the window.
    cli("status")
    cli("submit", root, "--max-requests-per-batch", "5", "--max-in-flight-batches", "2")
    assert openai_env.stats.batches_created == 2
    cli("submit", root, "--max-in-flight-batches", "3")
    assert openai_env.stats.batches_created == 3


def test_max_enqueued_tokens_window(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 30)
    openai_env.config.polls_to_complete = 1000
    dry = json.loads(cli("submit", root, "--dry-run", "--max-requests-per-batch", "5", "--json").stdout)
    per_shard = dry["prepare"]["est_input_tokens"] / 6
    cli("submit", root, "--max-requests-per-batch", "5", "--max-enqueued-tokens", str(int(per_shard * 2.5)))
    assert openai_env.stats.batches_created == 2
    store = Store(Path("state"))
    batches, tokens = store.in_flight("openai", "gpt-4o-mini")
    assert batches == 2 and tokens <= per_shard * 2.5


def test_window_defaults_come_from_the_config(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    Path("hipbatch.toml").write_text("[providers.openai]\nmax_in_flight_batches = 1\n", encoding="utf-8")
    root = make_hip_dir(tmp_path / "k", 12)
    openai_env.config.polls_to_complete = 1000
    cli("submit", root, "--max-requests-per-batch", "4")
    assert openai_env.stats.batches_created == 1
    cli("submit", root, "--max-requests-per-batch", "4", "--max-in-flight-batches", "2")  # the option wins
    assert openai_env.stats.batches_created == 2


def test_windows_are_built_per_provider_from_config() -> None:
    config = Config(providers={"openai": {"max_in_flight_batches": 3, "max_enqueued_tokens": 500}})
    windows = Windows(config)
    assert (windows["openai"].max_in_flight_batches, windows["openai"].max_enqueued_tokens) == (3, 500)
    assert (windows["anthropic"].max_in_flight_batches, windows["anthropic"].max_enqueued_tokens) == (
        100,
        None,
    )
    overridden = Windows(config, max_in_flight=7, max_tokens=900)
    assert (overridden["openai"].max_in_flight_batches, overridden["openai"].max_enqueued_tokens) == (7, 900)
    assert windows["openai"] is windows["openai"]  # one object per provider, kept across polls


def test_window_shrinks_on_refusal_and_grows_back_on_success() -> None:
    window = Window(max_enqueued_tokens=5000)
    window.refused("m", 3000)
    assert window.shrunk == {"m": 3000}
    window.refused("m", 4000)  # a later refusal never widens it
    assert window.shrunk == {"m": 3000}
    window.succeeded("other", 100)  # other models are unaffected
    window.succeeded("m", 1000)
    assert window.shrunk == {"m": 4000}
    window.succeeded("m", 1000)  # back to the configured window: the shrink is over
    assert window.shrunk == {}
    window.refused("m", 0)
    assert window.shrunk == {"m": 1}  # nothing enqueued: one shard at a time still goes


def test_stalled_only_when_nothing_can_move() -> None:
    assert stalled(unfinished=0, queued=3, created=0, adopted=0)
    assert not stalled(unfinished=1, queued=3, created=0, adopted=0)
    assert not stalled(unfinished=0, queued=3, created=1, adopted=0)
    assert not stalled(unfinished=0, queued=0, created=0, adopted=0)


def test_token_limit_refusal_is_requeued_and_later_completes(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 15)
    per_request = emulator_tokens(root, "k0001.hip")
    openai_env.config.enqueued_token_limit = int(per_request * 5 * 1.5)  # one shard of 5 fits, two do not
    cli("submit", root, "--max-requests-per-batch", "5")
    assert openai_env.stats.batches_created == 3  # all sent: hipbatch does not know the quota yet
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.02", "--json").stdout)
    assert summary["succeeded"] == 15 and summary["records"] == 15 and summary["failed"] == 0
    store = Store(Path("state"))
    requeues = [int(s["requeues"] or 0) for s in ledger_db(store).table("shards").rows_where(order_by="id")]
    assert requeues[0] == 0 and requeues[1] >= 1 and requeues[2] >= 1
    refused = [b for b in store.batches() if b.status == "failed"]
    assert len(refused) >= 2 and all(any(e.get("code") == "token_limit_exceeded" for e in b.errors) for b in refused)
    # A refusal is not an attempt: every request went through once, and the server ran each once.
    assert {r["attempts"] for r in ledger_db(store).table("requests").rows} == {1}
    assert len(openai_env.stats.sent) == 15 and set(openai_env.stats.sent.values()) == {1}
    assert len(read_dataset(Path("data/generated_prompts.json"))) == 15


def test_collect_wait_keeps_one_window_across_polls(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    from hipbatch import ops
    from hipbatch.views import Out

    root = make_hip_dir(tmp_path / "k", 20)
    openai_env.config.enqueued_token_limit = int(emulator_tokens(root, "k0001.hip") * 5 * 1.5)
    cli("submit", root, "--max-requests-per-batch", "5")
    windows = Windows(Config())
    opts = ops.CollectOptions(Path("out.json"), wait=True, poll_interval=0.02, timeout=60)
    summary = ops.collect(ops.Context(Path("state")), opts, Out(quiet=True), windows)
    assert summary["succeeded"] == 20
    # The refusal shrank the window, and the same object was used (and grown) by the later polls.
    assert "gpt-4o-mini" in windows["openai"].shrunk
    assert set(openai_env.stats.sent.values()) == {1}


@pytest.mark.parametrize("window", [[], ["--max-enqueued-tokens", "QUOTA"]])
def test_drain_runs_many_small_shards_through_a_small_quota(
    openai_env: LocalBatchServer, tmp_path: Path, window: list[str]
) -> None:
    n, per_shard = 120, 6
    root = make_hip_dir(tmp_path / "k", n)
    quota = int(emulator_tokens(root, "k0001.hip") * per_shard * 3.2)  # about three shards of twenty at once
    openai_env.config.enqueued_token_limit = quota
    openai_env.config.polls_to_complete = 2
    window = [quota_arg if quota_arg != "QUOTA" else str(quota // 2) for quota_arg in window]
    cli("submit", root, "--max-requests-per-batch", str(per_shard), *window)
    result = cli("drain", "--poll-interval", "0.01", "--timeout", "120", "--json", *window)
    summary: dict[str, Any] = json.loads(result.stdout)
    assert summary["records"] == n and summary["succeeded"] == n and summary["pending"] == 0
    store = Store(Path("state"))
    assert shard_states(store).count("queued") == 0
    assert store.batches(unfinished_only=True) == []
    assert {r["attempts"] for r in ledger_db(store).table("requests").rows} == {1}
    assert len(openai_env.stats.sent) == n and set(openai_env.stats.sent.values()) == {1}
    records = read_dataset(Path("data/generated_prompts.json"))
    assert sorted(r["file_name"] for r in records) == sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.hip")
    )
    if window:  # with the window set below the quota, the provider never had to refuse anything
        assert all(b.status != "failed" for b in store.batches())


def test_status_watch_feeds_the_queue(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 12)
    cli("submit", root, "--max-requests-per-batch", "4", "--max-in-flight-batches", "1")
    assert openai_env.stats.batches_created == 1
    Path("hipbatch.toml").write_text("[providers.openai]\nmax_in_flight_batches = 1\n", encoding="utf-8")
    rows = json.loads(cli("status", "--watch", "--interval", "0.05", "--json").stdout)
    assert openai_env.stats.batches_created == 3
    assert len(rows) == 3 and all(r["is_final"] for r in rows)
    assert shard_states(Store(Path("state"))).count("queued") == 0
