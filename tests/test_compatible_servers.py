"""Compatible servers and wrong URLs: a server with no model route is used (with a warning), an unknown model is
refused by name, and a base URL that cannot work (dead port, missing or doubled /v1, malformed, a config key)
fails in seconds with one line naming the URL and where it came from."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from hipbatch import ops, poll
from hipbatch.emulator import LocalBatchServer
from hipbatch.errors import TransientError, Unreachable
from hipbatch.views import Out
from tests.conftest import cli, read_dataset

URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_error_line(result: Any) -> str:
    """The command's stderr holds exactly one line, an error with no traceback; returns it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_a_server_with_no_model_route_is_warned_about_and_used(
    provider: str, server: LocalBatchServer, hip_dir: Path
) -> None:
    server.config.models_route = False
    out = cli("submit", hip_dir, "--provider", provider)
    assert "cannot be checked here" in out.stderr and "Warning:" in out.stderr
    model_route = "gemini.models.get" if provider == "gemini" else "models.retrieve"
    assert server.stats.hits.get(model_route) == 1 and server.stats.batches_created == 1
    done = cli("collect", "--wait", "--poll-interval", "0.05", "--timeout", "30", "--json")
    assert '"succeeded": 6' in done.stdout
    assert len(read_dataset(Path("data/generated_prompts.json"))) == 6


def test_an_unknown_model_is_refused_by_name(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    result = cli("submit", hip_dir, "--provider", provider, "--model", "no-such-model-7", code=2)
    line = one_error_line(result)
    assert "--model no-such-model-7" in line and "does not know this model" in line
    assert server.stats.batches_created == 0 and not server.stats.hits.get("openai.files.create")


@pytest.mark.parametrize(
    ("provider_name", "suffix", "hint"),
    [("openai", "", "usually ends with /v1"), ("anthropic", "/v1", "must not end with /v1")],
    ids=["openai-missing-v1", "anthropic-doubled-v1"],
)
def test_a_wrong_path_fails_fast_naming_the_url_and_a_hint(
    server: LocalBatchServer,
    hip_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider_name: str,
    suffix: str,
    hint: str,
) -> None:
    url = server.url + suffix  # OpenAI wants .../v1; Anthropic's SDK adds /v1 itself
    monkeypatch.setenv(URL_ENV[provider_name], url)
    monkeypatch.setenv(KEY_ENV[provider_name], "test-key")
    started = time.monotonic()
    result = cli("submit", hip_dir, "--provider", provider_name, code=2)
    assert time.monotonic() - started < 10
    line = one_error_line(result)
    assert url in line and URL_ENV[provider_name] in line and hint in line
    assert server.stats.batches_created == 0 and not Path("state/shards").exists()


@pytest.mark.parametrize("provider_name", ["openai", "anthropic"])
def test_a_dead_port_fails_within_seconds_naming_the_url(
    hip_dir: Path, monkeypatch: pytest.MonkeyPatch, provider_name: str
) -> None:
    url = f"http://127.0.0.1:{dead_port()}" + ("/v1" if provider_name == "openai" else "")
    monkeypatch.setenv(URL_ENV[provider_name], url)
    monkeypatch.setenv(KEY_ENV[provider_name], "test-key")
    started = time.monotonic()
    result = cli("submit", hip_dir, "--provider", provider_name, code=2)
    assert time.monotonic() - started < 10
    line = one_error_line(result)
    assert url in line and URL_ENV[provider_name] in line and "connection refused" in line
    assert "APIConnectionError" not in line and "model gpt" not in line  # not read as a model problem


def test_a_dead_port_from_the_config_file_names_the_config_key(hip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{dead_port()}/v1"
    Path("hipbatch.toml").write_text(f'[providers.openai]\nbase_url = "{url}"\n', encoding="utf-8")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    line = one_error_line(cli("submit", hip_dir, code=2))
    assert url in line and "providers.openai.base_url in hipbatch.toml" in line


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "htp://127.0.0.1/v1", "http://127.0.0.1:99999/v1", "http:///v1"])
def test_a_malformed_base_url_is_one_line_naming_the_variable(
    hip_dir: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    line = one_error_line(cli("submit", hip_dir, code=2))
    # Refused where the value is read (config validation) or where the client is built, naming both.
    assert "OPENAI_BASE_URL" in line and url in line
    assert "not a usable base URL" in line or "expected an http:// or https:// URL" in line


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        ("ConnectError:[Errno -2] Name or service not known", "unknown host"),
        ("ConnectTimeout:timed out", "the host did not answer (connect timeout)"),
    ],
)
def test_an_unknown_or_silent_host_is_unreachable_not_a_model_problem(cause: str, reason: str) -> None:
    # The SDK's own exceptions for a failed name lookup or a host that never answers (no DNS query or packet
    # leaves this machine), through the adapter's mapping.
    import httpx2
    import openai

    from hipbatch.providers.openai import translate

    kind, text = cause.split(":", 1)
    request = httpx2.Request("GET", "http://no-such-host.invalid/v1/models/gpt-4o-mini")
    with pytest.raises(Unreachable) as caught, translate("model gpt-4o-mini"):
        try:
            raise getattr(httpx2, kind)(text)
        except httpx2.TransportError as e:
            error = (
                openai.APITimeoutError(request)
                if kind == "ConnectTimeout"
                else openai.APIConnectionError(request=request)
            )
            raise error from e
    assert caught.value.reason == reason and caught.value.url == str(request.url)
    assert isinstance(caught.value, TransientError)  # retried elsewhere (status, collect); final for the model check


def test_long_retries_say_so_on_stderr(
    openai_env: LocalBatchServer, hip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every upload answers 500 asking for 2 s: the waits (on a fake clock) pass 3 s at the second retry.
    openai_env.config.update({"fault_rate": 1.0, "fault_kinds": ["500"], "fault_routes": ["openai.files.create"]})
    openai_env.config.retry_after_ms = 2000
    slept: list[float] = []
    ctx = ops.Context(state_dir=tmp_path / "state", clock=poll.Clock(sleep=slept.append))
    result = ops.submit(ctx, ops.SubmitOptions(ops.Files(hip_dir)), Out())
    assert result["feed"]["errors"] and openai_env.stats.batches_created == 0
    told = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Still trying:")]
    assert len(told) == poll.CALL.attempts - 2 and slept == [2.0] * (poll.CALL.attempts - 1)
    assert "attempt 2 of 8 failed; next try in 2.0s" in told[0] and "HTTP 500" in told[0]
