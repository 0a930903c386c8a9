"""Where a decode step's time goes, plain against DySCO, on the GPU: each llama.cpp call of the
loop (full pass, probe, score readout, bias, sampler) timed with a synchronize after it; the
rest of the step is Python. Also the step time with no synchronize at all.

    python bench/cuda/step_profile.py MODEL.gguf HEAD_MAP.json [--context 4096] [--gen 48]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from dysco_edge.decode import dysco_tokens, plain_tokens, plan_warmups
from dysco_edge.engine import Engine, EngineOptions
from dysco_edge.head_maps import load_head_map
from dysco_edge.sampling import Sampler

import llama_cpp


class Timers:
    def __init__(self, eng, sampler, sync):
        self.t = defaultdict(float)
        self.on, self.ctx, self.sync = False, eng.ctx, sync
        for obj, name in ((eng, "decode"), (eng.native, "probe"), (eng.native, "scores"),
                          (eng.native, "set_bias"), (eng.native, "clear_bias"), (sampler, "sample")):
            setattr(obj, name, self.wrap(name, getattr(obj, name)))

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.on:
                    if self.sync:
                        llama_cpp.llama_synchronize(self.ctx)
                    self.t[name] += time.perf_counter() - t0
        return timed


def run(eng, prompt, gen, config, sync):
    eng.clear()
    sampler = Sampler()
    timers = Timers(eng, sampler, sync)
    never = lambda t: False
    if config is None:
        it = plain_tokens(eng, prompt, reuse=0, sampler=sampler, max_new_tokens=gen, is_end=never)
    else:
        warm = plan_warmups(len(prompt), config.context_warmup, 4)
        it = dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=sampler, max_new_tokens=gen, is_end=never)
    count, first = 0, None
    for _ in it:
        count += 1
        if first is None:
            first, timers.on = time.perf_counter(), True
    total = time.perf_counter() - first
    steps = count - 1
    parts = {k: 1e3 * v / steps for k, v in timers.t.items()}
    parts["python rest"] = 1e3 * total / steps - sum(parts.values())
    return 1e3 * total / steps, parts


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("head_map")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=48)
    args = ap.parse_args()
    config = load_head_map(args.head_map).to_config()
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 30000, size=args.context)]
    print(f"| context {args.context} | sync | ms/step | " + " | ".join(
        ["decode", "probe", "scores", "set_bias", "clear_bias", "sample", "python rest"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sync in (False, True):
        for name, cfg in (("plain", None), ("dysco", config)):
            eng = Engine(args.model, EngineOptions(n_ctx=args.context + args.gen + 16, n_gpu_layers=99, flash_attn=True))
            run(eng, prompt[:512], 8, cfg, sync)  # warm up graphs
            ms, parts = run(eng, prompt, args.gen, cfg, sync)
            cells = " | ".join(f"{parts.get(k, 0.0):.3f}" for k in
                               ("decode", "probe", "scores", "set_bias", "clear_bias", "sample", "python rest"))
            print(f"| {name} | {sync} | {ms:.3f} | {cells} |", flush=True)
            eng.close()


if __name__ == "__main__":
    main()
