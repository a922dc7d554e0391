"""`status` fits the terminal: below the width of the full table each batch is stacked on a few lines, a batch id
is never cut (on a real pseudo-terminal of 80 columns too), and a top error is one line; `cancel` asks on a
terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from hipbatch.emulator import LocalBatchServer
from hipbatch.views import status_renderable
from tests.conftest import cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
LONG_ERROR = (
    "The server had an error\nwhile processing your request. Sorry about that! You can retry your request, or "
    "contact us through our help center if the error persists."
)


def rows(ids: list[str]) -> list[dict[str, Any]]:
    """Status rows as `status_rows` makes them, for batches with these ids (every other one with an error)."""
    now = time.time()
    summary = {"requests": 80, "done": 74, "failed": 6, "in_flight": 0, "queued": 0, "superseded": 0,
               "cost_usd": 0.01, "committed_usd": 0.0, "states": {"succeeded": 74, "failed": 6}}  # fmt: skip
    return [
        {
            "job": "kernels-of-a-long-job-name",
            "batch_id": batch_id,
            "provider": "openai",
            "model": "gpt-4o-mini-2024-07-18",
            "status": "completed",
            "is_final": True,
            "done": 74,
            "failed": 6,
            "total": 80,
            "counts_final_only": False,
            "created_at": now - 3600,
            "age_seconds": 3600.0,
            "expires_at": None,
            "collected": True,
            "expires_in_seconds": None,
            "job_summary": summary,
            "top_error": {"reason": "failed:server_error", "count": 6, "message": LONG_ERROR} if i % 2 else None,
        }
        for i, batch_id in enumerate(ids)
    ]


IDS = ["batch_408e26e58afbc907cbb1a2b3c4d5e6f7", "msgbatch_01HZX8Q2W3E4R5T6Y7U8I9O0PQ", "batch_6f0c1d"]


@pytest.mark.parametrize("width", [60, 80, 100, 140, 200])
def test_every_batch_id_is_whole_and_every_error_one_line(width: int) -> None:
    console = Console(width=width, force_terminal=True, color_system=None, record=True)
    console.print(status_renderable(rows(IDS), 0, width=width))
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines)
    for batch_id in IDS:
        assert sum(batch_id in line for line in lines) == 1, batch_id  # whole, on one line, once
    errors = [line for line in lines if "failed:server_error (6)" in line]
    assert len(errors) == 1 and "…" in errors[0]  # one line, cut with an ellipsis
    assert not any("while processing" in line for line in lines if line not in errors)  # no second line of it
    stacked = "batch id  status  done / failed / total  age" in lines
    if width <= 100:
        assert stacked
    if width >= 200:
        assert not stacked and any("┃ top error" in line for line in lines)  # the table, every column


def run_on_pty(args: list[str], env: dict[str, str], answer: bytes = b"", columns: int = 80) -> tuple[int, str]:
    """Run a command on a pseudo-terminal of `columns` columns; (exit code, what it printed, plain)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    if answer:
        os.write(master, answer)
    out, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    return proc.returncode, ANSI.sub("", out.decode("utf-8", "replace")).replace("\r", "")


def pty_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color"}


def test_status_on_an_80_column_terminal_shows_every_id_whole(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.polls_to_complete = 1000  # they stay running: expiry and counts are shown
    cli("submit", hip_dir, "--max-requests-per-batch", "2")
    ids = [b["batch_id"] for b in json.loads(cli("status", "--json").stdout)]
    code, text = run_on_pty([sys.executable, "-m", "hipbatch", "status"], pty_env())
    assert code == 0, text
    lines = text.splitlines()
    assert len(ids) == 3 and all(len(line) <= 80 for line in lines), text
    for batch_id in ids:
        assert any(batch_id in line for line in lines), (batch_id, text)
    assert "requests: submitted 6" in text


def test_cancel_on_a_terminal_asks_and_takes_no_for_an_answer(openai_env: LocalBatchServer, hip_dir: Path) -> None:
    openai_env.config.polls_to_complete = 1000
    cli("submit", hip_dir)
    code, text = run_on_pty([sys.executable, "-m", "hipbatch", "cancel"], pty_env(), answer=b"n\n")
    assert code == 1 and "Cancel 1 unfinished batch(es)? [y/N]" in text and "Nothing cancelled." in text
    assert "pass --yes" not in text
    assert json.loads(cli("status", "--json").stdout)[0]["status"] == "in_progress"
    assert openai_env.stats.hits.get("openai.batches.cancel") is None
