"""QR-head detection for any GGUF model: calibration prompts -> per-head QRScore -> a head map.

The attention comes from an `AttentionFn`: `NativeAttention` runs llama.cpp
with the native all-heads capture; tests plug in transformers instead, and
the same scoring code runs on both.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import make_examples
from ..config import DyscoConfig
from .importing import map_config
from .maps import HeadMap, ModelShape
from .layout import ExampleLayout, PromptFormat
from .qrscore import example_qr_score, mean_qr_scores, top_heads
from ..errors import InputError

__all__ = ["AttentionFn", "Detection", "NativeAttention", "detect_heads", "detection_head_map", "reselect",
           "score_layouts"]

CALIBRATION = "fictional-facts-v1"  # bump when calibration.py or qr_layout.py change what they produce
N_QR_HEADS = 16

# (prefix ids, row ids) -> [n_layer, n_head, n_pos] attention of the rows (decoded after the
# prefix) to every position, averaged over the rows
AttentionFn = Callable[[Sequence[int], Sequence[int]], np.ndarray]
ProgressFn = Callable[[int, int], None]


def score_layouts(layouts: Sequence[ExampleLayout], attention: AttentionFn,
                  progress: ProgressFn | None = None) -> np.ndarray:
    """[n_layer, n_head] QRScore over these examples."""
    per_example = []
    for i, layout in enumerate(layouts):
        query = attention(layout.prefix, layout.question)
        null = attention(layout.prefix, layout.null)
        per_example.append(example_qr_score(query, null, layout.spans, layout.gold))
        if progress is not None:
            progress(i + 1, len(layouts))
    return mean_qr_scores(per_example)


class NativeAttention:
    """An AttentionFn on an Engine; a prefix decoded once serves every row set that follows it."""

    def __init__(self, engine, *, layer_end: int | None = None):
        self.engine, self.layer_end = engine, layer_end
        self._prefix: tuple[int, ...] = ()

    def __call__(self, prefix: Sequence[int], rows: Sequence[int]) -> np.ndarray:
        prefix, start = tuple(int(t) for t in prefix), len(prefix)
        self._extend_cache(prefix)
        native = self.engine.native
        native.set_head_capture(start, start + len(rows), self.layer_end)
        try:
            self.engine.decode([int(t) for t in rows], start, want_logits=False)
            return native.head_scores()
        finally:
            native.clear_head_capture()


    def _extend_cache(self, prefix: tuple[int, ...]) -> None:
        """Make the KV cache hold exactly `prefix`, decoding only what the cached prefix lacks."""
        kept = len(self._prefix) if prefix[:len(self._prefix)] == self._prefix else 0
        self.engine.truncate(kept)  # also drops the rows of the previous call
        self._prefix = prefix[:kept]
        if len(prefix) > kept:
            self.engine.decode(prefix[kept:], kept, want_logits=False)
        self._prefix = prefix

@dataclass(frozen=True)
class Detection:
    """Every head's QRScore and how it was measured."""

    scores: np.ndarray = field(compare=False)  # [n_layer, n_head]
    seed: int
    examples: int
    documents: int
    seconds: float
    prompt_tokens: int = 0  # mean length of a calibration prompt (question included)

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or not np.isfinite(self.scores).all():
            raise InputError(f"scores must be a finite [n_layer, n_head] array, got shape {self.scores.shape}")


def detect_heads(engine, chat, *, examples: int = 64, seed: int = 0, documents: int = 8,
                 progress: ProgressFn | None = None) -> Detection:
    """Run the calibration set through a loaded model (an Engine and its ChatTemplate or None)."""
    fmt = PromptFormat.from_engine(engine, chat)
    layouts = fmt.layouts(make_examples(examples, seed=seed, n_documents=documents))
    longest = max(len(layout.prefix) + max(len(layout.question), len(layout.null)) for layout in layouts)
    if longest > engine.n_ctx:
        raise InputError(f"calibration prompts need {longest} tokens but the context holds {engine.n_ctx}; "
                         "load the model with a larger n_ctx or use fewer --documents")
    start = time.perf_counter()
    scores = score_layouts(layouts, NativeAttention(engine), progress)
    mean_tokens = round(np.mean([len(layout.prefix) + len(layout.question) for layout in layouts]))
    return Detection(scores=scores, seed=seed, examples=examples, documents=documents,
                     seconds=time.perf_counter() - start, prompt_tokens=int(mean_tokens))


def detection_head_map(detection: Detection, shape: ModelShape, *, name: str, max_layer: int | None = None,
                       name_patterns: Sequence[str] = (), model_file: str = "") -> HeadMap:
    """A head map with the top 16 heads (in layers <= max_layer) and every head's QRScore."""
    heads = top_heads(detection.scores, N_QR_HEADS, max_layer=max_layer)
    info = {"method": "qrhead", "calibration": CALIBRATION, "seed": detection.seed,
            "examples": detection.examples, "documents": detection.documents, "max_layer": max_layer,
            "prompt_tokens": detection.prompt_tokens, "seconds": round(detection.seconds, 1)}
    if model_file:
        info["model_file"] = Path(model_file).name
    return HeadMap(name=name, source=f"QRHead detection by dysco-edge ({CALIBRATION}, seed {detection.seed})",
                   qr_heads=heads, config=map_config(DyscoConfig(qr_heads=heads)),
                   shape=ModelShape(**{**vars(shape), "name": name}), name_patterns=tuple(name_patterns),
                   qr_scores=np.round(detection.scores, 8).tolist(), detection=info)


def reselect(head_map: HeadMap, *, max_layer: int | None) -> HeadMap:
    """The same map with its top 16 re-picked from its stored QRScores under another layer cap."""
    if head_map.qr_scores is None:
        raise InputError(f"head map {head_map.name!r} holds no qr_scores: detect with `dysco-edge heads detect`")
    scores = np.array(head_map.qr_scores)
    if max_layer is not None and not 0 <= max_layer < scores.shape[0]:
        raise InputError(f"max_layer must be in 0..{scores.shape[0] - 1} for this map, got {max_layer}")
    heads = top_heads(scores, N_QR_HEADS, max_layer=max_layer)
    return dataclasses.replace(head_map, qr_heads=heads, detection={**(head_map.detection or {}), "max_layer": max_layer})
