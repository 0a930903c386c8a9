"""Where an answer looked, as passages of the texts in its prompt (a document, a message).

Each prompt token is placed in the prompt's text by the bytes of its piece; each text is cut
into passages (sentences and lines; a "[page N]" / "[section: ...]" marker line is none, and
starts the next); a passage's weight is the importance DySCO gave its tokens averaged over the
answer's steps, i.e. the share of the QR heads' attention it held (runtime/focus_trace.py).
"""
from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .markers import MARKER

if TYPE_CHECKING:
    from ..runtime.generation import Generation

MAX_PASSAGE = 320  # characters: a longer sentence is cut at a space, so a highlight stays readable
# a sentence: from a non-space to . ! ? (and closing quotes or brackets) before a space, or to the line's end
_SENTENCE = re.compile(r"\S[^\n]*?(?:[.!?]+[\"'\u2019\u201d)\]]*(?=\s|$)|(?=\n)|$)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)  # a Markdown heading line


@dataclass(frozen=True)
class Passage:
    region: int             # which of the texts given to `focus_passages`
    start: int              # character offsets (code points) in that text
    end: int
    text: str
    weight: float           # mean share of the QR heads' attention over the answer's steps
    where: Optional[str]    # "page 2" or "section: Results": the last marker or heading before it


def passage_bounds(text: str) -> list[tuple[int, int]]:
    """(start, end) of each passage of text, in order; marker lines and blank space are in none."""
    spans = []
    for m in _SENTENCE.finditer(text):
        if MARKER.fullmatch(m.group().strip()):
            continue
        start, end = m.start(), m.start() + len(m.group().rstrip())
        while end - start > MAX_PASSAGE:
            cut = text.rfind(" ", start + 1, start + MAX_PASSAGE)
            cut = cut if cut > start else start + MAX_PASSAGE
            spans.append((start, cut))
            start = cut + 1 if text[cut] == " " else cut
        spans.append((start, end))
    return spans


def token_byte_starts(model, ids: Sequence[int]) -> tuple[bytes, np.ndarray]:
    """The prompt's text as bytes (its tokens' pieces joined) and the byte where each token starts."""
    piece = {t: model.engine.detokenize([t], special=True) for t in set(map(int, ids))}  # once per distinct token
    pieces = [piece[int(t)] for t in ids]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    return b"".join(pieces), np.cumsum(lengths) - lengths


def locate(prompt: bytes, texts: Sequence[str]) -> list[Optional[int]]:
    """The byte offset of each text in the prompt, searched in order (None: the template changed it)."""
    found, after = [], 0
    for text in texts:
        at = prompt.find(text.encode("utf-8"), after)
        found.append(None if at < 0 or not text else at)
        if at >= 0:
            after = at + len(text.encode("utf-8"))
    return found


def _char_of_byte(text: str) -> np.ndarray:
    """For each UTF-8 byte of text, the index of the character it belongs to."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.cumsum((raw & 0xC0) != 0x80) - 1


def region_weights(text: str, at: int, starts: np.ndarray, weights: np.ndarray,
                   bounds: list[tuple[int, int]]) -> np.ndarray:
    """Each passage's summed token weight; a token counts for the passage its first byte lies in
    (a token that begins just before the text counts from the text's first byte)."""
    size = len(text.encode("utf-8"))
    ends = np.append(starts[1:], np.iinfo(np.int64).max)
    inside = (ends > at) & (starts < at + size)
    chars = _char_of_byte(text)[np.maximum(starts[inside], at) - at]
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    hi = np.array([b[1] for b in bounds], dtype=np.int64)
    which = np.searchsorted(lo, chars, side="right") - 1
    ok = (which >= 0) & (chars < hi[np.maximum(which, 0)])
    return np.bincount(which[ok], weights=weights[inside][ok], minlength=len(bounds))


def focus_passages(model, generation: "Generation", texts: Sequence[str], *, top: int = 8) -> list[Passage]:
    """The `top` passages of `texts` (pieces of the prompt's text, in prompt order) that a traced
    DySCO generation weighted most, heaviest first; [] when it has no focus trace."""
    trace = generation.trace
    if not trace or not hasattr(trace, "mean_importance") or not trace.steps:
        return []
    prompt, starts = token_byte_starts(model, generation.prompt_ids)
    weights = trace.mean_importance()
    found = []
    for region, (text, at) in enumerate(zip(texts, locate(prompt, texts))):
        bounds = passage_bounds(text) if at is not None else []
        if not bounds:
            continue
        for (start, end), weight in zip(bounds, region_weights(text, at, starts, weights, bounds)):
            if weight > 0:
                found.append(Passage(region, start, end, text[start:end], float(weight), None))
    found.sort(key=lambda p: -p.weight)
    marks = {region: places(texts[region]) for region in {p.region for p in found[:top]}}
    return [replace(p, where=_last_before(marks[p.region], p.start)) for p in found[:top]]


def places(text: str) -> list[tuple[int, str]]:
    """(offset, "page 2" / "section: Results") of every marker and Markdown heading, in order."""
    found = [(m.start(), m.group(1)) for m in MARKER.finditer(text)]
    found += [(m.start(), f"section: {m.group(1)}") for m in _HEADING.finditer(text)]
    return sorted(found)


def _last_before(marks: list[tuple[int, str]], offset: int) -> Optional[str]:
    i = bisect_right(marks, offset, key=lambda m: m[0])
    return marks[i - 1][1] if i else None
