"""How the next token is chosen: greedy, or temperature/top-k/top-p/min-p (run by
llama.cpp's sampler chain, `engine.Sampler`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InputError


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise InputError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
