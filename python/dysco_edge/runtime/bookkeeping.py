"""Where DySCO's importance and selection live during a generation: strategies handed to
the decode loop (`decode.dysco_tokens`), chosen by the caller.

- `InPassBookkeeping`: the importance stays in the llama context; each probe leaves its
  scores in its graph and the next full pass updates, selects and biases itself right after
  llama.cpp fills its KQ mask (dysco_probe_select), so the pass's host work overlaps the probe.
- `HostBookkeeping`: the importance is a numpy vector (selection.py) and the bias is set
  from the host. Static DySCO needs it (one selection, no probes), and so do loops whose
  scores must be re-indexed first (bench/reference_harness.py).
Both give the same bits (tests/test_native_select.py).
- `FastBookkeeping` (mode "fast", not the spec): no probe. Each biased full pass also scores
  its token with the QR heads; the next pass folds those scores into the importance, selects
  and biases itself, so a step costs one pass plus the host's selection.
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
    """Importance, selection and bias inside the llama context (dynamic DySCO only)."""

    def __init__(self, config: DyscoConfig, template: np.ndarray, n_seen: int, **kw):
        if not config.dynamic:
            raise InputError("in-pass bookkeeping is for dynamic DySCO; static DySCO selects once (HostBookkeeping)")
        super().__init__(config, template, n_seen, **kw)

    def begin(self, native) -> None:
        native.importance_reset(self.n_seen)

    def observe(self, native) -> None:
        """Context warmup: fold the last full pass's scores into the importance."""
        native.importance_update(self.config.decay)

    def before_pass(self, native, token: int, pos: int) -> None:
        """Probe now; the full pass of `token` at `pos` updates, selects and biases itself."""
        cfg = self.config
        native.probe_select(token, pos, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, self.template_u8)

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
    """Mode "fast": the full pass of the previous token scores; this pass folds them in, selects
    from the importance over the positions before it and biases itself. No probe, except for a
    first step that no scored pass precedes (no context warmup)."""

    def before_pass(self, native, token: int, pos: int) -> None:
        cfg = self.config
        if not native.fast_select(pos, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, self.template_u8):
            super().before_pass(native, token, pos)


def default_bookkeeping(config: DyscoConfig) -> type[_Bookkeeping]:
    """Fast mode without probes; exact dynamic DySCO in the pass; static DySCO on the host."""
    if config.mode == FAST:
        return FastBookkeeping
    return InPassBookkeeping if config.dynamic else HostBookkeeping
