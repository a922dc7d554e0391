"""Deterministic fake model behind the emulator: a token counter, the prompt it "reverse-engineers" from
HIP code, and the reply forms real models wrap around it (tags, chatter, fences, labels and headings, quotes,
sign-offs, several paragraphs, two fenced blocks, cut, empty, refused), plus JSON forms for structured output."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MARKER_RE = re.compile(r"hipbatch-emulator:\s*form=([A-Za-z_]+)")
_GLOBAL_RE = re.compile(r"\b__global__\b")
_LAUNCH_BOUNDS_RE = re.compile(r"__launch_bounds__\s*\([^)]*\)")
_NAME_BEFORE_PAREN_RE = re.compile(r"^[^(;{}]*?(\w+)\s*\(")

#: Reply forms and the weights "mixed" draws them with (they sum to 100): mostly clean tags, then what real
#: models send when they drift from the instructions.
FORM_WEIGHTS: dict[str, int] = {
    "tag": 70,
    "chatter_tag": 4,  # preamble + tag + sign-off
    "fenced": 2,
    "preamble_fenced": 3,  # "Sure! Here's the prompt:" + fenced block
    "fenced_signoff": 1,  # fenced block + "Let me know ..."
    "label": 2,  # "English prompt: ..."
    "heading": 2,  # "## English prompt" (no colon), then the prompt
    "bold_label": 1,  # "**Prompt**", then the prompt
    "task_dash": 1,  # "Task - ..."
    "bare": 2,
    "quoted": 1,  # "..."
    "curly_quoted": 1,  # “...”
    "chatter": 2,  # preamble line + prompt + sign-off paragraph
    "multi_paragraph": 1,  # a prompt of several paragraphs, one of them a "Requirements:" list
    "ambiguous": 1,  # two fenced blocks, neither labelled: no way to tell which is the prompt
    "truncated": 3,
    "empty": 2,
    "refusal": 1,
}
FORMS: tuple[str, ...] = tuple(FORM_WEIGHTS)
#: Forms that hold a prompt a careful reader recovers exactly (the rest must end up as failures).
GOOD_FORMS = frozenset(FORMS) - {"ambiguous", "truncated", "empty", "refusal"}

#: Reply forms when a request asks for JSON (OpenAI response_format, Anthropic output_config), and their weights.
JSON_FORM_WEIGHTS: dict[str, int] = {
    "json": 80,
    "json_extra_keys": 6,  # the prompt property plus keys nobody asked for
    "json_fenced": 3,  # the object inside a ```json block
    "json_cut": 4,  # cut at max_tokens mid-string (finish length / stop_reason max_tokens)
    "json_refusal": 2,  # API-level refusal (OpenAI message.refusal, Anthropic stop_reason refusal)
    "json_empty_field": 2,  # {"english_prompt": ""}
    "json_refusal_field": 2,  # the refusal wording inside the property
    "json_invalid": 1,  # Python-style quotes: not JSON
}
JSON_FORMS: tuple[str, ...] = tuple(JSON_FORM_WEIGHTS)
GOOD_JSON_FORMS = frozenset({"json", "json_extra_keys", "json_fenced"})
#: The JSON form a text form name stands for when the request asks for JSON (every other text form -> "json").
JSON_FORM_FOR = {"truncated": "json_cut", "empty": "json_empty_field", "refusal": "json_refusal"}
#: The prompt property when a JSON request names no schema (OpenAI json_object).
DEFAULT_JSON_FIELD = "english_prompt"

REFUSAL_TEXT = "I'm sorry, but I can't help with that."
#: Chatter real models put around an answer; each reply picks one by a hash of its prompt.
PREAMBLES = (
    "Sure! Here's the prompt:",
    "Here is the rewritten prompt:",
    "Of course — here you go:",
    "Certainly! Below is the English prompt for this file:",
    "Here's the reverse-engineered task prompt:",
)
SIGNOFFS = (
    "Let me know if you'd like any changes.",
    "Hope this helps!",
    "Feel free to ask if you want it shorter or more detailed.",
    "I kept it concise and close to what the code does.",
)
HEADINGS = ("## English prompt", "### English Prompt", "# Prompt", "## English prompt:")
BOLD_LABELS = ("**Prompt**", "**English prompt:**", "**Task**")
FENCE_INFOS = ("", "text", "markdown")
#: The extra paragraphs of the multi_paragraph form (the prompt itself holds a colon line and a list).
MORE_PARAGRAPHS = (
    "Requirements:\n"
    "- check every index against n before touching memory;\n"
    "- launch 256 threads per block and enough blocks to cover n;\n"
    "- copy the result back and compare it with a CPU reference.\n\n"
    "Report the first mismatch, if any, and exit with a non-zero status."
)
#: Per-message overhead added to prompt token counts, like chat formats do.
MESSAGE_OVERHEAD_TOKENS = 3


@dataclass
class FakeReply:
    """One reply of the fake model; `finish` is "stop", "length" (cut by max_tokens) or "refusal".

    `prompt` is what a careful reader must take from it (tests compare the dataset with it): the exact
    prompt for a good form that was not cut, None for a reply that holds none (cut, empty, refused, ambiguous,
    bad JSON).
    """

    text: str | None
    finish: str
    form: str
    prompt_tokens: int
    completion_tokens: int
    prompt: str | None = None


@functools.lru_cache(maxsize=256)  # system prompts repeat across every request of a batch
def count_tokens(text: str) -> int:
    """Deterministic stand-in tokenizer: words and single punctuation marks."""
    return len(_TOKEN_RE.findall(text))


def prompt_tokens(system: str, user_text: str) -> int:
    """Input tokens of one request: both texts plus a per-message overhead (system counts if non-empty)."""
    messages = 1 + (1 if system else 0)
    return count_tokens(system) + count_tokens(user_text) + MESSAGE_OVERHEAD_TOKENS * messages


def kernel_names(code: str) -> list[str]:
    """Names of the `__global__` functions in `code`, in order of appearance."""
    names: list[str] = []
    for match in _GLOBAL_RE.finditer(code):
        rest = _LAUNCH_BOUNDS_RE.sub(" ", code[match.end() : match.end() + 600])
        found = _NAME_BEFORE_PAREN_RE.match(rest)
        if found and found.group(1) not in names:
            names.append(found.group(1))
    return names


def fingerprint(user_text: str) -> str:
    """Short content hash that makes every distinct input give a distinct prompt."""
    return hashlib.sha256(user_text.encode("utf-8")).hexdigest()[:8]


def expected_prompt(user_text: str) -> str:
    """The one-line English prompt the fake model answers with for `user_text`."""
    names = kernel_names(user_text)
    ref = fingerprint(user_text)
    if not names:
        return (
            "Write a HIP host program that allocates device memory, runs the computation and checks the "
            f"result on the host (ref {ref})."
        )
    others = ""
    if len(names) > 1:
        rest = ", ".join(f"`{name}`" for name in names[1:])
        others = f" together with the kernel(s) {rest}"
    return (
        f"Write a HIP kernel named `{names[0]}`{others}, plus the host code that allocates the buffers, "
        f"launches it and copies the result back (ref {ref})."
    )


def _unit(seed: int, text: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def json_field_of(schema: dict[str, Any] | None) -> str:
    """The property a JSON reply puts the prompt in: the schema's first required string property."""
    properties = (schema or {}).get("properties")
    if not isinstance(properties, dict):
        return DEFAULT_JSON_FIELD
    required = (schema or {}).get("required")
    names = [n for n in required if n in properties] if isinstance(required, list) else []
    for name in [*names, *properties]:
        prop = properties.get(name)
        if isinstance(name, str) and isinstance(prop, dict) and prop.get("type") == "string":
            return name
    return DEFAULT_JSON_FIELD


