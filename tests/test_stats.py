"""request_stats (m007), the counts status, collect's summary and the cost ledger read instead of every request:
after every kind of change (submit, collect, retry, retry --max-tokens, --reextract, --strict, live mode, cancel,
a changed file) they agree with a full recount of the requests, on a fresh store and on one migrated from m006."""

from __future__ import annotations

import ast
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from hipbatch.emulator import LocalBatchServer
from hipbatch.store import Store
from tests.conftest import cli, ledger_db, make_hip_dir

WAIT = ("collect", "--wait", "--poll-interval", "0.02", "--json")
KEY = 8  # request_stats' key columns come first
FLOATS = (KEY + 1, KEY + 2)  # cost_usd, est_cost_usd: sums of floats, kept by adding and taking away


def assert_counts_agree(state: Path = Path("state")) -> list[tuple[Any, ...]]:
    """The stored request_stats are the requests counted again (floats to rounding), and not empty."""
    store = Store(state)
    try:
        stored, recount = store.stats_rows(), store.stats_rows(recount=True)
    finally:
        store.close()
    assert [r[:KEY] for r in stored] == [r[:KEY] for r in recount]
    for kept, fresh in zip(stored, recount, strict=True):
        ints = [v for i, v in enumerate(kept) if i >= KEY and i not in FLOATS]
        assert ints == [v for i, v in enumerate(fresh) if i >= KEY and i not in FLOATS], kept[:KEY]
        assert [kept[i] for i in FLOATS] == pytest.approx([fresh[i] for i in FLOATS], rel=1e-9, abs=1e-12)
    assert recount
    return recount


def as_m006(state: Path) -> None:
    """The store as hipbatch left it before m007: no request_stats, m005's covering index."""
    db = Database(sqlite3.connect(state / "hipbatch.db", isolation_level=None))
    db.execute("DROP TABLE request_stats")
    db.execute("DROP INDEX idx_requests_superseded")
    db.table("requests").create_index(["job", "state", "is_current", "cost_usd", "est_cost_usd"])
    db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm007_request_stats'")
    db.close()


def status_summary() -> dict[str, Any]:
    rows = json.loads(cli("status", "--json").stdout)
    rows = rows["batches"] if isinstance(rows, dict) else rows
    return next(r["job_summary"] for r in rows if r["job_summary"])


@pytest.mark.parametrize("start", ["fresh", "m006"])
def test_counts_agree_with_a_recount_after_every_kind_of_change(
    start: str, openai_env: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 24)
    openai_env.config.forms = "mixed"  # tags, fences, labels, truncated and unusable replies
    openai_env.config.request_error_rate = 0.2
    cli("submit", root, "--max-requests-per-batch", "7")
    assert_counts_agree()
    first = json.loads(cli(*WAIT).stdout)
    assert first["failed"] > 0 and first["succeeded"] > 0
    assert_counts_agree()
    if start == "m006":
        as_m006(Path("state"))  # the next command migrates it, counting what the requests hold
        assert_counts_agree()

    openai_env.config.request_error_rate = 0.0
    cli("retry", "--only", "failed")
    assert_counts_agree()
    cli(*WAIT)
    assert_counts_agree()
    cli("retry", "--only", "truncated", "--max-tokens", "2048")  # new requests; the old ones superseded
    assert_counts_agree()
    cli(*WAIT)
    assert_counts_agree()

    ledger_db(Path("state")).execute("UPDATE requests SET method = NULL")  # as an older hipbatch left them
    cli("collect", "--reextract")  # counts taken again for the job, whatever they were
    assert_counts_agree()
    cli("collect", "--strict")
    assert_counts_agree()

    (root / "k0001.hip").write_text("// changed\n__global__ void k1() {}\n", encoding="utf-8")
    make_hip_dir(root, 3, start=100)
    live = json.loads(cli("run", root, "--json").stdout)  # the changed and new files, and retryable ones, live
    assert live["succeeded"] > 0
    assert_counts_agree()
    make_hip_dir(root, 8, start=200)
    cli("submit", root, "--max-in-flight-batches", "1", "--max-requests-per-batch", "4")  # some stay queued
    assert_counts_agree()
    cli("cancel", "--yes")
    recount = assert_counts_agree()

    # What status and collect show is what the requests say.
    summary = status_summary()
    current = json.loads(cli("collect", "--json").stdout)
    assert summary["done"] == current["succeeded"]
    assert summary["superseded"] == current["superseded"] >= 1
    assert summary["requests"] + summary["superseded"] == sum(r[KEY] for r in recount)
    db = ledger_db(Path("state"))
    (succeeded,) = db.execute("SELECT count(*) FROM requests WHERE state = 'succeeded' AND is_current = 1").fetchone()
    assert current["succeeded"] == succeeded
    by_reason = dict(
        db.execute(
            "SELECT state || CASE WHEN error_code IS NOT NULL AND error_code != state THEN ':' || error_code "
            "ELSE '' END, count(*) FROM requests WHERE is_current = 1 AND state NOT IN "
            "('succeeded', 'pending', 'submitted') GROUP BY 1"
        ).fetchall()
    )
    assert current["failed_by_reason"] == by_reason


