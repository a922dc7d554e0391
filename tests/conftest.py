"""Shared fixtures: a clean environment, a local batch server on 127.0.0.1, folders of .hip files."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database
from typer.testing import CliRunner

from hipbatch.cli import app
from hipbatch.emulator import EmulatorConfig, LocalBatchServer

PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_PROFILE",
    "HIPBATCH_MODEL",
    "HIPBATCH_STATE_DIR",
    "OPENAI_CUSTOM_HEADERS",
    "ANTHROPIC_CUSTOM_HEADERS",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_GENAI_USE_VERTEXAI",
)


#: True once collect.py maps Gemini's JOB_STATE_* words and RESOURCE_EXHAUSTED, and retry/submit read a line's id
#: through providers.base.line_id (the edits listed in the Gemini branch's report). Until then the tests that need
#: them are expected to fail (strict: a pass means this should be flipped) or, when slow, skipped.
GEMINI_PORTED = True
needs_gemini_port = pytest.mark.xfail(not GEMINI_PORTED, reason="needs the collect/retry edits for Gemini", strict=True)


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real keys or URLs; state in tmp; cwd in tmp so no stray hipbatch.toml is read."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "anthropic-config"
    empty.mkdir()
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(empty))
    monkeypatch.setenv("HIPBATCH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HIPBATCH_LOCK_TIMEOUT", "20")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def server() -> Iterator[LocalBatchServer]:
    """The local batch server on port 0; replies always in <prompt> tags unless a test changes config."""
    with LocalBatchServer(port=0, config=EmulatorConfig(polls_to_complete=1, forms="tag")) as srv:
        yield srv


def point_at(server: LocalBatchServer, provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if provider == "openai":
        monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    elif provider == "gemini":
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.gemini_base_url)
        monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    else:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.anthropic_base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")


@pytest.fixture
def openai_env(server: LocalBatchServer, monkeypatch: pytest.MonkeyPatch) -> LocalBatchServer:
    point_at(server, "openai", monkeypatch)
    return server


@pytest.fixture(params=["openai", "anthropic", "gemini"])
def provider(request: pytest.FixtureRequest, server: LocalBatchServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per provider, with the environment pointing at the local server."""
    point_at(server, request.param, monkeypatch)
    return str(request.param)


KERNEL = """#include <hip/hip_runtime.h>
// file {i}
__global__ void kernel_{i}(float* x, int n) {{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < n) x[idx] = x[idx] * {i}.0f + 1.0f;
}}
"""


def make_hip_dir(root: Path, n: int, start: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"k{i:04d}.hip").write_text(KERNEL.format(i=i), encoding="utf-8")
    return root


@pytest.fixture
def hip_dir(tmp_path: Path) -> Path:
    return make_hip_dir(tmp_path / "kernels", 6)


def cli(*args: str, code: int | None = 0) -> Any:
    """Run the CLI in-process; check the exit code unless code is None."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    return result


def ledger_db(state: Any) -> Database:
    """The ledger's SQLite file opened on its own (autocommit) connection, for tests that look inside it or
    set it up; `state` is a Store or a state dir."""
    state_dir = Path(getattr(state, "state_dir", state))
    return Database(sqlite3.connect(state_dir / "hipbatch.db", isolation_level=None))


def read_dataset(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def env_without_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
