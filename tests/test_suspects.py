"""How each prompt was kept, the ones that still look suspicious, --strict, and re-extraction over stored replies
after an extractor change (no request sent again)."""

from __future__ import annotations

import json
from pathlib import Path

from hipbatch.emulator import LocalBatchServer
from tests.conftest import cli, ledger_db, make_hip_dir, read_dataset

DATASET = Path("data/generated_prompts.json")
SUSPICIOUS = {
    "k0001.hip": "Write a kernel.\n\n```cpp\n__global__ void k(){}\n```\n\nThen test it well on the host side.",
    "k0002.hip": '"Write a HIP kernel that sums" an array and checks the "result"',
}


def stored_replies_become(replies: dict[str, str]) -> None:
    """Rewrite stored replies (as another model release might have answered), then re-extract offline."""
    db = ledger_db(Path("state"))
    for name, text in replies.items():
        db.execute("UPDATE requests SET reply_text = ? WHERE file_name = ?", [text, name])


def test_methods_and_suspects_are_counted_and_strict_fails_them(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 12)
    cli("submit", root)
    first = json.loads(cli("collect", "--wait", "--poll-interval", "0.02", "--json").stdout)
    assert first["methods"] == {"tag": 12} and first["suspects"] == 0
    sent = dict(openai_env.stats.sent)
    stored_replies_become(SUSPICIOUS)
    cli("collect", "--reextract")
    summary = cli("collect")
    assert "2 prompt(s) kept, but look suspicious: k0001.hip (fence_line), k0002.hip (wrapping_quote)" in summary.stderr
    assert "extracted by: tag 10, whole 2" in summary.stderr
    records = read_dataset(DATASET)
    assert len(records) == 12
    page = cli("report", "--output", "r.html")
    assert (
        page.exit_code == 0
        and "k0001.hip" in Path("r.html").read_text()
        and "id='suspects'" in Path("r.html").read_text()
    )
    strict = json.loads(cli("collect", "--strict", "--json").stdout)
    assert strict["failed_as_suspect"] == 2 and strict["records"] == 10
    assert strict["failed_by_reason"] == {"extraction_failed:suspect": 2}
    assert {r["file_name"] for r in read_dataset(DATASET)} == {r["file_name"] for r in records} - set(SUSPICIOUS)
    assert dict(openai_env.stats.sent) == sent  # all of it offline: nothing sent again


def test_reextract_fixes_a_dataset_written_by_an_older_extractor(openai_env: LocalBatchServer, tmp_path: Path) -> None:
    root = make_hip_dir(tmp_path / "kernels", 6)
    cli("submit", root)
    cli("collect", "--wait", "--poll-interval", "0.02")
    good = {r["file_name"]: r["english_prompt"] for r in read_dataset(DATASET)}
    sent = dict(openai_env.stats.sent)
    # As the old extractor left it: chatter and fence markers kept around the prompt.
    db = ledger_db(Path("state"))
    for name, prompt in good.items():
        reply = f"Sure! Here's the prompt:\n\n```\n{prompt}\n```\n\nLet me know if you'd like any changes."
        db.execute("UPDATE requests SET reply_text = ?, prompt = ?, method = NULL WHERE file_name = ?",
                   [reply, reply, name])  # fmt: skip
    cli("collect")
    assert all(r["english_prompt"].startswith("Sure!") for r in read_dataset(DATASET))
    counts = json.loads(cli("collect", "--reextract", "--json").stdout)["reextracted"]
    assert counts == {"succeeded": 6}
    assert {r["file_name"]: r["english_prompt"] for r in read_dataset(DATASET)} == good
    fields = "file_name,method,suspect"
    cli("collect", "--fields", fields, "--output-file", "m.json")
    assert {(r["method"], r["suspect"]) for r in read_dataset(Path("m.json"))} == {("fenced", None)}
    assert dict(openai_env.stats.sent) == sent
