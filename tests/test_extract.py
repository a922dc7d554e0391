"""Unit tests for hipbatch.extract: every reply form, failure reason and setting."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hipbatch.extract import (
    DEFAULT_SETTINGS,
    EXTRACTION_FAILED,
    METHODS,
    SUSPECT_FENCE_LINE,
    SUSPECT_LABEL,
    SUSPECT_PREAMBLE,
    SUSPECT_WRAPPING_QUOTE,
    TRUNCATED,
    Extraction,
    ExtractSettings,
    extract,
    is_overlong,
)
from hipbatch.records import RequestState

PROMPT = "Write a HIP kernel `vector_add` that adds two float arrays of length n."
CASES_FILE = Path(__file__).parent / "data" / "extract_cases.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CASES_FILE.read_text(encoding="utf-8"))["case"]
CASE_KEYS = {
    "id",
    "reply",
    "finish",
    "settings",
    "expect_prompt",
    "expect_reason",
    "expect_detail",
    "expect_method",
    "expect_suspects",
}


def assert_ok(result: Extraction, expected: str) -> None:
    assert result.ok, result
    assert result.reason is None
    assert result.prompt == expected


def assert_failed(result: Extraction, reason: str, detail_part: str) -> None:
    assert not result.ok
    assert result.prompt is None
    assert result.reason == reason
    assert detail_part in result.detail


# --- tags -------------------------------------------------------------------------------------------


def test_tag_only() -> None:
    assert_ok(extract(f"<prompt>{PROMPT}</prompt>"), PROMPT)


def test_tag_with_chatter_and_whitespace() -> None:
    text = f"Sure! Here is the prompt you asked for:\n\n<prompt>\n  {PROMPT}\n</prompt>\n\nLet me know if..."
    assert_ok(extract(text), PROMPT)


def test_two_tags_take_first() -> None:
    text = f"<prompt>{PROMPT}</prompt>\n<prompt>Another prompt entirely.</prompt>"
    assert_ok(extract(text), PROMPT)


def test_uppercase_and_mixed_case_tag() -> None:
    assert_ok(extract(f"<PROMPT>{PROMPT}</PROMPT>"), PROMPT)
    assert_ok(extract(f"<Prompt>{PROMPT}</prompt >"), PROMPT)


def test_tag_with_attribute() -> None:
    assert_ok(extract(f'<prompt lang="en">{PROMPT}</prompt>'), PROMPT)


def test_tag_mentioned_in_chatter_before_real_one() -> None:
    text = f"I will wrap it in <prompt> tags as requested:\n<prompt>{PROMPT}</prompt>"
    assert_ok(extract(text), PROMPT)


def test_similar_tag_name_is_not_the_tag() -> None:
    result = extract(f"<prompts>{PROMPT}</prompts>")
    # Not our tag: the reply falls through to "whole reply".
    assert_ok(result, f"<prompts>{PROMPT}</prompts>")


def test_tag_multiline_content_keeps_inner_formatting() -> None:
    body = "Write a HIP program.\n\n- kernel `k(float* x, int n)`\n- launch 256 threads per block"
    assert_ok(extract(f"<prompt>\n{body}\n</prompt>"), body)


def test_tag_wins_over_length_finish_when_closed() -> None:
    assert_ok(extract(f"<prompt>{PROMPT}</prompt> and then more text that got cu", "length"), PROMPT)


def test_unclosed_tag_without_length_finish_fails() -> None:
    result = extract(f"<prompt>{PROMPT}", "stop")
    assert_failed(result, EXTRACTION_FAILED, "no closing </prompt> tag")


def test_unclosed_tag_with_length_finish_is_truncated() -> None:
    assert_failed(extract(f"<prompt>{PROMPT}", "length"), TRUNCATED, "max_tokens")
    assert_failed(extract(f"<prompt>{PROMPT}", "max_tokens"), TRUNCATED, "max_tokens")


def test_empty_tag_fails() -> None:
    assert_failed(extract("<prompt>   </prompt>"), EXTRACTION_FAILED, "empty prompt")


def test_custom_tag() -> None:
    settings = ExtractSettings(tag="task")
    assert_ok(extract(f"ok <task>{PROMPT}</task>", settings=settings), PROMPT)
    assert_failed(extract(f"<task>{PROMPT}", settings=settings), EXTRACTION_FAILED, "</task>")


# --- length finish without tags ---------------------------------------------------------------------


def test_length_finish_without_tag_is_truncated() -> None:
    assert_failed(extract(PROMPT, "length"), TRUNCATED, "max_tokens")
    assert_failed(extract(f"```\n{PROMPT}\n```", "length"), TRUNCATED, "max_tokens")


@pytest.mark.parametrize("finish", [None, "stop", "end_turn", "stop_sequence"])
def test_normal_finishes_accept_bare_reply(finish: str | None) -> None:
    assert_ok(extract(PROMPT, finish), PROMPT)


# --- fenced blocks ----------------------------------------------------------------------------------


def test_fenced_without_language() -> None:
    assert_ok(extract(f"```\n{PROMPT}\n```"), PROMPT)


@pytest.mark.parametrize("info", ["text", "markdown", "md", "plaintext"])
def test_fenced_with_language(info: str) -> None:
    assert_ok(extract(f"```{info}\n{PROMPT}\n```"), PROMPT)


def test_tilde_fence() -> None:
    assert_ok(extract(f"~~~\n{PROMPT}\n~~~"), PROMPT)
    assert_ok(extract(f"~~~text\n{PROMPT}\n~~~"), PROMPT)


def test_fence_with_surrounding_whitespace_and_crlf() -> None:
    assert_ok(extract(f"\n\n  ```text\r\n{PROMPT}\r\n```  \n\n"), PROMPT)


def test_longer_fence_may_hold_inner_code_block() -> None:
    body = "Write a kernel with this signature:\n```cpp\n__global__ void k(float* x);\n```"
    assert_ok(extract(f"````markdown\n{body}\n````"), body)


def test_fence_with_chatter_is_its_body() -> None:
    # Changed on purpose (issue 10): one fenced block anywhere is the prompt, whatever stands around it.
    assert_ok(extract(f"Here you go:\n```\n{PROMPT}\n```"), PROMPT)
    assert_ok(extract(f"Here you go:\n```\n{PROMPT}\n```\nEnjoy, and let me know!"), PROMPT)


def test_two_fenced_blocks_are_ambiguous() -> None:
    # Changed on purpose (issue 10): two blocks and no label naming one of them is a failure, not the whole reply.
    text = f"```\n{PROMPT}\n```\nand\n```\nsecond\n```"
    assert_failed(extract(text), EXTRACTION_FAILED, "ambiguous: 2 fenced blocks")


def test_empty_fence_fails() -> None:
    assert_failed(extract("```\n```"), EXTRACTION_FAILED, "empty prompt")
    assert_failed(extract("```text\n   \n```"), EXTRACTION_FAILED, "empty prompt")


def test_fence_mismatched_markers_is_never_closed() -> None:
    # Changed on purpose (issue 10): the whole reply used to be kept, fence lines and all.
    assert_failed(extract(f"```\n{PROMPT}\n~~~"), EXTRACTION_FAILED, "never closed")


# --- labels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        "English prompt:",
        "english PROMPT:",
        "Prompt:",
        "Task:",
        "**English prompt:**",
        "**English prompt**:",
        "**Prompt:**",
        "__Task:__",
        "# Prompt:",
        "## English prompt:",
        "### **Task:**",
        "  \n Prompt:",
    ],
)
def test_label_forms(head: str) -> None:
    assert_ok(extract(f"{head} {PROMPT}"), PROMPT)
    assert_ok(extract(f"{head}\n\n{PROMPT}\n"), PROMPT)


def test_label_then_fenced_block() -> None:
    assert_ok(extract(f"**Prompt:**\n```text\n{PROMPT}\n```"), PROMPT)


def test_label_in_middle_is_not_stripped() -> None:
    text = f"Some words first. Prompt: {PROMPT}"
    assert_ok(extract(text), text)


def test_label_alone_fails() -> None:
    assert_failed(extract("**English prompt:**"), EXTRACTION_FAILED, "empty prompt")


def test_custom_labels() -> None:
    settings = ExtractSettings(labels=("Request:",))
    assert_ok(extract(f"Request: {PROMPT}", settings=settings), PROMPT)
    assert_ok(extract(f"Prompt: {PROMPT}", settings=settings), f"Prompt: {PROMPT}")


def test_label_without_colon_needs_word_boundary() -> None:
    settings = ExtractSettings(labels=("Prompt",))
    assert_ok(extract(f"Prompt {PROMPT}", settings=settings), PROMPT)
    assert_ok(extract("Prompts are hard to write well.", settings=settings), "Prompts are hard to write well.")


# --- bare, empty, whitespace ------------------------------------------------------------------------


def test_bare_reply_is_stripped_whole() -> None:
    assert_ok(extract(f"\n\n   {PROMPT}   \n"), PROMPT)


@pytest.mark.parametrize("text", [None, "", "   ", "\n\t\n", "\u00a0\u2003"])
def test_empty_reply(text: str | None) -> None:
    assert_failed(extract(text), EXTRACTION_FAILED, "empty reply")


def test_empty_reply_with_length_finish_is_still_empty() -> None:
    assert_failed(extract("", "length"), EXTRACTION_FAILED, "empty reply")


# --- refusals ---------------------------------------------------------------------------------------


def test_refusal_finish_wins_over_everything() -> None:
    assert_failed(extract(f"<prompt>{PROMPT}</prompt>", "refusal"), EXTRACTION_FAILED, "refusal")
    assert_failed(extract(None, "refusal"), EXTRACTION_FAILED, "refusal")


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I’m sorry, but I can’t assist with this request.",
        "I can't help with that request.",
        "I cannot assist with that.",
        "I am unable to help with this.",
        "Sorry, I can't do that.",
        "**I'm sorry, but I can't comply with this request.**",
    ],
)
def test_refusal_by_words(text: str) -> None:
    assert_failed(extract(text), EXTRACTION_FAILED, "refusal")


def test_long_reply_starting_like_refusal_is_kept() -> None:
    text = "I'm sorry, but I can't " + "resist writing a detailed prompt. " * 10
    assert len(text) >= 200
    assert_ok(extract(text), text.strip())


def test_refusal_words_inside_tag_are_a_prompt() -> None:
    inner = "I can't get my HIP kernel to compile; write a corrected vector_add kernel."
    assert_ok(extract(f"<prompt>{inner}</prompt>"), inner)


def test_prompt_starting_with_i_is_not_refusal() -> None:
    text = "I need a HIP kernel that computes a prefix sum over 1M ints."
    assert_ok(extract(text), text)


# --- min_chars --------------------------------------------------------------------------------------


def test_too_short_default() -> None:
    assert_failed(extract("<prompt>Write it</prompt>"), EXTRACTION_FAILED, "too short")
    assert_failed(extract("short"), EXTRACTION_FAILED, "too short")


def test_exactly_min_chars_is_ok() -> None:
    assert_ok(extract("<prompt>0123456789</prompt>"), "0123456789")
    assert_failed(extract("<prompt>012345678</prompt>"), EXTRACTION_FAILED, "too short")


def test_min_chars_zero_still_rejects_empty() -> None:
    settings = ExtractSettings(min_chars=0)
    assert_ok(extract("<prompt>x</prompt>", settings=settings), "x")
    assert_failed(extract("<prompt></prompt>", settings=settings), EXTRACTION_FAILED, "empty prompt")


def test_min_chars_counts_characters_not_bytes() -> None:
    settings = ExtractSettings(min_chars=5)
    assert_ok(extract("<prompt>カーネル書</prompt>", settings=settings), "カーネル書")


# --- non-ASCII --------------------------------------------------------------------------------------


def test_non_ascii_preserved_exactly() -> None:
    inner = "Schreibe einen HIP-Kernel für die Größe n — カーネル `scale` (x *= α), e\u0301 stays decomposed."
    for text in (f"<prompt>{inner}</prompt>", f"```\n{inner}\n```", f"Prompt: {inner}", inner):
        result = extract(text)
        assert result.ok
        assert result.prompt == inner


# --- Extraction -------------------------------------------------------------------------------------


def test_extraction_ok_property() -> None:
    assert Extraction(prompt="abc", reason=None).ok
    assert not Extraction(prompt="", reason=None).ok
    assert not Extraction(prompt=None, reason=EXTRACTION_FAILED, detail="x").ok


def test_reasons_match_ledger_states() -> None:
    assert RequestState(EXTRACTION_FAILED) is RequestState.EXTRACTION_FAILED
    assert RequestState(TRUNCATED) is RequestState.TRUNCATED


# --- settings ---------------------------------------------------------------------------------------


def test_defaults_match_template_toml() -> None:
    assert DEFAULT_SETTINGS == ExtractSettings(
        tag="prompt", labels=("English prompt:", "Prompt:", "Task:"), min_chars=10
    )


def test_from_mapping_full() -> None:
    settings = ExtractSettings.from_mapping({"tag": "answer", "labels": ["Answer:"], "min_chars": 3})
    assert settings == ExtractSettings(tag="answer", labels=("Answer:",), min_chars=3)
    assert isinstance(settings.labels, tuple)
    hash(settings)


def test_from_mapping_partial_keeps_defaults() -> None:
    assert ExtractSettings.from_mapping({"min_chars": 20}) == ExtractSettings(min_chars=20)
    assert ExtractSettings.from_mapping({}) == DEFAULT_SETTINGS


def test_from_mapping_unknown_key_names_it() -> None:
    with pytest.raises(ValueError, match="min_char"):
        ExtractSettings.from_mapping({"min_char": 5})
    with pytest.raises(ValueError, match="'lables'"):
        ExtractSettings.from_mapping({"tag": "prompt", "lables": ["Prompt:"]})


@pytest.mark.parametrize(
    "data",
    [
        {"tag": ""},
        {"tag": "<prompt>"},
        {"tag": 3},
        {"labels": "Prompt:"},
        {"labels": ["Prompt:", ""]},
        {"labels": [1]},
        {"min_chars": -1},
        {"min_chars": "10"},
        {"min_chars": True},
    ],
)
def test_from_mapping_bad_values(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ExtractSettings.from_mapping(data)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_SETTINGS.tag = "x"  # type: ignore[misc]


# --- speed ------------------------------------------------------------------------------------------


def test_pathological_inputs_are_fast() -> None:
    nasty = [
        "*" * 50_000 + "x",
        "#" * 50_000,
        "```\n" + "a\n" * 50_000 + "``",
        "<prompt" * 10_000,
        "<prompt>" * 10_000 + "</prompt>",
        " " * 50_000 + "x" * 5,
        "~~~\n" + "~~~x\n" * 20_000,
        # the readers added for issue 10: chatter phrases, rules, quotes, labels and fences repeated
        "here is the " * 5_000 + "prompt:",
        "Here is the prompt:\n" + "here " * 20_000,
        "\n".join(["---"] * 50_000),
        "x\n" + "\n".join(["- - -"] * 30_000),
        "> " + "\n> ".join(["a"] * 50_000),
        "```\n" * 30_000,
        "```\nx\n```\n" * 20_000,
        "**Prompt**" * 20_000,
        "## " + "prompt " * 20_000,
        '"' * 100_000,
        "“" * 50_000 + "”" * 50_000,
        "x\n\n" * 50_000 + "Let me know",
        "Sure!\n" * 50_000,
        "Task - " * 30_000,
        "{" * 50_000,
    ]
    as_json = ExtractSettings(json_field="english_prompt")
    start = time.perf_counter()
    for text in nasty:
        extract(text)
        extract(text, "length")
        extract(text, "stop", as_json)
    assert time.perf_counter() - start < 3.0


def test_throughput() -> None:
    replies = [
        f"<prompt>{PROMPT}</prompt>",
        f"Sure.\n<prompt>{PROMPT}</prompt>",
        f"```text\n{PROMPT}\n```",
        f"**English prompt:** {PROMPT}",
        PROMPT,
    ] * 4_000
    start = time.perf_counter()
    results = [extract(text, "stop") for text in replies]
    assert all(r.ok for r in results)
    assert time.perf_counter() - start < 2.0


# --- the case table (tests/data/extract_cases.toml) -------------------------------------------------


def test_case_table_is_well_formed() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    for case in CASES:
        assert set(case) <= CASE_KEYS, case["id"]
        assert ("expect_prompt" in case) != ("expect_reason" in case), case["id"]
        assert case.get("expect_method", "tag") in METHODS, case["id"]
    json_cases = [case for case in CASES if "json_field" in case.get("settings", {})]
    assert len(json_cases) >= 10 and any("expect_prompt" in c for c in json_cases)
    assert {case.get("expect_reason") for case in CASES} >= {None, EXTRACTION_FAILED, TRUNCATED}


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_case(case: dict[str, Any]) -> None:
    settings = ExtractSettings.from_mapping(case.get("settings", {}))
    result = extract(case["reply"], case.get("finish", "stop"), settings)
    if "expect_prompt" in case:
        assert result.ok, result
        assert result.prompt == case["expect_prompt"].strip()
        assert result.method in METHODS
        if "expect_method" in case:
            assert result.method == case["expect_method"]
        if "expect_suspects" in case:
            assert result.suspects == tuple(case["expect_suspects"])
        # What is kept is never short and never still opens with a label or a fence line.
        assert len(result.prompt) >= settings.min_chars
        assert not result.prompt.startswith(("```", "~~~"))
        assert SUSPECT_LABEL not in result.suspects
    else:
        assert not result.ok and result.prompt is None, result
        assert result.reason == case["expect_reason"]
        assert case.get("expect_detail", "") in result.detail
        assert result.method is None and result.suspects == ()


# --- methods and suspects ---------------------------------------------------------------------------


def test_methods_of_each_form() -> None:
    assert extract(f"<prompt>{PROMPT}</prompt>").method == "tag"
    assert extract(f"```\n{PROMPT}\n```").method == "fenced"
    assert extract(f"Prompt: {PROMPT}").method == "label"
    assert extract(PROMPT).method == "whole"
    as_json = ExtractSettings(json_field="english_prompt")
    assert extract(f'{{"english_prompt": "{PROMPT}"}}', settings=as_json).method == "json"


def test_clean_prompts_have_no_suspects() -> None:
    for text in (f"<prompt>{PROMPT}</prompt>", f"```\n{PROMPT}\n```", f"## English prompt\n{PROMPT}", PROMPT):
        assert extract(text).suspects == ()


def test_suspects_of_a_tagged_prompt_that_still_carries_chatter() -> None:
    # Tag content is kept verbatim (as before); what still looks wrong in it is flagged, not dropped.
    def suspects(inner: str) -> tuple[str, ...]:
        return extract(f"<prompt>{inner}</prompt>").suspects

    assert suspects(f"```\n{PROMPT}\n```") == (SUSPECT_FENCE_LINE,)
    assert suspects(f"English prompt: {PROMPT}") == (SUSPECT_LABEL,)
    assert suspects(f'"{PROMPT}"') == (SUSPECT_WRAPPING_QUOTE,)
    assert suspects(f"“{PROMPT}”.") == (SUSPECT_WRAPPING_QUOTE,)
    assert suspects(f"Here is the prompt you asked for: {PROMPT}") == (SUSPECT_PREAMBLE,)
    assert suspects(f"Sure! {PROMPT}") == (SUSPECT_PREAMBLE,)
    assert suspects(f"{PROMPT}\nLet me know if this works.") == (SUSPECT_PREAMBLE,)


def test_is_overlong_uses_four_times_the_median() -> None:
    assert not is_overlong(400, 100.0)
    assert is_overlong(401, 100.0)
    assert not is_overlong(10_000, 0.0)  # no median yet: nothing is overlong


# --- JSON settings ----------------------------------------------------------------------------------


def test_json_field_setting() -> None:
    assert ExtractSettings.from_mapping({"json_field": "english_prompt"}).json_field == "english_prompt"
    assert DEFAULT_SETTINGS.json_field is None
    for bad in ("", "  ", 3):
        with pytest.raises(ValueError, match="json_field"):
            ExtractSettings.from_mapping({"json_field": bad})


def test_json_mode_ignores_tags_and_labels() -> None:
    settings = ExtractSettings(json_field="english_prompt")
    assert_failed(extract(f"<prompt>{PROMPT}</prompt>", "stop", settings), EXTRACTION_FAILED, "invalid JSON")
    inner = f"<prompt>{PROMPT}</prompt>"
    assert_ok(extract(f'{{"english_prompt": "{inner}"}}', "stop", settings), inner)


def test_json_nested_too_deep_is_a_failure_not_a_crash() -> None:
    settings = ExtractSettings(json_field="english_prompt")
    assert_failed(extract("[" * 100_000, "stop", settings), EXTRACTION_FAILED, "invalid JSON")
