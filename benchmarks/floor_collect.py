"""Floor for `collect`: the least any tool must do with downloaded batch results.

Parses every line of the OpenAI output files given, takes the text between <prompt> tags from the reply,
and writes a JSON array of {custom_id, english_prompt}, streamed. No ledger, no other reply forms.

Usage: python floor_collect.py OUT.json RESULTS.jsonl [RESULTS.jsonl ...]
"""

from __future__ import annotations

import json
import re
import sys

TAG = re.compile(r"<prompt>(.*?)</prompt>", re.S)


def main(out_path: str, *inputs: str) -> None:
    first = True
    with open(out_path, "w", encoding="utf-8") as out:
        out.write("[")
        for path in inputs:
            with open(path, "rb") as fh:
                for raw in fh:
                    line = json.loads(raw)
                    text = line["response"]["body"]["choices"][0]["message"]["content"] or ""
                    match = TAG.search(text)
                    if match is None:
                        continue
                    record = {"custom_id": line["custom_id"], "english_prompt": match.group(1).strip()}
                    out.write(("\n  " if first else ",\n  ") + json.dumps(record, ensure_ascii=False))
                    first = False
        out.write("\n]\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
