"""The dataset file: written atomically (temp file, fsync, rename), streamed from the ledger sorted by file
name, so an existing file is only ever replaced by a complete one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from hipbatch.store import Store


def write_dataset(store: Store, output: Path, fmt: str = "json", job: str | None = None) -> int:
    """Write the dataset atomically (temp file + rename), streamed from the store; returns records."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.*.part"):
        stale.unlink(missing_ok=True)  # left by a killed run; callers hold the state-dir lock
    part = output.with_name(f".{output.name}.{os.getpid()}.part")
    n = 0
    try:
        with part.open("w", encoding="utf-8") as fh:
            if fmt == "json":
                fh.write("[")
            for text in _record_lines(store, job):
                if fmt == "json":
                    fh.write(("\n  " if n == 0 else ",\n  ") + text)
                else:
                    fh.write(text + "\n")
                n += 1
            if fmt == "json":
                fh.write("\n]\n" if n else "]\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, output)
    finally:
        part.unlink(missing_ok=True)
    return n


def record_json(record: dict[str, Any]) -> str:
    """json.dumps(record, ensure_ascii=False), with strings escaped directly (the dataset's hot loop)."""
    parts = []
    for key, value in record.items():
        text = encode_basestring(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(f"{encode_basestring(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _record_lines(store: Store, job: str | None) -> Iterator[str]:
    """record_json of each record, without a dict per record: the columns that repeat (provider, model,
    job, via) are encoded once per combination."""
    tails: dict[tuple[Any, ...], str] = {}
    for job_name, file_name, prompt, custom_id, provider, model, via in store.dataset_tuples(job):
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
