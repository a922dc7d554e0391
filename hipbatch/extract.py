"""Pull the English prompt out of one LLM reply, reading it as a person would: tags, fenced blocks, labels and
headings, preambles, sign-offs, wrapping quotes, refusals, truncation, and JSON (structured output) replies.

Pure functions and no I/O, driven by the tables below; the `[extract]` table of template.toml (and its `[output]`
table, for `json_field`) becomes an `ExtractSettings`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

#: `Extraction.reason` values; they equal the ledger states of the same name in `hipbatch.records`.
EXTRACTION_FAILED = "extraction_failed"
TRUNCATED = "truncated"

#: `Extraction.method` values: how a kept prompt was found.
METHOD_TAG = "tag"  # inside <tag>...</tag>
METHOD_FENCED = "fenced"  # the body of the one fenced block (or the one that follows a label)
METHOD_LABEL = "label"  # the text after a leading label or heading
METHOD_JSON = "json"  # the named property of a JSON reply (ExtractSettings.json_field)
METHOD_WHOLE = "whole"  # the whole reply, less any preamble, sign-off and wrapping quotes
METHODS = (METHOD_TAG, METHOD_FENCED, METHOD_LABEL, METHOD_JSON, METHOD_WHOLE)

#: `Extraction.suspects` values: why a kept prompt still looks wrong (the caller adds "overlong", see is_overlong).
SUSPECT_FENCE_LINE = "fence_line"  # a line that opens or closes a fenced block
SUSPECT_LABEL = "label"  # starts with a label or a label-like heading
SUSPECT_WRAPPING_QUOTE = "wrapping_quote"  # starts and ends with a quote mark
SUSPECT_PREAMBLE = "preamble"  # a chatter phrase to the reader at its start (preamble) or end (sign-off)
SUSPECT_OVERLONG = "overlong"  # not set here: the caller adds it when is_overlong(len(prompt), job median)

#: Finish reasons meaning "cut off by max_tokens" (OpenAI says "length", Anthropic "max_tokens").
LENGTH_FINISHES = frozenset({"length", "max_tokens"})
#: Finish reason meaning the model declined.
REFUSAL_FINISH = "refusal"
#: Replies at least this long are never taken as refusals on their wording alone.
REFUSAL_MAX_CHARS = 200
#: A kept prompt longer than this many times its job's median length is suspect ("overlong").
OVERLONG_FACTOR = 4.0
#: Only this much of a first line, a last paragraph or a label line is looked at for chatter (keeps it O(1)).
CHATTER_MAX_CHARS = 300
#: A kept prompt's first this many chars are checked for a preamble phrase left in it.
SUSPECT_HEAD_CHARS = 100

#: Info strings of a fenced block that wraps prose (the prompt). Any other (cpp, hip, ...) marks code that is
#: part of the prompt, not a wrapper around it.
PROSE_FENCE_INFO = frozenset({"", "text", "txt", "plain", "plaintext", "markdown", "md", "prompt", "english", "none"})
#: Keys read when a text template's reply is a JSON object anyway (models drift into JSON): the first present.
JSON_PROMPT_KEYS = ("english_prompt", "prompt", "task_prompt", "task")
#: Info strings of a fenced block tolerated around a JSON reply.
JSON_FENCE_INFO = frozenset({"", "json", "jsonc", "json5", "text"})
#: A block whose body starts like this is code even with no info string: a prompt never starts so.
CODE_BODY_STARTS = ("#include", "#define", "#pragma", "__global__", "__device__", "__host__", "template <", "template<")

#: Refusal openers at the start of a short reply (or of what is kept from one).
REFUSAL_OPENERS = r"""
    (?:i['’]m|i\s+am)\s+(?:sorry|afraid|unable|not\s+able)
  | sorry\b
  | i\s+apologi[sz]e
  | unfortunately\b
  | i\s+(?:can['’]?t|cannot|can\s+not|won['’]t|will\s+not|must\s+decline|am\s+unable|am\s+not\s+able)
      \s+(?:help|assist|comply|provide|do|fulfil|fulfill|create|generate|write|produce|complete|support)
"""
#: Refusal sentences recognised anywhere in a short reply: stricter, as they may follow a preamble.
REFUSAL_ANYWHERE = r"""
    \bi\s+(?:can['’]?t|cannot|can\s+not|won['’]t|will\s+not|am\s+unable\s+to|am\s+not\s+able\s+to)
      \s+(?:help|assist|comply|fulfil|fulfill)\b
  | \bi\s+must\s+decline\b
  | \b(?:i['’]m|i\s+am)\s+(?:sorry|afraid),?\s+(?:but\s+)?i\s+(?:can['’]?t|cannot|won['’]t|am\s+unable)\b
"""
#: Phrases of a first line that speaks to the reader about the answer ("Here is the rewritten prompt:").
#: The line is dropped when it also ends with a colon (or the phrase is followed by one on the same line).
PREAMBLE_PHRASES = (
    r"\bhere(?:['’]s|\s+is|\s+are)\b.{0,60}?\b(?:prompt|task|request|instruction|version|rewrite|description)s?\b",
    r"\bhere\s+(?:you\s+go|it\s+is)\b",
    r"\b(?:below|following)\s+(?:is|are)\b.{0,60}?\b(?:prompt|task|request|instruction)s?\b",
    r"\bas\s+requested\b",
    r"\b(?:i['’]ve|i\s+have)\s+(?:written|drafted|created|prepared|put\s+together|reverse[- ]engineered|come\s+up)\b",
    r"\b(?:the|your)\s+(?:[\w-]+\s+){0,3}prompt\s+(?:is|follows|would\s+be)\b",
    r"\b(?:rewritten|reverse[- ]engineered|requested)\s+(?:english\s+)?(?:task\s+)?prompt\b",
)
#: One of these (lower case) is in every preamble phrase: a cheap test before the regex runs.
PREAMBLE_KEYWORDS = (
    "here",
    "below",
    "following",
    "requested",
    "i've",
    "i’ve",
    "i have",
    "prompt",
)
#: A first line that is only an interjection ("Sure!") is dropped too.
INTERJECTIONS = (
    "sure",
    "certainly",
    "of course",
    "absolutely",
    "okay",
    "ok",
    "alright",
    "great",
    "got it",
    "no problem",
    "happy to help",
)
#: Openings of a closing paragraph (or last line) addressed to the reader ("Let me know..."); it is dropped.
SIGNOFF_PHRASES = (
    r"let\s+me\s+know\b",
    r"(?:i\s+)?hope\s+(?:this|that|it)\s+helps\b",
    r"feel\s+free\s+to\s+(?:ask|reach\s+out|let\s+me\s+know|request|tell\s+me)\b",
    r"feel\s+free\s+to\s+(?:adjust|modify|tweak|edit|change|refine|expand|shorten)\s+"
    r"(?:it|this|that|the\s+(?:prompt|wording|text|details))\b",
    r"i(?:['’]ve|\s+have)?\s+(?:kept|tried\s+to|aimed|focused|made\s+sure|avoided|phrased)\b",
    r"(?:would|do)\s+you\s+(?:like|want)\b",
    r"if\s+you(?:['’]d|\s+would)\s+like\b",
    r"if\s+you\s+want\s+(?:me|any|more|changes)\b",
    r"(?:want|shall|should)\s+i\b",
    r"happy\s+to\s+(?:adjust|help|refine|tweak|revise|expand|change)\b",
    r"(?:this|the\s+above|that)\s+prompt\s+(?:should|will|captures|covers|includes|describes|reflects|asks)\b",
    r"good\s+luck\b",
    r"notes?:\s+i\b",  # "Note: I focused on ..." (a note in the first person is about the answer)
)
#: A preamble phrase ending its line with "." or "!" ("Below is the prompt.") is dropped only when a blank line
#: follows it and the line is at most this long.
PREAMBLE_SENTENCE_MAX_CHARS = 160
#: Quote pairs that may wrap the whole prompt; they are dropped when nothing inside closes them early.
WRAPPING_QUOTES = {'"': '"', "“": "”", "„": "“", "«": "»", "'": "'", "‘": "’"}
_CLOSING_QUOTES = frozenset(WRAPPING_QUOTES.values())
#: Last words of a heading or bold line that make it a label even when it is not in [extract].labels
#: ("## Reverse-engineered English prompt").
LABEL_HEADING_WORDS = frozenset({"prompt", "task", "request"})
#: Label separators: a colon, or a dash followed by a space ("Task - Write ...").
LABEL_SEPARATORS = r":|[-–—](?=\s)"

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]*")
_FLAGS = re.IGNORECASE | re.VERBOSE
_REFUSAL = re.compile(rf"\A[\s*_#>\"'“‘]*(?:{REFUSAL_OPENERS})", _FLAGS)
_REFUSAL_ANY = re.compile(REFUSAL_ANYWHERE, _FLAGS)
_PREAMBLE = re.compile("|".join(PREAMBLE_PHRASES))  # run on lower-cased text: 10x faster than IGNORECASE
_INTERJECTION = re.compile(
    rf"\A[\s*_]*(?:{'|'.join(re.escape(w) for w in INTERJECTIONS)})[\s!.,:;*_—–-]*\Z", re.IGNORECASE
)
_SIGNOFF = re.compile(rf"\A[\s*_>(-]*(?:{'|'.join(SIGNOFF_PHRASES)})", re.IGNORECASE)
_HEADING = re.compile(
    r"\A[ \t]*(?:#{1,6}[ \t]+|\*\*|__)(?P<text>[^\n*_#]{1,80}?)[ \t]*[*_]*[ \t]*:?[*_]*[ \t]*(?:\n|\Z)"
)
_INTERJECTION_INITIALS = frozenset(w[0] for w in INTERJECTIONS) | frozenset(w[0].upper() for w in INTERJECTIONS)
_INTERJECTION_START = re.compile(rf"(?:{'|'.join(re.escape(w) for w in INTERJECTIONS)})(?![\w'’])")
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['’](?=\w)")
_RULE_LINE = re.compile(r"[ \t]*(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})")  # markdown thematic break
_QUOTE_MARKER = re.compile(r"^>[ \t]?", re.MULTILINE)
_FENCES = ("```", "~~~")
_MARKUP = "#*_>"  # markdown heading, bold/italic and quote markers that may open a label line
_FENCE_AFTER_NEWLINE = re.compile(r"\n[ \t]*(?:```|~~~)")


@dataclass(frozen=True)
class ExtractSettings:
    """How replies are read; mirrors the `[extract]` table of a template's template.toml.

    `json_field` set: the reply is a JSON object and the prompt is that property (structured output).
    """

    tag: str = "prompt"
    labels: tuple[str, ...] = ("English prompt:", "Prompt:", "Task:")
    min_chars: int = 10
    json_field: str | None = None

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
        if self.json_field is not None and (not isinstance(self.json_field, str) or not self.json_field.strip()):
            raise ValueError(f"extract.json_field must be a non-empty property name, got {self.json_field!r}")

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
    """The outcome for one reply: a prompt, or a reason (a ledger state) with human-readable detail.

    A kept prompt also says how it was found (`method`, one of METHODS) and why it may still be wrong
    (`suspects`, SUSPECT_* names; empty when it looks clean). Failures have method None and no suspects.
    """

    prompt: str | None
    reason: str | None
    detail: str = ""
    method: str | None = None
    suspects: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None and bool(self.prompt)


def is_overlong(length: int, median: float) -> bool:
    """True when a kept prompt of `length` chars is over OVERLONG_FACTOR times its job's median length."""
    return median > 0 and length > OVERLONG_FACTOR * median


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


def _label_key(label: str) -> str:
    return " ".join(label.strip().rstrip(":").strip().lower().split())


@lru_cache(maxsize=64)
def _label_pattern(labels: tuple[str, ...]) -> tuple[re.Pattern[str], frozenset[str], frozenset[str]]:
    """The leading-label pattern, the labels given without a colon (those need no separator) and the first
    letters of every label."""
    keys = sorted({_label_key(label) for label in labels}, key=len, reverse=True)
    words = "|".join(r"\s+".join(re.escape(word) for word in key.split()) for key in keys)
    # Leading whitespace and markdown heading / bold / quote markers (one character class, so no backtracking
    # blow-up on long runs of '*'), a label, closing markers, then a separator or none.
    pattern = re.compile(
        rf"\A(?P<pre>[\s#*_>]*)(?P<label>{words})(?!\w)[ \t]*[*_]*[ \t]*(?P<sep>{LABEL_SEPARATORS}|)[*_]*",
        re.IGNORECASE,
    )
    bare = frozenset(_label_key(label) for label in labels if not label.strip().endswith(":"))
    return pattern, bare, frozenset(key[0] for key in keys) | frozenset(_MARKUP)


_tag_patterns(DEFAULT_SETTINGS.tag)
_label_pattern(DEFAULT_SETTINGS.labels)


def _after_label(text: str, settings: ExtractSettings) -> str | None:
    """What follows a leading label or label-like heading of `text` (stripped), or None if it has none."""
    pattern, bare, initials = _label_pattern(settings.labels)
    if text[:1] not in _MARKUP and text.lstrip()[:1].lower() not in initials:
        return None  # the usual case, "Write a ...": no regex runs
    found = pattern.match(text)
    if found is not None:
        rest = text[found.end() :]
        markup = "#" in found["pre"] or "*" in found["pre"] or "_" in found["pre"]
        alone = not rest[: rest.find("\n") if "\n" in rest else len(rest)].strip()
        if found["sep"] or markup or alone or _label_key(found["label"]) in bare:
            return rest.strip()
    heading = _HEADING.match(text)
    if heading is not None:
        words = heading["text"].split()
        if len(words) <= 8 and words and words[-1].strip(":").lower() in LABEL_HEADING_WORDS:
            return text[heading.end() :].strip()
    return None


@dataclass
class _Block:
    """One top-level fenced block: its info word, body and whether a label line stands just before it."""

    info: str
    body: str
    labelled: bool
    closed: bool

    @property
    def wraps_prose(self) -> bool:
        return self.info in PROSE_FENCE_INFO and not self.body.lstrip().startswith(CODE_BODY_STARTS)


def _blocks(text: str, settings: ExtractSettings) -> list[_Block]:
    """The top-level fenced blocks of `text`, in order (CommonMark rules: a fence closes on the same character,
    at least as long, alone on its line; a longer outer fence may hold shorter inner ones). One pass."""
    lines = text.split("\n")
    blocks: list[_Block] = []
    fence = ""
    info = ""
    start = 0
    labelled = False
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not fence:
            if stripped[:3] in ("```", "~~~"):
                char = stripped[0]
                run = len(stripped) - len(stripped.lstrip(char))
                rest = stripped[run:].strip()
                if char == "`" and "`" in rest:
                    continue  # ```inline``` on one line is code, not a fence
                fence, info, start = stripped[:run], (rest.split() or [""])[0].lower(), number
                labelled = _labelled(lines, number, settings)
        elif stripped.startswith(fence) and not stripped.strip(fence[0]):
            blocks.append(_Block(info, "\n".join(lines[start + 1 : number]), labelled, True))
            fence = ""
    if fence:
        blocks.append(_Block(info, "\n".join(lines[start + 1 :]), labelled, False))
    return blocks


def _labelled(lines: list[str], number: int, settings: ExtractSettings) -> bool:
    """Whether the last non-blank line before line `number` is a label standing alone, or a preamble line
    ending with a colon ("Here is the prompt:")."""
    for back in range(number - 1, max(-1, number - 4), -1):
        line = lines[back].strip()
        if line:
            if len(line) > CHATTER_MAX_CHARS:
                return False
            return _after_label(line, settings) == "" or (line.endswith(":") and _preamble_end(line) >= 0)
    return False


def _from_blocks(text: str, settings: ExtractSettings) -> Extraction | None:
    """The prompt from the fenced blocks of `text`; None when no block wraps prose (go on with the whole text)."""
    blocks = _blocks(text, settings)
    if any(not block.closed for block in blocks):
        return _fail("a fenced block is never closed")
    wrappers = [block for block in blocks if block.wraps_prose]
    if not wrappers:
        return None
    if len(wrappers) > 1:
        labelled = [block for block in wrappers if block.labelled]
        if len(labelled) != 1:
            return _fail(f"ambiguous: {len(wrappers)} fenced blocks")
        wrappers = labelled
    body = wrappers[0].body.strip()
    rest = _after_label(body, settings)
    return _finish(_unquote(rest if rest is not None else body), settings, METHOD_FENCED)


def _first_line(text: str) -> tuple[str, str]:
    end = text.find("\n")
    return (text, "") if end < 0 else (text[:end], text[end + 1 :])


def _preamble_end(line: str) -> int:
    """Where a preamble phrase in `line` ends, or -1 when it holds none."""
    low = line.lower()
    if len(low) != len(line):
        return -1  # lower() changed the length (rare scripts): offsets would not match
    for word in PREAMBLE_KEYWORDS:
        if word in low:
            found = _PREAMBLE.search(low)
            return -1 if found is None else found.end()
    return -1


def _has_fence_line(text: str) -> bool:
    """Whether a line of `text` opens or closes a fenced block (cheap for the usual one-line prompt)."""
    return text.lstrip(" \t").startswith(_FENCES) or ("\n" in text and _FENCE_AFTER_NEWLINE.search(text) is not None)


def _drop_preamble(text: str) -> str:
    """`text` without a first line that speaks to the reader and ends with a colon, or is only "Sure!"."""
    line, rest = _first_line(text)
    if len(line) > CHATTER_MAX_CHARS:
        return text
    if rest and _INTERJECTION.match(line):
        return rest.strip()
    end = _preamble_end(line)
    if end < 0:
        return text
    tail = line.rstrip(" \t*_")
    if tail.endswith(":"):
        return rest.strip()
    colon = line.find(":", end)
    if 0 <= colon <= end + 40:
        return (line[colon + 1 :].strip(" \t*_") + "\n" + rest).strip()  # "Here is the prompt: Write ..."
    if tail.endswith((".", "!")) and len(line) <= PREAMBLE_SENTENCE_MAX_CHARS and not rest.partition("\n")[0].strip():
        return rest.strip()  # "Below is the prompt." then a blank line
    return text


def _drop_markup(text: str) -> str:
    """`text` without horizontal rules at its start or end and without a blockquote marker on every line.

    One scan from each end with offsets (no copy per line), so a reply of 10^5 rule lines stays linear.
    """
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0 or not (_RULE_LINE.fullmatch(text, start, end) or not text[start:end].strip()):
            break
        start = end + 1
    stop = len(text)
    while stop > start:
        cut = text.rfind("\n", start, stop)
        if cut < 0 or not (_RULE_LINE.fullmatch(text, cut + 1, stop) or not text[cut + 1 : stop].strip()):
            break
        stop = cut
    if start or stop < len(text):
        text = text[start:stop].strip()
    if text.startswith(">") and all(not ln.strip() or ln.lstrip().startswith(">") for ln in text.split("\n")):
        text = _QUOTE_MARKER.sub("", text).strip()
    return text


def _drop_signoff(text: str) -> str:
    """`text` without a closing paragraph (or last line) addressed to the reader."""
    for cut in (text.rfind("\n\n"), text.rfind("\n")):
        if cut > 0:
            tail = text[cut:].strip()
            if len(tail) <= CHATTER_MAX_CHARS and _SIGNOFF.match(tail):
                return text[:cut].strip()
    return text


def _unquote(text: str) -> str:
    """`text` without quote marks that wrap all of it (and nothing inside closes them early)."""
    if len(text) < 2:
        return text
    closing = WRAPPING_QUOTES.get(text[0])
    if closing is None or text[-1] != closing:
        return text
    inner = text[1:-1]
    marks = _INNER_APOSTROPHE.sub("", inner) if closing in "'’" else inner  # "doesn’t" closes nothing
    if text[0] == closing:
        balanced = closing not in marks
    else:
        balanced = marks.count(text[0]) == marks.count(closing)
    return inner.strip() if balanced else text


def _clean(text: str, settings: ExtractSettings) -> tuple[str, str]:
    """Drop a preamble, a leading label, sign-offs, horizontal rules, blockquote markers and wrapping quotes
    (repeatedly: they nest); also return the method."""
    method = METHOD_WHOLE
    for _ in range(3):
        before = text
        text = _drop_markup(_drop_preamble(text))
        rest = _after_label(text, settings)
        if rest is not None:
            text, method = rest, METHOD_LABEL
        text = _unquote(_drop_markup(_drop_signoff(text)))
        if text == before:
            break
    return text, method


def _is_refusal(text: str) -> bool:
    return len(text) < REFUSAL_MAX_CHARS and (_REFUSAL.match(text) is not None or _REFUSAL_ANY.search(text) is not None)


def _suspects(prompt: str, settings: ExtractSettings) -> tuple[str, ...]:
    """Why a kept prompt still looks wrong (cheap checks on its ends only, plus one scan for fence lines)."""
    found = []
    if _has_fence_line(prompt):
        found.append(SUSPECT_FENCE_LINE)
    if _after_label(prompt, settings) is not None:  # anchored at the start: cost independent of the length
        found.append(SUSPECT_LABEL)
    if prompt[0] in WRAPPING_QUOTES and prompt[-8:].rstrip(".!?,;: \t\n")[-1:] in _CLOSING_QUOTES:
        found.append(SUSPECT_WRAPPING_QUOTE)
    line = prompt[:SUSPECT_HEAD_CHARS].partition("\n")[0]
    tail = prompt[prompt.rfind("\n", -CHATTER_MAX_CHARS) + 1 :] if "\n" in prompt else prompt
    if (
        _preamble_end(line) >= 0
        or (line[:1] in _INTERJECTION_INITIALS and _INTERJECTION_START.match(line.lower()) is not None)
        or _SIGNOFF.match(tail) is not None
    ):
        found.append(SUSPECT_PREAMBLE)
    return tuple(found)


def _finish(prompt: str, settings: ExtractSettings, method: str) -> Extraction:
    prompt = prompt.strip()
    if not prompt:
        return _fail("empty prompt")
    if len(prompt) < settings.min_chars:
        return _fail(f"too short ({len(prompt)} < {settings.min_chars} chars)")
    if method != METHOD_TAG and len(prompt) < REFUSAL_MAX_CHARS and _REFUSAL.match(prompt):
        return _fail("refusal")
    return Extraction(prompt=prompt, reason=None, method=method, suspects=_suspects(prompt, settings))


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
    inner = text[start.end() : end.start()].strip()
    if _is_refusal(inner):
        return _fail("refusal")
    return _finish(inner, settings, METHOD_TAG)


def _from_json(text: str, finish: str | None, settings: ExtractSettings) -> Extraction:
    """The `json_field` property of a JSON reply (a fenced ```json block around it is tolerated)."""
    field = str(settings.json_field)
    if _has_fence_line(text):
        blocks = _blocks(text, settings)
        if len(blocks) == 1 and blocks[0].closed and blocks[0].info in JSON_FENCE_INFO:
            text = blocks[0].body.strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        if finish in LENGTH_FINISHES:
            return _truncated("reply cut at max_tokens inside the JSON")
        where = f" at char {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        return _fail(f"invalid JSON: {getattr(e, 'msg', type(e).__name__)}{where}")
    if not isinstance(data, dict):
        return _fail(f"the JSON reply is a {type(data).__name__}, not an object")
    if field not in data:
        return _fail(f"no {field!r} property in the JSON reply")
    value = data[field]
    if not isinstance(value, str):
        return _fail(f"the {field!r} property is a {type(value).__name__}, not a string")
    value = value.strip()
    if not value:
        return _fail(f"empty {field!r} property")
    if _is_refusal(value):
        return _fail("refusal")
    return _finish(value, settings, METHOD_JSON)


def _unasked_json(text: str, settings: ExtractSettings) -> Extraction | None:
    """A text reply that is a JSON object holding the prompt under one of JSON_PROMPT_KEYS; None if it is not."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    for key in JSON_PROMPT_KEYS:
        if isinstance(data.get(key), str):
            return _from_json(text, None, ExtractSettings(settings.tag, settings.labels, settings.min_chars, key))
    return None


def extract(text: str | None, finish: str | None = None, settings: ExtractSettings = DEFAULT_SETTINGS) -> Extraction:
    """Take the English prompt from one reply `text` whose provider finish reason is `finish`.

    Order: refusal finish; empty reply; JSON mode (settings.json_field) reads that property and stops there;
    first `<tag>...</tag>` (unclosed -> truncated when cut by max_tokens, else failed); any other reply cut by
    max_tokens -> truncated; short refusal wording anywhere -> failed; fenced blocks: exactly one wrapping prose
    -> its body, two or more -> ambiguous unless exactly one follows a label, an unclosed one -> failed; a reply
    that is a JSON object anyway -> its JSON_PROMPT_KEYS property; else the reply less a leading preamble line,
    a leading label or heading, a trailing sign-off, horizontal rules, blockquote markers and wrapping quotes.
    What is kept is stripped and at least min_chars long.
    """
    if finish == REFUSAL_FINISH:
        return _fail("refusal")
    if text is None or not text.strip():
        return _fail("empty reply")
    stripped = text.strip()
    if settings.json_field is not None:
        return _from_json(stripped, finish, settings)
    tagged = _tagged(text, settings, finish)
    if tagged is not None:
        return tagged
    if finish in LENGTH_FINISHES:
        return _truncated("reply cut at max_tokens")
    if _is_refusal(stripped):
        return _fail("refusal")
    if _has_fence_line(stripped):
        fenced = _from_blocks(stripped, settings)
        if fenced is not None:
            return fenced
    if stripped[0] == "{" and stripped[-1] == "}":
        unasked = _unasked_json(stripped, settings)
        if unasked is not None:
            return unasked
    prompt, method = _clean(stripped, settings)
    return _finish(prompt, settings, method)
