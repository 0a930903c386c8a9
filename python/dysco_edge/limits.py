"""The one place inputs are checked before they reach C: numbers ranged, finite, of the right
kind; text valid UTF-8.

llama.cpp and the DySCO C API take int32 (positions, token ids, counts), uint32 (context
sizes) and finite floats; Python's unbounded ints and its NaN/inf would wrap, truncate or
assert there. Each check names the value as the user gave it (`name`: a field, a flag or an
argument) and raises `error` (an InputError subclass: ConfigError for DySCO options).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from .errors import InputError

INT32_MAX = 2**31 - 1       # llama_pos, llama_token, int32_t counts of the C APIs
MAX_THREADS = 512           # ggml's GGML_MAX_N_THREADS
MAX_SEQUENCES = 256         # llama.cpp's LLAMA_MAX_SEQ: sequences of one context


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _span(lo: int, hi: int) -> str:
    return f">= {lo}" if hi >= 2**63 - 1 else f"in {lo}..{hi}"


def int_in(value: Any, name: str, lo: int = 0, hi: int = INT32_MAX, *, error: type = InputError,
           what: str = "an int") -> int:
    """value as a plain int in lo..hi (inclusive)."""
    if not is_int(value) or not lo <= value <= hi:
        raise error(f"{name}: expected {what} {_span(lo, hi)}, got {shown(value)}")
    return int(value)


def real_in(value: Any, name: str, lo: Optional[float] = None, hi: Optional[float] = None, *,
            lo_open: bool = False, hi_open: bool = False, error: type = InputError) -> float:
    """value as a finite float within lo and hi (each bound excluded when its *_open flag says)."""
    ok = is_real(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else []
        raise error(f"{name}: expected a finite number{' ' if bounds else ''}{' and '.join(bounds)}, "
                    f"got {shown(value)}")
    return float(value)


def shown(value: Any) -> str:
    """The value for a message, at most 80 characters; huge ints (repr refuses past 4300 digits)
    and containers of them are described instead of printed."""
    if is_int(value) and abs(value) > 10**30:
        return f"an int of about 10**{int(value).bit_length() * 0.30103:.0f}"
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} holding a huge int"
    return text if len(text) <= 80 else text[:77] + "..."


def check_text(text: str, name: str) -> None:
    """Text llama.cpp can take as UTF-8: no lone surrogates (Python's stand-ins for undecodable bytes
    in argv, or half a UTF-16 pair in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid UTF-8 text: character {e.start} is {text[e.start]!r} (undecodable "
                         f"bytes or half a surrogate pair); pass UTF-8 text") from None
