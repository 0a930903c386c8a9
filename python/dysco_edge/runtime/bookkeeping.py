"""Where DySCO's importance and selection live during a generation: strategies handed to
the decode loop (`decode.dysco_tokens`), chosen by the caller.

- `InPassBookkeeping`: the importance lives on the backend and the decode graphs do the rest
  (native/dysco-track.cpp): each probe folds its scores into it, and the full pass selects S and
  biases its own KQ mask, so a step has no host round trip. S and the importance are read back
  only for a trace (`--show-focus`, tests).
- `HostBookkeeping`: the importance is a numpy vector (selection.py) and the bias is set
  from the host. Static DySCO needs it (one selection, no probes), so do loops whose scores
  must be re-indexed first (bench/verify/reference_harness.py) and models whose KV cache is not a
  plain one (iSWA). It is the oracle the graph bookkeeping is tested against.
- `FastBookkeeping` (mode "fast", not the spec): no probe. Each biased full pass also scores
  its token with the QR heads and folds the scores in its graph; the next pass selects from them.
  `FastHostBookkeeping` does the same on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import FAST, DyscoConfig
from ..errors import InputError
from .focus_trace import FocusTrace
from .selection import ImportanceBuffer, bias_vector, select_positions

TRACE_TOP = 8  # importance positions kept per traced step


@dataclass(frozen=True)
class StepTrace:
    pos: int                  # position fed at this intervention step
    selected: np.ndarray      # S before template removal (ascending positions)
    top_positions: np.ndarray  # the TRACE_TOP most important positions, most important first


class _Bookkeeping:
    """What both strategies share: the config, the template mask and the trace."""

    def __init__(self, config: DyscoConfig, template: np.ndarray, n_seen: int, *, capacity: int,
                 trace: Optional[list[StepTrace]] = None):
        self.config, self.trace = config, trace
        self.template = template                     # [n_prompt] bool
        self.template_u8 = np.ascontiguousarray(template, dtype=np.uint8)
        self.n_seen, self.capacity = n_seen, capacity

    def record(self, pos: int, selected: np.ndarray, importance: np.ndarray) -> None:
        if self.trace is None:
            return
        # argpartition: a full sort of the importance per step would be O(n log n)
        k = min(TRACE_TOP, importance.size)
        top = np.argpartition(-importance, k - 1)[:k]
        top = top[np.argsort(-importance[top], kind="stable")]
        self.trace.append(StepTrace(pos, selected.copy(), top))
        if isinstance(self.trace, FocusTrace):
            self.trace.observe(pos, importance)


class InPassBookkeeping(_Bookkeeping):
    """Importance, selection and bias inside the decode graphs (dynamic DySCO only)."""

    def __init__(self, config: DyscoConfig, template: np.ndarray, n_seen: int, **kw):
        if not config.dynamic:
            raise InputError("in-pass bookkeeping is for dynamic DySCO; static DySCO selects once (HostBookkeeping)")
        super().__init__(config, template, n_seen, **kw)

    def begin(self, native) -> None:
        cfg = self.config
        native.importance_reset(self.n_seen, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, self.template_u8)

    def observe(self, native) -> None:
        """Context warmup: the pass folded its scores into the importance in its graph."""

    def before_pass(self, native, token: int, pos: int) -> None:
        """Probe now (it folds its scores); the full pass of `token` at `pos` selects and biases itself."""
        native.probe_select(token, pos)

    def after_pass(self, native, pos: int) -> None:
        """Raise if the pass did not select; trace S."""
        selected = native.pass_selection(want_selected=self.trace is not None)
        if self.trace is not None:
            self.record(pos, selected, native.importance())


class HostBookkeeping(_Bookkeeping):
    """Importance and selection in numpy; the bias is set from the host before each pass."""

    def __init__(self, config: DyscoConfig, template: np.ndarray, n_seen: int, **kw):
        super().__init__(config, template, n_seen, **kw)
        self.scores = ImportanceBuffer(n_seen, capacity=self.capacity)
        self.static_selection: Optional[np.ndarray] = None

    def begin(self, native) -> None:
        pass

    def observe(self, native) -> None:
        self.scores.update(native.scores(), self.config.decay)

    def select(self) -> np.ndarray:
        cfg = self.config
        if cfg.dynamic:
            return select_positions(self.scores.values, cfg.top_p, cfg.top_k)
        if self.static_selection is None:
            self.static_selection = select_positions(self.scores.values, cfg.top_p, cfg.top_k)
        return self.static_selection

    def before_pass(self, native, token: int, pos: int) -> None:
        """Spec 3.1-3.3: probe (dynamic only), select S, bias the full pass at `pos`."""
        if self.config.dynamic:
            native.probe(token, pos)
            self.observe(native)
        selected = self.select()
        native.set_bias(bias_vector(selected, pos, self.config.strength, self.template))
        self.record(pos, selected, self.scores.values)

    def after_pass(self, native, pos: int) -> None:
        pass


class FastBookkeeping(InPassBookkeeping):
    """Mode "fast": the full pass of the previous token scored and folded; this pass selects from
    the importance over the positions before it and biases itself, in its graph. No probe, except
    for a first step that no scored pass precedes (no context warmup)."""

    def before_pass(self, native, token: int, pos: int) -> None:
        # the trace shows the importance S came from: this pass folds its own scores in after
        self._traced = native.importance() if self.trace is not None else None
        if not native.fast_select(pos):
            super().before_pass(native, token, pos)
            self._traced = None

    def after_pass(self, native, pos: int) -> None:
        selected = native.pass_selection(want_selected=self.trace is not None)
        if self.trace is not None:
            self.record(pos, selected, native.importance() if self._traced is None else self._traced)


class FastHostBookkeeping(HostBookkeeping):
    """Mode "fast" with numpy and the plain C calls (capture, set_bias, scores): select from the
    importance over 0..pos-1, bias the pass, fold its scores after it. The first step with nothing
    scored before it probes, as the spec's step does."""

    def before_pass(self, native, token: int, pos: int) -> None:
        if not self.scores.values.any():  # only a reset's zeros: nothing has scored yet
            native.probe(token, pos)
            self.observe(native)
        selected = select_positions(self.scores.values, self.config.top_p, self.config.top_k)
        native.set_capture(True)
        native.set_bias(bias_vector(selected, pos, self.config.strength, self.template))
        self.record(pos, selected, self.scores.values)

    def after_pass(self, native, pos: int) -> None:
        if self.scores.values.size == pos:  # not yet folded: this pass scored 0..pos
            self.observe(native)


def default_bookkeeping(config: DyscoConfig, in_graph: bool = True) -> type[_Bookkeeping]:
    """Dynamic DySCO in the decode graphs where the KV cache allows it (`in_graph`), else on the
    host; static DySCO on the host."""
    if config.mode == FAST:
        return FastBookkeeping if in_graph else FastHostBookkeeping
    return InPassBookkeeping if config.dynamic and in_graph else HostBookkeeping
