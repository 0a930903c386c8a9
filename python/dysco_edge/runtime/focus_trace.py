"""A DySCO trace that also keeps where the answer looked: the importance over the prompt,
summed over the steps that produce the answer's tokens (documents/focus.py turns it into
passages of the document).

It is the list of StepTrace the bookkeeping appends to, so every reader of a trace reads
it as before; the sum costs one vector addition per step.
"""
from __future__ import annotations

import numpy as np


class FocusTrace(list):
    """StepTrace per intervention step, and `importance`: the importance of each prompt position
    summed over the steps that produce an answer token (the last prompt token's and after)."""

    def __init__(self, n_prompt: int):
        super().__init__()
        self.n_prompt = n_prompt
        self.importance = np.zeros(n_prompt, dtype=np.float64)
        self.steps = 0

    def observe(self, pos: int, importance: np.ndarray) -> None:
        """Fold in the importance DySCO selected from at the step that fed position `pos`."""
        if pos < self.n_prompt - 1:  # a teacher-forced prompt token: not the answer's
            return
        n = min(self.n_prompt, importance.size)
        self.importance[:n] += importance[:n]
        self.steps += 1

    def mean_importance(self) -> np.ndarray:
        """The importance per prompt position averaged over the answer's steps (zeros before any)."""
        return self.importance / max(self.steps, 1)
