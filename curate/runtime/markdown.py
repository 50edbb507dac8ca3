"""Values from data (file names, captions, VLM answers, ids) made inert in markdown reports.

Reports are rendered as markdown and HTML (a viewer, the Prefect UI), and a file may be named
`<img src=x onerror=...>` or a VLM may answer with `<script>`: every such value goes through
`escape`, which turns HTML's special characters into entities, backslash-escapes the markdown
punctuation that could start a link, image, code span, emphasis or table cell, and keeps the
value on one line.
"""

from __future__ import annotations

import re

_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MARKDOWN = set("\\`*_[]()|!~#")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")


def escape(value: object, limit: int | None = None) -> str:
    """VALUE as one line of literal markdown text (at most LIMIT characters of it, then '…')."""
    text = _LINE_BREAKS.sub(" ", str(value))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    out = []
    for char in text:
        if char in _HTML:
            out.append(_HTML[char])
        elif char in _MARKDOWN:
            out.append("\\" + char)
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def fenced(text: str, info: str = "") -> list[str]:
    """TEXT as a fenced code block whose fence no line of TEXT can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]
