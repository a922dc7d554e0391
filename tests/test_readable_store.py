"""A store people can open: m005_readable_store converts a store made before it (ISO-8601 timestamps next to the
epoch floats, the dataset / failures / batch_overview views, superseded requests marked), and the files table's
triggers keep `is_current` right as files change."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from hipbatch.migrations import migrations
from hipbatch.store import Store
from tests.conftest import ledger_db

T0 = 1767225600.5  # 2026-01-01T00:00:00.500Z
ISO0 = "2026-01-01T00:00:00.500Z"


def old_store(state_dir: Path) -> None:
    """A store at the schema before m005, with one job: a.hip answered (and an older answer from before it
    changed), b.hip failed, c.hip skipped, one collected batch."""
    state_dir.mkdir(parents=True)
    db = Database(sqlite3.connect(state_dir / "hipbatch.db", isolation_level=None))
    migrations.apply(db, stop_before="m005_readable_store")
    db.table("jobs").insert({"name": "k", "provider": "openai", "model": "m", "created_at": T0, "updated_at": T0})
    db.table("files").insert_all(
        [
            {"job": "k", "file_name": "a.hip", "custom_id": "hb-a2", "updated_at": T0},
            {"job": "k", "file_name": "b.hip", "custom_id": "hb-b", "updated_at": T0},
            {"job": "k", "file_name": "c.hip", "skip_reason": "empty file", "updated_at": T0},
        ]
    )
    common = {"job": "k", "provider": "openai", "model": "m", "batch_id": "batch_1", "created_at": T0}
    db.table("requests").insert_all(
        [
            {**common, "custom_id": "hb-a1", "file_name": "a.hip", "state": "succeeded", "prompt": "Old prompt"},
            {
                **common,
                "custom_id": "hb-a2",
                "file_name": "a.hip",
                "state": "succeeded",
                "prompt": "Write a kernel",
                "answered_at": T0 + 60,
                "updated_at": T0 + 60,
            },
            {
                **common,
                "custom_id": "hb-b",
                "file_name": "b.hip",
                "state": "failed",
                "error_code": "server_error",
                "error_message": "boom",
                "attempts": 2,
                "updated_at": T0 + 61,
            },
        ]
    )
    db.table("shards").insert({"id": 1, "key": "k-1", "job": "k", "path": "state/shards/k/k-1.jsonl", "n_requests": 3})
    db.table("batches").insert(
        {"id": "batch_1", "shard_id": 1, "job": "k", "provider": "openai", "model": "m", "status": "completed",
         "is_final": 1, "total": 3, "done": 2, "failed": 1, "collected": 1, "created_at": T0, "finished_at": T0 + 62}
    )  # fmt: skip
    db.close()


def test_an_old_store_is_converted_and_its_views_read_well(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_store(state)
    store = Store(state)  # applies m005
    db = ledger_db(state)
    assert "m005_readable_store" in {r["name"] for r in db.table("_sqlite_migrations").rows}
    assert list(db.query("SELECT * FROM dataset")) == [
        {"job": "k", "file_name": "a.hip", "english_prompt": "Write a kernel", "custom_id": "hb-a2",
         "provider": "openai", "model": "m", "via": "batch", "batch_id": "batch_1",
         "answered_at": "2026-01-01T00:01:00.500Z"},
    ]  # fmt: skip
    failures = list(db.query("SELECT job, file_name, state, error_code, error_message, attempts FROM failures"))
    assert failures == [
        {"job": "k", "file_name": "b.hip", "state": "failed", "error_code": "server_error", "error_message": "boom",
         "attempts": 2},
        {"job": "k", "file_name": "c.hip", "state": "skipped", "error_code": None, "error_message": "empty file",
         "attempts": 0},
    ]  # fmt: skip
    [batch] = db.query("SELECT * FROM batch_overview")
    assert (batch["batch_id"], batch["succeeded_in_ledger"], batch["failed_in_ledger"]) == ("batch_1", 2, 1)
    assert (batch["created_at"], batch["finished_at"], batch["shard_path"]) == (
        ISO0,
        "2026-01-01T00:01:02.500Z",
        "state/shards/k/k-1.jsonl",
    )
    [job] = db.query("SELECT created_at, created_at_iso FROM jobs")
    assert job == {"created_at": T0, "created_at_iso": ISO0}  # the float stays; its ISO text sits next to it
    current = {r["custom_id"]: r["is_current"] for r in db.query("SELECT custom_id, is_current FROM requests")}
    assert current == {"hb-a1": 0, "hb-a2": 1, "hb-b": 1}  # a.hip's old answer is superseded
    assert store.request_counts("k") == {"succeeded": 1, "failed": 1} and store.superseded_count("k") == 1
    assert [r["file_name"] for r in store.failed_files("k")] == ["b.hip", "c.hip"]


def test_the_files_triggers_keep_current_requests_right(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old_store(state)
    store = Store(state)
    db = ledger_db(state)

    def current() -> dict[str, int]:
        return {r["custom_id"]: r["is_current"] for r in db.query("SELECT custom_id, is_current FROM requests")}

    store.record_files([{"job": "k", "file_name": "a.hip", "custom_id": "hb-a1"}])  # a.hip back to its old text
    assert current() == {"hb-a1": 1, "hb-a2": 0, "hb-b": 1}
    store.forget_files_not_in("k", ["a.hip", "c.hip"])  # b.hip removed from the folder
    assert current() == {"hb-a1": 1, "hb-a2": 0, "hb-b": 0}
    store.record_files([{"job": "k", "file_name": "b2.hip", "custom_id": "hb-b"}])  # same text under a new name
    assert current() == {"hb-a1": 1, "hb-a2": 0, "hb-b": 1}
    assert store.superseded_count() == 1 and store.request_counts() == {"succeeded": 1, "failed": 1}
