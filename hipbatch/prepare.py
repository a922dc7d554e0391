"""Prepare: render every file of a folder into requests, and pack the ones the store does not know into shards
recorded in the ledger (or, for a dry run, into preview shards recorded nowhere). Nothing is sent here.

Streams end to end: one folder listing, one file and one chunk of requests are in memory at a time.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hipbatch.errors import UsageError
from hipbatch.pack import LineEncoder, Shard, ShardWriter, safe_name, shard_prefix
from hipbatch.progress import NullProgress, Progress, Task
from hipbatch.providers import Provider
from hipbatch.store import Store

if TYPE_CHECKING:  # jinja2 loads only for commands that render (status and collect do not)
    from hipbatch.render import Template

RENDER_CHUNK = 500  # files rendered between two store look-ups (their lines are held meanwhile)
FILE_ROWS_CHUNK = 5000  # file rows recorded per transaction: a commit per 500 cost 3x as much (1.7 s per 100,000)
#: The first shard of a run holds at most this many bytes, each next one twice the last up to the provider's
#: limit (16, 32, 64, 128 MB, then 200 or 256): submit sends a shard while it renders the next, so a job that
#: would fit one batch starts sending after 16 MB instead of after all of it. A 10,000-file job of 114 MB goes
#: in 4 batches instead of 1 (about 0.5 s sooner); a 100,000-file one in 11 instead of 8.
RAMP_FROM = 16 * 1024 * 1024

#: One rendered file: (file name, custom_id, JSONL line, estimated input tokens).
Rendered = tuple[str, str, bytes, int]


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


@dataclass(frozen=True)
class Source:
    """Which files of which folder a run takes, and how they are read."""

    input_dir: Path
    job: str
    pattern: str = "**/*.hip"
    limit: int | None = None
    follow_symlinks: bool = False
    max_file_bytes: int | None = None  # None: the reader's default cap

    def names(self) -> Iterator[str]:
        """The matching file names, sorted, at most `limit`; a bad INPUT_DIR or no match is a UsageError."""
        from hipbatch.render import iter_discover

        found = iter_discover(self.input_dir, self.pattern, follow_symlinks=self.follow_symlinks)
        first = next(found, None)
        if first is None:
            raise UsageError(f"INPUT_DIR {self.input_dir}: no files match --glob {self.pattern!r}")
        return itertools.islice(itertools.chain([first], found), self.limit)

    def count(self) -> int:
        """How many files names() gives (a second listing: cheap next to reading the files)."""
        from hipbatch.render import iter_discover

        found = iter_discover(self.input_dir, self.pattern, follow_symlinks=self.follow_symlinks)
        return sum(1 for _ in itertools.islice(found, self.limit))

    def read(self, name: str) -> str:
        """One file's text, or SkipFile with the reason (only regular files inside INPUT_DIR, up to the cap)."""
        from hipbatch.files import DEFAULT_MAX_FILE_BYTES
        from hipbatch.render import read_source

        return read_source(
            os.path.join(self.input_dir, name),
            root=self.input_dir,
            follow_symlinks=self.follow_symlinks,
            max_bytes=self.max_file_bytes or DEFAULT_MAX_FILE_BYTES,
        )


def prepare(
    store: Store,
    template: Template,
    provider: Provider,
    model: str,
    params: dict[str, Any],
    source: Source,
    max_requests_per_batch: int | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_shard: Callable[[int], object] | None = None,
    est_cost: Callable[[int, int], float] | None = None,
) -> PrepareReport:
    """Render every file, record it, and write the requests the store does not know into shards; each shard
    id goes to `on_shard` as soon as the shard is recorded (submit sends it while the next one is packed).
    `est_cost(input tokens, max_tokens)` gives each request's worst-case cost, recorded with it."""
    progress = progress or NullProgress()
    names = source.names()
    total = source.count() if getattr(progress, "active", False) else None
    report = PrepareReport(
        job=source.job,
        provider=provider.name,
        model=model,
        dry_run=dry_run,
        max_tokens=int(params.get("max_tokens") or 0),
    )
    if not dry_run:
        store.upsert_job(
            source.job,
            provider=provider.name,
            model=model,
            input_dir=str(source.input_dir.resolve()),
            template_dir=str(template.path.resolve()),
        )
    packer = _Packer(store, provider, model, source.job, params, max_requests_per_batch, report, on_shard, est_cost)
    with progress.task(f"render {source.job}", total) as bar:
        file_rows = _render_all(template, LineEncoder(provider, model, params), source, names, packer, bar)
    packer.writer.close()
    packer.record_files(file_rows)
    if not dry_run and source.limit is None:
        # Every file seen has its row, so more rows than files means some files are gone: only then list the
        # folder again (sorted, streamed) to find them.
        from hipbatch.render import iter_discover

        if store.file_count(source.job) > report.files:
            found = iter_discover(source.input_dir, source.pattern, follow_symlinks=source.follow_symlinks)
            store.forget_files_not_in(source.job, found)
    return report


