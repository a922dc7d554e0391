"""Submit's pipeline: a shard is uploaded and created while the next one is rendered, every store call of both
threads goes through one lock, a crash anywhere in it is finished by the next submit, uploads and Anthropic
create bodies stream from the shard file, and commands that call no provider import no SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from hipbatch import cost
from hipbatch.config import load_config
from hipbatch.emulator import LocalBatchServer
from hipbatch.pack import Shard, ShardWriter
from hipbatch.prepare import Source, prepare
from hipbatch.providers import Provider, ProviderSettings, get_provider
from hipbatch.providers.anthropic import request_body
from hipbatch.providers.registry import Adapters, provider_for_job
from hipbatch.records import ShardState
from hipbatch.render import load_template
from hipbatch.store import Store
from hipbatch.submit import Feeder
from tests.conftest import cli, env_without_keys, ledger_db, make_hip_dir
from tests.test_crash import STATE, WAIT, Killed, assert_nothing_lost_nothing_twice, crashing


class Watched:
    """A real adapter (real SDK, real server) that reports each upload or create as it starts."""

    def __init__(self, inner: Provider, started: list[tuple[str, str]], event: threading.Event) -> None:
        self.inner, self.started, self.event = inner, started, event

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload(self, path: Path) -> str | None:
        self.started.append(("upload", path.name))
        self.event.set()
        return self.inner.upload(path)

    def create(self, path: Path, file_id: str | None, tag: dict[str, str]) -> Any:
        self.started.append(("create", path.name))
        self.event.set()
        return self.inner.create(path, file_id, tag)


def pipelined_submit(root: Path, provider: str, per_batch: int, adapters: Adapters, on_shard: Any = None) -> Feeder:
    """What `submit` does, with the adapters given: prepare feeding a Feeder shard by shard."""
    template = load_template(Path("templates/default"))
    adapter, model, params = provider_for_job(load_config(None), template, provider, None)
    store = Store(STATE)
    try:
        with Feeder(store, adapters) as feeder:

            def put(shard_id: int) -> None:
                feeder.put(shard_id)
                if on_shard is not None:
                    on_shard(feeder, shard_id)

            prepare(feeder.store, template, adapter, model, params, Source(root, "kernels"), per_batch, on_shard=put)
    finally:
        store.close()
    return feeder


def test_a_shard_is_sent_while_the_next_one_is_rendered(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 9)
    started: list[tuple[str, str]] = []
    event = threading.Event()
    adapters = Adapters(load_config(None), lambda s: Watched(get_provider(s), started, event))  # type: ignore[return-value]
    seen_while_packing: list[int] = []

    def on_shard(feeder: Feeder, shard_id: int) -> None:
        if not seen_while_packing:  # the first shard: its send starts before the second shard is rendered
            assert event.wait(20), "the first shard was not sent while the others were still to render"
            seen_while_packing.append(len(feeder.store.shards_in_states(list(ShardState))))

    feeder = pipelined_submit(root, provider, 3, adapters, on_shard)
    assert seen_while_packing == [1]  # only the first shard was recorded when its send began
    assert len(feeder.report.created) == 3 and not feeder.report.errors
    calls = [kind for kind, _ in started]
    assert calls == ["upload", "create"] * 3  # (Anthropic's upload sends nothing: requests go with the create)
    store = Store(STATE)
    in_order = [Path(s.path).name for s in store.shards_in_states(["submitted"])]  # by shard id
    store.close()
    assert list(dict.fromkeys(name for _, name in started)) == in_order  # each shard sent once, in order
    assert server.stats.batches_created == 3
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 9
    assert_nothing_lost_nothing_twice(server, 9)


@pytest.mark.parametrize("point", ["after_upload", "before_create", "after_create"])
def test_pipelined_submit_crash_then_submit_again(
    provider: str, server: LocalBatchServer, tmp_path: Path, point: str
) -> None:
    if provider == "anthropic" and point == "after_upload":
        pytest.skip("Anthropic uploads nothing: its requests travel in the create call")
    root = make_hip_dir(tmp_path / "kernels", 9)
    with pytest.raises(Killed):  # dies in the worker on the second shard; raised when the pipeline ends
        pipelined_submit(root, provider, 3, crashing(point, nth=2))
    assert server.stats.batches_created == (2 if point == "after_create" else 1)
    store = Store(STATE)
    assert len(store.shards_in_states(["queued"])) == 1  # the third was still recorded, never sent
    store.close()
    out = cli("submit", root, "--provider", provider)
    if point == "after_create":
        assert "Adopted 1 batch(es) created by an interrupted run" in out.stderr
    assert server.stats.batches_created == 3  # one per shard, never two
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 9
    assert_nothing_lost_nothing_twice(server, 9)


def test_an_error_while_rendering_stops_the_sends(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 9)

    def fail_after_first(feeder: Feeder, shard_id: int) -> None:
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        pipelined_submit(root, "openai", 3, Adapters(load_config(None)), fail_after_first)
    assert openai_env.stats.batches_created <= 1  # at most the shard already handed over
    out = json.loads(cli("submit", root, "--max-requests-per-batch", "3", "--json").stdout)
    assert out["prepare"]["new"] == 6  # the files not rendered before the error; the first shard is kept
    assert openai_env.stats.batches_created == 3  # the first shard's batch (then or now) and two new ones
    assert json.loads(cli(*WAIT).stdout)["succeeded"] == 9
    assert_nothing_lost_nothing_twice(openai_env, 9)


def test_submit_cli_pipelines_and_reports(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 10)
    out = json.loads(cli("submit", root, "--provider", provider, "--max-requests-per-batch", "4", "--json").stdout)
    assert out["prepare"]["new"] == 10 and len(out["prepare"]["shards"]) == 3
    assert len(out["feed"]["created"]) == 3 and out["feed"]["uploaded"] == (0 if provider == "anthropic" else 3)
    assert server.stats.batches_created == 3
    store = Store(STATE)
    assert len(store.shards_in_states(["submitted"])) == 3
    assert store.request_counts() == {"submitted": 10}
    store.close()


def test_submit_records_the_worst_case_cost_settle_would(
    provider: str, server: LocalBatchServer, tmp_path: Path
) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    cli("submit", root, "--provider", provider)
    cli(*WAIT)  # answers: the next estimate is calibrated by the tokens the server reported
    make_hip_dir(root, 4, start=6)
    cli("submit", root, "--provider", provider)
    db = ledger_db(STATE)
    rows = list(db.query("SELECT custom_id, model, est_cost_usd FROM requests WHERE state = 'submitted'"))
    recorded = {r["custom_id"]: r["est_cost_usd"] for r in rows}
    assert len(recorded) == 4 and all(v is not None and v > 0 for v in recorded.values())
    prices = cost.load_prices(load_config(None))
    price = prices.lookup(provider, rows[0]["model"])
    assert price is not None
    store = Store(STATE)
    calibrated = cost.calibration(store, provider, rows[0]["model"], price.input_includes_cache)
    assert calibrated.samples == 6 and calibrated.ratio not in (None, 1.0)  # a real calibration is applied
    db.execute("UPDATE requests SET est_cost_usd = NULL")  # what settle computes on its own, for comparison
    store.rebuild_stats()  # the raw UPDATE above bypassed the counters settle reads
    cost.settle(store, prices)
    store.close()
    settled = {r["custom_id"]: r["est_cost_usd"] for r in db.query("SELECT * FROM requests WHERE state = 'submitted'")}
    assert settled == recorded  # the same floats, to the last bit


# ---- streaming from the shard file ---------------------------------------------------------------

PEAK = """
import json, sys, tracemalloc
from pathlib import Path
from hipbatch.providers import ProviderSettings, get_provider
name, key_env, url, shard = sys.argv[1:5]
adapter = get_provider(ProviderSettings(name=name, key_env=key_env, base_url=url))
adapter.upload_block = adapter.body_block = 256 * 1024
adapter.client  # the SDK and its client are built before measuring
tracemalloc.start()
file_id = adapter.upload(Path(shard))
info = adapter.create(Path(shard), file_id, {"hipbatch_shard": "s", "hipbatch_job": "j"})
print(json.dumps({"peak": tracemalloc.get_traced_memory()[1], "id": info.id}))
"""


def big_shard(path: Path, provider: str, n: int, text_bytes: int) -> int:
    """A shard of n requests of the provider's format; returns its size."""
    adapter = get_provider(ProviderSettings(name=provider, key_env="UNUSED"))
    with path.open("wb") as out:
        for i in range(n):
            user = f"kernel {i}\n" + "x" * text_bytes
            line = adapter.to_line(f"hb-{i:048d}", "model-1", {"max_tokens": 16}, "system", user)
            out.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return path.stat().st_size


