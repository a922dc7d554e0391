"""The dataset file: written atomically (temp file, fsync, rename), streamed from the ledger sorted by file
name, so an existing file is only ever replaced by a complete one, and never by an empty one.

Formats: json (one array), jsonl, parquet (with the optional `pyarrow`: `pip install 'hipbatch[parquet]'`).
`fields` picks the record's keys (the seed's format is `file_name,english_prompt`).
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from hipbatch.errors import UsageError
from hipbatch.store import Store

FORMATS = ("json", "jsonl", "parquet")
#: Every field a record can have: the default record, then how the prompt was extracted and why it may be suspect.
FIELDS = ("file_name", "english_prompt", "custom_id", "provider", "model", "job", "via", "method", "suspect")
PARQUET_ROWS = 10_000  # rows per parquet row group: memory stays flat


@dataclass(frozen=True)
class Written:
    """What writing the dataset did: the records in the new file, or why the old file was left as it was."""

    records: int
    replaced: bool = True
    kept_because: str | None = None  # set when an existing file was left untouched


def parse_fields(text: str | None) -> tuple[str, ...] | None:
    """`--fields file_name,english_prompt` -> the field names (None: the default record)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FIELDS]
    if unknown or not names:
        raise UsageError(f"--fields {text}: unknown field {unknown[0] if unknown else '(none)'}; use any of "
                         f"{', '.join(FIELDS)}")  # fmt: skip
    if len(set(names)) != len(names):
        raise UsageError(f"--fields {text}: a field is named twice")
    return names


def write_dataset(
    store: Store,
    output: Path,
    fmt: str = "json",
    job: str | None = None,
    fields: Sequence[str] | None = None,
    kept: KeptPrompts | None = None,
) -> Written:
    """Write the dataset atomically, streamed from the store (`kept` sees every record on the way). An existing
    file that holds records is never replaced by one with none (the store holds nothing for it: a wrong
    --state-dir or --job, a fresh store)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*.part"):
        stale.unlink(missing_ok=True)  # left by a killed run; callers hold the state-dir lock
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        if fields is None and fmt != "parquet" and store.sql_json_like_python():
            # The default record made by SQLite itself (json_quote escapes as json.dumps does): no Python per field
            made = store.dataset_lines(job)
            n = _write_text((r[0] for r in made) if kept is None else kept.watch_lines(made), part, fmt)
        else:
            rows = store.dataset_tuples(job) if kept is None else kept.watch(store.dataset_tuples(job))
            n = _write_parquet(rows, part, fields) if fmt == "parquet" else _write_text(_lines(rows, fields), part, fmt)
        if n == 0 and _has_records(output, fmt):
            return Written(0, replaced=False, kept_because=f"{store.state_dir} holds no records for it")
        os.replace(part, output)
    finally:
        part.unlink(missing_ok=True)
    return Written(n)


def _lines(rows: Iterable[tuple[Any, ...]], fields: Sequence[str] | None) -> Iterator[str]:
    return _record_lines(rows) if fields is None else (record_json(r) for r in _records(rows, fields))


def _write_text(lines: Iterable[str], part: Path, fmt: str) -> int:
    n = 0
    with part.open("w", encoding="utf-8") as fh:
        if fmt == "json":
            fh.write("[")
        for text in lines:
            if fmt == "json":
                fh.write(("\n  " if n == 0 else ",\n  ") + text)
            else:
                fh.write(text + "\n")
            n += 1
        if fmt == "json":
            fh.write("\n]\n" if n else "]\n")
        fh.flush()
        os.fsync(fh.fileno())
    return n


def _write_parquet(rows: Iterable[tuple[Any, ...]], part: Path, fields: Sequence[str] | None) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("--format parquet needs pyarrow: pip install 'hipbatch[parquet]'") from None
    names = list(fields or FIELDS[:7])
    schema = pa.schema([(name, pa.string()) for name in names])
    n = 0
    with pq.ParquetWriter(str(part), schema) as writer:
        batch: list[dict[str, Any]] = []
        for record in _records(rows, names):
            batch.append(record)
            if len(batch) >= PARQUET_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n, batch = n + len(batch), []
        if batch or n == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n += len(batch)
    with part.open("rb") as fh:
        os.fsync(fh.fileno())
    return n


def _has_records(path: Path, fmt: str) -> bool:
    """Whether an existing dataset file holds at least one record (reading only its first bytes)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if fmt == "parquet" or head.startswith(b"PAR1"):
        try:
            import pyarrow.parquet as pq

            return bool(pq.ParquetFile(str(path)).metadata.num_rows)
        except Exception:  # not readable as parquet: keep it, it may hold records
            return bool(head)
    text = head.lstrip()
    if text.startswith(b"["):
        return bool(text[1:].lstrip()) and not text[1:].lstrip().startswith(b"]")
    return bool(text)


