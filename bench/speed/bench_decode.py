"""End-to-end decoding speed: plain llama.cpp decoding against exact and fast DySCO, same
model, context, prompt and greedy sampler, measured in one run (runs alternate; medians).
Reports prefill tok/s, decode tok/s, each mode's ratio to plain (exact's target: 0.9 (CPU) /
0.95 (GPU) x plain/(1+(L_max+1)/L); fast's: 0.93), the share of a DySCO decode step spent on
the host outside llama.cpp calls, and GPU memory where nvidia-smi exists.

    python bench/speed/bench_decode.py --model M.gguf --head-map head_maps/llama-3.1-8b-instruct.json \
        --contexts 4096 16384 --gen 64 [--n-gpu-layers 99 --flash-attn] [--split-mode layer --tensor-split 1,1]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import time

import numpy as np

from dysco_edge.runtime.decode import dysco_tokens, plain_tokens, plan_warmups
from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler, SplitOptions
from dysco_edge.heads.maps import load_head_map
from dysco_edge.models import default_model_path

import llama_cpp

FAST_TARGET = 0.93  # fast DySCO's decode speed over plain (the fast-mode issue)


def gpu_memory_mib() -> float | None:
    """Memory used on every GPU of the machine, summed (nvidia-smi ignores CUDA_VISIBLE_DEVICES)."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return float(sum(float(x) for x in out)) if out else None


class Clock:
    """Prefill ends at the first progress report of the last chunk; decode is the rest."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.prefill_end = None

    def progress(self, done, total):
        if done == total:
            self.prefill_end = time.perf_counter()


class PassTimer:
    """Time spent inside llama.cpp calls (full decodes and probes) once `active`; the rest of a
    decode step is host work outside them (the loop; selection and bias unless the full pass makes
    them, dysco_probe_select)."""

    def __init__(self, eng):
        self.active, self.seconds, self.ctx = False, 0.0, eng.ctx
        self.decode, self.probe, self.probe_select = eng.decode, eng.native.probe, eng.native.probe_select
        eng.decode = self.wrap(self.decode, sync=True)
        eng.native.probe = self.wrap(self.probe, sync=True)
        # no wait: the full pass after it overlaps the probe on a GPU, and waits for it inside its own call
        eng.native.probe_select = self.wrap(self.probe_select, sync=False)

    def wrap(self, fn, sync):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    # a GPU pass returns before it ends: wait, so its time is not counted as host time
                    if sync:
                        llama_cpp.llama_synchronize(self.ctx)
                    self.seconds += time.perf_counter() - t
        return timed

    def remove(self, eng):
        eng.decode, eng.native.probe, eng.native.probe_select = self.decode, self.probe, self.probe_select


def run(eng, prompt, gen, config):
    eng.clear()
    clock, sampler, passes = Clock(), Sampler(), PassTimer(eng)
    never = lambda t: False
    if config is None:
        tokens = plain_tokens(eng, prompt, reuse=0, sampler=sampler, max_new_tokens=gen, is_end=never,
                              progress=clock.progress)
        n_prefill = len(prompt) - 1
    else:
        warm = plan_warmups(len(prompt), config.context_warmup, 4)
        tokens = dysco_tokens(eng, prompt, config, warm, reuse=0, sampler=sampler, max_new_tokens=gen,
                              is_end=never, progress=clock.progress)
        n_prefill = len(prompt) - warm.fed
    first = None
    count = 0
    for _ in tokens:
        count += 1
        if first is None:
            first = time.perf_counter()
            passes.active = True
    end = time.perf_counter()
    passes.remove(eng)
    sampler.close()
    return {"prefill_tps": n_prefill / (clock.prefill_end - clock.t0),
            "decode_tps": (count - 1) / (end - first), "mem": gpu_memory_mib(),
            "host_share": 1.0 - passes.seconds / (end - first)}


def median_runs(runners, repeats: int) -> list[dict]:
    """Each runner `repeats` times, alternating (so drift in machine load hits them alike);
    per runner the median of every numeric result."""
    results = [[] for _ in runners]
    for _ in range(max(1, repeats)):
        for out, runner in zip(results, runners):
            out.append(runner())
    return [{key: (float(np.median([r[key] for r in rs])) if rs[0][key] is not None else None) for key in rs[0]}
            for rs in results]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--head-map", required=True)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 6144])
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="plain and DySCO runs alternate this many times; medians are reported (noisy machines)")
    ap.add_argument("--modes", default="exact,fast", help="DySCO modes to time against plain, comma-separated")
    ap.add_argument("--split-mode", default="layer", help="layer, row or none (several GPUs)")
    ap.add_argument("--tensor-split", default="", help="a share per GPU, e.g. 1,1 (default: by free memory)")
    ap.add_argument("--main-gpu", type=int, default=0)
    args = ap.parse_args()
    split = SplitOptions(args.split_mode, args.main_gpu, args.tensor_split or ())
    model = args.model or str(default_model_path())
    config = load_head_map(args.head_map).to_config()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    configs = [None] + [config.replace(mode=m) for m in modes]
    target = 0.95 if args.n_gpu_layers else 0.9
    print(f"model: {model}; heads: {args.head_map}; n_gpu_layers={args.n_gpu_layers} flash_attn={args.flash_attn}")
    print("| context | mode | prefill tok/s | prefill / plain | decode tok/s | decode / plain | target "
          "| host share of a step | GPU MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.contexts:
        eng = Engine(model, EngineOptions(n_ctx=n + args.gen + 16, n_batch=2048, n_ubatch=512,
                                          n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
                                          n_threads=args.threads, split=split))
        where = eng.where()
        prompt = [int(t) for t in np.random.default_rng(n).integers(1000, 30000, size=n)]
        for cfg in configs:
            run(eng, prompt[:256], 4, cfg)  # warm up every graph kind
        results = median_runs([(lambda cfg=cfg: run(eng, prompt, args.gen, cfg)) for cfg in configs], args.repeats)
        for cfg, r in zip(configs, results):
            print_row(n, cfg, r, results[0], target / (1 + (config.l_max + 1) / eng.n_layer))
        eng.close()
    print(f"\non {where}")


def print_row(n: int, cfg, r: dict, plain: dict, exact_target: float) -> None:
    mode = "plain" if cfg is None else cfg.mode
    goal = {"plain": "", "exact": f"{exact_target:.3f}x", "fast": f"{FAST_TARGET:.2f}x"}[mode]
    print(f"| {n} | {mode} | {r['prefill_tps']:.0f} | {r['prefill_tps'] / plain['prefill_tps']:.3f}x "
          f"| {r['decode_tps']:.1f} | {r['decode_tps'] / plain['decode_tps']:.3f}x | {goal} "
          f"| {'' if cfg is None else format(r['host_share'], '.1%')} | {r['mem']} |", flush=True)


if __name__ == "__main__":
    main()
