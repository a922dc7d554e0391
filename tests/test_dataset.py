"""The dataset file: never destroyed by a collect that has nothing for it, seed-exact fields, parquet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hipbatch.emulator import LocalBatchServer
from tests.conftest import cli, make_hip_dir, read_dataset

DATASET = Path("data/generated_prompts.json")


def existing_dataset() -> bytes:
    DATASET.parent.mkdir(parents=True, exist_ok=True)
    DATASET.write_text(json.dumps([{"file_name": "a.hip", "english_prompt": "Write a kernel."}]), encoding="utf-8")
    return DATASET.read_bytes()


def test_collect_on_an_empty_state_dir_leaves_the_dataset_and_creates_nothing(tmp_path: Path) -> None:
    before = existing_dataset()
    result = cli("--state-dir", tmp_path / "nowhere", "collect")
    assert DATASET.read_bytes() == before
    assert str(tmp_path / "nowhere") in result.stderr and "left as it was" in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_collect_for_an_unknown_job_is_an_error_naming_it(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    cli("collect", "--wait", "--poll-interval", "0.02")
    before = DATASET.read_bytes()
    result = cli("collect", "--job", "nope", code=2)
    assert "--job nope: no such job" in result.stderr and "kernels" in result.stderr
    assert DATASET.read_bytes() == before


def test_a_store_with_no_answers_yet_never_replaces_a_dataset(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    before = existing_dataset()
    openai_env.config.polls_to_complete = 1000  # submitted, never finished
    cli("submit", hip_dir)
    result = cli("collect", "--json")
    summary = json.loads(result.stdout)
    assert summary["written"] is False and summary["records"] == 0
    assert DATASET.read_bytes() == before and "left data/generated_prompts.json as it was" in result.stderr


def test_fields_write_exactly_those_keys(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir)
    cli("collect", "--wait", "--poll-interval", "0.02", "--fields", "file_name,english_prompt")
    records = read_dataset(DATASET)
    assert len(records) == 6 and all(list(r) == ["file_name", "english_prompt"] for r in records)
    cli("collect", "--fields", "english_prompt,via", "--format", "jsonl", "--output-file", "out.jsonl")
    lines = [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]
    assert [r["english_prompt"] for r in lines] == [r["english_prompt"] for r in records]
    assert {r["via"] for r in lines} == {"batch"} and all(list(r) == ["english_prompt", "via"] for r in lines)


@pytest.mark.parametrize("fields", ["file_name,nope", ",", "file_name,file_name"])
def test_bad_fields_are_one_line(fields: str) -> None:
    result = cli("collect", "--fields", fields, code=2)
    assert result.stderr.startswith("Error: --fields") and "Traceback" not in result.stderr


def test_parquet_holds_the_same_records(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    root = make_hip_dir(tmp_path / "k", 25)
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.02")
    cli("collect", "--format", "parquet", "--output-file", "out.parquet")
    table = pq.read_table("out.parquet")
    assert table.to_pylist() == read_dataset(DATASET)
    cli("collect", "--format", "parquet", "--output-file", "seed.parquet", "--fields", "file_name,english_prompt")
    assert pq.read_table("seed.parquet").column_names == ["file_name", "english_prompt"]


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
        "from hipbatch.cli import main; sys.argv = ['hipbatch', 'collect', '--format', 'parquet']; main()"
    )
    state = tmp_path / "state"
    cli("--state-dir", state, "submit", make_hip_dir(tmp_path / "k", 2), "--dry-run")  # a store, nothing sent
    (state / "hipbatch.db").touch()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        "HIPBATCH_STATE_DIR": str(state), "PATH": "/usr/bin:/bin"}, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'hipbatch[parquet]'" in done.stderr and "Traceback" not in done.stderr
