"""Prefill tokens/s with and without DySCO, alternating on one context, with a whole generation
of the same kind between measurements (so the DySCO state and graphs are live, as in use).

DySCO prefills the prompt less its last Wc + Wi tokens (they are fed one by one afterwards); the
plain loop prefills all but the last one. Each measurement is one llama_decode call sequence.

    python bench/speed/bench_prefill.py [--model PATH] [--head-map JSON] [--context 1024] [--repeats 4]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dysco_edge.runtime.decode import dysco_tokens, plain_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler
from dysco_edge.heads.maps import load_head_map
from dysco_edge.models import resolve


def generate(eng, prompt, config):
    eng.clear()
    sampler, never = Sampler(), (lambda t: False)
    if config is None:
        tokens = plain_tokens(eng, prompt, reuse=0, sampler=sampler, max_new_tokens=16, is_end=never)
    else:
        warm = plan_warmups(len(prompt), config.context_warmup, 4)
        tokens = dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=sampler, max_new_tokens=16, is_end=never)
    for _ in tokens:
        pass
    sampler.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--head-map", default="head_maps/smollm2-135m-instruct.json")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    config = load_head_map(args.head_map).to_config()
    eng = Engine(args.model or resolve("smollm2-135m"), EngineOptions(n_ctx=args.context + 64, n_batch=2048,
                                                                   n_ubatch=512, n_threads=args.threads))
    prompt = [int(t) for t in np.random.default_rng(args.context).integers(1000, 30000, size=args.context)]
    counts = {"plain": args.context - 1, "dysco": args.context - config.context_warmup - 4}
    rates = {name: [] for name in counts}
    for _ in range(args.repeats):
        for name, cfg in (("plain", None), ("dysco", config)):
            eng.clear()
            t0 = time.perf_counter()
            eng.decode(prompt[:counts[name]], 0, want_logits=False)
            rates[name].append(counts[name] / (time.perf_counter() - t0))
            generate(eng, prompt, cfg)
    plain, dysco = (float(np.median(rates[k])) for k in ("plain", "dysco"))
    print("| context | plain prefill tok/s | DySCO prefill tok/s | DySCO / plain | runs |")
    print("|---|---|---|---|---|")
    print(f"| {args.context} | {plain:.0f} | {dysco:.0f} | {dysco / plain:.3f}x | {args.repeats} each, median |")
    eng.close()


if __name__ == "__main__":
    main()
