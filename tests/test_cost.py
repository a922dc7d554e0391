"""Cost before and after: the price table, calibrated estimates, the budget gate, the ledger and status."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hipbatch.config import load_config
from hipbatch.cost import LEDGER_KEYS, load_prices, usd
from hipbatch.emulator import LocalBatchServer
from hipbatch.render import REPO_ROOT
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

MODEL = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}  # the templates


def split_examples(tmp_path: Path) -> tuple[Path, Path]:
    """The bundled real kernels in two halves: one to calibrate on, one to estimate."""
    files = sorted((REPO_ROOT / "examples" / "hip").rglob("*.hip"))
    first, second = tmp_path / "first", tmp_path / "second"
    for n, path in enumerate(files):
        dest = (first if n % 2 == 0 else second) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return first, second


def billed(server: LocalBatchServer) -> dict[str, int]:
    s = server.stats
    return {
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "cache_read_tokens": s.cache_read_tokens,
        "cache_write_tokens": s.cache_write_tokens,
    }


def ledger_json(*args: str) -> dict[str, Any]:
    return json.loads(cli("cost", "--json", *args).stdout)


# ---- the price table ------------------------------------------------------------------------------


def test_price_table_ships_with_a_check_date_and_never_guesses() -> None:
    prices = load_prices()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", prices.checked)
    assert prices.batch_discount == 0.5
    mini = prices.lookup("openai", "gpt-4o-mini")
    assert mini is not None and (mini.input, mini.cache_read, mini.output) == (0.15, 0.075, 0.60)
    dated = prices.lookup("openai", "gpt-4o-mini-2024-07-18")  # a date suffix falls back to the base model
    assert dated is not None and dated.matched == "gpt-4o-mini" and dated.input == mini.input
    assert prices.lookup("openai", "gpt-4o-2024-05-13").input == 5.0  # a snapshot with its own price wins
    sonnet = prices.lookup("anthropic", "claude-sonnet-4-5-20250929")
    assert sonnet is not None and (sonnet.input, sonnet.output, sonnet.cache_write) == (3.0, 15.0, 6.0)
    assert prices.lookup("anthropic", "claude-opus-4-0").input == 15.0  # alias
    assert prices.lookup("openai", "gpt-other") is None
    assert prices.lookup("anthropic", "gpt-4o-mini") is None  # prices are per provider


def test_price_file_is_shipped_as_package_data() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hipbatch"]
    assert any(Path("data/prices.toml").match(p) for p in patterns)
    assert (REPO_ROOT / "hipbatch" / "data" / "prices.toml").is_file()


def test_cost_formula_follows_each_providers_usage_fields() -> None:
    prices = load_prices()
    # OpenAI: prompt_tokens include the cached ones, which are billed at the cache-read rate.
    mini = prices.lookup("openai", "gpt-4o-mini")
    assert mini is not None
    live = 1_000_000 * 0.15 / 1e6 - 400_000 * 0.15 / 1e6 + 400_000 * 0.075 / 1e6 + 200_000 * 0.60 / 1e6
    assert mini.cost(1_000_000, 200_000, cache_read=400_000, live=True) == pytest.approx(live)
    assert mini.cost(1_000_000, 200_000, cache_read=400_000) == pytest.approx(live / 2)
    # Anthropic: input_tokens exclude cache reads and writes, each billed at its own rate.
    haiku = prices.lookup("anthropic", "claude-haiku-4-5")
    assert haiku is not None
    assert haiku.cost(1000, 100, cache_read=5000, cache_write=2000, live=True) == pytest.approx(
        (1000 * 1.0 + 5000 * 0.10 + 2000 * 2.0 + 100 * 5.0) / 1e6
    )
    # The worst case assumes no cache hits and every prefix written again (1 h writes cost 2x input).
    assert haiku.worst_case(1000, 100) == pytest.approx((1000 * 2.0 + 100 * 5.0) / 2e6)
    assert mini.worst_case(1000, 100) == pytest.approx((1000 * 0.15 + 100 * 0.60) / 2e6)


def test_config_file_adds_and_overrides_prices(tmp_path: Path) -> None:
    Path("hipbatch.toml").write_text(
        '[prices.openai."gpt-other"]\ninput = 1.0\noutput = 4.0\n\n[prices.openai."gpt-4o-mini"]\ninput = 0.2\n',
        encoding="utf-8",
    )
    prices = load_prices(load_config(None))
    other = prices.lookup("openai", "gpt-other")
    assert other is not None and (other.input, other.output, other.cache_read) == (1.0, 4.0, 1.0)
    assert "hipbatch.toml" in other.source
    mini = prices.lookup("openai", "gpt-4o-mini")
    assert mini is not None and (mini.input, mini.output) == (0.2, 0.60)  # merged with the shipped entry
    hip = make_hip_dir(tmp_path / "k", 3)
    out = json.loads(cli("submit", hip, "--dry-run", "--model", "gpt-other", "--json").stdout)
    est = out["estimate"]
    assert est["batch_usd"] == pytest.approx((est["input_tokens"] * 1.0 + 3 * 1024 * 4.0) / 2e6)


@pytest.mark.parametrize(
    "text, complaint",
    [
        ('[prices.openai."m"]\ninput = "cheap"\noutput = 1\n', 'prices.openai."m".input: expected a price'),
        ('[prices.openai."m"]\ninput = 1\n', 'prices.openai."m": missing output'),
        ('[prices.openai."m"]\ninput = 1\noutput = 2\nfoo = 3\n', "unknown key 'foo'"),
    ],
)
def test_bad_price_in_config_is_a_one_line_error(hip_dir: Path, text: str, complaint: str) -> None:
    Path("hipbatch.toml").write_text(text, encoding="utf-8")
    result = cli("submit", hip_dir, "--dry-run", code=2)
    assert result.stderr.startswith("Error: hipbatch.toml: ") and complaint in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- before: the estimate and the budget gate -----------------------------------------------------


def test_dry_run_prints_tokens_and_cost_batch_next_to_live(hip_dir: Path) -> None:
    result = cli("submit", hip_dir, "--dry-run")
    assert "6 requests to send in 1 shards" in result.stderr
    assert "output at most 6,144" in result.stderr
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("Estimated cost"))
    batch, live = (float(v) for v in re.findall(r"\$([0-9.]+)", line))
    assert live == pytest.approx(2 * batch, rel=1e-3) and batch > 0
    assert "not yet calibrated" in result.stderr
    est = json.loads(cli("submit", hip_dir, "--dry-run", "--json").stdout)["estimate"]
    assert est["requests"] == 6 and est["output_ceiling"] == 6 * 1024 and est["calibrated"] is False
    mini = load_prices().lookup("openai", "gpt-4o-mini")
    assert mini is not None
    assert est["batch_usd"] == pytest.approx((est["input_tokens"] * 0.15 + 6 * 1024 * 0.60) / 2e6)
    assert est["live_usd"] == pytest.approx(2 * est["batch_usd"])


def test_unknown_model_warns_and_gives_no_dollar_figures(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    dry = cli("submit", hip_dir, "--dry-run", "--model", "gpt-other")
    assert "Warning: no price known for openai model 'gpt-other'" in dry.stderr
    assert "Estimated cost" not in dry.stderr and "$" not in dry.stderr
    cli("submit", hip_dir, "--model", "gpt-other")
    cli("collect", "--wait", "--poll-interval", "0.05")
    result = cli("cost", "--json")
    assert "Warning: no price known" in result.stderr
    data = json.loads(result.stdout)
    (row,) = data["rows"]
    assert row["model"] == "gpt-other" and row["requests"] == 6 and row["input_tokens"] > 0
    assert row["cost_usd"] is None and row["live_equivalent_usd"] is None and row["committed_usd"] is None
    assert data["total"]["cost_usd"] is None and data["total"]["input_tokens"] == row["input_tokens"]
    status = json.loads(cli("status", "--json").stdout)
    assert status[0]["job_summary"]["cost_usd"] is None
    assert "cost so far unknown" in cli("status").stdout


def test_budget_gate_refuses_before_any_upload(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    dry = json.loads(cli("submit", hip_dir, "--provider", provider, "--dry-run", "--json").stdout)["estimate"]
    worst = dry["batch_usd"]
    result = cli("submit", hip_dir, "--provider", provider, "--max-cost", f"{worst * 0.9:.8f}", code=1)
    assert result.stderr.startswith("Error: estimated worst case") and "over --max-cost" in result.stderr
    assert "nothing was sent" in result.stderr
    assert server.stats.files_uploaded == 0 and server.stats.batches_created == 0
    assert Store(Path("state")).request_counts() == {}  # nothing queued for a later status/collect to send
    cli("status")
    cli("collect")
    assert server.stats.files_uploaded == 0 and server.stats.batches_created == 0
    cli("submit", hip_dir, "--provider", provider, "--max-cost", f"{worst * 1.1:.8f}")
    assert server.stats.batches_created == 1


def test_budget_gate_counts_requests_queued_earlier(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    first = make_hip_dir(tmp_path / "a", 4)
    second = make_hip_dir(tmp_path / "b", 4, start=100)
    cli("submit", first, "--max-in-flight-batches", "1")
    cli("submit", second, "--max-in-flight-batches", "1")  # waits in the local queue
    assert openai_env.stats.batches_created == 1
    third = make_hip_dir(tmp_path / "c", 1, start=200)
    alone = json.loads(cli("submit", third, "--dry-run", "--json").stdout)["estimate"]["batch_usd"]
    result = cli("submit", third, "--max-cost", f"{alone * 1.5:.8f}", code=1)
    assert "for 4 request(s) queued earlier" in result.stderr
    assert openai_env.stats.batches_created == 1


def test_max_cost_with_an_unknown_price_refuses(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    result = cli("submit", hip_dir, "--model", "gpt-other", "--max-cost", "100", code=1)
    assert "cannot check the budget" in result.stderr and "no price known" in result.stderr
    assert openai_env.stats.files_uploaded == 0


def test_estimate_is_calibrated_within_ten_percent(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    first, second = split_examples(tmp_path)
    cli("submit", first, "--provider", provider)
    cli("collect", "--wait", "--poll-interval", "0.05")
    text = cli("submit", second, "--provider", provider, "--dry-run").stderr
    assert f"calibrated on 7 answered request(s) of {provider}/{MODEL[provider]}" in text
    est = json.loads(cli("submit", second, "--provider", provider, "--dry-run", "--json").stdout)["estimate"]
    assert est["calibrated"] is True and est["calibration_samples"] == 7
    before = billed(server)
    cli("submit", second, "--provider", provider)
    cli("collect", "--wait", "--poll-interval", "0.05")
    after = billed(server)
    # What the emulator counted (fake_model.count_tokens), however the provider splits it into cache fields.
    # OpenAI and Gemini count cached tokens inside the input tokens; Anthropic counts them apart.
    kinds = ["input_tokens"] if provider != "anthropic" else ["input_tokens", "cache_read_tokens", "cache_write_tokens"]
    actual = sum(after[k] - before[k] for k in kinds)
    assert abs(est["input_tokens"] - actual) / actual < 0.10
    assert abs(est["local_input_tokens"] - actual) / actual > 0.10  # the calibration is what closes the gap
    # The likely cost uses the reply length seen so far, and never exceeds the worst case.
    assert est["likely_batch_usd"] < est["batch_usd"]


# ---- after: the ledger ----------------------------------------------------------------------------


def expected_cost(provider: str, server: LocalBatchServer) -> float:
    price = load_prices().lookup(provider, MODEL[provider])
    assert price is not None
    b = billed(server)
    return price.cost(b["input_tokens"], b["output_tokens"], b["cache_read_tokens"], b["cache_write_tokens"])


def test_cost_json_shape_and_agreement_with_the_emulator(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "k", 12)
    cli("submit", root, "--provider", provider, "--job", "alpha")
    committed = ledger_json()["total"]["committed_usd"]
    assert committed > 0  # worst case reserved at submit, before anything is answered
    cli("collect", "--wait", "--poll-interval", "0.05")
    data = ledger_json()
    assert set(data) == {"rows", "total"}
    (row,) = data["rows"]
    assert set(row) == {"job", "provider", "model", *LEDGER_KEYS}
    assert set(data["total"]) == set(LEDGER_KEYS)
    assert (row["job"], row["provider"], row["model"]) == ("alpha", provider, MODEL[provider])
    assert row["requests"] == 12
    assert {k: row[k] for k in billed(server)} == billed(server)
    assert round(row["cost_usd"], 2) == round(expected_cost(provider, server), 2)
    assert row["cost_usd"] == pytest.approx(expected_cost(provider, server), abs=1e-6)
    assert row["live_equivalent_usd"] == pytest.approx(2 * row["cost_usd"], abs=2e-6)
    assert row["committed_usd"] == 0.0
    assert row["cost_usd"] < committed  # the worst case is an upper bound
    table = cli("cost", "--job", "alpha").stdout
    assert "alpha" in table and usd(row["cost_usd"]) in table
    assert cli("cost", "--job", "nope", code=2).stderr.startswith("Error: --job nope: no such job")


def test_recollect_and_status_do_not_change_the_ledger(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 8)
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.05")
    first = ledger_json()
    for _ in range(2):
        cli("status")
        cli("collect")
    store = Store(Path("state"))
    ledger_db(store).execute("UPDATE batches SET collected = 0")  # as if killed before the batch was marked collected
    cli("collect")
    cli("collect", "--reextract")
    assert ledger_json() == first
    assert {k: first["total"][k] for k in billed(openai_env)} == billed(openai_env)


def crash_before_attach(store: Store) -> None:
    """The store as a submit killed after the provider created the batch but before its id was saved."""
    with store.atomic():
        ledger_db(store).execute("UPDATE shards SET state = 'creating', batch_id = NULL")
        ledger_db(store).execute("UPDATE requests SET state = 'pending', batch_id = NULL, attempts = attempts - 1")
        ledger_db(store).execute("DELETE FROM batches")
        store.rebuild_stats()  # the ledger was changed from outside: its counts are taken again


def test_adopted_batch_is_counted_once(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 6)
    cli("submit", root, "--provider", provider)
    crash_before_attach(Store(Path("state")))
    cli("collect", "--wait", "--poll-interval", "0.05")  # resumes the create: finds and adopts the batch
    store = Store(Path("state"))
    assert [b.adopted for b in store.batches()] == [True]
    assert server.stats.batches_created == 1 and set(server.stats.answered.values()) == {1}
    first = ledger_json()
    assert {k: first["total"][k] for k in billed(server)} == billed(server)
    # The same batch attached again (a second adoption) and read again: nothing moves.
    batch = store.batches()[0]
    shard = store.shard(batch.shard_id)

    store.attach_batch(shard, batch.info(), adopted=True)
    ledger_db(store).execute("UPDATE batches SET collected = 0")
    cli("collect")
    assert ledger_json() == first
    assert round(first["total"]["cost_usd"], 2) == round(expected_cost(provider, server), 2)


# ---- status at a glance ---------------------------------------------------------------------------


def test_status_summary_expiry_and_top_error(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    openai_env.config.polls_to_complete = 1000  # stays running
    root = make_hip_dir(tmp_path / "k", 5)
    cli("submit", root, "--job", "run")
    rows = json.loads(cli("status", "--json").stdout)
    assert isinstance(rows, list) and len(rows) == 1
    (row,) = rows
    assert 23 * 3600 < row["expires_in_seconds"] <= 24 * 3600 and row["top_error"] is None
    assert row["job_summary"] == {
        "requests": 5,
        "done": 0,
        "failed": 0,
        "in_flight": 5,
        "queued": 0,
        "superseded": 0,
        "cost_usd": 0.0,
        "committed_usd": row["job_summary"]["committed_usd"],
        "states": {"submitted": 5},
    }
    assert row["job_summary"]["committed_usd"] > 0
    text = cli("status").stdout
    assert text.index("run: 5 requests: 0 done, 0 failed, 5 in flight, 0 queued") < text.index("batch id")
    assert "expires in" in text and ("23h59m" in text or "24h00m" in text)


def test_completed_with_zero_succeeded_says_why(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.request_error_rate = 1.0
    cli("submit", hip_dir)
    before = json.loads(cli("status", "--json").stdout)[0]
    assert before["status"] == "completed" and before["done"] == 0
    assert before["top_error"]["reason"] == "not collected yet" and before["expires_in_seconds"] is None
    cli("collect")
    after = json.loads(cli("status", "--json").stdout)[0]
    top = after["top_error"]
    assert top["reason"] == "failed:server_error" and top["count"] == 6 and top["message"]
    assert after["job_summary"]["failed"] == 6 and after["job_summary"]["cost_usd"] == 0.0
    text = cli("status").stdout
    assert "failed:server_error (6)" in text and "0 done, 6 failed" in text


def test_batch_refused_as_a_whole_shows_its_reason(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.validation_error_rate = 1.0
    cli("submit", hip_dir)
    row = json.loads(cli("status", "--json").stdout)[0]
    assert row["status"] == "failed" and row["top_error"]["reason"].startswith("batch failed:")


@pytest.mark.parametrize("mode", ["retry", "live"])
def test_paid_answers_asked_again_stay_in_the_ledger(openai_env: LocalBatchServer, hip_dir: Path, mode: str) -> None:
    """A truncated answer is paid for; asking again (retry or live) must not drop it from the ledger."""
    openai_env.config.forms = "truncated"
    cli("submit", hip_dir)
    cli("collect", "--wait", "--poll-interval", "0.05")
    first = json.loads(cli("cost", "--json").stdout)["total"]
    assert first["output_tokens"] == openai_env.stats.output_tokens > 0
    openai_env.config.forms = "tag"
    if mode == "retry":
        cli("retry", "--only", "truncated")
        summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    else:
        summary = json.loads(cli("run", hip_dir, "--json").stdout)
    assert read_dataset(Path("data/generated_prompts.json")) and summary
    total = json.loads(cli("cost", "--json").stdout)["total"]
    # every answer the server billed, both attempts, counted once each
    assert total["input_tokens"] == openai_env.stats.input_tokens
    assert total["output_tokens"] == openai_env.stats.output_tokens
    assert total["input_tokens"] > first["input_tokens"] and total["cost_usd"] > first["cost_usd"]
    again = json.loads(cli("cost", "--json").stdout)["total"]
    cli("collect")
    assert json.loads(cli("cost", "--json").stdout)["total"] == again  # re-collect changes nothing
