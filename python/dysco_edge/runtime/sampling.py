"""How the next token is chosen: greedy, or temperature/top-k/top-p/min-p (run by
llama.cpp's sampler chain, `engine.Sampler`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InputError
from ..limits import int_in, is_int, real_in, shown


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    seed: Optional[int] = None

    def __post_init__(self):
        # llama.cpp's sampler takes float temperature/top_p/min_p, int32 top_k and a uint32 seed
        object.__setattr__(self, "temperature", real_in(self.temperature, "temperature", 0))
        object.__setattr__(self, "top_k", int_in(self.top_k, "top_k", 0))
        object.__setattr__(self, "top_p", real_in(self.top_p, "top_p", 0, 1, lo_open=True))
        object.__setattr__(self, "min_p", real_in(self.min_p, "min_p", 0, 1, hi_open=True))
        if self.seed is not None and not is_int(self.seed):
            raise InputError(f"seed: expected an int or None, got {shown(self.seed)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
