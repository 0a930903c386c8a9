"""The DySCO decoding loop (DYSCO_SPEC.md "Procedure"), built from small named steps:
prefill, context warmup, probe, select, bias, full pass; and the plain loop beside it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .config import DyscoConfig
from .engine import Engine, ProgressFn
from .native import NativeContext
from .sampling import Sampler
from .selection import ImportanceBuffer, bias_vector, select_positions, template_mask

TRACE_TOP = 8  # importance positions kept per traced step


@dataclass(frozen=True)
class StepTrace:
    pos: int                  # position fed at this intervention step
    selected: np.ndarray      # S before template removal (ascending positions)
    top_positions: np.ndarray  # the TRACE_TOP most important positions, most important first


@dataclass
class DyscoRun:
    """DySCO's state for one generation: importance, static selection, trace.

    The importance lives in `scores` (numpy), or, with `scores` None, in the llama context, where
    dysco_select_bias also selects and sets the bias (same bits, fewer passes over every
    position: the update went from 0.26 to 0.15 ms a step at 32K on the GPU machine's host).
    With `select_in_pass`, the full pass itself updates, selects and biases once its mask is
    filled (dysco_probe_select): its host work before that overlaps the probe on a GPU.
    """
    config: DyscoConfig
    template: np.ndarray                # [n_prompt] bool
    scores: Optional[ImportanceBuffer]  # importance over the positions seen; None: kept in the context
    static_selection: Optional[np.ndarray] = None
    trace: Optional[list[StepTrace]] = None
    select_in_pass: bool = False

    def __post_init__(self):
        if self.in_context and not self.config.dynamic:
            raise ValueError("in-context bookkeeping is for dynamic DySCO; static DySCO selects once in numpy")
        if self.select_in_pass and not self.in_context:
            raise ValueError("the full pass can only select from an importance kept in the context (scores=None)")
        self.template_u8 = np.ascontiguousarray(self.template, dtype=np.uint8)

    @property
    def in_context(self) -> bool:
        return self.scores is None

    def importance(self, native) -> np.ndarray:  # [positions seen]
        return native.importance() if self.in_context else self.scores.values

    def observe(self, native) -> None:
        """Spec 3.2 / warmup: fold the last scores into the importance."""
        if self.in_context:
            native.importance_update(self.config.decay)
        else:
            self.scores.update(native.scores(), self.config.decay)

    def select(self) -> np.ndarray:
        if self.config.dynamic:
            return select_positions(self.scores.values, self.config.top_p, self.config.top_k)
        if self.static_selection is None:
            self.static_selection = select_positions(self.scores.values, self.config.top_p, self.config.top_k)
        return self.static_selection

    def set_bias(self, native, pos: int) -> None:
        """Spec 3.3: select S and bias the next full pass at `pos`."""
        cfg = self.config
        if self.in_context:
            selected = native.select_bias(pos, cfg.top_p, cfg.top_k, cfg.strength, self.template_u8,
                                          want_selected=self.trace is not None)
        else:
            selected = self.select()
            native.set_bias(bias_vector(selected, pos, cfg.strength, self.template))
        if self.trace is not None:
            self.record(pos, selected, self.importance(native))

    def probe_select(self, native, token: int, pos: int) -> None:
        """Spec 3.1-3.3 with the selection in the pass: probe now; the full pass of `token` at
        `pos` updates the importance, selects S and biases itself."""
        cfg = self.config
        native.probe_select(token, pos, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, self.template_u8)

    def pass_selected(self, native, pos: int) -> None:
        """After that full pass: raise if it did not select; trace S."""
        selected = native.pass_selection(want_selected=self.trace is not None)
        if self.trace is not None:
            self.record(pos, selected, self.importance(native))

    def record(self, pos: int, selected: np.ndarray, importance: np.ndarray) -> None:
        # argpartition: a full sort of the importance per step would be O(n log n)
        k = min(TRACE_TOP, importance.size)
        top = np.argpartition(-importance, k - 1)[:k]
        top = top[np.argsort(-importance[top], kind="stable")]
        self.trace.append(StepTrace(pos, selected.copy(), top))


@dataclass(frozen=True)
class Warmups:
    context: int       # Wc
    intervention: int  # Wi

    @property
    def fed(self) -> int:
        return self.context + self.intervention

    def first_intervention(self, n_prompt: int) -> int:
        """Position of the first intervention step (Wi + 1 prompt tokens, Wi when Wc = 0)."""
        return max(n_prompt - self.fed, n_prompt - self.intervention - 1)


def plan_warmups(n_prompt: int, context: int, intervention: int) -> Warmups:
    """Shrink Wc, then Wi, until at least one prompt token is prefilled."""
    if n_prompt < 1:
        raise ValueError("the prompt is empty")
    while n_prompt <= context + intervention:
        if context > 0:
            context -= 1
        else:
            intervention -= 1
    return Warmups(context, intervention)


def prefill(engine: Engine, tokens: Sequence[int], start: int, end: int,
            progress: Optional[ProgressFn] = None) -> None:
    """Positions start..end-1 the usual way, without logits or bias."""
    if end > start:
        engine.decode(tokens[start:end], start, want_logits=False, progress=progress)


def warm_context(engine: Engine, run: DyscoRun, tokens: Sequence[int], first: int, stop: int) -> None:
    """Spec step 2: plain full passes whose QR-head scores update the importance."""
    if stop <= first:
        return
    engine.native.set_capture(True)
    try:
        for pos in range(first, stop):
            engine.decode([tokens[pos]], pos, want_logits=False)
            run.observe(engine.native)
    finally:
        engine.native.set_capture(False)


def intervene(engine: Engine, run: DyscoRun, token: int, pos: int, want_logits: bool) -> None:
    """Spec step 3: probe, select, bias, full pass (static mode skips the probe)."""
    if run.select_in_pass:
        run.probe_select(engine.native, token, pos)
    else:
        if run.config.dynamic:
            engine.native.probe(token, pos)
            run.observe(engine.native)
        run.set_bias(engine.native, pos)
    try:
        engine.decode([token], pos, want_logits=want_logits)
        if run.select_in_pass:
            run.pass_selected(engine.native, pos)
    finally:
        engine.native.clear_bias()


def select_in_pass_default() -> bool:
    """The full pass selects (dysco_probe_select) unless DYSCO_SELECT_IN_PASS=0, for A/B timing."""
    return os.environ.get("DYSCO_SELECT_IN_PASS", "1") != "0"


Feed = Callable[[int, int, bool], None]  # (token, pos, want_logits)


def sample_loop(engine: Engine, feed: Feed, sampler: Sampler, first_pos: int, max_new_tokens: int,
                is_end: Callable[[int], bool]) -> Iterator[int]:
    """Sample, yield, feed back; stops after an end token, max_new_tokens, or a full context."""
    for i in range(max_new_tokens):
        token = sampler.sample(engine.ctx)
        yield token
        pos = first_pos + i
        if is_end(token) or i == max_new_tokens - 1 or pos >= engine.n_ctx:
            return
        feed(token, pos, True)


def plain_tokens(engine: Engine, prompt: Sequence[int], *, reuse: int, sampler: Sampler,
                 max_new_tokens: int, is_end: Callable[[int], bool],
                 progress: Optional[ProgressFn] = None) -> Iterator[int]:
    """Plain decoding: prefill, then the usual one-token steps."""
    n = len(prompt)
    prefill(engine, prompt, reuse, n - 1, progress)
    engine.decode([prompt[-1]], n - 1)

    def feed(token: int, pos: int, want_logits: bool) -> None:
        engine.decode([token], pos, want_logits=want_logits)

    yield from sample_loop(engine, feed, sampler, n, max_new_tokens, is_end)


def dysco_tokens(engine: Engine, prompt: Sequence[int], config: DyscoConfig, warmups: Warmups, *,
                 reuse: int, sampler: Sampler, max_new_tokens: int, is_end: Callable[[int], bool],
                 trace: Optional[list[StepTrace]] = None,
                 progress: Optional[ProgressFn] = None, in_context: Optional[bool] = None,
                 select_in_pass: Optional[bool] = None) -> Iterator[int]:
    """DySCO decoding of one prompt, exactly as the spec's procedure.

    `in_context`: keep the importance and selection in the llama context (None: whenever the
    engine's native controls are the real ones and DySCO is dynamic; a wrapper that re-indexes
    scores, like bench/reference_harness.py, keeps them in numpy). `select_in_pass`: with the
    importance in the context, let each full pass select for itself (None: select_in_pass_default)."""
    n = len(prompt)
    start_fed = n - warmups.fed
    first_iv = warmups.first_intervention(n)
    prefill(engine, prompt, reuse, start_fed, progress)
    engine.native.set_heads(config.qr_heads)
    if in_context is None:
        in_context = config.dynamic and type(engine.native) is NativeContext
    if in_context:
        engine.native.importance_reset(start_fed)
    scores = None if in_context else ImportanceBuffer(start_fed, capacity=engine.n_ctx + 1)
    if select_in_pass is None:
        select_in_pass = select_in_pass_default()
    run = DyscoRun(config, template_mask(prompt, config.template_sequences), scores, trace=trace,
                   select_in_pass=in_context and select_in_pass)
    warm_context(engine, run, prompt, start_fed, first_iv)
    for pos in range(first_iv, n):
        intervene(engine, run, prompt[pos], pos, want_logits=pos == n - 1)

    def feed(token: int, pos: int, want_logits: bool) -> None:
        intervene(engine, run, token, pos, want_logits)

    yield from sample_loop(engine, feed, sampler, n, max_new_tokens, is_end)