def choose_form(user_text: str, forms: str = "mixed", seed: int = 0, json_mode: bool = False) -> str:
    """The reply form for `user_text`: a `hipbatch-emulator: form=NAME` marker wins, then `forms`.

    With json_mode (the request asks for JSON) the form is a JSON one: a text form name maps to its JSON
    counterpart (JSON_FORM_FOR, else "json") and "mixed" draws from JSON_FORM_WEIGHTS.
    """
    weights = JSON_FORM_WEIGHTS if json_mode else FORM_WEIGHTS
    marker = _MARKER_RE.search(user_text)
    if marker and (marker.group(1) in FORM_WEIGHTS or marker.group(1) in JSON_FORM_WEIGHTS):
        forms = marker.group(1)
    if forms != "mixed":
        if forms not in FORM_WEIGHTS and forms not in JSON_FORM_WEIGHTS:
            raise ValueError(f"unknown reply form {forms!r}; use 'mixed' or one of {', '.join(FORMS)}")
        if forms in weights:
            return forms
        return JSON_FORM_FOR.get(forms, "json") if json_mode else "tag"
    point = _unit(seed, user_text)
    for name, weight in weights.items():
        if point < weight:
            return name
        point -= weight
    return next(iter(weights))  # unreachable while the weights sum to 100


def _pick(options: tuple[str, ...], prompt: str, salt: str) -> str:
    return options[zlib.crc32(f"{salt}\0{prompt}".encode()) % len(options)]