def test_upload_and_create_stream_from_the_shard_file(provider: str, server: LocalBatchServer, tmp_path: Path) -> None:
    shard = tmp_path / "big.jsonl"
    # Gemini's SDK uploads in 8 MiB chunks (its own resumable upload): bounded, but not below a chunk or two, so
    # its shard is bigger, to show the bound does not grow with it.
    n, limit = (1000, 20_000_000) if provider == "gemini" else (400, 3_000_000)
    size = big_shard(shard, provider, n, 50_000)
    url = getattr(server, f"{provider}_base_url")
    key_env = f"{provider.upper()}_API_KEY"
    env = env_without_keys() | {key_env: "test-key", "ANTHROPIC_CONFIG_DIR": str(tmp_path)}
    args = [sys.executable, "-c", PEAK, provider, key_env, url, str(shard)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert size > 20_000_000
    # Held in memory, the shard would take at least its size (parsed and serialised again: about 4x).
    assert result["peak"] < limit, f"{provider}: {result['peak'] / 1e6:.1f} MB for a {size / 1e6:.0f} MB shard"
    assert server.stats.batches_created == 1 and result["id"]
    assert len(server.stats.sent) == n and set(server.stats.sent.values()) == {1}  # every request, once


def test_durable_shards_are_synced_while_written(tmp_path: Path) -> None:
    lines = [json.dumps({"custom_id": f"c{i}", "text": "x" * (1000 + i)}).encode() + b"\n" for i in range(3000)]
    closed: list[Shard] = []
    writer = ShardWriter(tmp_path, "s", 2000, 1 << 30, on_close=closed.append, sync_every=256 * 1024)
    for i, line in enumerate(lines):
        writer.add(line, f"c{i}", 1)
    writer.close()
    assert writer.background_syncs >= 2  # 3 MB in two shards: a sync every 256 KB unless one still runs
    assert [s.n_requests for s in closed] == [2000, 1000]
    assert b"".join(s.path.read_bytes() for s in closed) == b"".join(lines)
    assert not list(tmp_path.glob("*.part"))


def test_shards_ramp_up_to_the_byte_limit(tmp_path: Path) -> None:
    closed: list[Shard] = []
    writer = ShardWriter(tmp_path, "s", 10**6, 1000, durable=False, on_close=closed.append, ramp_from=100)
    for i in range(400):  # 10-byte lines, 4,000 bytes
        writer.add(b"%09d\n" % i, f"c{i}", 1)
    writer.close()
    assert [s.n_bytes for s in closed] == [100, 200, 400, 800, 1000, 1000, 500]  # doubling, then the limit
    assert b"".join(s.path.read_bytes() for s in closed) == b"".join(b"%09d\n" % i for i in range(400))


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("ending", [b"\n", b""])
def test_anthropic_request_body_is_the_lines_as_one_json_array(tmp_path: Path, block: int, ending: bytes) -> None:
    lines = [{"custom_id": f"c{i}", "params": {"text": "é\n" * i}} for i in range(5)]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join(json.dumps(x, ensure_ascii=False).encode() for x in lines) + ending)
    length, chunks = request_body(path, block)
    body = b"".join(chunks)
    assert length == len(body)
    assert json.loads(body) == {"requests": lines}