def _render_all(
    template: Template,
    encoder: LineEncoder,
    source: Source,
    names: Iterator[str],
    packer: _Packer,
    bar: Task,
) -> list[dict[str, Any]]:
    """Read and render each file, handing chunks of RENDER_CHUNK requests to the packer; returns the file rows
    not recorded yet (recorded after the last shard)."""
    from hipbatch.render import SkipFile, estimate_tokens

    report, job = packer.report, source.job
    file_rows: list[dict[str, Any]] = []
    chunk: list[Rendered] = []
    system_tokens: tuple[str, int] = ("", estimate_tokens(""))  # the shared system prompt's, counted once
    for name in names:
        report.files += 1
        try:
            code = source.read(name)
        except SkipFile as e:
            report.skipped.append((name, str(e)))
            file_rows.append({"job": job, "file_name": name, "custom_id": None, "skip_reason": str(e)})
            bar.advance()
            continue
        system, user = template.render(code, name)
        cid, line = encoder.encode(system, user)
        if system is not system_tokens[0]:
            system_tokens = (system, estimate_tokens(system))
        chunk.append((name, cid, line, system_tokens[1] + estimate_tokens(user)))
        if len(chunk) >= RENDER_CHUNK:
            packer.add_chunk(chunk, file_rows)
            bar.advance(len(chunk))
            chunk = []
            if len(file_rows) >= FILE_ROWS_CHUNK:
                packer.record_files(file_rows)
                file_rows = []
    packer.add_chunk(chunk, file_rows)
    bar.advance(len(chunk))
    return file_rows


class _Packer:
    """Dedups chunks of rendered requests against the store and the open shard, and writes the new ones; each
    shard is recorded with its requests as soon as it is closed (nothing is recorded for a dry run)."""

    def __init__(
        self,
        store: Store,
        provider: Provider,
        model: str,
        job: str,
        params: dict[str, Any],
        max_requests_per_batch: int | None,
        report: PrepareReport,
        on_shard: Callable[[int], object] | None = None,
        est_cost: Callable[[int, int], float] | None = None,
    ) -> None:
        self.store, self.provider, self.model, self.job, self.report = store, provider, model, job, report
        self.on_shard, self.est_cost = on_shard, est_cost
        self.stamp = time.time()
        dry = report.dry_run
        shard_dir = store.state_dir / ("dry-run" if dry else "shards") / safe_name(job)
        if dry:  # a preview replaces the previous one instead of piling up next to it
            for old in [*shard_dir.glob("*.jsonl"), *shard_dir.glob("*.jsonl.part")]:
                old.unlink(missing_ok=True)
        max_requests = min(provider.max_requests, max_requests_per_batch or provider.max_requests)
        self.writer = ShardWriter(
            shard_dir,
            shard_prefix(job, store.next_shard_number()),
            max_requests,
            provider.max_bytes,
            durable=not dry,
            on_close=self._record,
            ramp_from=RAMP_FROM,
        )

    def record_files(self, rows: list[dict[str, Any]]) -> None:
        if not self.report.dry_run:  # a dry run records nothing
            self.store.record_files(rows, self.stamp)

    def add_chunk(self, chunk: list[Rendered], file_rows: list[dict[str, Any]]) -> None:
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
            writer.add(line, cid, tokens, None if report.dry_run else (cid, name, tokens))

    def _record(self, shard: Shard) -> None:
        self.report.shards.append(str(shard.path))
        if self.report.dry_run:
            return
        p = self.provider
        fixed = {"job": self.job, "provider": p.name, "model": self.model, "endpoint": p.endpoint}
        shard_id = self.store.add_shard(
            {
                **fixed,
                "key": shard.key,
                "path": str(shard.path),
                "n_requests": shard.n_requests,
                "n_bytes": shard.n_bytes,
                "est_tokens": shard.est_tokens,
            },
            self._request_rows(shard, fixed),
        )
        shard.requests.clear()
        if self.on_shard is not None:
            self.on_shard(shard_id)

    def _request_rows(self, shard: Shard, fixed: dict[str, str]) -> Iterator[dict[str, Any]]:
        max_tokens, est_cost = self.report.max_tokens, self.est_cost
        for cid, name, tokens in shard.requests:
            row = {"custom_id": cid, "file_name": name, "est_input_tokens": tokens, "max_tokens": max_tokens} | fixed
            if est_cost is not None:
                row["est_cost_usd"] = est_cost(tokens, max_tokens)
            yield row
