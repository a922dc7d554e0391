"""Streaming and bulk paths: one JSON escape per request, lazy sorted discovery, bulk dedup against the store,
and a collect whose memory does not grow with the number of result lines."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from hipbatch.collect import collect_batches
from hipbatch.config import load_config
from hipbatch.dataset import record_json, write_dataset
from hipbatch.emulator import fake_model
from hipbatch.emulator.openai_api import _result_line, chat_completion_body
from hipbatch.pack import LineEncoder
from hipbatch.prepare import Source, prepare
from hipbatch.providers import ProviderSettings, get_provider
from hipbatch.providers.registry import Adapters
from hipbatch.records import BatchInfo
from hipbatch.render import REPO_ROOT, discover, iter_discover, load_template, request_id
from hipbatch.store import Store
from tests.conftest import ledger_db, make_hip_dir

TEXTS = [
    ("sys", "user"),
    ("", "only user"),
    ("only system", ""),
    ("", ""),
    ('é \u2028 "q" \\ \n\t\x00\x1f', "日本語 </prompt> \ud7ff"),
    ("sys", "another user"),
]


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"max_tokens": 1024, "temperature": 0.2, "top_p": None},
        # structured output: the json template's params, json_schema included
        {k: v for k, v in load_template(REPO_ROOT / "templates" / "json").params.items() if k != "model"},
    ],
    ids=["none", "sampling", "json-template"],
)
def test_line_encoder_matches_request_id_and_json_dumps(provider: str, params: dict[str, Any]) -> None:
    adapter = get_provider(ProviderSettings(name=provider, key_env="UNUSED"))
    encoder = LineEncoder(adapter, "model-1", params)
    ids = set()
    for system, user in TEXTS:
        cid, line = encoder.encode(system, user)
        assert cid == request_id(provider, adapter.endpoint, "model-1", params, system, user)
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid), cid  # Anthropic's rule, whatever the text
        ids.add(cid)
        expected = (
            json.dumps(
                adapter.to_line(cid, "model-1", params, system, user),
                ensure_ascii=False,
                separators=(",", ":"),
            )
            + "\n"
        )
        assert line == expected.encode("utf-8")
    assert len(ids) == len(TEXTS)  # different text, different id


def test_line_encoder_falls_back_when_a_provider_rewrites_the_text() -> None:
    class Shouting:
        name, endpoint = "openai", "/v1/x"

        def to_line(self, custom_id: str, model: str, params: dict[str, Any], system: str, user: str) -> dict[str, Any]:
            return {"custom_id": custom_id, "messages": [system.upper(), user, user]}

    cid, line = LineEncoder(Shouting(), "m", {}).encode("sys", "hi")
    assert json.loads(line) == {"custom_id": cid, "messages": ["SYS", "hi", "hi"]}


def test_discovery_is_lazy_and_globally_sorted(tmp_path: Path) -> None:
    names = [
        "a.hip",
        "a0.hip",
        "a/x.hip",
        "a-b/y.hip",
        "b.hip",
        "b/c.hip",
        "b/c/d.hip",
        "b.c/e.hip",
        "Z.hip",
        "é.hip",
        "e/é.hip",
        "skip.txt",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x", encoding="utf-8")
    os.symlink(tmp_path / "b", tmp_path / "linked")  # a symlinked folder is not entered (as os.walk)
    found = iter_discover(tmp_path)
    assert not isinstance(found, list) and iter(found) is found
    assert list(found) == sorted(n for n in names if n.endswith(".hip"))
    assert discover(tmp_path, "b/*.hip") == ["b/c.hip", "b/c/d.hip"]  # fnmatch: * crosses folders


def _prepare(store: Store, root: Path, **kwargs: Any) -> Any:
    template = load_template(Path("templates/default"))
    adapter = get_provider(ProviderSettings(name="openai", key_env="UNUSED"))
    source = Source(root, "job", limit=kwargs.pop("limit", None))
    return prepare(store, template, adapter, "gpt-4o-mini", {"max_tokens": 64}, source, **kwargs)


def test_resubmit_looks_up_known_ids_in_bulk(tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 1200)
    store = Store(tmp_path / "state")
    first = _prepare(store, root)
    assert (first.new, first.known) == (1200, 0)
    statements: list[str] = []
    store._db.conn.set_trace_callback(statements.append)
    again = _prepare(store, root)
    store._db.conn.set_trace_callback(None)
    assert (again.new, again.known, again.shards) == (0, 1200, [])
    lookups = [s for s in statements if "FROM requests WHERE custom_id IN" in s]
    assert 1 <= len(lookups) <= 3  # one query per chunk of files, never one per request
    # Apart from the rows of executemany (the file rows upsert, traced once per row), a handful of statements.
    others = [s for s in statements if not s.startswith("INSERT INTO files")]
    assert len(others) < 60, others[:80]


def test_rows_of_vanished_files_are_swept_only_on_a_full_scan(tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 10)
    store = Store(tmp_path / "state")
    _prepare(store, root)
    (root / "k0002.hip").unlink()
    _prepare(store, root, limit=5)
    assert ledger_db(store).table("files").count == 10  # a partial run proves nothing about the other files
    _prepare(store, root)
    names = {r["file_name"] for r in ledger_db(store).table("files").rows}
    assert len(names) == 9 and "k0002.hip" not in names


def test_dry_run_replaces_its_previous_preview(tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "k", 5)
    store = Store(tmp_path / "state")
    _prepare(store, root, dry_run=True)
    _prepare(store, root, dry_run=True)
    previews = list((tmp_path / "state" / "dry-run").rglob("*.jsonl"))
    assert len(previews) == 1 and len(previews[0].read_text().splitlines()) == 5
    assert store.request_counts() == {}


def test_record_json_is_json_dumps() -> None:
    for record in ({"file_name": 'a"b\n.hip', "english_prompt": "é \u2028 x", "via": None, "n": 3}, {}):
        assert record_json(record) == json.dumps(record, ensure_ascii=False)


def _collect_fixture(state: Path, n: int) -> None:
    """A finished batch of n requests whose results file is already downloaded (as after a killed collect)."""
    store = Store(state)
    template = load_template(Path("templates/default"))
    store.upsert_job("job", provider="openai", model="m", template_dir=str(template.path))
    ids = [f"hb-{i:048d}" for i in range(n)]
    store.record_files(
        {"job": "job", "file_name": f"f{i:06d}.hip", "custom_id": cid, "skip_reason": None} for i, cid in enumerate(ids)
    )
    shard_id = store.add_shard(
        {
            "key": "s",
            "job": "job",
            "provider": "openai",
            "model": "m",
            "endpoint": "/v1/x",
            "path": "/nonexistent",
            "n_requests": n,
            "n_bytes": 0,
            "est_tokens": n,
        },
        (
            {
                "custom_id": cid,
                "job": "job",
                "file_name": f"f{i:06d}.hip",
                "provider": "openai",
                "model": "m",
                "endpoint": "/v1/x",
            }
            for i, cid in enumerate(ids)
        ),
    )
    store.attach_batch(store.shard(shard_id), BatchInfo(id="batch_x", status="in_progress", is_final=False))
    store.update_batch(
        BatchInfo(
            id="batch_x",
            status="completed",
            is_final=True,
            total=n,
            done=n,
            failed=0,
            output_file_id="file-x",
        )
    )
    (state / "results").mkdir(exist_ok=True)
    with (state / "results" / "batch_x.jsonl").open("w", encoding="utf-8") as out:
        for i, cid in enumerate(reversed(ids)):
            text, finish = fake_model.render_form("tag", f"Write a HIP kernel number {i} that scales a vector.")
            reply = fake_model.FakeReply(text, finish, "tag", 100, 20)
            out.write(
                json.dumps(_result_line(cid, {"status_code": 200, "body": chat_completion_body("m", reply)})) + "\n"
            )
    store.close()


def _traced_collect(tmp_path: Path, n: int) -> tuple[int, int]:
    """(peak Python allocations, results file size) of collecting n lines and writing their dataset."""
    state = tmp_path / f"state-{n}"
    _collect_fixture(state, n)
    store = Store(state)
    adapters = Adapters(load_config(None))
    tracemalloc.start()
    report = collect_batches(store, adapters)
    written = write_dataset(store, tmp_path / f"out-{n}.json").records
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.lines == n and written == n
    assert store.request_counts() == {"succeeded": n}
    records = json.loads((tmp_path / f"out-{n}.json").read_text(encoding="utf-8"))
    assert len(records) == n and records[0]["file_name"] == "f000000.hip"
    assert records[0]["english_prompt"].startswith("Write a HIP kernel number")
    return peak, (state / "results" / "batch_x.jsonl").stat().st_size


def test_collect_streams_result_lines(tmp_path: Path) -> None:
    # tracemalloc slows every allocation several times: 4,000 and 20,000 lines keep this test quick while
    # showing that five times the lines do not take five times the memory.
    small, _ = _traced_collect(tmp_path, 4_000)
    large, size = _traced_collect(tmp_path, 20_000)
    assert size > 9_000_000  # the records as Python objects would take several times the file
    assert large < 6_000_000, f"collect of 20,000 lines peaked at {large / 1e6:.1f} MB of Python allocations"
    assert large < small * 1.5 + 500_000, (small, large)
