"""Submit: render files into requests, pack new ones into shards, and feed shards to the provider.

Every provider call that creates something is preceded by a committed intent (shard state uploading /
creating), and every result is committed as soon as it is known, so a killed submit is finished, not
redone, by the next submit, status or collect.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hipbatch.config import Config, resolve
from hipbatch.errors import AmbiguousSubmit, HipbatchError, ProviderError, TransientError, UsageError
from hipbatch.poll import retrying
from hipbatch.progress import NullProgress, Progress
from hipbatch.providers import Provider, ProviderSettings, get_provider
from hipbatch.records import BatchInfo, ShardState
from hipbatch.store import Store

if TYPE_CHECKING:  # jinja2 loads only for commands that render (status and collect do not)
    from hipbatch.render import Template

RENDER_CHUNK = 500  # files rendered between two store look-ups (their lines are held meanwhile)
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
    ambiguous: list[str] = field(default_factory=list)  # shards refused without --force (AmbiguousSubmit)
    errors: list[str] = field(default_factory=list)  # provider calls that failed after retries
    duplicates_cancelled: list[str] = field(default_factory=list)  # extra batches found for one shard


def prepare(
    store: Store,
    template: Template,
    provider: Provider,
    model: str,
    params: dict[str, Any],
    input_dir: Path,
    job: str,
    pattern: str = "**/*.hip",
    limit: int | None = None,
    max_requests_per_batch: int | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> PrepareReport:
    """Render every file, record it, and write the requests the store does not know into shards.

    Streams end to end: one folder listing, one file and one chunk of requests are in memory at a time.
    """
    from hipbatch.pack import LineEncoder
    from hipbatch.render import SkipFile, estimate_tokens, iter_discover, read_source

    progress = progress or NullProgress()
    found = iter_discover(input_dir, pattern)
    first = next(found, None)
    if first is None:
        raise UsageError(f"INPUT_DIR {input_dir}: no files match --glob {pattern!r}")
    names = itertools.islice(itertools.chain([first], found), limit)
    total = None
    if getattr(progress, "active", False):  # a second listing costs little next to reading the files
        total = sum(1 for _ in itertools.islice(iter_discover(input_dir, pattern), limit))
    report = PrepareReport(
        job=job, provider=provider.name, model=model, dry_run=dry_run, max_tokens=int(params.get("max_tokens") or 0)
    )
    shard_dir = store.state_dir / ("dry-run" if dry_run else "shards") / _safe(job)
    if dry_run:  # a preview replaces the previous one instead of piling up next to it
        for old in [*shard_dir.glob("*.jsonl"), *shard_dir.glob("*.jsonl.part")]:
            old.unlink(missing_ok=True)
    max_requests = min(provider.max_requests, max_requests_per_batch or provider.max_requests)
    writer = _Packer(store, provider, shard_dir, job, model, params, max_requests, dry_run, report)
    if not dry_run:
        store.upsert_job(
            job,
            provider=provider.name,
            model=model,
            input_dir=str(input_dir.resolve()),
            template_dir=str(template.path.resolve()),
        )
    encoder = LineEncoder(provider, model, params)
    stamp = time.time()
    base = str(input_dir)
    file_rows: list[dict[str, Any]] = []
    chunk: list[tuple[str, str, bytes, int]] = []
    with progress.task(f"render {job}", total) as bar:
        for name in names:
            report.files += 1
            try:
                code = read_source(os.path.join(base, name), root=base)
            except SkipFile as e:
                report.skipped.append((name, str(e)))
                file_rows.append({"job": job, "file_name": name, "custom_id": None, "skip_reason": str(e)})
                bar.advance()
                continue
            system, user = template.render(code, name)
            cid, line = encoder.encode(system, user)
            chunk.append((name, cid, line, estimate_tokens(system) + estimate_tokens(user)))
            if len(chunk) >= RENDER_CHUNK:
                writer.add_chunk(chunk, file_rows)
                bar.advance(len(chunk))
                chunk = []
                if len(file_rows) >= RENDER_CHUNK:
                    if not dry_run:  # a dry run records nothing
                        store.record_files(file_rows, stamp)
                    file_rows = []
        writer.add_chunk(chunk, file_rows)
        bar.advance(len(chunk))
    writer.finish()
    if not dry_run:
        store.record_files(file_rows, stamp)
        # Every file seen has its row, so more rows than files means some files are gone: only then list the
        # folder again (sorted, streamed) to find them.
        if limit is None and store.file_count(job) > report.files:
            store.forget_files_not_in(job, iter_discover(input_dir, pattern))
    return report


class _Packer:
    """Dedups a chunk of rendered requests against the store and the open shard, then writes new ones."""

    def __init__(
        self,
        store: Store,
        provider: Provider,
        shard_dir: Path,
        job: str,
        model: str,
        params: dict[str, Any],
        max_requests: int,
        dry_run: bool,
        report: PrepareReport,
    ) -> None:
        from hipbatch.pack import ShardWriter

        self.store, self.provider, self.job, self.model = store, provider, job, model
        self.dry_run, self.report = dry_run, report
        self.writer = ShardWriter(
            shard_dir,
            f"{_safe(job)[:40]}-{store.next_shard_number():06d}",
            max_requests,
            provider.max_bytes,
            durable=not dry_run,
        )
        self.params = params

    def add_chunk(self, chunk: list[tuple[str, str, bytes, int]], file_rows: list[dict[str, Any]]) -> None:
        """Chunk items are (file name, custom_id, JSONL line, estimated input tokens)."""
        if not chunk:
            return
        known = self.store.known_ids([cid for _, cid, _, _ in chunk])  # one query per chunk, not per file
        fresh: set[str] = set()
        report, job, writer = self.report, self.job, self.writer
        for name, cid, line, tokens in chunk:
            report.requests += 1
            report.est_input_tokens_all += tokens
            if cid in known or cid in fresh or cid in writer.pending_ids():
                report.known += cid in known
                file_rows.append({"job": job, "file_name": name, "custom_id": cid, "skip_reason": None})
                continue
            if not writer.fits_alone(line):
                reason = f"request too large for one batch ({len(line)} bytes)"
                report.skipped.append((name, reason))
                file_rows.append({"job": job, "file_name": name, "custom_id": None, "skip_reason": reason})
                continue
            fresh.add(cid)
            file_rows.append({"job": job, "file_name": name, "custom_id": cid, "skip_reason": None})
            report.new += 1
            report.est_input_tokens += tokens
            # A compact row (the ledger dict is built when the shard is recorded); none for a preview.
            closed = writer.add(line, None if self.dry_run else (cid, name, tokens), tokens, custom_id=cid)
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
        fixed = {
            "job": self.job,
            "provider": self.provider.name,
            "model": self.model,
            "endpoint": self.provider.endpoint,
            "max_tokens": self.report.max_tokens,
        }
        self.store.add_shard(
            {
                "key": shard.key,
                "job": self.job,
                "provider": self.provider.name,
                "model": self.model,
                "endpoint": self.provider.endpoint,
                "path": str(shard.path),
                "n_requests": shard.n_requests,
                "n_bytes": shard.n_bytes,
                "est_tokens": shard.est_tokens,
            },
            (
                {"custom_id": cid, "file_name": name, "est_input_tokens": tokens, **fixed}
                for cid, name, tokens in shard.requests
            ),
        )
        shard.requests.clear()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "job"


# ---- feeding the queue ----------------------------------------------------------------------------


@dataclass
class Window:
    """How much may be at the provider at once."""

    max_in_flight_batches: int = DEFAULT_MAX_IN_FLIGHT
    max_enqueued_tokens: int | None = None  # per model; None = unlimited
    shrunk: dict[str, int] = field(default_factory=dict)  # model -> tokens allowed after a quota refusal

    def refused(self, model: str, in_flight_tokens: int) -> None:
        """A batch of model was refused for quota: send no more than what the provider holds now."""
        held = max(in_flight_tokens, 1)
        self.shrunk[model] = min(self.shrunk.get(model, held), held)

    def succeeded(self, model: str, tokens: int) -> None:
        """A batch of model went through: a shrunk window grows back by its size, up to the configured one."""
        if model in self.shrunk:
            grown = self.shrunk[model] + max(tokens, 1)
            if self.max_enqueued_tokens is not None and grown >= self.max_enqueued_tokens:
                del self.shrunk[model]
            else:
                self.shrunk[model] = grown

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


def pick_window(window: Window | Mapping[str, Window] | None, provider: str) -> Window:
    """The window for one provider, from a single window or a per-provider mapping (see drain.Windows)."""
    if window is None:
        return Window()
    return window if isinstance(window, Window) else window[provider]


def feed(
    store: Store,
    adapters: Adapters,
    window: Window | Mapping[str, Window] | None = None,
    force: bool = False,
    resume_only: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    progress: Progress | None = None,
) -> FeedReport:
    """Finish interrupted submits, then (unless resume_only) send queued shards while the window allows.

    A shard that cannot be sent (ambiguous, or a provider error after retries) is reported and left as it
    is; the others still go. A provider that keeps failing transiently gets no more calls in this run.
    """
    window = window if window is not None else Window()
    report = FeedReport()
    down: set[str] = set()  # providers that failed transiently after retries: stop calling them now
    resumable = (ShardState.UPLOADING, ShardState.UPLOADED, ShardState.CREATING, ShardState.AMBIGUOUS)
    for shard in store.shards_in_states(resumable):
        _send_reported(store, adapters, shard, report, force, sleep, down)
    queue = [] if resume_only else store.shards_in_states([ShardState.QUEUED])
    with (progress or NullProgress()).task("send shards", len(queue) or None) as bar:
        for queued in queue:
            bar.advance()
            shard = without_answered(store, queued)  # requests answered live since packing are never sent
            if shard is None or shard["provider"] in down:
                continue
            if not pick_window(window, shard["provider"]).allows(store, shard):
                report.queued += 1
                continue
            _send_reported(store, adapters, shard, report, force, sleep, down)
    return report


def without_answered(store: Store, shard: dict[str, Any]) -> dict[str, Any] | None:
    """The queued shard to send instead of this one, once some of its requests were answered live: its
    still-pending lines copied into a new queued shard that the pending requests move to, or None when none is
    left. The old shard becomes `answered` and its file stays whole (retry copies lines from it). The new file
    is written before anything is recorded, so a crash leaves at worst an unused file."""
    if store.shard_ids_with_pending(shard["id"]) == shard["n_requests"]:
        return shard  # the usual case, answered by a count: no ids loaded for every queued shard at every poll
    pending = store.pending_in_shard(shard["id"])
    if len(pending) == shard["n_requests"]:
        return shard
    new_id = None
    if pending:
        from hipbatch.pack import ShardWriter

        path = Path(shard["path"])
        per_line = int(shard["est_tokens"] or 0) // max(int(shard["n_requests"] or 0), 1)
        writer = ShardWriter(
            path.parent,
            f"{_safe(str(shard['job']))[:40]}-{store.next_shard_number():06d}",
            max(len(pending), 1),
            1 << 62,
        )
        with path.open("rb") as src:
            for raw in src:
                custom_id = json.loads(raw).get("custom_id") if raw.strip() else None
                if custom_id in pending:
                    line = raw if raw.endswith(b"\n") else raw + b"\n"
                    writer.add(line, {"custom_id": custom_id}, per_line)
        new = writer.close()
        if new is None:
            return None  # its pending lines are not in the file: never send the answered ones instead
        row = {
            **{k: shard[k] for k in ("job", "provider", "model", "endpoint")},
            "key": new.key,
            "path": str(new.path),
            "n_requests": new.n_requests,
            "n_bytes": new.n_bytes,
            "est_tokens": new.est_tokens,
        }
        with store.atomic():
            new_id = store.move_requests_to_shard(sorted(new.ids), row)
            store.update_shard(shard["id"], state=ShardState.ANSWERED)
    else:
        store.update_shard(shard["id"], state=ShardState.ANSWERED)
    return None if new_id is None else store.shard(new_id)


def _send_reported(
    store: Store,
    adapters: Adapters,
    shard: dict[str, Any],
    report: FeedReport,
    force: bool,
    sleep: Callable[[float], None],
    down: set[str],
) -> None:
    if shard["provider"] in down:
        return
    try:
        _send(store, adapters, shard, report, force, sleep)
    except AmbiguousSubmit as e:
        report.ambiguous.append(str(e))
    except TransientError as e:
        down.add(shard["provider"])
        report.errors.append(f"shard {Path(shard['path']).name}: {e} (left as it was; rerun to continue)")
    except ProviderError as e:
        report.errors.append(f"shard {Path(shard['path']).name}: {e}")


def _send(
    store: Store,
    adapters: Adapters,
    shard: dict[str, Any],
    report: FeedReport,
    force: bool,
    sleep: Callable[[float], None],
) -> None:
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
        # The last run may have been stopped after the provider accepted the create: look before creating.
        found = _look_for_batch(store, provider, shard, tag, sleep, force=force, report=report)
        if found is not None:
            store.attach_batch(shard, found, adopted=True)
            report.adopted.append(found.id)
            return
        if state == ShardState.AMBIGUOUS and not force:
            raise AmbiguousSubmit(_ambiguous_message(shard))
    info = _create(store, provider, shard, tag, force, sleep, report)
    store.attach_batch(shard, info)
    report.created.append(info.id)


def _create(
    store: Store,
    provider: Provider,
    shard: dict[str, Any],
    tag: dict[str, str],
    force: bool,
    sleep: Callable[[float], None],
    report: FeedReport | None = None,
    attempts: int = 6,
) -> BatchInfo:
    """Create a batch with no blind retries: after an ambiguous failure, look before trying again."""
    path = Path(shard["path"])
    # One intent time for every attempt of this call: a batch made by an early attempt whose answer was
    # lost must still fall inside the window the later looks search.
    store.update_shard(shard["id"], state=ShardState.CREATING, intent_at=time.time())
    shard = store.shard(shard["id"])
    for attempt in range(attempts):
        try:
            return provider.create(path, shard["file_id"], tag)
        except TransientError as e:
            sleep(min(getattr(e, "retry_after", None) or 0.5 * 2**attempt, 30.0))
            found = _look_for_batch(store, provider, shard, tag, sleep, force=force, report=report)
            if found is not None:
                return found
            if attempt == attempts - 1:
                raise
        except ProviderError as e:
            if "cannot find file" in str(e).lower():
                if attempt < attempts - 1:
                    sleep(min(1.0 * 2**attempt, 30.0))  # the upload is not visible yet (a known race)
                    continue
                # The input file is gone (expired or deleted): upload it again next time.
                store.update_shard(shard["id"], state=ShardState.QUEUED, file_id=None)
                raise
            back = ShardState.UPLOADED if shard["file_id"] else ShardState.QUEUED
            store.update_shard(shard["id"], state=back)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


#: Anthropic batches are matched on creation time: allow this much difference between our clock and theirs.
CLOCK_SKEW = 60.0


def _look_for_batch(
    store: Store,
    provider: Provider,
    shard: dict[str, Any],
    tag: dict[str, str],
    sleep: Callable[[float], None],
    force: bool = False,
    report: FeedReport | None = None,
) -> BatchInfo | None:
    """The provider batch an interrupted create made for this shard, if any.

    With metadata (OpenAI) the tag names the shard exactly; should a create have happened twice, the
    earliest batch is adopted and the others are cancelled before they are billed. Without (Anthropic),
    a single unknown batch of the same size created after the intent is adopted; several are ambiguous:
    the shard is marked so and refused until --force (which submits it again).
    """
    since = float(shard["intent_at"] or shard["created_at"])
    if not provider.has_metadata:
        since -= CLOCK_SKEW
    known = store.known_batch_ids()
    candidates = [
        b for b in retrying(provider.find, tag, since, int(shard["n_requests"]), sleep=sleep) if b.id not in known
    ]
    if not candidates:
        return None
    if provider.has_metadata or len(candidates) == 1:
        candidates.sort(key=lambda b: (b.created_at or 0, b.id))
        for extra in candidates[1:]:
            try:
                retrying(provider.cancel, extra.id, sleep=sleep)
                if report is not None:
                    report.duplicates_cancelled.append(extra.id)
            except ProviderError as e:
                if report is not None:
                    report.errors.append(f"duplicate batch {extra.id} of shard {shard['key']}: cancel it by hand ({e})")
        return candidates[0]
    if force:
        return None
    store.update_shard(shard["id"], state=ShardState.AMBIGUOUS)
    raise AmbiguousSubmit(_ambiguous_message(shard, [b.id for b in candidates]))


def _ambiguous_message(shard: dict[str, Any], ids: list[str] | None = None) -> str:
    which = f" (candidates: {', '.join(ids)})" if ids else ""
    return (
        f"shard {Path(shard['path']).name} of job {shard['job']}: a batch may already exist at "
        f"{shard['provider']}{which} and cannot be told apart, so it is not resubmitted; check the "
        "provider's console, cancel any duplicate, then rerun with --force to submit it again"
    )


def provider_for_job(
    config: Config,
    template: Template,
    provider_name: str,
    model: str | None,
    factory: Callable[[ProviderSettings], Provider] = get_provider,
) -> tuple[Provider, str, dict[str, Any]]:
    """The adapter, model and request params for a submit, after the precedence rules."""
    settings, chosen, params = resolve(config, provider_name, template.defaults_for(provider_name), model)
    return factory(settings), chosen, params
