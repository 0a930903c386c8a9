"""DySCO's host-side bookkeeping in numpy: importance update, selection, bias vector.

Pure functions following DYSCO_SPEC.md ("State"; "Procedure" steps 3.2 and 3.3).

Precision. `update_importance` keeps the importance vector in float64, where
an fp32 implementation would keep it in fp32. Sums differ only at the 1e-7
relative level, which moves a position across the nucleus boundary only when
it sits on the boundary within rounding; fp32 attention from llama.cpp differs
from the reference's attention by more than that anyway.

Ties. The reference sorts with `torch.sort(descending=True)`, whose order among
exactly equal values is unspecified. Here it is fixed: larger value first, then
lower position first. The rule only decides *which* of several equal values at
the selection boundary are kept (the lower positions); the cumulative sums, and
so the nucleus size, do not depend on it.

Selection works in the input's precision (float64 from `update_importance`;
a float32 vector is summed in float32).

Speed. No argsort: the size of the selected set is found from the largest
values alone (`np.partition` to a candidate set, then a sort of the candidates
only), and the positions are then read off with one comparison against the
boundary value. On 131072 positions (2-core x86 VM): hybrid or top-k with
k = 4096 about 0.5 ms; top_p alone 0.5 ms when the nucleus is within the 4096
largest, else about 3 ms (one full value sort).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..config import HARD_MASK_STRENGTH
from ..errors import InputError

__all__ = [
    "update_importance",
    "ImportanceBuffer",
    "select_nucleus",
    "select_top_k",
    "select_positions",
    "template_mask",
    "bias_vector",
]

# top_p-only selection first looks at this many largest values; when they
# already hold more than top_p of the mass, no full sort is needed.
_NUCLEUS_PROBE = 4096


def update_importance(importance: np.ndarray, attn: np.ndarray, decay: float) -> np.ndarray:
    """The spec's update: `a[:-1] += decay * I`, then `I := a / sum(a)`.

    `attn` is the *mean* over the QR heads of their softmax probabilities from
    the current query at position q to positions 0..q, so it has one entry more
    than `importance`. (A sum over heads must be divided by the number of heads
    first: the scale of `attn` against `decay * I` matters.) Returns a new
    float64 vector of length q + 1 summing to 1; the inputs are not modified.
    """
    previous = np.asarray(importance, dtype=np.float64)
    scores = np.array(attn, dtype=np.float64)  # a copy: updated in place below
    if previous.ndim != 1 or scores.shape != (previous.size + 1,):
        raise InputError(
            f"attn: expected {previous.size + 1} entries (positions 0..{previous.size}) "
            f"for an importance vector of shape {previous.shape}, got shape {scores.shape}"
        )
    scores[:-1] += decay * previous
    total = scores.sum()
    if not (np.isfinite(total) and total > 0):
        raise InputError(f"attn: the updated scores sum to {total}; expected a finite positive total")
    scores /= total
    return scores


class ImportanceBuffer:
    """The importance vector kept in one growing float64 buffer, updated in place.

    Same arithmetic as `update_importance`, so the same bits; but no fresh 256 KiB arrays per
    step at 32K positions, whose allocation and page faults cost more than the update itself.
    """

    def __init__(self, size: int, capacity: int = 0):
        self._buffer = np.zeros(max(int(size), int(capacity), 16), dtype=np.float64)
        self._size = int(size)

    @property
    def values(self) -> np.ndarray:
        """The current vector (a view: valid until the next update)."""
        return self._buffer[: self._size]

    def update(self, attn: np.ndarray, decay: float) -> None:
        """`a[:-1] += decay * I`, then `I := a / sum(a)`; `attn` has one entry more than I."""
        q = self._size
        if np.ndim(attn) != 1 or np.size(attn) != q + 1:
            raise InputError(f"attn: expected {q + 1} entries (positions 0..{q}) for an importance vector "
                             f"of {q} positions, got shape {np.shape(attn)}")
        if q + 1 > self._buffer.size:
            grown = np.zeros(2 * (q + 1), dtype=np.float64)
            grown[:q] = self._buffer[:q]
            self._buffer = grown
        new = self._buffer[: q + 1]
        new[:q] *= decay
        new[q] = 0.0
        new += attn  # float32 scores widen to float64 here, as in update_importance
        total = new.sum()
        if not (np.isfinite(total) and total > 0):
            raise InputError(f"attn: the updated scores sum to {total}; expected a finite positive total")
        new /= total
        self._size = q + 1


def select_nucleus(importance: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus: sorted descending, the prefix whose cumulative sum is <= top_p, at least one.

    Returns the kept positions in ascending order (int64).
    """
    x = _as_scores(importance)
    _check_top_p(top_p)
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    # The probe's values are exactly the first ones of a full descending sort,
    # with the same cumulative sums: if they pass top_p, the nucleus ends among them.
    descending = _largest_descending(x, min(x.size, _NUCLEUS_PROBE))
    cumulative = np.cumsum(descending)
    if descending.size < x.size and cumulative[-1] <= top_p:
        descending = _largest_descending(x, x.size)
        cumulative = np.cumsum(descending)
    count = _prefix_length(cumulative, top_p)
    return _positions_of_largest(x, count, descending[count - 1])


def select_top_k(importance: np.ndarray, k: int) -> np.ndarray:
    """The min(k, len) largest (ties at the boundary: lower positions first), ascending (int64)."""
    x = _as_scores(importance)
    _check_top_k(k)
    count = min(int(k), x.size)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(x, x.size - count)[x.size - count]
    return _positions_of_largest(x, count, threshold)


