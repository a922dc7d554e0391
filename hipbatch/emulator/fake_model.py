"""Deterministic fake model behind the emulator: a token counter, the prompt it "reverse-engineers" from
HIP code, and the reply forms (tag, chatter, fenced, label, bare, truncated, empty, refusal) around it."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MARKER_RE = re.compile(r"hipbatch-emulator:\s*form=([A-Za-z_]+)")
_GLOBAL_RE = re.compile(r"\b__global__\b")
_LAUNCH_BOUNDS_RE = re.compile(r"__launch_bounds__\s*\([^)]*\)")
_NAME_BEFORE_PAREN_RE = re.compile(r"^[^(;{}]*?(\w+)\s*\(")

#: Reply forms and the weights "mixed" draws them with (they sum to 100).
FORM_WEIGHTS: dict[str, int] = {
    "tag": 70,
    "chatter_tag": 8,
    "fenced": 6,
    "label": 6,
    "bare": 4,
    "truncated": 3,
    "empty": 2,
    "refusal": 1,
}
FORMS: tuple[str, ...] = tuple(FORM_WEIGHTS)
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
#: Per-message overhead added to prompt token counts, like chat formats do.
MESSAGE_OVERHEAD_TOKENS = 3


@dataclass
class FakeReply:
    """One reply of the fake model; `finish` is "stop", "length" (cut by max_tokens) or "refusal"."""

    text: str | None
    finish: str
    form: str
    prompt_tokens: int
    completion_tokens: int


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


def choose_form(user_text: str, forms: str = "mixed", seed: int = 0) -> str:
    """The reply form for `user_text`: a `hipbatch-emulator: form=NAME` marker wins, then `forms`."""
    marker = _MARKER_RE.search(user_text)
    if marker and marker.group(1) in FORM_WEIGHTS:
        return marker.group(1)
    if forms != "mixed":
        if forms not in FORM_WEIGHTS:
            raise ValueError(f"unknown reply form {forms!r}; use 'mixed' or one of {', '.join(FORMS)}")
        return forms
    point = _unit(seed, user_text)
    for name, weight in FORM_WEIGHTS.items():
        if point < weight:
            return name
        point -= weight
    return "tag"  # unreachable while the weights sum to 100


def render_form(form: str, prompt: str) -> tuple[str, str]:
    """Reply text and finish reason of `form` wrapped around `prompt`."""
    if form == "tag":
        return f"<prompt>{prompt}</prompt>", "stop"
    if form == "chatter_tag":
        return (
            f"Sure! Here is the prompt:\n<prompt>{prompt}</prompt>\nLet me know if you need changes.",
            "stop",
        )
    if form == "fenced":
        return f"```\n{prompt}\n```", "stop"
    if form == "label":
        return f"English prompt: {prompt}", "stop"
    if form == "bare":
        return prompt, "stop"
    if form == "truncated":
        return "<prompt>" + prompt[: len(prompt) // 2], "length"
    if form == "empty":
        return "", "stop"
    if form == "refusal":
        return REFUSAL_TEXT, "refusal"
    raise ValueError(f"unknown reply form {form!r}")


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


def reply(system: str, user_text: str, max_tokens: int, forms: str = "mixed", seed: int = 0) -> FakeReply:
    """The fake model's reply to one request."""
    form = choose_form(user_text, forms, seed)
    text, finish = render_form(form, expected_prompt(user_text))
    if count_tokens(text) > max_tokens:
        text, finish = cut_to_tokens(text, max_tokens), "length"
    return FakeReply(
        text=text,
        finish=finish,
        form=form,
        prompt_tokens=prompt_tokens(system, user_text),
        completion_tokens=count_tokens(text),
    )
