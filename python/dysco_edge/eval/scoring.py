"""Deterministic scoring rules for the evaluation tasks: prediction text + gold -> score in [0, 1].

Rules are named (the name is stored with each case), so a results file can be re-scored.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from ..errors import InputError

Gold = str | Sequence[str]

_NUMBER = re.compile(r"\d[\d,]*")
_VARIABLE = re.compile(r"\b[A-Z]{5}\b")
_PATH_SEPARATORS = re.compile(r"->|\u2192|,|;|\n|\bthen\b", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z]+")
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def normalize(text: str) -> str:
    """Lower case, one space between words, no surrounding spaces or punctuation."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def first_number(prediction: str, gold: Gold) -> float:
    """1 when the first number in the prediction is the gold number (thousands commas ignored)."""
    match = _NUMBER.search(prediction)
    return float(match is not None and match.group().replace(",", "") == str(gold))


def final_number(prediction: str, gold: Gold) -> float:
    """1 when the answer's number is the gold: the first after the last 'Answer:', else the last one."""
    parts = _ANSWER.split(prediction)
    numbers = _NUMBER.findall(parts[-1])[:1] if len(parts) > 1 else _NUMBER.findall(prediction)[-1:]
    return float(bool(numbers) and numbers[0].replace(",", "") == str(gold))


def path_prefix(prediction: str, gold: Gold) -> float:
    """Fraction of the gold route reproduced in order before the first wrong city."""
    steps = [_WORD.search(part) for part in _PATH_SEPARATORS.split(prediction)]
    said = [m.group().lower() for m in steps if m is not None]
    right = 0
    for want, got in zip(gold, said):
        if want.lower() != got:
            break
        right += 1
    return right / len(gold)


def sequence_ratio(prediction: str, gold: Gold) -> float:
    """difflib's similarity ratio of the normalized texts (partial credit for near copies)."""
    return difflib.SequenceMatcher(None, normalize(prediction), normalize(str(gold)), autojunk=False).ratio()


def set_overlap(prediction: str, gold: Gold) -> float:
    """|named & gold| / max(|named|, |gold|) over five-capital-letter names: listing extras costs."""
    named = set(_VARIABLE.findall(prediction))
    wanted = set(gold)
    return len(named & wanted) / max(len(named), len(wanted))


SCORERS: dict[str, Callable[[str, Gold], float]] = {
    "first_number": first_number,
    "final_number": final_number,
    "path_prefix": path_prefix,
    "sequence_ratio": sequence_ratio,
    "set_overlap": set_overlap,
}


EXACT_SCORERS = frozenset({"first_number", "final_number"})  # 0 or 1 only: Wilson intervals apply


def score(rule: str, prediction: str, gold: Gold) -> float:
    try:
        scorer = SCORERS[rule]
    except KeyError:
        raise InputError(f"unknown scoring rule {rule!r}; known: {', '.join(SCORERS)}") from None
    return float(scorer(prediction, gold))