# ---- start-up: no SDK where no provider is called ---------------------------------------------------

MODULES = """
import runpy, sys
sys.argv = ["hipbatch", *sys.argv[1:]]
try:
    runpy.run_module("hipbatch", run_name="__main__")
finally:
    print(sorted(m for m in ("openai", "anthropic", "httpx2") if m in sys.modules))
"""


def sdks_imported(*args: str, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", MODULES, *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))  # type: ignore[no-any-return]


def test_commands_with_no_provider_call_import_no_sdk(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 4)
    env = env_without_keys() | {
        "OPENAI_BASE_URL": openai_env.openai_base_url,
        "OPENAI_API_KEY": "test-key",
        "HIPBATCH_STATE_DIR": str(tmp_path / "state"),
    }
    assert sdks_imported("submit", str(root), "--dry-run", env=env) == []
    assert sdks_imported("collect", env=env) == []  # an empty state: nothing to download
    cli("submit", root)
    cli(*WAIT)
    assert sdks_imported("collect", env=env) == []  # every batch collected: nothing to download
    assert sdks_imported("status", env=env) == []  # every batch final: nothing to refresh
    assert sdks_imported("cost", env=env) == []
    assert sdks_imported("submit", str(root), env=env) == ["httpx2", "openai"]  # checks the model first
