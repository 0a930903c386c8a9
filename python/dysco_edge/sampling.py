"""Token choice through llama.cpp's sampler chain (greedy, or temperature/top-k/top-p/min-p)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import _llama  # noqa: F401
import llama_cpp


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """A llama.cpp sampler chain; `sample(ctx)` picks from the last decoded logits."""

    def __init__(self, options: SamplingOptions = SamplingOptions()):
        self.options = options
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        for stage in self._stages(options):
            llama_cpp.llama_sampler_chain_add(self._chain, stage)

    @staticmethod
    def _stages(o: SamplingOptions):
        if o.greedy:
            return [llama_cpp.llama_sampler_init_greedy()]
        stages = []
        if o.top_k:
            stages.append(llama_cpp.llama_sampler_init_top_k(o.top_k))
        if o.top_p < 1:
            stages.append(llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        if o.min_p > 0:
            stages.append(llama_cpp.llama_sampler_init_min_p(o.min_p, 1))
        stages.append(llama_cpp.llama_sampler_init_temp(o.temperature))
        seed = o.seed if o.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        stages.append(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return stages

    def sample(self, ctx) -> int:
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, -1))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        self.close()
