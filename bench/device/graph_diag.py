"""Whether plain and DySCO decode steps replay CUDA graphs: counts ggml-cuda's debug lines
("CUDA Graph id N reused", "warmup complete", "warmup reset") per decode phase, and the
step time of each phase with and without a synchronize.

    python bench/device/graph_diag.py MODEL.gguf HEAD_MAP.json [--context 8192] [--gen 32]
"""
from __future__ import annotations

import ctypes
import time
from collections import Counter

from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp
from step_profile import generation, setup  # beside this script

KEYS = ("reused", "warmup complete", "warmup reset", "disabling")


class GraphLog:
    """A llama/ggml log callback that counts ggml-cuda's CUDA-graph lines while `on`."""

    def __init__(self):
        self.on, self.count = False, Counter()
        self._cb = llama_cpp.llama_log_callback(self._log)  # kept alive: ggml holds the pointer
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def _log(self, level, text, user_data):
        if self.on and text:
            line = text.decode(errors="replace")
            for key in KEYS:
                if key in line:
                    self.count[key] += 1


def run(eng, prompt, gen, config, log):
    eng.clear()
    sampler = Sampler()
    it = generation(eng, prompt, gen, config, sampler)
    log.count.clear()
    count, first = 0, None
    for _ in it:
        count += 1
        if first is None:
            first, log.on = time.perf_counter(), True
    log.on = False
    sampler.close()
    return 1e3 * (time.perf_counter() - first) / (count - 1), count - 1, dict(log.count)


def main():
    args, config, prompt = setup(__doc__, 8192, 32)
    eng = Engine(args.model, EngineOptions(n_ctx=args.context + args.gen + 16, n_gpu_layers=99, flash_attn=True))
    log = GraphLog()
    print(f"| context {args.context} | ms/step | steps | " + " | ".join(KEYS) + " |")
    print("|---|---|---|" + "---|" * len(KEYS))
    for name, cfg in (("plain", None), ("dysco", config), ("plain", None), ("dysco", config)):
        ms, steps, counts = run(eng, prompt, args.gen, cfg, log)
        print(f"| {name} | {ms:.3f} | {steps} | " + " | ".join(str(counts.get(k, 0)) for k in KEYS) + " |", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
