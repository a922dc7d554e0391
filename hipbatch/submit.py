"""Submit: render files into requests, pack new ones into shards, and feed shards to the provider.

Every provider call that creates something is preceded by a committed intent (shard state uploading /
creating), and every result is committed as soon as it is known, so a killed submit is finished, not
redone, by the next submit, status or collect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hipbatch.config import Config, resolve
from hipbatch.errors import AmbiguousSubmit, HipbatchError, ProviderError, TransientError, UsageError
from hipbatch.poll import retrying
from hipbatch.progress import NullProgress, Progress
from hipbatch.providers import Provider, ProviderSettings, get_provider
from hipbatch.records import BatchInfo, ShardState
from hipbatch.render import SkipFile, Template, discover, estimate_tokens, read_source, request_id
from hipbatch.store import Store

RENDER_CHUNK = 1000
DEFAULT_MAX_IN_FLIGHT = 100  # batches per provider at once: the practical limit of both services


class Adapters:
    """One adapter per provider, built on first use from the config (keys from the environment)."""

    def __init__(self, config: Config, factory: Callable[[ProviderSettings], Provider] = get_provider) -> None:
        self.config = config
        self.factory = factory
        self._cache: dict[str, Provider] = {}

    def get(self, name: str) -> Provider:
        if name not in self._cache:
            settings, _, _ = resolve(self.config, name, {"model": "-"})
            self._cache[name] = self.factory(settings)
        return self._cache[name]


@dataclass
class PrepareReport:
    """What rendering and packing found."""

    job: str
    provider: str
    model: str
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0  # distinct requests rendered
    known: int = 0  # already in the store (sent before, or queued)
    new: int = 0  # written to new shards now
    shards: list[str] = field(default_factory=list)
    est_input_tokens: int = 0  # of the new requests
    est_input_tokens_all: int = 0  # of every rendered request
    max_tokens: int = 0
    dry_run: bool = False


@dataclass
class FeedReport:
    """What feeding the queue did."""

    uploaded: int = 0
    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    queued: int = 0  # shards left waiting for capacity
    blocked: list[str] = field(default_factory=list)  # why some shards could not be sent now


def prepare(store: Store, template: Template, provider: Provider, model: str, params: dict[str, Any],
            input_dir: Path, job: str, pattern: str = "**/*.hip", limit: int | None = None,
            max_requests_per_batch: int | None = None, dry_run: bool = False,
            progress: Progress | None = None) -> PrepareReport:
    """Render every file, record it, and write the requests the store does not know into shards."""
    progress = progress or NullProgress()
    names = discover(input_dir, pattern)
    if not names:
        raise UsageError(f"INPUT_DIR {input_dir}: no files match --glob {pattern!r}")
    if limit is not None:
        names = names[:limit]
    report = PrepareReport(job=job, provider=provider.name, model=model, dry_run=dry_run,
                           max_tokens=int(params.get("max_tokens") or 0))
    shard_dir = store.state_dir / ("dry-run" if dry_run else "shards") / _safe(job)
    max_requests = min(provider.max_requests, max_requests_per_batch or provider.max_requests)
    writer = _Packer(store, provider, shard_dir, job, model, params, max_requests, dry_run, report)
    if not dry_run:
        store.upsert_job(job, provider=provider.name, model=model, input_dir=str(input_dir.resolve()),
                         template_dir=str(template.path.resolve()))
    file_rows: list[dict[str, Any]] = []
    chunk: list[tuple[str, str, str, str]] = []
    with progress.task(f"render {job}", len(names)) as bar:
        for name in names:
            report.files += 1
            try:
                code = read_source(input_dir / name)
            except SkipFile as e:
                report.skipped.append((name, str(e)))
                file_rows.append({"job": job, "file_name": name, "custom_id": None, "skip_reason": str(e)})
                bar.advance()
                continue
            system, user = template.render(code, name)
            cid = request_id(provider.name, provider.endpoint, model, params, system, user)
            chunk.append((name, cid, system, user))
            if len(chunk) >= RENDER_CHUNK:
                writer.add_chunk(chunk, file_rows)
                bar.advance(len(chunk))
                chunk = []
                if not dry_run and len(file_rows) >= RENDER_CHUNK:
                    store.record_files(file_rows)
                    file_rows = []
        writer.add_chunk(chunk, file_rows)
        bar.advance(len(chunk))
    writer.finish()
    if not dry_run:
        store.record_files(file_rows)
        if limit is None:
            store.forget_files_except(job, set(names))
    return report


class _Packer:
    """Dedups a chunk of rendered requests against the store and the open shard, then writes new ones."""

    def __init__(self, store: Store, provider: Provider, shard_dir: Path, job: str, model: str,
                 params: dict[str, Any], max_requests: int, dry_run: bool, report: PrepareReport) -> None:
        from hipbatch.pack import ShardWriter

        self.store, self.provider, self.job, self.model = store, provider, job, model
        self.dry_run, self.report = dry_run, report
        self.writer = ShardWriter(shard_dir, f"{_safe(job)[:40]}-{store.next_shard_number():06d}",
                                  max_requests, provider.max_bytes)
        self.params = params

    def add_chunk(self, chunk: list[tuple[str, str, str, str]], file_rows: list[dict[str, Any]]) -> None:
        if not chunk:
            return
        known = self.store.known_ids([cid for _, cid, _, _ in chunk])
        fresh: set[str] = set()
        report = self.report
        for name, cid, system, user in chunk:
            tokens = estimate_tokens(system) + estimate_tokens(user)
            report.requests += 1
            report.est_input_tokens_all += tokens
            if cid in known or cid in fresh or cid in self.writer.pending_ids():
                report.known += cid in known
                file_rows.append({"job": self.job, "file_name": name, "custom_id": cid, "skip_reason": None})
                continue
            line = self.provider.to_line(cid, self.model, self.params, system, user)
            data = (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            if not self.writer.fits_alone(data):
                reason = f"request too large for one batch ({len(data)} bytes)"
                report.skipped.append((name, reason))
                file_rows.append({"job": self.job, "file_name": name, "custom_id": None, "skip_reason": reason})
                continue
            fresh.add(cid)
            file_rows.append({"job": self.job, "file_name": name, "custom_id": cid, "skip_reason": None})
            row = {"custom_id": cid, "job": self.job, "file_name": name, "provider": self.provider.name,
                   "model": self.model, "endpoint": self.provider.endpoint, "est_input_tokens": tokens,
                   "max_tokens": report.max_tokens}
            report.new += 1
            report.est_input_tokens += tokens
            closed = self.writer.add(data, row, tokens)
            if closed is not None:
                self._record(closed)

    def finish(self) -> None:
        closed = self.writer.close()
        if closed is not None:
            self._record(closed)

    def _record(self, shard: Any) -> None:
        self.report.shards.append(str(shard.path))
        if self.dry_run:
            return
        self.store.add_shard(
            {"key": shard.key, "job": self.job, "provider": self.provider.name, "model": self.model,
             "endpoint": self.provider.endpoint, "path": str(shard.path), "n_requests": shard.n_requests,
             "n_bytes": shard.n_bytes, "est_tokens": shard.est_tokens},
            shard.requests,
        )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "job"


# ---- feeding the queue ----------------------------------------------------------------------------


@dataclass
class Window:
    """How much may be at the provider at once."""

    max_in_flight_batches: int = DEFAULT_MAX_IN_FLIGHT
    max_enqueued_tokens: int | None = None  # per model; None = unlimited
    shrunk: dict[str, int] = field(default_factory=dict)  # model -> tokens allowed after a quota refusal

    def allows(self, store: Store, shard: dict[str, Any]) -> bool:
        batches, _ = store.in_flight(shard["provider"])
        if batches >= self.max_in_flight_batches:
            return False
        limit = self.shrunk.get(shard["model"], self.max_enqueued_tokens)
        if limit is None:
            return True
        _, tokens = store.in_flight(shard["provider"], shard["model"])
        # A shard bigger than the whole quota still goes alone, or it would never go.
        return tokens == 0 or tokens + int(shard["est_tokens"] or 0) <= limit


def feed(store: Store, adapters: Adapters, window: Window | None = None, force: bool = False,
         resume_only: bool = False, sleep: Callable[[float], None] = time.sleep) -> FeedReport:
    """Finish interrupted submits, then (unless resume_only) send queued shards while the window allows."""
    window = window or Window()
    report = FeedReport()
    resumable = (ShardState.UPLOADING, ShardState.UPLOADED, ShardState.CREATING, ShardState.AMBIGUOUS)
    for shard in store.shards_in_states(resumable):
        _send(store, adapters, shard, report, force, sleep)
    for shard in [] if resume_only else store.shards_in_states([ShardState.QUEUED]):
        if not window.allows(store, shard):
            report.queued += 1
            continue
        _send(store, adapters, shard, report, force, sleep)
    return report


def _send(store: Store, adapters: Adapters, shard: dict[str, Any], report: FeedReport, force: bool,
          sleep: Callable[[float], None]) -> None:
    try:
        provider = adapters.get(shard["provider"])
        provider.check_key()
    except HipbatchError as e:
        report.blocked.append(f"shard {Path(shard['path']).name}: {e}")
        return
    path = Path(shard["path"])
    tag = {"hipbatch_shard": shard["key"], "hipbatch_job": str(shard["job"])[:500]}
    state = shard["state"]
    if state in (ShardState.QUEUED, ShardState.UPLOADING):
        # An interrupted upload is simply redone: files cost nothing and a batch is what gets billed.
        store.update_shard(shard["id"], state=ShardState.UPLOADING, intent_at=time.time())
        file_id = retrying(provider.upload, path, sleep=sleep)
        store.update_shard(shard["id"], state=ShardState.UPLOADED, file_id=file_id)
        report.uploaded += file_id is not None
        shard = store.shard(shard["id"])
        state = shard["state"]
    if state in (ShardState.CREATING, ShardState.AMBIGUOUS):
        found = _look_for_batch(store, provider, shard, tag, sleep)
        if found is not None:
            store.attach_batch(shard, found, adopted=True)
            report.adopted.append(found.id)
            return
        if found is None and state == ShardState.AMBIGUOUS and not force:
            raise AmbiguousSubmit(_ambiguous_message(shard))
    info = _create(store, provider, shard, tag, force, sleep)
    store.attach_batch(shard, info)
    report.created.append(info.id)


def _create(store: Store, provider: Provider, shard: dict[str, Any], tag: dict[str, str], force: bool,
            sleep: Callable[[float], None], attempts: int = 6) -> BatchInfo:
    """Create a batch with no blind retries: after an ambiguous failure, look before trying again."""
    path = Path(shard["path"])
    for attempt in range(attempts):
        store.update_shard(shard["id"], state=ShardState.CREATING, intent_at=time.time())
        shard = store.shard(shard["id"])
        try:
            return provider.create(path, shard["file_id"], tag)
        except TransientError as e:
            sleep(min(getattr(e, "retry_after", None) or 0.5 * 2**attempt, 30.0))
            found = _look_for_batch(store, provider, shard, tag, sleep, force=force)
            if found is not None:
                return found
            if attempt == attempts - 1:
                raise
        except ProviderError as e:
            if "cannot find file" in str(e).lower() and attempt < attempts - 1:
                sleep(min(1.0 * 2**attempt, 30.0))  # the upload is not visible yet (a known race)
                continue
            store.update_shard(shard["id"], state=ShardState.UPLOADED if shard["file_id"] else ShardState.QUEUED)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def _look_for_batch(store: Store, provider: Provider, shard: dict[str, Any], tag: dict[str, str],
                    sleep: Callable[[float], None], force: bool = False) -> BatchInfo | None:
    """The provider batch an interrupted create made for this shard, if any."""
    since = float(shard["intent_at"] or shard["created_at"])
    candidates = [b for b in retrying(provider.find, tag, since, int(shard["n_requests"]), sleep=sleep)
                  if b.id not in store.known_batch_ids()]
    if not candidates:
        return None
    if provider.has_metadata or len(candidates) == 1:
        return min(candidates, key=lambda b: b.created_at or 0)
    if force:
        return None
    store.update_shard(shard["id"], state=ShardState.AMBIGUOUS)
    raise AmbiguousSubmit(_ambiguous_message(shard, [b.id for b in candidates]))


def _ambiguous_message(shard: dict[str, Any], ids: list[str] | None = None) -> str:
    which = f" (candidates: {', '.join(ids)})" if ids else ""
    return (f"shard {Path(shard['path']).name} of job {shard['job']}: a batch may already exist at "
            f"{shard['provider']}{which} and cannot be told apart, so it is not resubmitted; check the "
            "provider's console, cancel any duplicate, then rerun with --force to submit it again")


def provider_for_job(config: Config, template: Template, provider_name: str, model: str | None,
                     factory: Callable[[ProviderSettings], Provider] = get_provider
                     ) -> tuple[Provider, str, dict[str, Any]]:
    """The adapter, model and request params for a submit, after the precedence rules."""
    settings, chosen, params = resolve(config, provider_name, template.defaults_for(provider_name), model)
    return factory(settings), chosen, params
