"""Pull the English prompt out of one LLM reply: tags, fenced blocks, labels, refusals, truncation.

Pure functions and no I/O; the `[extract]` table of template.toml becomes an `ExtractSettings`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

#: `Extraction.reason` values; they equal the ledger states of the same name in `hipbatch.records`.
EXTRACTION_FAILED = "extraction_failed"
TRUNCATED = "truncated"

#: Finish reasons meaning "cut off by max_tokens" (OpenAI says "length", Anthropic "max_tokens").
LENGTH_FINISHES = frozenset({"length", "max_tokens"})
#: Finish reason meaning the model declined.
REFUSAL_FINISH = "refusal"
#: Replies at least this long are never taken as refusals on their wording alone.
REFUSAL_MAX_CHARS = 200

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]*")

_REFUSAL = re.compile(
    r"""\A[\s*_#>"']*(?:
        (?:i['’]m|i\s+am)\s+(?:sorry|afraid|unable|not\s+able)
      | sorry\b
      | i\s+apologi[sz]e
      | unfortunately\b
      | i\s+(?:can['’]?t|cannot|can\s+not|won['’]t|will\s+not|must\s+decline|am\s+unable|am\s+not\s+able)
          \s+(?:help|assist|comply|provide|do|fulfil|fulfill|create|generate|write|produce|complete|support)
    )""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True)
class ExtractSettings:
    """How replies are read; mirrors the `[extract]` table of a template's template.toml."""

    tag: str = "prompt"
    labels: tuple[str, ...] = ("English prompt:", "Prompt:", "Task:")
    min_chars: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.tag, str) or not _TAG_NAME.fullmatch(self.tag):
            raise ValueError(f"extract.tag must be a tag name such as 'prompt', got {self.tag!r}")
        labels = self.labels
        if isinstance(labels, str) or not isinstance(labels, list | tuple):
            raise ValueError(f"extract.labels must be a list of strings, got {labels!r}")
        if not all(isinstance(label, str) and label.strip() for label in labels):
            raise ValueError(f"extract.labels must hold non-empty strings, got {list(labels)!r}")
        object.__setattr__(self, "labels", tuple(labels))
        if isinstance(self.min_chars, bool) or not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ValueError(f"extract.min_chars must be a non-negative integer, got {self.min_chars!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExtractSettings:
        """Build from the `[extract]` table; missing keys keep their defaults, unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"unknown key {key!r} in [extract] (known: {', '.join(sorted(known))})")
        values = dict(data)
        if "labels" in values and isinstance(values["labels"], list):
            values["labels"] = tuple(values["labels"])
        return cls(**values)


DEFAULT_SETTINGS = ExtractSettings()


@dataclass(frozen=True)
class Extraction:
    """The outcome for one reply: a prompt, or a reason (a ledger state) with human-readable detail."""

    prompt: str | None
    reason: str | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None and bool(self.prompt)


def _fail(detail: str) -> Extraction:
    return Extraction(prompt=None, reason=EXTRACTION_FAILED, detail=detail)


def _truncated(detail: str) -> Extraction:
    return Extraction(prompt=None, reason=TRUNCATED, detail=detail)


@lru_cache(maxsize=64)
def _tag_patterns(tag: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    name = re.escape(tag)
    opening = re.compile(rf"<{name}(?:\s[^<>]*)?>", re.IGNORECASE)
    closing = re.compile(rf"</{name}\s*>", re.IGNORECASE)
    return opening, closing


@lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = []
    for label in sorted({label.strip() for label in labels}, key=len, reverse=True):
        words = r"\s+".join(re.escape(word) for word in label.rstrip(":").split())
        if label.endswith(":"):
            # "Prompt:", "**Prompt:**" and "**Prompt**:" all count.
            alternatives.append(rf"{words}[ \t]*[*_]*[ \t]*:[*_]*")
        else:
            alternatives.append(rf"{words}(?!\w)[*_]*")
    # Leading whitespace and markdown heading / bold / quote markers (one character class, so no
    # backtracking blow-up on long runs of '*'), then a label.
    return re.compile(rf"\A[\s#*_>]*(?:{'|'.join(alternatives)})", re.IGNORECASE)


_tag_patterns(DEFAULT_SETTINGS.tag)
_label_pattern(DEFAULT_SETTINGS.labels)


def _unfence(text: str) -> str | None:
    """The body of `text` (already stripped) if it is exactly one fenced block, else None.

    A block is ``` or ~~~ (3 or more), an optional info word, a newline, the body, and the same fence
    alone on the last line. Plain string work: faster than a backtracking regex on long replies.
    """
    if not text.startswith(("```", "~~~")):
        return None
    first_nl = text.find("\n")
    last_nl = text.rfind("\n")
    if first_nl < 0:
        return None
    head = text[:first_nl].rstrip()
    fence = head[: len(head) - len(head.lstrip(head[0]))]
    info = head[len(fence) :].strip()
    if len(info.split()) > 1 or (fence[0] == "`" and "`" in info):
        return None
    if text[last_nl + 1 :].strip() != fence:
        return None
    body = text[first_nl + 1 : last_nl] if last_nl > first_nl else ""
    # Two blocks with chatter between them also open and close like one; a fence line inside says so.
    for line in body.splitlines():
        if line.lstrip().startswith(fence):
            return None
    return body


def _tagged(text: str, settings: ExtractSettings, finish: str | None) -> Extraction | None:
    """Handle a reply that holds an opening tag; None when it holds none."""
    opening, closing = _tag_patterns(settings.tag)
    first = opening.search(text)
    if first is None:
        return None
    end = closing.search(text, first.end())
    if end is None:
        if finish in LENGTH_FINISHES:
            return _truncated(f"reply cut at max_tokens before the closing </{settings.tag}> tag")
        return _fail(f"no closing </{settings.tag}> tag")
    # The opening tag nearest the first closing tag, so a tag mentioned in chatter
    # ("here it is in <prompt> tags: <prompt>...</prompt>") does not swallow the text before the real one.
    start = first
    for later in opening.finditer(text, first.end(), end.start()):
        start = later
    return _finish(text[start.end() : end.start()].strip(), settings)


def _finish(prompt: str, settings: ExtractSettings) -> Extraction:
    if not prompt:
        return _fail("empty prompt")
    if len(prompt) < settings.min_chars:
        return _fail(f"too short ({len(prompt)} < {settings.min_chars} chars)")
    return Extraction(prompt=prompt, reason=None)


def extract(text: str | None, finish: str | None = None, settings: ExtractSettings = DEFAULT_SETTINGS) -> Extraction:
    """Take the English prompt from one reply `text` whose provider finish reason is `finish`.

    Order: refusal finish; empty reply; first `<tag>...</tag>` (unclosed -> truncated when cut by
    max_tokens, else failed); any other reply cut by max_tokens -> truncated; short refusal wording ->
    failed; one fenced block -> its body; a leading label -> the text after it; else the whole reply.
    """
    if finish == REFUSAL_FINISH:
        return _fail("refusal")
    if text is None or not text.strip():
        return _fail("empty reply")
    tagged = _tagged(text, settings, finish)
    if tagged is not None:
        return tagged
    if finish in LENGTH_FINISHES:
        return _truncated("reply cut at max_tokens")
    stripped = text.strip()
    if len(stripped) < REFUSAL_MAX_CHARS and _REFUSAL.match(stripped):
        return _fail("refusal")
    body = _unfence(stripped)
    if body is not None:
        return _finish(body.strip(), settings)
    label = _label_pattern(settings.labels).match(stripped)
    if label is not None:
        rest = stripped[label.end() :].strip()
        inner = _unfence(rest)
        return _finish((inner if inner is not None else rest).strip(), settings)
    return _finish(stripped, settings)
