"""One DySCO decode step's parts on the GPU, kernel by kernel, under Nsight Compute.

Prefills CONTEXT random tokens, warms every graph, then runs PART once between
cudaProfilerStart/Stop, so that `ncu --profile-from-start off` times only its kernels:

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python bench/device/kernel_profile.py MODEL.gguf HEAD_MAP.json --part probe
    python bench/device/kernel_profile.py --summarize ncu.csv   # per-kernel totals

PART: probe, plain (a full pass with logits), capture (a full pass recording scores),
biased (a full pass with a DySCO bias). Also prints the part's wall time without ncu
(median of 20) so that the kernel sum can be set against it.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import sys
import time
from collections import defaultdict

import numpy as np


def cudart():
    for name in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise OSError("libcudart not found: set LD_LIBRARY_PATH to the CUDA toolkit's lib64")


def parts(eng, n, tok, bias):
    def capture():
        eng.native.set_capture(True)
        eng.decode([tok], n)
        eng.native.scores()
        eng.native.set_capture(False)

    def biased():
        eng.native.set_bias(bias)
        eng.decode([tok], n)
        eng.native.clear_bias()

    return {"probe": lambda: (eng.native.probe(tok, n), eng.native.scores()),
            "plain": lambda: eng.decode([tok], n), "capture": capture, "biased": biased}


def run(args):
    from dysco_edge.runtime.engine import Engine, EngineOptions  # before llama_cpp: it loads our libllama
    from dysco_edge.heads.maps import load_head_map

    import llama_cpp

    eng = Engine(args.model, EngineOptions(n_ctx=args.context + 64, n_gpu_layers=99, flash_attn=True))
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 30000, size=args.context + 1)]
    n = args.context
    eng.decode(ids[:n], 0, want_logits=False)
    eng.native.set_heads(load_head_map(args.head_map).to_config().qr_heads)
    bias = np.zeros(n + 1, dtype=np.float32)
    bias[rng.choice(n, size=min(n, 4096), replace=False)] = np.log(2.0)
    step = parts(eng, n, ids[n], bias)[args.part]
    times = []
    for _ in range(23):  # the first calls build and capture the graphs
        t0 = time.perf_counter()
        step()
        llama_cpp.llama_synchronize(eng.ctx)
        times.append(time.perf_counter() - t0)
        eng.truncate(n)
    print(f"{args.part}: wall {1e3 * float(np.median(times[3:])):.3f} ms (median of {len(times) - 3})", flush=True)
    rt = cudart()
    rt.cudaProfilerStart()
    step()
    llama_cpp.llama_synchronize(eng.ctx)
    rt.cudaProfilerStop()
    eng.truncate(n)
    eng.close()


# ncu writes gpu__time_duration in a unit of its choosing (the name differs between versions)
UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def summarize(path):
    totals, counts = defaultdict(float), defaultdict(int)
    with open(path, newline="") as f:
        rows = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(rows):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row["Metric Unit"]
        if unit not in UNIT_US:
            sys.exit(f"kernel_profile: unknown time unit {unit!r} in {path}; expected one of {sorted(UNIT_US)}")
        scale = UNIT_US[unit]
        name = row["Kernel Name"].split("(")[0].split("<")[0][:60]
        totals[name] += float(row["Metric Value"].replace(",", "")) * scale
        counts[name] += 1
    print(f"| kernel | launches | total us |\n|---|---|---|")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {counts[name]} | {us:.1f} |")
    print(f"| **all** | {sum(counts.values())} | {sum(totals.values()):.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("head_map", nargs="?")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--part", choices=("probe", "plain", "capture", "biased"), default="probe")
    ap.add_argument("--summarize", metavar="NCU_CSV", help="print per-kernel totals of an ncu --csv log")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    elif not (args.model and args.head_map):
        sys.exit("kernel_profile: MODEL and HEAD_MAP are required unless --summarize is given")
    else:
        run(args)


if __name__ == "__main__":
    main()
