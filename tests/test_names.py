"""Text from outside (job, model and file names, provider error messages, batch ids) is shown as text: never read
as rich markup, never passed to the terminal as control codes, in every printer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hipbatch.emulator import LocalBatchServer
from hipbatch.progress import RichProgress
from hipbatch.text import plain
from tests.conftest import cli, make_hip_dir, read_dataset

CLEAR = "\x1b[2J"  # clears the screen if it reached a terminal
TITLE = "\x1b]0;pwned\x07"  # sets the window title

#: (job, model) pairs that rich would read as markup (a closing tag with no opening one raises MarkupError).
NAMES = [("[/x]", "gpt-[bold]x[/bold]"), ("[red]job[/]", "gpt-4o-mini"), (f"job{CLEAR}", f"m{TITLE}x")]


def assert_shown_as_text(result: object, *literals: str) -> None:
    out = f"{result.stdout}{result.stderr}"  # type: ignore[attr-defined]
    assert "\x1b" not in out and "\x07" not in out and "Traceback" not in out
    for literal in literals:
        assert plain(literal) in out, (literal, out)


@pytest.mark.parametrize(("job", "model"), NAMES, ids=["closing-tag", "colour", "escapes"])
def test_job_and_model_names_are_text_in_every_command(
    openai_env: LocalBatchServer, tmp_path: Path, job: str, model: str
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 3)
    (root / f"empty{CLEAR}.hip").write_text("")  # skipped, and named in the summary
    assert_shown_as_text(cli("submit", root, "--job", job, "--model", model), job, model, f"empty{CLEAR}.hip")
    assert_shown_as_text(cli("status"), job, model)
    assert_shown_as_text(cli("status", "--all", "--job", job), job, model)
    assert_shown_as_text(cli("cost"), job, model)
    assert_shown_as_text(cli("collect"), "Wrote 3 records")
    assert_shown_as_text(cli("cost"), job, model)  # again, once answers are in: the state dir stays usable
    assert_shown_as_text(cli("status"), job)
    shown = json.loads(cli("status", "--json").stdout)
    assert shown[0]["job"] == job and shown[0]["model"] == model  # data keeps the real names
    report = cli("report", "--job", job, "--output", "r.html")
    assert_shown_as_text(report, "Wrote r.html")


def test_file_names_with_escapes_are_kept_in_data_and_stripped_on_screen(
    openai_env: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 2)
    (root / f"k{TITLE}.hip").write_text("__global__ void k(float* x) { x[0] = 1.0f; }\n")
    (root / f"bad{CLEAR}.hip").write_bytes(b"\x00\x01binary")
    result = cli("submit", root, "--dry-run")
    assert_shown_as_text(result, f"bad{CLEAR}.hip")
    assert_shown_as_text(cli("submit", root))
    assert_shown_as_text(cli("collect"))
    names = {r["file_name"] for r in read_dataset(Path("data/generated_prompts.json"))}
    assert f"k{TITLE}.hip" in names  # the dataset holds the true name (JSON escapes it)


def test_provider_error_text_is_shown_as_text(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    result = cli("submit", hip_dir, "--model", f"unknown-{CLEAR}[red]m[/red]", code=2)
    assert_shown_as_text(result, "[red]m[/red]")
    assert result.stderr.count("\n") == 1  # one line


def test_batch_errors_with_markup_are_text(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    cli("submit", hip_dir, "--job", "[/x]")
    openai_env.config.download_fault = "malformed"
    result = cli("collect", "--job", "[/x]")
    assert_shown_as_text(result, "results not read")
    assert_shown_as_text(cli("status"), "results not read")


def test_progress_bar_descriptions_are_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with RichProgress().task(f"collect [/x] batch[bold]{CLEAR}", 2) as bar:
        bar.advance(2)
    assert "\x1b[2J" not in capsys.readouterr().err
