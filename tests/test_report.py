"""`hipbatch report`: a self-contained HTML page that agrees with `hipbatch cost` and opens in a browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hipbatch.cost import load_prices
from hipbatch.emulator import LocalBatchServer
from hipbatch.report import BUCKETS, timeline
from hipbatch.store import Store
from tests.conftest import cli, make_hip_dir

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def data_values(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-key="([^"]+)" data-value="([^"]*)"', page))


@pytest.fixture
def finished_run(openai_env: LocalBatchServer, tmp_path: Path) -> Path:
    """A job of 30 files with mixed reply forms and some server errors, collected."""
    root = make_hip_dir(tmp_path / "kernels", 30)
    openai_env.config.forms = "mixed"
    openai_env.config.request_error_rate = 0.2
    cli("submit", root, "--job", "kern")
    cli("collect", "--wait", "--poll-interval", "0.05")
    return root


def test_report_agrees_with_cost_and_the_emulator(finished_run: Path, openai_env: LocalBatchServer) -> None:
    out = json.loads(cli("report", "--job", "kern", "--output", "r/kern.html", "--json").stdout)
    page = Path("r/kern.html").read_text(encoding="utf-8")
    ledger = json.loads(cli("cost", "--json", "--job", "kern").stdout)["total"]
    values = data_values(page)
    for key in ("input_tokens", "output_tokens", "cache_read_tokens", "requests"):
        assert int(values[f"total-{key}"]) == ledger[key]
    assert float(values["total-cost_usd"]) == ledger["cost_usd"] == out["cost_usd"]
    assert float(values["total-live_equivalent_usd"]) == ledger["live_equivalent_usd"]
    price = load_prices().lookup("openai", "gpt-4o-mini")
    assert price is not None
    s = openai_env.stats
    assert ledger["input_tokens"] == s.input_tokens and ledger["output_tokens"] == s.output_tokens
    assert round(ledger["cost_usd"], 2) == round(price.cost(s.input_tokens, s.output_tokens), 2)
    assert ledger["cost_usd"] == pytest.approx(price.cost(s.input_tokens, s.output_tokens), abs=1e-6)


def test_report_sections_are_self_contained(finished_run: Path) -> None:
    cli("report")  # the only job is the default; the default file name follows it
    page = Path("report-kern.html").read_text(encoding="utf-8")
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "default-src 'none'" in page
    assert "<svg" in page and 'id="timeline"' in page and 'id="cost-bars"' in page
    store = Store(Path("state"))
    reasons = store.failure_reasons("kern")
    assert reasons and 'id="failure-bars"' in page
    for reason, n in reasons.items():
        assert f"<td>{html.escape(reason)}</td><td data-value='{n}'>" in page
    sample = next(iter(store.dataset_rows("kern")))
    assert html.escape(sample["file_name"]) in page and html.escape(sample["english_prompt"]) in page


def test_file_names_and_prompts_are_escaped(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    (root / "a & <b>.hip").write_text("__global__ void odd(float* x) { x[0] = 1; }\n", encoding="utf-8")
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.05")
    cli("report", "--output", "odd.html")
    page = Path("odd.html").read_text(encoding="utf-8")
    assert "a &amp; &lt;b&gt;.hip" in page and "<b>.hip" not in page
    assert "Write a HIP kernel named `odd`" in page


def test_timeline_ends_with_the_stores_counts(finished_run: Path) -> None:
    store = Store(Path("state"))
    tl = timeline(store, "kern")
    assert tl is not None and tl.end > tl.start
    final = {str(state): series[-1] for state, series in tl.counts.items() if series[-1]}
    assert final == store.request_counts("kern")
    assert all(len(series) == BUCKETS for series in tl.counts.values())
    assert all(v >= 0 for series in tl.counts.values() for v in series)


def test_report_while_batches_are_running(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.polls_to_complete = 1000
    cli("submit", hip_dir, "--job", "live-one")
    cli("report", "--output", "running.html")
    page = Path("running.html").read_text(encoding="utf-8")
    assert "in flight (6)" in page and data_values(page)["total-committed_usd"] not in ("", "0.0")
    assert "No prompts extracted yet." in page and "No failures." in page


def test_report_needs_a_known_job(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    assert cli("report", code=2).stderr.startswith("Error: no hipbatch state in ")  # and nothing created
    assert not Path("state").exists()
    cli("submit", make_hip_dir(tmp_path / "a", 2), "--job", "a")
    cli("submit", make_hip_dir(tmp_path / "b", 2, start=50), "--job", "b")
    assert "--job is needed" in cli("report", code=2).stderr
    result = cli("report", "--job", "nope", code=2)
    assert result.stderr.startswith("Error: --job nope: no such job") and "a, b" in result.stderr
    assert not Path("report-nope.html").exists()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium; "
    ".ci/run installs it): the headless browser check is skipped",
)
def test_report_opens_in_headless_chromium_without_errors(finished_run: Path, tmp_path: Path) -> None:
    cli("report", "--job", "kern", "--output", "kern.html")
    page = Path("kern.html").resolve()
    assert CHROMIUM is not None
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Anything the page logs (a CSP violation, a failed load, a script error) is a CONSOLE line.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    dom = proc.stdout
    assert "<title>hipbatch report: kern</title>" in dom
    assert dom.count("<svg") >= 3 and 'id="timeline"' in dom and "<polygon" in dom
