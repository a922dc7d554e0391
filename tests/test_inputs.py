"""Bad input gets one clear line and a non-zero exit; one bad file never stops the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.store import Store
from tests.conftest import cli, env_without_keys, read_dataset


def test_missing_input_dir(tmp_path: Path) -> None:
    out = cli("submit", tmp_path / "nope", "--dry-run", code=2)
    assert "INPUT_DIR" in out.stderr and "nope" in out.stderr and "no such folder" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_input_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.hip"
    f.write_text("x")
    out = cli("submit", f, "--dry-run", code=2)
    assert "not a folder" in out.stderr


def test_no_files_match(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = cli("submit", tmp_path / "empty", "--dry-run", code=2)
    assert "no files match" in out.stderr and "**/*.hip" in out.stderr


def test_bad_files_are_skipped_with_reasons(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    (hip_dir / "latin1.hip").write_bytes("// größe\n__global__ void k() {}\n".encode("latin-1"))
    (hip_dir / "empty.hip").write_text("  \n")
    (hip_dir / "binary.hip").write_bytes(b"\x7fELF\x00\x00\x01")
    out = cli("submit", hip_dir)
    assert "skipped latin1.hip: not UTF-8" in out.stderr
    assert "skipped empty.hip: empty" in out.stderr
    assert "skipped binary.hip: binary" in out.stderr
    assert openai_env.stats.batches_created == 1 and sum(openai_env.stats.sent.values()) == 6
    summary = json.loads(cli("collect", "--wait", "--poll-interval", "0.05", "--json").stdout)
    assert summary["records"] == 6 and summary["skipped_files"] == 3
    skipped = {r["file_name"]: r["skip_reason"] for r in Store(Path("state")).skipped_files()}
    assert set(skipped) == {"latin1.hip", "empty.hip", "binary.hip"}


def test_non_ascii_source_round_trips(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = tmp_path / "intl"
    root.mkdir()
    (root / "k.hip").write_text(
        "// カーネル: größe\n__global__ void grosse(float* x) { x[0] = 1; }\n", encoding="utf-8"
    )
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.05")
    [record] = read_dataset(Path("data/generated_prompts.json"))
    assert "grosse" in record["english_prompt"]


def test_missing_openai_key_names_the_variable(
    server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.openai_base_url)
    out = cli("submit", hip_dir, code=2)
    assert "OPENAI_API_KEY is not set" in out.stderr
    assert server.stats.files_uploaded == 0
    assert not (Path("state") / "shards").exists()  # nothing written before the key check


def test_missing_anthropic_key_names_the_variable(
    server: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.anthropic_base_url)
    out = cli("submit", hip_dir, "--provider", "anthropic", code=2)
    assert "ANTHROPIC_API_KEY is not set" in out.stderr
    assert server.stats.batches_created == 0


def test_unknown_provider(hip_dir: Path) -> None:
    out = cli("submit", hip_dir, "--provider", "mistral", code=2)
    assert "--provider" in out.stderr and "mistral" in out.stderr


def test_model_the_provider_rejects(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    out = cli("submit", hip_dir, "--provider", provider, "--model", "unknown-model-9", code=2)
    assert "--model unknown-model-9" in out.stderr and "does not know" in out.stderr
    assert server.stats.batches_created == 0 and server.stats.files_uploaded == 0
    assert Store(Path("state")).request_counts() == {}  # nothing half-submitted


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("user.j2", "{{ code }\n", "user.j2:1: template syntax error"),
        ("user.j2", "line one\n{{ code }} {{ nope }}\n", "user.j2:2: 'nope' is undefined"),
    ],
)
def test_template_errors_name_file_and_line(hip_dir: Path, tmp_path: Path, name: str, text: str, expected: str) -> None:
    template = tmp_path / "tpl"
    template.mkdir()
    (template / "system.j2").write_text("You are helpful.")
    (template / "user.j2").write_text("{{ code }}")
    (template / name).write_text(text)
    out = cli("submit", hip_dir, "--dry-run", "--model", "m", "--template-dir", template, code=2)
    assert expected in out.stderr


def test_status_failure_leaves_batch_as_it_was(
    openai_env: LocalBatchServer, hip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("submit", hip_dir)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    out = cli("status", "--json")
    assert "status check failed" in out.stderr
    [batch] = json.loads(out.stdout)
    assert batch["status"] == "validating" and not batch["is_final"]


def test_help_starts_without_sdks() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from hipbatch.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
        "print(sorted(m for m in ('openai', 'anthropic', 'google.genai', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env_without_keys()
    )
    assert out.stdout.strip() == "[]"


def test_every_command_has_help_with_an_example() -> None:
    from hipbatch.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands if c.callback]
    assert {"submit", "status", "collect", "demo", "emulator"} <= set(names)
    for name in names:
        out = cli(name.replace("_", "-"), "--help")
        assert "Example:" in out.stdout, name
