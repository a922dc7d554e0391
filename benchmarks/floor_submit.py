"""Floor for `submit --dry-run`: the least any tool must do to turn a folder into a batch input file.

Reads every .hip file (sorted), formats the same OpenAI request line hipbatch writes for the default
template, gives it a content-hash custom_id, and writes one JSONL file. No template engine, no store,
no dedup, no limits: the constant system prompt is escaped once, each file's text once.

Usage: python floor_submit.py INPUT_DIR OUT.jsonl [MODEL]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "default"
USER = (
    "Write the English task prompt for this HIP file.\n\nFile: {name}\n\n````hip\n{code}\n````\n\n"
    "Answer only with the prompt inside <prompt>...</prompt>."
)


def main(root: str, out_path: str, model: str = "gpt-4o-mini") -> None:
    system = (TEMPLATE / "system.j2").read_text(encoding="utf-8").replace("{{ language }}", "HIP")
    system = system.removesuffix("\n")
    dumps = json.encoder.encode_basestring  # type: ignore[attr-defined]
    head = (
        '{"model":'
        + dumps(model)
        + ',"messages":[{"role":"system","content":'
        + dumps(system)
        + '},{"role":"user","content":'
    ).encode()
    tail = b'}],"max_completion_tokens":1024,"temperature":0.2}}\n'
    names = []
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        names.extend(f if rel == "." else f"{rel}/{f}" for f in files if f.endswith(".hip"))
    names.sort()
    with open(out_path, "wb") as out:
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                code = fh.read().decode("utf-8")
            user = dumps(USER.format(name=name, code=code.rstrip())).encode()
            cid = hashlib.sha256(user).hexdigest()[:48]
            out.write(
                b'{"custom_id":"hb-' + cid.encode() + b'","method":"POST","url":"/v1/chat/completions",'
                b'"body":' + head + user + tail
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