def form_prompt(form: str, prompt: str) -> str:
    """The prompt a `form` reply carries: `prompt` itself, or more paragraphs of it (multi_paragraph)."""
    return f"{prompt}\n\n{MORE_PARAGRAPHS}" if form == "multi_paragraph" else prompt


def render_form(form: str, prompt: str, json_field: str = DEFAULT_JSON_FIELD) -> tuple[str, str]:
    """Reply text and finish reason of `form` wrapped around `prompt` (form_prompt(form, prompt) is what it holds)."""
    if form in JSON_FORM_WEIGHTS:
        return _render_json(form, prompt, json_field)
    pre, sign = _pick(PREAMBLES, prompt, "pre"), _pick(SIGNOFFS, prompt, "sign")
    texts = {
        "tag": f"<prompt>{prompt}</prompt>",
        "chatter_tag": f"Sure! Here is the prompt:\n<prompt>{prompt}</prompt>\nLet me know if you need changes.",
        "fenced": f"```\n{prompt}\n```",
        "preamble_fenced": f"{pre}\n\n```{_pick(FENCE_INFOS, prompt, 'info')}\n{prompt}\n```",
        "fenced_signoff": f"```text\n{prompt}\n```\n\n{sign}",
        "label": f"English prompt: {prompt}",
        "heading": f"{_pick(HEADINGS, prompt, 'heading')}\n\n{prompt}",
        "bold_label": f"{_pick(BOLD_LABELS, prompt, 'bold')}\n{prompt}",
        "task_dash": f"Task - {prompt}",
        "bare": prompt,
        "quoted": f'"{prompt}"',
        "curly_quoted": f"“{prompt}”",
        "chatter": f"{pre}\n\n{prompt}\n\n{sign}",
        "multi_paragraph": form_prompt(form, prompt),
        "ambiguous": f"Here are two versions.\n\n```\n{prompt}\n```\n\nor, shorter:\n\n```\n{prompt[:60]}\n```",
        "truncated": "<prompt>" + prompt[: len(prompt) // 2],
        "empty": "",
        "refusal": REFUSAL_TEXT,
    }
    if form not in texts:
        raise ValueError(f"unknown reply form {form!r}")
    finish = {"truncated": "length", "refusal": "refusal"}.get(form, "stop")
    return texts[form], finish


def _render_json(form: str, prompt: str, field: str) -> tuple[str, str]:
    whole = json.dumps({field: prompt}, ensure_ascii=False)
    texts = {
        "json": whole,
        "json_extra_keys": json.dumps(
            {"kernel_count": prompt.count("`") // 2, field: prompt, "notes": "Derived from the kernel signatures."},
            ensure_ascii=False,
        ),
        "json_fenced": "```json\n" + json.dumps({field: prompt}, ensure_ascii=False, indent=2) + "\n```",
        "json_cut": whole[: len(whole) // 2],
        "json_refusal": REFUSAL_TEXT,
        "json_empty_field": json.dumps({field: ""}),
        "json_refusal_field": json.dumps({field: REFUSAL_TEXT}),
        "json_invalid": "{'" + field + "': '" + prompt + "'}",
    }
    finish = {"json_cut": "length", "json_refusal": "refusal"}.get(form, "stop")
    return texts[form], finish


def cut_to_tokens(text: str, max_tokens: int) -> str:
    """The prefix of `text` that holds its first `max_tokens` tokens."""
    if max_tokens <= 0:
        return ""
    end = 0
    for index, match in enumerate(_TOKEN_RE.finditer(text)):
        if index == max_tokens:
            break
        end = match.end()
    return text[:end]


def reply(
    system: str,
    user_text: str,
    max_tokens: int,
    forms: str = "mixed",
    seed: int = 0,
    json_schema: dict[str, Any] | None = None,
) -> FakeReply:
    """The fake model's reply to one request; json_schema (not None) means the request asks for JSON."""
    json_mode = json_schema is not None
    form = choose_form(user_text, forms, seed, json_mode)
    base = expected_prompt(user_text)
    text, finish = render_form(form, base, json_field_of(json_schema))
    prompt = form_prompt(form, base)
    if count_tokens(text) > max_tokens:
        text, finish = cut_to_tokens(text, max_tokens), "length"
    good = finish != "length" and form in (GOOD_JSON_FORMS if json_mode else GOOD_FORMS)
    return FakeReply(
        text=text,
        finish=finish,
        form=form,
        prompt_tokens=prompt_tokens(system, user_text),
        completion_tokens=count_tokens(text),
        prompt=prompt if good else None,
    )
