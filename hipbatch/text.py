"""Text from outside (file, job and model names, provider error messages) made safe to print: no terminal control
codes, no bidi overrides. Rich tables show it through `rich.text.Text`, never as markup (views.py)."""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """Text safe for a terminal: control characters (escape sequences, bidi overrides) become '?'; newlines kept."""
    return _CONTROL.sub("?", str(text))


def one_line(text: object, limit: int | None = None) -> str:
    """Text as one line (runs of whitespace, newlines included, become one space), cut to `limit` with an ellipsis."""
    line = " ".join(plain(text).split())
    return line if limit is None or len(line) <= limit else line[: max(limit - 1, 0)] + "…"


def shown(text: str) -> str:
    """One value inside an error line (a file name, a link target): control characters escaped (\\n, \\x1b)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
