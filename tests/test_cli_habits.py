"""Command-line habits: global options after the command name, -h, the usual metavars, `cancel` without a terminal,
`collect` naming failed files and `status --failed`, counts that agree after a file changed, `retry --max-tokens`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hipbatch.cli import app
from hipbatch.emulator import LocalBatchServer
from hipbatch.pack import LineEncoder
from hipbatch.providers import ProviderSettings, get_provider
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--timeout", "60", "--json")
COMMANDS = ["submit", "status", "collect", "drain", "cost", "report", "retry", "cancel", "run", "emulator", "demo"]


def test_global_options_also_work_after_the_command_name(
    openai_env: LocalBatchServer, hip_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    cli("submit", hip_dir, "--state-dir", elsewhere)
    assert (elsewhere / "hipbatch.db").is_file() and not (tmp_path / "state").exists()  # not HIPBATCH_STATE_DIR
    [batch] = json.loads(cli("status", "--json", f"--state-dir={elsewhere}").stdout)
    assert batch["job"] == "kernels"
    assert cli("status", "--json").stdout.strip() == "[]"  # the env's state dir knows nothing of it
    missing = cli("cost", "--config", tmp_path / "nope.toml", code=2)
    assert f"--config {tmp_path / 'nope.toml'}: no such file" in missing.stderr
    # after the command name wins over before it, as the nearer one
    cli("--state-dir", tmp_path / "ignored", "collect", "--state-dir", elsewhere)
    assert not (tmp_path / "ignored").exists()


@pytest.mark.parametrize("args", [["-h"], ["submit", "-h"], ["status", "-h"]])
def test_dash_h_is_help(args: list[str]) -> None:
    out = cli(*args)
    assert out.stdout.startswith("Usage: ") and "-h, --help" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_uses_the_usual_metavars_and_keeps_its_example(command: str) -> None:
    text = cli(command, "--help").stdout
    assert "Example:" in text
    assert not re.search(r"<(str|int|float|path)[^>]*>|\{\w+\}", text), text  # no <str>, <int range>, {input_dir}
    if command in ("submit", "run"):
        assert f"Usage: hipbatch {command} [OPTIONS] INPUT_DIR" in text.replace("root", "hipbatch")
        assert "--model NAME" in text and "--limit INTEGER" in text and "--template-dir PATH" in text
    if command not in ("emulator", "demo"):
        assert "--state-dir PATH" in text and "--config PATH" in text


def test_cancel_without_a_terminal_says_to_pass_yes(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.polls_to_complete = 1000
    cli("submit", hip_dir)
    result = CliRunner().invoke(app, ["cancel"])  # stdin is not a terminal here
    assert result.exit_code == 1 and "Aborted" not in result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert "pass --yes" in line and "nothing was cancelled" in line
    assert json.loads(cli("status", "--json").stdout)[0]["status"] == "in_progress"
    assert openai_env.stats.hits.get("openai.batches.cancel") is None


def test_collect_names_failed_files_and_status_lists_them_all(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 12)
    (root / "empty.hip").write_text("", encoding="utf-8")  # skipped, listed last by status --failed
    openai_env.config.validation_error_rate = 1.0  # every batch fails validation: every request fails
    cli("submit", root)
    done = cli(*WAIT[:-1])
    [line] = [x for x in done.stderr.splitlines() if x.startswith("Failed files: ")]
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("k*.hip"))
    assert line.startswith("Failed files: " + ", ".join(names[:10]) + " and 2 more")
    assert "`hipbatch status --failed`" in line
    summary = json.loads(cli(*WAIT).stdout)
    assert summary["failed_files"] == names[:10] and summary["failed"] == 12
    listed = json.loads(cli("status", "--failed", "--json").stdout)
    assert [r["file_name"] for r in listed] == [*names, "empty.hip"]
    assert {r["reason"] for r in listed[:-1]} == {"failed"} and listed[-1]["reason"] == "skipped"
    assert all("failed validation" in r["error"] for r in listed[:-1])
    table = cli("status", "--failed")
    assert all(name in table.stdout for name in names) and "13 file(s) with no good answer" in table.stderr


def test_counts_agree_after_a_file_changed(provider: str, server: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir, "--provider", provider)
    cli(*WAIT)
    (hip_dir / "k0001.hip").write_text("__global__ void changed(float* x) { x[0] = 1.0f; }\n", encoding="utf-8")
    cli("submit", hip_dir, "--provider", provider)
    summary = json.loads(cli(*WAIT).stdout)
    assert (summary["records"], summary["succeeded"], summary["superseded"]) == (6, 6, 1)
    assert len(read_dataset(Path("data/generated_prompts.json"))) == 6
    [row] = {r["job"]: r for r in json.loads(cli("status", "--json").stdout)}.values()
    assert row["job_summary"]["requests"] == 6 and row["job_summary"]["superseded"] == 1
    assert row["job_summary"]["states"] == {"succeeded": 6}
    text = cli("status").stdout
    assert "kernels: 6 requests (and 1 superseded by newer ones)" in text
    assert "requests: succeeded 6; superseded 1" in text
    cli("report")
    html = Path("report-kernels.html").read_text(encoding="utf-8")
    assert "<span class='muted'>requests</span><b>6</b>" in html
    assert "<span class='muted'>superseded</span><b>1</b>" in html
    assert server.stats.billed_twice() == []


def test_retry_max_tokens_sends_truncated_requests_as_new_ones(
    provider: str, server: LocalBatchServer, hip_dir: Path
) -> None:
    Path("hipbatch.toml").write_text(f"[providers.{provider}]\nmax_tokens = 5\n", encoding="utf-8")
    cli("submit", hip_dir, "--provider", provider)
    first = json.loads(cli(*WAIT).stdout)
    assert first["failed_by_reason"] == {"truncated": 6} and first["records"] == 0
    old_ids = {cid for cid, n in server.stats.sent.items() if n}
    report = json.loads(cli("retry", "--only", "truncated", "--max-tokens", "1024", "--json").stdout)
    assert report["renewed"] == 6 and report["requests"] == 6
    new_ids = set(server.stats.sent) - old_ids
    assert len(new_ids) == 6 and all(server.stats.sent[cid] == 1 for cid in old_ids | new_ids)  # none sent twice
    final = json.loads(cli(*WAIT).stdout)
    assert (final["records"], final["succeeded"], final["failed"], final["superseded"]) == (6, 6, 0, 6)
    assert {r["custom_id"] for r in read_dataset(Path("data/generated_prompts.json"))} == new_ids
    db = ledger_db(Path("state"))
    rows = {r["custom_id"]: r for r in db.table("requests").rows}
    assert {cid for cid, r in rows.items() if r["is_current"]} == new_ids
    assert all(rows[cid]["max_tokens"] == 1024 and rows[cid]["attempts"] == 1 for cid in new_ids)
    assert all(rows[cid]["state"] == "truncated" and rows[cid]["output_tokens"] > 0 for cid in old_ids)
    ledger = json.loads(cli("cost", "--json").stdout)["total"]  # both answers of each file were paid: both count
    assert (ledger["input_tokens"], ledger["output_tokens"]) == (server.stats.input_tokens, server.stats.output_tokens)
    again = json.loads(cli("retry", "--json").stdout)  # the old truncated requests are superseded: never resent
    assert again["requests"] == 0


@pytest.mark.parametrize("provider_name", ["openai", "anthropic"])
def test_a_request_line_reads_back_to_the_same_request(provider_name: str) -> None:
    adapter = get_provider(ProviderSettings(name=provider_name, key_env="NONE"))
    params = {"max_tokens": 300, "temperature": 0.2}
    custom_id, line = LineEncoder(adapter, "some-model", params).encode("System text", "User \u00e9 text\n")
    model, back, system, user = adapter.request_parts(json.loads(line))
    assert (model, back, system, user) == ("some-model", params, "System text", "User \u00e9 text\n")
    assert LineEncoder(adapter, model, back).encode(system, user) == (custom_id, line)
