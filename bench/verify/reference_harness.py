"""The model inputs of the authors' reference harness, replayed around our DySCO loop, for the
golden conformance cases (../shared/golden).

The golden outputs come from the authors' DySCO generate on Hugging Face transformers 4.57.
Two things that harness does to the *model's inputs* are not part of DySCO and are not in
DYSCO_SPEC.md, yet they decide its outputs:

1. An attention mask that is 0 at every prompt token equal to the pad id (token 1,
   `<|im_start|>`, in these cases). Those keys are hidden from every query: in prefill, in the
   context warmup, in probes and in full passes, the token's own query included. Generated
   tokens are never hidden.
2. Position ids taken from that mask over the *whole* prompt (cumsum - 1, masked entries set
   to 1), cut from the end to the length of what is fed. The prefill of x[0..n-T-1] gets the
   ids of x[T..n-1], so a prefix token whose counterpart T tokens later is masked sits at
   position 1. Fed token k >= n-T gets (unmasked prompt tokens) + k - (n-T).

Replaying the first intervention step on transformers with both gives every case's selected
set exactly (Jaccard 1.0); with neither, 0.64-0.86 (see the closing note of issue 3).

llama_decode wants each sequence's positions to continue its last one, so a position-1 token
is fed alone in a scratch sequence whose rows attend the whole cache (the native slot
layout), then joined to sequence 0. Scores and bias are addressed by slot, which on a fresh
unified cache fed in order is the token's index: what the loop calls a position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

import llama_cpp

SCRATCH_SEQ = 1


class _NativeByIndex:
    """The engine's native controls with positions read as token indices (slots)."""

    def __init__(self, harness: "ReferenceHarness"):
        self._h = harness
        self._native = harness.engine.native

    def __getattr__(self, name):
        return getattr(self._native, name)

    def probe(self, token: int, index: int, seq_id: int = 0) -> None:
        self._native.probe(token, self._h.position(index), seq_id)
        self._h.last_index = index

    def scores(self) -> np.ndarray:
        # slot-addressed scores cover the whole KV view; the loop wants positions 0..q
        return self._native.scores()[: self._h.last_index + 1]


class ReferenceHarness:
    """Looks like an Engine to decode.dysco_tokens; feeds the model as the reference harness did.

    `engine` needs two sequences on a unified cache (EngineOptions(n_seq_max=2, kv_unified=True)) and an empty
    cache (slots are token indices only on a fresh one). `fed` is the number of prompt tokens the
    loop feeds one at a time (Wc + Wi).
    """

    def __init__(self, engine, prompt: Sequence[int], fed: int, pad_id: int = 1):
        self.engine = engine
        self.ctx = engine.ctx
        self.greedy_token = engine.greedy_token  # what Sampler reads: the same context's logits
        self.n_ctx = engine.n_ctx
        keep = np.array([t != pad_id for t in prompt])
        ids = np.cumsum(keep) - 1
        ids[~keep] = 1
        self.n_prefill = len(prompt) - fed
        self.prefix_pos = ids[fed:]                      # [n_prefill]
        self.displaced = ~keep[fed:]                     # prefix tokens at position 1
        self.n_unmasked = int(keep.sum())
        self.last_index = -1
        if engine.seq_pos_max(0) >= 0 or engine.seq_pos_max(SCRATCH_SEQ) >= 0:
            raise ValueError("ReferenceHarness needs an empty KV cache: call engine.clear() first")
        engine.native.set_slot_layout(np.flatnonzero(~keep), view_seq=SCRATCH_SEQ)
        self.native = _NativeByIndex(self)

    def close(self) -> None:
        self.engine.native.clear_slot_layout()
        self.engine.clear()

    def position(self, index: int) -> int:
        if index < self.n_prefill:
            return int(self.prefix_pos[index])
        return self.n_unmasked + index - self.n_prefill

    def decode(self, tokens: Sequence[int], start: int, *, want_logits: bool = True,
               progress: Optional[object] = None) -> None:
        """Tokens at indices start..; runs of ordinary positions in one call each."""
        end = start + len(tokens)
        run = start
        for index in range(start, end + 1):
            if index < end and not self._displaced(index):
                continue
            if index > run:
                self._feed_run(tokens[run - start:index - start], run, want_logits and index == end)
            if index < end:
                self._feed_displaced(tokens[index - start], want_logits and index == end - 1)
            run = index + 1
        self.last_index = end - 1

    def _displaced(self, index: int) -> bool:
        return index < self.n_prefill and bool(self.displaced[index])

    def _feed_run(self, tokens: Sequence[int], start: int, want_logits: bool) -> None:
        first = self.position(start)
        for k, index in enumerate(range(start, start + len(tokens))):
            assert self.position(index) == first + k, "reference positions of a run must be consecutive"
        self.engine.decode(list(tokens), first, want_logits=want_logits)

    def _feed_displaced(self, token: int, want_logits: bool) -> None:
        mem = self.engine.memory
        self.engine.decode([token], 1, want_logits=want_logits, seq_id=SCRATCH_SEQ)
        llama_cpp.llama_memory_seq_cp(mem, SCRATCH_SEQ, 0, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