def record_json(record: dict[str, Any]) -> str:
    """json.dumps(record, ensure_ascii=False), with strings escaped directly (the dataset's hot loop)."""
    parts = []
    for key, value in record.items():
        text = encode_basestring(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(f"{encode_basestring(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _records(rows: Iterable[tuple[Any, ...]], fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Records holding just `fields`, in file-name order."""
    order = Store.DATASET_COLUMNS
    at = [order.index(f) for f in fields]
    for row in rows:
        record = {f: row[i] for f, i in zip(fields, at, strict=True)}
        if "via" in record:
            record["via"] = record["via"] or "batch"
        yield record


def _record_lines(rows: Iterable[tuple[Any, ...]]) -> Iterator[str]:
    """record_json of each default record, without a dict per record: the columns that repeat (provider, model,
    job, via) are encoded once per combination."""
    tails: dict[tuple[Any, ...], str] = {}
    for job_name, file_name, prompt, custom_id, provider, model, via, *_ in rows:
        key = (provider, model, job_name, via)
        tail = tails.get(key)
        if tail is None:
            tail = tails[key] = record_json(
                {"provider": provider, "model": model, "job": job_name, "via": via or "batch"}
            )[1:]
        yield (
            f'{{"file_name": {_value(file_name)}, "english_prompt": {_value(prompt)}, '
            f'"custom_id": {_value(custom_id)}, {tail}'
        )


def _value(value: Any) -> str:
    return encode_basestring(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass
class _JobPrompts:
    lengths: array[int] = field(default_factory=lambda: array("q"))  # of the prompts the extractor did not suspect
    suspects: list[tuple[str, str, int]] = field(default_factory=list)  # (file name, why, length), in file order


class KeptPrompts:
    """What the dataset pass sees of the kept prompts, per job: their lengths (for the job's median) and the ones
    the extractor named suspects; the overlong ones (over `factor` x the median) follow from the lengths once the
    pass is over. So the summary costs no query of its own (only when overlong prompts must be named)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.jobs: dict[str, _JobPrompts] = {}

    def watch(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        """The rows (Store.DATASET_COLUMNS), each seen on its way."""
        jobs = self.jobs
        for row in rows:
            seen = jobs.get(row[0])
            if seen is None:
                seen = jobs[row[0]] = _JobPrompts()
            if row[8]:
                seen.suspects.append((row[1], row[8], len(row[2])))
            else:
                seen.lengths.append(len(row[2]))
            yield row

    def watch_lines(self, rows: Iterable[tuple[str, str, str, int, str | None]]) -> Iterator[str]:
        """The record lines of Store.dataset_lines rows (line, job, file name, prompt length, suspect), each seen."""
        jobs = self.jobs
        for line, job, name, length, suspect in rows:
            seen = jobs.get(job)
            if seen is None:
                seen = jobs[job] = _JobPrompts()
            if suspect:
                seen.suspects.append((name, suspect, length))
            else:
                seen.lengths.append(length)
            yield line

    def overlong(self, job: str) -> float:
        """Length over which a kept prompt of the job is suspect (inf when it has none)."""
        seen = self.jobs.get(job)
        if seen is None:
            return float("inf")
        lengths = sorted([*seen.lengths, *(n for _, _, n in seen.suspects)])
        mid = len(lengths) // 2
        median = lengths[mid] if len(lengths) % 2 else (lengths[mid - 1] + lengths[mid]) / 2
        return self.factor * median or float("inf")

    def suspects(self, job: str, limit: int) -> tuple[int, list[tuple[str, str]] | None]:
        """(how many of the job's kept prompts are suspect, the first `limit` (file name, why)); the list is None
        when overlong prompts are among them (Store.suspect_files names those)."""
        seen = self.jobs.get(job)
        if seen is None:
            return 0, []
        over = self.overlong(job)
        plain = sum(1 for n in seen.lengths if n > over)
        named = [(name, why + (",overlong" if n > over else "")) for name, why, n in seen.suspects[:limit]]
        return len(seen.suspects) + plain, None if plain else named
