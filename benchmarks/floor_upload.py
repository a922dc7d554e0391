"""Floor for `submit` to a server: the least any tool must do to send a folder as batches through the SDK.

Writes the same request lines as floor_submit.py (read, format, write; no template engine, no store, no
dedup), cut into files at the provider's limits, then for each file makes the same SDK calls hipbatch makes:
OpenAI `files.create` (the open file, streamed) then `batches.create`; Anthropic one `POST /v1/messages/batches`
whose body is streamed from the file through the SDK's own client. One after the other, nothing overlapped.
Keys and base URLs come from the environment, as for hipbatch.

Usage: python floor_upload.py INPUT_DIR OUT_DIR [openai|anthropic]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from floor_submit import TEMPLATE, USER

LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024 - 64 * 1024)}


def lines(root: str, provider: str, model: str) -> Iterator[bytes]:
    """The request line of every .hip file under root, sorted by name (the default template's text)."""
    system = (TEMPLATE / "system.j2").read_text(encoding="utf-8").replace("{{ language }}", "HIP")
    dumps = json.encoder.encode_basestring  # type: ignore[attr-defined]
    esys = dumps(system.removesuffix("\n")).encode()
    if provider == "openai":
        head = b'"method":"POST","url":"/v1/chat/completions","body":{"model":' + dumps(model).encode()
        head += b',"messages":[{"role":"system","content":' + esys + b'},{"role":"user","content":'
        tail = b'}],"max_completion_tokens":1024,"temperature":0.2}}\n'
    else:
        head = b'"params":{"model":' + dumps(model).encode() + b',"max_tokens":1024,"temperature":0.2,'
        head += b'"system":[{"type":"text","text":' + esys + b',"cache_control":{"type":"ephemeral","ttl":"1h"}}],'
        head += b'"messages":[{"role":"user","content":'
        tail = b"}]}}\n"
    names = []
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        names.extend(f if rel == "." else f"{rel}/{f}" for f in files if f.endswith(".hip"))
    names.sort()
    for name in names:
        with open(os.path.join(root, name), "rb") as fh:
            code = fh.read().decode("utf-8")
        user = dumps(USER.format(name=name, code=code.rstrip())).encode()
        cid = hashlib.sha256(user).hexdigest()[:48]
        yield b'{"custom_id":"hb-' + cid.encode() + b'",' + head + user + tail


def write_shards(root: str, out_dir: Path, provider: str, model: str) -> list[Path]:
    """The lines cut into files within the provider's request-count and byte limits."""
    max_lines, max_bytes = LIMITS[provider]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    out, count, size = None, 0, 0
    for line in lines(root, provider, model):
        if out is None or count >= max_lines or size + len(line) > max_bytes:
            if out is not None:
                out.close()
            paths.append(out_dir / f"floor-{len(paths):04d}.jsonl")
            out, count, size = paths[-1].open("wb"), 0, 0
        out.write(line)
        count += 1
        size += len(line)
    if out is not None:
        out.close()
    return paths


def send_openai(paths: list[Path]) -> list[str]:
    import openai

    client = openai.OpenAI(max_retries=0)
    ids = []
    for path in paths:
        with path.open("rb") as fh:
            file_id = client.files.create(file=(path.name, fh), purpose="batch").id
        batch = client.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"floor": path.name},
        )
        ids.append(batch.id)
    return ids


def send_anthropic(paths: list[Path]) -> list[str]:
    import anthropic
    from anthropic.types.messages import MessageBatch

    client = anthropic.Anthropic(max_retries=0)
    ids = []
    for path in paths:
        size = path.stat().st_size
        n = sum(1 for _ in path.open("rb"))

        def body(path: Path = path) -> Iterator[bytes]:
            yield b'{"requests":['
            with path.open("rb") as fh:
                for k, line in enumerate(fh):
                    yield (b"," if k else b"") + line
            yield b"]}"

        length = len(b'{"requests":[') + size + (n - 1) + len(b"]}")
        batch = client.post(
            "/v1/messages/batches",
            cast_to=MessageBatch,
            content=body(),
            options={"headers": {"Content-Type": "application/json", "Content-Length": str(length)}},
        )
        ids.append(batch.id)
    return ids


def main(root: str, out_dir: str, provider: str = "openai") -> None:
    model = "gpt-4o-mini" if provider == "openai" else "claude-haiku-4-5"
    paths = write_shards(root, Path(out_dir), provider, model)
    ids = send_openai(paths) if provider == "openai" else send_anthropic(paths)
    print(json.dumps({"batches": ids, "files": [str(p) for p in paths]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