STORE = Path(__file__).resolve().parent.parent / "hipbatch" / "store.py"
WRITES_REQUESTS = re.compile(r"\b(UPDATE requests|INSERT (OR \w+ )?INTO requests|DELETE FROM requests)\b")
KEEPS_STATS = {"_counted", "_stats_add", "recount_batch", "rebuild_stats", "_fill"}  # or SQL into request_stats
#: Helpers whose writes run inside their caller's _counted() (named in the caller).
INSIDE_CALLERS = {"_apply_staged"}


def test_every_store_method_that_changes_requests_keeps_the_counts() -> None:
    store = next(n for n in ast.parse(STORE.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "Store")
    missing = []
    for node in store.body:
        if not isinstance(node, ast.FunctionDef) or node.name in INSIDE_CALLERS:
            continue
        texts = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        inserts = "requests" in texts and any(
            isinstance(n, ast.Attribute) and n.attr in ("insert", "insert_all", "upsert", "update", "delete")
            for n in ast.walk(node)
        )
        if not (any(WRITES_REQUESTS.search(t) for t in texts) or inserts):
            continue
        names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        if not (names & KEEPS_STATS or any("INTO request_stats" in t for t in texts)):
            missing.append(node.name)
    assert not missing, f"these store methods change requests without keeping request_stats: {missing}"


def test_suspects_seen_in_the_dataset_pass_are_the_ones_the_queries_find(
    openai_env: LocalBatchServer, tmp_path: Path
) -> None:
    from hipbatch.dataset import KeptPrompts, write_dataset
    from hipbatch.extract import OVERLONG_FACTOR
    from hipbatch.ops import _kept_prompts, _seen_prompts

    root = make_hip_dir(tmp_path / "kernels", 14)
    cli("submit", root)
    cli(*WAIT)
    db = ledger_db(Path("state"))
    replies = {
        "k0004.hip": "Write a kernel.\n\n```cpp\n__global__ void k(){}\n```\n\nThen test it well on the host side.",
        "k0005.hip": "Write a HIP kernel that " + "sums and checks every element of a long array, " * 40,
        "k0010.hip": "Write a HIP kernel that " + "scales, clamps and writes back a long vector, " * 30,
    }
    for name, text in replies.items():
        db.execute("UPDATE requests SET reply_text = ? WHERE file_name = ?", [text, name])
    cli("collect", "--reextract")
    store = Store(Path("state"))
    try:
        seen = KeptPrompts(OVERLONG_FACTOR)
        write_dataset(store, tmp_path / "d.json", kept=seen)
        from_pass = _seen_prompts(store, None, seen)
        from_queries = _kept_prompts(store, None, strict=False)
    finally:
        store.close()
    assert from_pass == from_queries
    assert from_pass["suspects"] == 3
    assert {s["file_name"] for s in from_pass["suspect_files"]} == set(replies)
    assert any("overlong" in s["why"] for s in from_pass["suspect_files"])


def test_records_made_by_sqlite_are_byte_for_byte_the_python_ones(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    from hipbatch.dataset import KeptPrompts, write_dataset
    from hipbatch.extract import OVERLONG_FACTOR

    root = make_hip_dir(tmp_path / "kernels", 8)
    cli("submit", root, "--job", 'odd "job" \\ é')
    cli("submit", root, "--job", "second")  # two jobs: their records merged by file name
    cli(*WAIT)
    db = ledger_db(Path("state"))
    tricky = 'Write a "kernel" \\ that\ttabs,\nnew lines, \x01\x1f\x7f, é 日本 \u2028\u2029 😀 and more text'
    db.execute("UPDATE requests SET reply_text = ? WHERE file_name = 'k0001.hip'", [f"<prompt>{tricky}</prompt>"])
    cli("collect", "--reextract")
    store = Store(Path("state"))
    try:
        assert store.sql_json_like_python()
        outputs = {}
        for made_by_sql in (True, False):
            store._json_checked = made_by_sql
            for fmt in ("json", "jsonl"):
                seen = KeptPrompts(OVERLONG_FACTOR)
                out = tmp_path / f"{made_by_sql}.{fmt}"
                write_dataset(store, out, fmt, kept=seen)
                outputs[made_by_sql, fmt] = (out.read_bytes(), {j: seen.suspects(j, 10) for j in seen.jobs})
    finally:
        store.close()
    for fmt in ("json", "jsonl"):
        assert outputs[True, fmt] == outputs[False, fmt]
    records = json.loads(outputs[True, "json"][0])
    assert len(records) == 16 and tricky in {r["english_prompt"] for r in records}
    assert [(r["file_name"], r["job"]) for r in records] == sorted((r["file_name"], r["job"]) for r in records)
