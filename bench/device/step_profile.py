"""Where a decode step's time goes, plain against DySCO, on the GPU: each llama.cpp call of the
loop (full pass, probe, score readout, bias, sampler) timed with a synchronize after it; the
rest of the step is Python. Also the step time with no synchronize at all. With the selection in
the pass (the default), "decode" holds the update, selection and bias, and "probe" the probe.
With DYSCO_HOST_TIMELINE=1 each context prints, when freed, the host time between DySCO's hook
points (native/dysco-state.h dysco_timeline), plain passes included.

    python bench/device/step_profile.py MODEL.gguf HEAD_MAP.json [--context 4096] [--gen 48]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from dysco_edge.runtime.bookkeeping import HostBookkeeping, InPassBookkeeping
from dysco_edge.runtime.decode import dysco_tokens, plain_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler
from dysco_edge.heads.maps import load_head_map

import llama_cpp


PARTS = ("decode", "probe", "observe", "select+bias", "pass S", "clear_bias", "sample", "python rest")


class Timers:
    def __init__(self, eng, sampler, sync):
        self.t = defaultdict(float)
        self.on, self.ctx, self.sync = False, eng.ctx, sync
        # (object, attribute, label, host-only): host-only steps are timed without a synchronize
        targets = ((eng, "decode", "decode", False), (eng.native, "probe", "probe", False),
                   (eng.native, "probe_select", "probe", False),
                   (eng.native, "clear_bias", "clear_bias", False), (sampler, "sample", "sample", False),
                   (HostBookkeeping, "observe", "observe", True), (HostBookkeeping, "select", "select+bias", True),
                   (InPassBookkeeping, "after_pass", "pass S", True))
        for obj, attr, label, host in targets:
            original = getattr(obj, attr)
            original = getattr(original, "__wrapped_original__", original)
            setattr(obj, attr, self.wrap(label, original, host))

    def wrap(self, name, fn, host=False):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.on:
                    if self.sync and not host:
                        llama_cpp.llama_synchronize(self.ctx)
                    self.t[name] += time.perf_counter() - t0
        timed.__wrapped_original__ = fn
        return timed


def generation(eng, prompt, gen, config, sampler, bookkeeping=None):
    """The token stream of one generation: plain (config None) or DySCO, never stopping early."""
    never = lambda t: False
    if config is None:
        return plain_tokens(eng, prompt, reuse=0, sampler=sampler, max_new_tokens=gen, is_end=never)
    warm = plan_warmups(len(prompt), config.context_warmup, 4)
    return dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=sampler, max_new_tokens=gen, is_end=never,
                        bookkeeping=bookkeeping)


def run(eng, prompt, gen, config, sync, variant):
    eng.clear()
    sampler = Sampler()
    timers = Timers(eng, sampler, sync)
    it = generation(eng, prompt, gen, config, sampler, **variant)
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


def setup(description, context, gen):
    """MODEL HEAD_MAP [--context] [--gen] from the command line: (args, DySCO config, random prompt)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("model")
    ap.add_argument("head_map")
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--gen", type=int, default=gen)
    args = ap.parse_args()
    config = load_head_map(args.head_map).to_config()
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 30000, size=args.context)]
    return args, config, prompt


def main():
    args, config, prompt = setup(__doc__, 4096, 48)
    print(f"| context {args.context} | sync | ms/step | " + " | ".join(PARTS) + " |")
    print("|---|---|---|" + "---|" * len(PARTS))
    # "numpy": the importance and selection on the host (HostBookkeeping)
    variants = (("plain", None, {}), ("dysco", config, {"bookkeeping": InPassBookkeeping}),
                ("dysco numpy", config, {"bookkeeping": HostBookkeeping}))
    for sync in (False, True):
        for name, cfg, variant in variants:
            eng = Engine(args.model, EngineOptions(n_ctx=args.context + args.gen + 16, n_gpu_layers=99, flash_attn=True))
            if cfg is None:
                eng.native.set_attn_scale(1.0)  # a DySCO state doing nothing: DYSCO_HOST_TIMELINE times plain passes too
            run(eng, prompt[:512], 8, cfg, sync, variant)  # warm up graphs
            ms, parts = run(eng, prompt, args.gen, cfg, sync, variant)
            cells = " | ".join(f"{parts.get(k, 0.0):.3f}" for k in PARTS)
            print(f"| {name} | {sync} | {ms:.3f} | {cells} |", flush=True)
            eng.close()


if __name__ == "__main__":
    main()