def select_positions(importance: np.ndarray, top_p: float | None, top_k: int | None) -> np.ndarray:
    """The spec's selection S: nucleus, top-k, or hybrid when both are set.

    Hybrid: take the nucleus; if it has more than top_k positions, take the
    top_k largest instead. The nucleus has more than k positions exactly when
    the k + 1 largest values have a cumulative sum <= top_p, so only those are
    sorted. Returns ascending positions (int64).
    """
    if top_p is None and top_k is None:
        raise InputError("top_p/top_k: at least one must be set, got top_p=None and top_k=None")
    if top_p is None:
        return select_top_k(importance, top_k)
    if top_k is None:
        return select_nucleus(importance, top_p)
    x = _as_scores(importance)
    _check_top_p(top_p)
    _check_top_k(top_k)
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    descending = _largest_descending(x, min(x.size, int(top_k) + 1))
    count = min(_prefix_length(np.cumsum(descending), top_p), int(top_k))
    return _positions_of_largest(x, count, descending[count - 1])


def template_mask(
    token_ids: Sequence[int] | np.ndarray,
    template_sequences: Iterable[Sequence[int]],
) -> np.ndarray:
    """True at every position covered by an occurrence of any template sequence.

    Occurrences may overlap (each one marks its own positions). Empty sequences
    are ignored. Vectorized per sequence: O(len(tokens) * len(sequence)).
    """
    tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    mask = np.zeros(tokens.size, dtype=bool)
    for sequence in template_sequences:
        pattern = np.asarray(sequence, dtype=np.int64).reshape(-1)
        if pattern.size == 0 or pattern.size > tokens.size:
            continue
        starts = _occurrences(tokens, pattern)
        for offset in range(pattern.size):
            mask[starts + offset] = True
    return mask


def bias_vector(
    selected: np.ndarray,
    current_pos: int,
    strength: float,
    template: np.ndarray | None = None,
) -> np.ndarray:
    """The additive attention bias b over positions 0..current_pos (float32).

    Soft (0 < strength < 99): template positions are removed from `selected`;
    b = log(strength) on the rest and on current_pos (always, as the spec says),
    0 elsewhere. Hard (strength >= 99): b = 0 on `selected` and current_pos,
    -inf elsewhere; template positions are not removed. `template` is a
    boolean mask over the prompt (see `template_mask`); positions past its end
    (generated tokens) are not template.
    """
    q = _check_position(current_pos)
    chosen = np.asarray(selected, dtype=np.int64).reshape(-1)
    if chosen.size and (chosen.min() < 0 or chosen.max() > q):
        raise InputError(
            f"selected: positions must lie in 0..{q} (current_pos), got {chosen.min()}..{chosen.max()}"
        )
    if not strength > 0:
        raise InputError(f"strength: expected a number > 0, got {strength!r}")
    if strength >= HARD_MASK_STRENGTH:
        bias = np.full(q + 1, -np.inf, dtype=np.float32)
        bias[chosen] = 0.0
        bias[q] = 0.0
        return bias
    if template is not None:
        chosen = _drop_template(chosen, np.asarray(template, dtype=bool).reshape(-1))
    bias = np.zeros(q + 1, dtype=np.float32)
    bias[chosen] = np.log(strength)
    bias[q] = np.log(strength)
    return bias


# ---- helpers ----

def _as_scores(importance: np.ndarray) -> np.ndarray:
    x = np.asarray(importance)
    if x.ndim != 1:
        raise InputError(f"importance: expected a 1-D vector, got shape {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    # Non-negative and finite, so cumulative sums rise and a prefix is well defined.
    if x.size and not (x.min() >= 0 and np.isfinite(x.max())):
        raise InputError(f"importance: expected finite values >= 0, got min {x.min()} and max {x.max()}")
    return x


def _largest_descending(x: np.ndarray, size: int) -> np.ndarray:
    """The `size` largest values, in descending order (O(n) partition + sort of `size`)."""
    if size >= x.size:
        return np.sort(x)[::-1]
    return np.sort(np.partition(x, x.size - size)[x.size - size:])[::-1]


def _prefix_length(cumulative: np.ndarray, top_p: float) -> int:
    """How many leading entries have cumulative sum <= top_p; at least one ("always keep the first")."""
    return max(1, int(np.searchsorted(cumulative, top_p, side="right")))


def _positions_of_largest(x: np.ndarray, count: int, threshold: float) -> np.ndarray:
    """Positions of the `count` largest values, given that the count-th largest is `threshold`.

    All values above it, then values equal to it from the lowest position up.
    """
    keep = x > threshold
    missing = count - int(np.count_nonzero(keep))
    keep[np.flatnonzero(x == threshold)[:missing]] = True
    return np.flatnonzero(keep).astype(np.int64, copy=False)


def _occurrences(tokens: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start positions of every (possibly overlapping) occurrence of `pattern`."""
    starts = np.flatnonzero(tokens[: tokens.size - pattern.size + 1] == pattern[0])
    for offset in range(1, pattern.size):
        starts = starts[tokens[starts + offset] == pattern[offset]]
    return starts


def _drop_template(chosen: np.ndarray, template: np.ndarray) -> np.ndarray:
    in_prompt = chosen < template.size
    is_template = np.zeros(chosen.size, dtype=bool)
    is_template[in_prompt] = template[chosen[in_prompt]]
    return chosen[~is_template]


def _check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise InputError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def _check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"top_k: expected an int >= 1, got {k!r}")


def _check_position(current_pos: int) -> int:
    if isinstance(current_pos, bool) or not isinstance(current_pos, (int, np.integer)) or current_pos < 0:
        raise InputError(f"current_pos: expected an int >= 0, got {current_pos!r}")
    return int(current_pos)
