"""The schema an empty store migrates to, table by table (columns and types), and the migrations it records."""

from __future__ import annotations

from pathlib import Path

from hipbatch.store import Store
from tests.conftest import ledger_db


def test_an_empty_store_migrates_to_the_current_schema(tmp_path: Path) -> None:
    Store(tmp_path / "state").close()
    db = ledger_db(tmp_path / "state")
    applied = [r["name"] for r in db.table("_sqlite_migrations").rows_where(order_by="id")]
    assert applied[:4] == [
        "m001_initial", "m002_status_covering_indexes", "m003_superseded_answers", "m004_batch_read_errors",
    ]  # fmt: skip
    assert db.table("jobs").columns_dict == {
        "name": str, "provider": str, "model": str, "input_dir": str, "template_dir": str, "output_file": str,
        "created_at": float, "updated_at": float,
    }  # fmt: skip
    assert db.table("files").columns_dict == {
        "job": str, "file_name": str, "custom_id": str, "skip_reason": str, "updated_at": float,
    }  # fmt: skip
    requests = db.table("requests").columns_dict
    for column, kind in {"custom_id": str, "state": str, "attempts": int, "est_cost_usd": float, "prompt": str,
                         "input_tokens": int, "cost_usd": float, "via": str}.items():  # fmt: skip
        assert requests[column] is kind, column
    assert {"id", "key", "state", "file_id", "batch_id", "intent_at", "requeues"} <= set(
        db.table("shards").columns_dict
    )
    assert {"id", "shard_id", "status", "is_final", "collected", "adopted"} <= set(db.table("batches").columns_dict)
    batches = db.table("batches").columns_dict
    assert (batches["read_error"], batches["read_attempts"], batches["proven"]) == (str, int, int)
    assert db.table("foreign_batches").columns_dict == {
        "id": str, "provider": str, "shard_id": int, "released_at": float, "reason": str,
    }  # fmt: skip
    assert db.table("superseded").columns_dict["cost_usd"] is float
    indexes = {tuple(i.columns) for i in db.table("requests").indexes}
    # m007 replaced m005's covering index by request_stats, and reads superseded requests through a partial index
    assert ("job", "state", "is_current", "cost_usd", "est_cost_usd") not in indexes
    assert ("job", "state", "error_code", "cost_usd", "est_cost_usd") in indexes
    assert ("state", "batch_id", "error_code") in indexes
    assert list(db.table("request_stats").pks) == [
        "job", "provider", "model", "via", "batch_id", "state", "error_code", "method",
    ]  # fmt: skip
    assert {"n", "cost_usd", "n_cost_usd", "est_cost_usd", "n_est_cost_usd", "input_tokens"} <= set(
        db.table("request_stats").columns_dict
    )


def test_m004_marks_uncollected_anthropic_adoptions_tentative(tmp_path: Path) -> None:
    from hipbatch.migrations import migrations

    (tmp_path / "old").mkdir()
    db = ledger_db(tmp_path / "old")  # a store as hipbatch left it before m004
    migrations.apply(db, stop_before="m004_batch_read_errors")
    for i, (provider, adopted, collected) in enumerate(
        [("anthropic", 1, 0), ("anthropic", 1, 1), ("anthropic", 0, 0), ("openai", 1, 0)]
    ):
        db.table("batches").insert(
            {"id": f"b{i}", "shard_id": i, "provider": provider, "adopted": adopted, "collected": collected}
        )
    migrations.apply(db)
    rows = {r["id"]: (r["proven"], r["read_attempts"]) for r in db.table("batches").rows}
    assert rows == {"b0": (0, 0), "b1": (1, 0), "b2": (1, 0), "b3": (1, 0)}


def test_opening_again_applies_nothing(tmp_path: Path) -> None:
    Store(tmp_path / "state").close()
    before = ledger_db(tmp_path / "state").table("_sqlite_migrations").count
    Store(tmp_path / "state").close()
    assert ledger_db(tmp_path / "state").table("_sqlite_migrations").count == before
