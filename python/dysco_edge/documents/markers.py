"""Where a passage lies in a document: the last "[page N]" marker the PDF reader wrote before it,
and the last heading after that page's start: a "[section: ...]" line of the HTML reader or a
Markdown heading ("## Results", kept as the user wrote it; "#" lines inside ``` fences are code)."""
from __future__ import annotations

import re
from typing import Optional, Sequence

MARKER = re.compile(r"\[(page \d+)\]|\[section: ([^\]\n]{1,200})\]")
HEADING = re.compile(r" {0,3}#{1,6}[ \t]+(.{1,200}?)[ \t#]*")
FENCES = ("```", "~~~")


def last_marker(text_before: str) -> Optional[str]:
    """'page 12', 'section: Results', or 'page 12, section: Results' (a heading on that page) for
    the text before a passage; None when it has no marker."""
    page = section = None
    fenced = False
    lines = text_before.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith(FENCES):
            fenced = not fenced
            continue
        whole = i < len(lines) - 1  # the last line may stop inside a heading: not one yet
        heading = HEADING.fullmatch(line) if whole and not fenced else None
        if heading:
            section = heading.group(1)
        for found in MARKER.finditer(line):
            page, section = (found.group(1), None) if found.group(1) else (page, found.group(2))
    where = ([page] if page else []) + ([f"section: {section}"] if section else [])
    return ", ".join(where) or None


def token_span(pieces: Sequence[bytes], text: str) -> Optional[tuple[int, int]]:
    """Positions lo..hi-1 of the tokens (given as each token's bytes) that hold the first occurrence
    of text, surrounding whitespace aside; None when the tokens do not hold it."""
    needle = text.strip().encode("utf-8")
    start = b"".join(pieces).find(needle) if needle else -1
    if start < 0:
        return None
    end, offset, lo = start + len(needle), 0, None
    for i, piece in enumerate(pieces):
        offset += len(piece)
        if lo is None and offset > start:
            lo = i
        if offset >= end:
            return lo, i + 1
    return None
