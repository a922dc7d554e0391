"""Config file and precedence: command line > environment > config file > template defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hipbatch.config import load_config, resolve
from hipbatch.emulator import LocalBatchServer
from tests.conftest import cli, ledger_db

TEMPLATE = {"model": "tpl-model", "max_tokens": 100, "temperature": 0.5}


def test_template_defaults_when_nothing_else() -> None:
    settings, model, params = resolve(load_config(None), "openai", TEMPLATE)
    assert model == "tpl-model" and params == {"max_tokens": 100, "temperature": 0.5}
    assert settings.key_env == "OPENAI_API_KEY" and settings.base_url is None


def test_precedence_cli_env_config_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hipbatch.toml").write_text(
        '[providers.openai]\nmodel = "cfg-model"\nmax_tokens = 200\nbase_url = "http://cfg/v1"\n'
        'api_key_env = "MY_KEY"\n'
    )
    config = load_config(None)
    settings, model, params = resolve(config, "openai", TEMPLATE)
    assert (model, params["max_tokens"], params["temperature"]) == ("cfg-model", 200, 0.5)
    assert settings.base_url == "http://cfg/v1" and settings.key_env == "MY_KEY"
    monkeypatch.setenv("HIPBATCH_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env/v1")
    settings, model, _ = resolve(config, "openai", TEMPLATE)
    assert model == "env-model" and settings.base_url == "http://env/v1"
    _, model, _ = resolve(config, "openai", TEMPLATE, model="cli-model")
    assert model == "cli-model"


def test_seed_style_config_json_with_literal_key_warns_and_never_copies(
    openai_env: LocalBatchServer, hip_dir: Path, tmp_path: Path
) -> None:
    secret = "sk-literal-secret-123"
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"providers": {"openai": {"model": "json-model", "api_key": secret}, "anthropic": {"model": "claude-x"}}}
        )
    )
    out = cli("submit", hip_dir)
    assert "literal key" in out.stderr and "ignored" in out.stderr and secret not in out.stderr
    cli("collect", "--wait", "--poll-interval", "0.05")
    assert {r["model"] for r in json.loads(Path("data/generated_prompts.json").read_text())} == {"json-model"}
    for path in [*Path("state").rglob("*"), Path("data/generated_prompts.json")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
            assert b"test-key" not in path.read_bytes(), path  # the env key is never stored either


def test_key_env_from_config(
    server: LocalBatchServer, hip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hipbatch.toml").write_text(
        f'[providers.anthropic]\napi_key_env = "TEAM_CLAUDE_KEY"\nbase_url = "{server.anthropic_base_url}"\n'
    )
    out = cli("submit", hip_dir, "--provider", "anthropic", code=2)
    assert "TEAM_CLAUDE_KEY is not set" in out.stderr
    monkeypatch.setenv("TEAM_CLAUDE_KEY", "k")
    cli("submit", hip_dir, "--provider", "anthropic")
    assert server.stats.batches_created_by_provider.get("anthropic") == 1


def test_bad_config_file(tmp_path: Path, hip_dir: Path) -> None:
    (tmp_path / "bad.toml").write_text("[providers.openai\n")
    out = cli("--config", tmp_path / "bad.toml", "submit", hip_dir, "--dry-run", code=2)
    assert "--config" in out.stderr and "bad.toml" in out.stderr
    out = cli("--config", tmp_path / "missing.toml", "submit", hip_dir, "--dry-run", code=2)
    assert "no such file" in out.stderr


def test_anthropic_requests_cache_the_system_prompt(
    server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import point_at

    point_at(server, "anthropic", monkeypatch)
    cli("submit", hip_dir, "--provider", "anthropic")
    cli("collect", "--wait", "--poll-interval", "0.05")

    rows = list(ledger_db(Path("state")).table("requests").rows)
    assert sum(r["cache_write_tokens"] for r in rows) > 0
    assert sum(1 for r in rows if r["cache_read_tokens"] > 0) == len(rows) - 1
    assert sum(r["cache_read_tokens"] for r in rows) == server.stats.cache_read_tokens
