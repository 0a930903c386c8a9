"""Where a decode step's time goes on the CPU: plain, fast and exact DySCO steps of the runtime's own
loop (runtime/decode.py, as Model.generate drives it) at the same positions after one prefill, the
modes taking turns in blocks; per mode the median time of a step, its difference to plain, and how
many of its llama.cpp graphs were reused rather than rebuilt (llama_perf_context's n_reused). Times
are this process's CPU time (a shared machine's load does not enter; with one thread that is the
step's compute).

    python bench/speed/step_cost.py --context 4096 [--threads 1] [--flash-attn] [--steps 32] [--blocks 3]
        [--modes plain,fast,exact] [--profile]     # --profile: cProfile of the Python side, per mode

Mode `plain+scores` is the plain loop with the QR heads' score capture left on: what the retired
bench_decode.py timed as plain after a fast run (dysco_fast_select turns capture on; only
Model.generate turns it off again).

DYSCO_HOST_TIMELINE=1 prints the native hook points' host times when the context is freed. The native
side by symbol, one mode at a time, the prefill left out (perf's control FIFO, enabled after it):
    mkfifo /tmp/ctl; PERF_CTL_FIFO=/tmp/ctl perf record -g --control fifo:/tmp/ctl -D -1 -o fast.data \
        python bench/speed/step_cost.py --modes fast; perf report -i fast.data --no-children --sort dso,symbol
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import numpy as np

from dysco_edge.heads.maps import load_head_map
from dysco_edge.models import resolve
from dysco_edge.runtime.decode import dysco_tokens, plain_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

import llama_cpp  # after dysco_edge, which points it at the package's libllama

INTERVENTION_WARMUP = 4  # SmolLM2's chat template appends 4 tokens for the generation prompt
SCORED_PLAIN = "plain+scores"


def step_times(eng: Engine, prompt: list[int], config, steps: int, profiler=None) -> tuple[list[float], int]:
    """Seconds between consecutive tokens of one generation (its first token, which waits for the
    warmups, left out), and the graphs reused meanwhile; the prompt's cells before the fed tokens
    are reused."""
    n = len(prompt)
    sampler, never = Sampler(), (lambda token: False)
    if config == SCORED_PLAIN:
        eng.native.set_capture(True)
        config = None
    if config is None:
        eng.truncate(n - 1)
        tokens = plain_tokens(eng, prompt, reuse=n - 1, sampler=sampler, max_new_tokens=steps + 1, is_end=never)
    else:
        warm = plan_warmups(n, config.context_warmup, INTERVENTION_WARMUP)
        eng.truncate(n - warm.fed)
        tokens = dysco_tokens(eng, prompt, config, warm, reuse=n - warm.fed, sampler=sampler,
                              max_new_tokens=steps + 1, is_end=never)
    stamps = []
    next(tokens)
    reused = llama_cpp.llama_perf_context(eng.ctx).n_reused
    if profiler:
        profiler.enable()
    for _ in tokens:
        stamps.append(time.process_time())
    if profiler:
        profiler.disable()
    sampler.close()
    eng.native.set_capture(False)  # as Model.generate leaves it
    return list(np.diff(stamps)), llama_cpp.llama_perf_context(eng.ctx).n_reused - reused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--head-map", default="head_maps/smollm2-135m-instruct.json")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--modes", default="plain,fast,exact")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    path = resolve(args.model) if args.model else resolve("smollm2-135m")
    base = load_head_map(args.head_map).to_config()
    configs = {m: m if m == SCORED_PLAIN else None if m == "plain" else base.replace(mode=m)
               for m in args.modes.split(",")}
    eng = Engine(path, EngineOptions(n_ctx=args.context + args.steps + 64, n_threads=args.threads,
                                     flash_attn=args.flash_attn))
    prompt = [int(t) for t in np.random.default_rng(args.context).integers(1000, 30000, size=args.context)]
    eng.decode(prompt, 0, want_logits=False)
    eng.native.set_heads(base.qr_heads)
    if os.environ.get("PERF_CTL_FIFO"):  # perf record --control: count the decode steps only
        with open(os.environ["PERF_CTL_FIFO"], "w") as ctl:
            ctl.write("enable\n")
    profilers = {m: cProfile.Profile() if args.profile else None for m in configs}
    times, reused = {m: [] for m in configs}, {m: 0 for m in configs}
    for m, cfg in configs.items():
        step_times(eng, prompt, cfg, 4)  # builds its graphs
    for _ in range(args.blocks):
        for m, cfg in configs.items():
            t, r = step_times(eng, prompt, cfg, args.steps, profilers[m])
            times[m] += t
            reused[m] += r
    report(args, eng, times, {m: r / len(times[m]) for m, r in reused.items()}, profilers)
    eng.close()


def report(args, eng: Engine, times: dict, reused: dict, profilers: dict) -> None:
    med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    print(f"{eng.where()}; context {args.context}; {args.steps} steps x {args.blocks} blocks per mode\n")
    print("| mode | step ms (median) | tok/s | ms over plain | / plain | graphs reused per step |")
    print("|---|---|---|---|---|---|")
    for m, ms in med.items():
        over = f"{ms - med['plain']:+.2f} | {med['plain'] / ms:.3f}x" if "plain" in med else "- | -"
        print(f"| {m} | {ms:.2f} | {1e3 / ms:.1f} | {over} | {reused[m]:.2f} |")
    for m, prof in profilers.items():
        if prof:
            print(f"\n### {m}: Python functions by own time (cProfile, all its steps)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
