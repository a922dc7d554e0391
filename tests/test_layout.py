"""The house rules of the layout, checked on the source: SQL only in the store, waiting only in poll.py, SDKs
only in their adapter, small functions, a thin CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hipbatch"
PRODUCT = sorted(p for p in PACKAGE.rglob("*.py") if "emulator" not in p.parts)
SQL = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE|CREATE|DROP|PRAGMA)\b[^\n]*\b(FROM|SET|INTO|TABLE|INDEX|\w+\s*=)")
SDKS = {"openai": "providers/openai.py", "anthropic": "providers/anthropic.py", "google": "providers/gemini.py"}


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", PRODUCT, ids=rel)
def test_sql_only_in_the_store(path: Path) -> None:
    if rel(path) in ("store.py", "migrations.py"):
        return
    strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)]
    found = [s for s in strings if isinstance(s, str) and SQL.search(s)]
    assert not found, f"{rel(path)} holds SQL: {found[:2]}"


@pytest.mark.parametrize("path", PRODUCT, ids=rel)
def test_waiting_only_in_poll(path: Path) -> None:
    if rel(path) == "poll.py":
        return
    text = path.read_text()
    retries = re.search(r"^\s*(import|from) tenacity", text, re.M)
    assert not retries and "time.sleep(" not in text, f"{rel(path)} waits or retries on its own"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=rel)
def test_sdks_only_in_their_adapter(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in SDKS and not (top == "google" and not name.startswith("google.genai")):
                assert rel(path) == SDKS[top], f"{rel(path)} imports the {top} SDK"


@pytest.mark.parametrize("path", PRODUCT, ids=rel)
def test_no_function_over_60_lines(path: Path) -> None:
    if rel(path) == "migrations.py":
        return  # declarative table definitions
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, f"{rel(path)}: {', '.join(long)}"


def test_cli_is_thin() -> None:
    lines = (PACKAGE / "cli.py").read_text().count("\n")
    assert lines <= 500, f"cli.py has {lines} lines"
    assert "from hipbatch.store" not in (PACKAGE / "cli.py").read_text()  # commands reach the store through ops
