"""The unbiased KV prefix of one sequence (0 unless told) that the next prompt may reuse.

DySCO writes biased cells from its first intervention step on; only cells written
without a bias can serve another prompt. This object knows which tokens those are, and
drops everything past them when a generation ends, however it ends.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import EngineError
from .engine import Engine, ProgressFn


class PrefixCache:
    def __init__(self, engine: Engine, seq_id: int = 0):
        self.engine, self.seq_id = engine, seq_id
        self.tokens: list[int] = []  # tokens whose KV cells were written without bias

    def reusable(self, prompt: Sequence[int], limit: int) -> int:
        """Length of the cached prefix shared with this prompt (at most limit)."""
        n = 0
        for a, b in zip(self.tokens[:limit], prompt[:limit]):
            if a != b:
                break
            n += 1
        return n

    def keep(self, ids: Sequence[int], progress: Optional[ProgressFn] = None) -> None:
        """Make the cache hold exactly `ids`, prefilling only what it lacks."""
        ids = [int(t) for t in ids]
        reuse = self.reusable(ids, len(ids))
        self.engine.truncate(reuse, self.seq_id)
        if len(ids) > reuse:
            self.engine.decode(ids[reuse:], reuse, want_logits=False, seq_id=self.seq_id, progress=progress)
        self.tokens = ids

    def restore(self, ids: Sequence[int], cells: bytes | bytearray) -> None:
        """Make the cache hold `ids` from cells saved earlier (by `cells()`) instead of prefilling."""
        ids = [int(t) for t in ids]
        self.tokens = []  # until the cells are in and checked
        self.engine.load_seq(cells, self.seq_id)
        last = self.engine.seq_pos_max(self.seq_id)
        if last != len(ids) - 1:
            self.engine.truncate(0, self.seq_id)
            raise EngineError(f"the saved cells end at position {last}, not {len(ids) - 1}")
        self.tokens = ids

    def cells(self) -> bytearray:
        """The serialized cells of `tokens` (all unbiased)."""
        return self.engine.save_seq(self.seq_id)

    def claim(self, prompt: Sequence[int], limit: int) -> int:
        """Start a generation: keep the shared prefix (at most limit), return its length."""
        reuse = self.reusable(prompt, limit)
        self.engine.truncate(reuse, self.seq_id)
        self.tokens = []  # until release: cells past reuse are being written
        return reuse

    def release(self, prompt: Sequence[int], clean_end: int) -> None:
        """End a generation: cells past clean_end were biased (or generated): drop them."""
        self.engine.truncate(clean_end, self.seq_id)
        self.tokens = list(prompt[:self.engine.seq_pos_max(self.seq_id) + 1])
