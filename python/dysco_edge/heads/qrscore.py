"""QRScore (QRHead, Zhang et al. 2025), pure numpy, exactly as DYSCO_SPEC.md states it.

For one example, per head: s[j] = attention from the question tokens to
position j, averaged over the question tokens, minus the same with the
question replaced by the null query "N/A". Per document, token scores below
mean - 2*std (population std) are dropped and the rest summed. A head's
QRScore is the mean over examples of that sum on the gold document.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ..errors import InputError

__all__ = ["document_scores", "example_qr_score", "mean_qr_scores", "top_heads"]

OUTLIER_STDS = 2.0  # the spec: drop token scores below mean - 2 * std

Span = tuple[int, int]  # document positions [start, end)


def document_scores(query: np.ndarray, null: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """[n_layer, n_head, n_docs]: each document's filtered calibrated score mass.

    query, null: [n_layer, n_head, n_pos] attention of the question rows and of
    the null-query rows, each averaged over its rows (n_pos may differ: only
    document columns are read, and every span must lie inside both).
    """
    query, null = np.asarray(query, dtype=np.float64), np.asarray(null, dtype=np.float64)
    _check_inputs(query, null, spans)
    out = np.empty(query.shape[:2] + (len(spans),))
    for d, (start, end) in enumerate(spans):
        s = query[..., start:end] - null[..., start:end]
        floor = s.mean(axis=-1, keepdims=True) - OUTLIER_STDS * s.std(axis=-1, keepdims=True)
        out[..., d] = np.where(s >= floor, s, 0.0).sum(axis=-1)
    return out


def example_qr_score(query: np.ndarray, null: np.ndarray, spans: Sequence[Span], gold: int) -> np.ndarray:
    """[n_layer, n_head]: one example's score mass on its gold document."""
    if not 0 <= gold < len(spans):
        raise InputError(f"gold must index a document span (0-{len(spans) - 1}), got {gold}")
    return document_scores(query, null, spans)[..., gold]


def mean_qr_scores(per_example: Sequence[np.ndarray]) -> np.ndarray:
    """[n_layer, n_head]: the QRScore, the mean of the examples' gold masses."""
    if not per_example:
        raise InputError("QRScore needs at least one example")
    return np.mean(np.stack(per_example), axis=0)


def top_heads(scores: np.ndarray, k: int = 16, *, max_layer: int | None = None) -> tuple[tuple[int, int], ...]:
    """The k heads with the largest QRScore, best first, among layers <= max_layer (all if None).

    Ties go to the lower (layer, head), so the choice is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_layer, n_head = scores.shape
    allowed = n_layer if max_layer is None else min(n_layer, max_layer + 1)
    if max_layer is not None and max_layer < 0:
        raise InputError(f"max_layer must be >= 0, got {max_layer}")
    if not 1 <= k <= allowed * n_head:
        raise InputError(f"k must be in 1..{allowed * n_head} (heads in layers 0-{allowed - 1}), got {k}")
    flat = scores[:allowed].reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))[:k]  # by score descending, then index
    return tuple((int(i // n_head), int(i % n_head)) for i in order)


def _check_inputs(query: np.ndarray, null: np.ndarray, spans: Sequence[Span]) -> None:
    if query.ndim != 3 or null.ndim != 3 or query.shape[:2] != null.shape[:2]:
        raise InputError(f"query and null must be [n_layer, n_head, n_pos] with equal layers and heads, "
                         f"got {query.shape} and {null.shape}")
    if not spans:
        raise InputError("at least one document span is needed")
    limit = min(query.shape[2], null.shape[2])
    for start, end in spans:
        if not 0 <= start < end <= limit:
            raise InputError(f"document span [{start}, {end}) is empty or outside the {limit} captured positions")
