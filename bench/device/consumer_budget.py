"""What `gpu_memory` chooses for each model, context and budget, whether it fit (the device memory
the process took, from nvidia-smi, against the budget), and the decode speed of what it chose
(plain / fast / exact through Model.generate, bench_api.py's measurement).

    python bench/device/consumer_budget.py --models A.gguf B.gguf=heads.json --contexts 8192 32768 --budgets 8G 12G 24G \
        [--doc-tokens 1024] [--gen 16] [--repeats 2] [--rpc HOST:PORT]   # RPC: a run without a GPU

Decode is timed after a document of --doc-tokens tokens (at most half the context) inside a context
of the given size (the context decides what fits; a full one would take minutes to prefill on the
layers left on the CPU).
Choices that come out the same for several budgets are measured once.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))
from bench_api import ApiRun, alternate, document, messages  # noqa: E402

from dysco_edge import Model  # noqa: E402
from dysco_edge.documents.kv_cache import parse_size  # noqa: E402
from dysco_edge.placement import MemoryOptions, fit_model  # noqa: E402

MODES = ("plain", "fast", "exact")


def device_used_mib() -> float | None:
    """Memory in use on the first GPU (MiB), or None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None


def speeds(model: Model, doc_tokens: int, gen: int, repeats: int) -> dict[str, float]:
    # the document, its chat template and the answer within the context
    msgs = messages(document(model, min(doc_tokens, model.n_ctx // 2)))
    config = model.resolve_dysco("auto")
    dysco = {"plain": None, "fast": config.replace(mode="fast"), "exact": config.replace(mode="exact")}
    runs = {mode: ApiRun(model, msgs, dysco[mode], gen, False) for mode in MODES}
    for run in runs.values():
        run.warm()
    return {mode: r["decode"] for mode, r in alternate(runs, repeats).items()}


def measure(path: str, n_ctx: int, budget: str, args, baseline: float | None) -> dict:
    path, _, heads = path.partition("=")  # MODEL or MODEL=HEAD_MAP
    device = {"rpc": args.rpc} if args.rpc else {}
    with Model(path, n_ctx=n_ctx, gpu_memory=budget, head_map=heads or None, **device) as model:
        chosen = model.placement.chosen if model.placement else None
        out = {"chosen": chosen, "describe": model.placement.describe() if model.placement else model.where(),
               "speed": speeds(model, args.doc_tokens, args.gen, args.repeats)}
        used = device_used_mib()
        out["used"] = used - baseline if used is not None and baseline is not None else None
        return out


def label(path: str) -> str:
    name = Path(path.partition("=")[0]).stem
    return f"{name} (random weights)" if name in ("qwen3-8b", "llama-3.1-8b", "llama-3.1-70b") else name


def row(path: str, n_ctx: int, budget: str, r: dict) -> str:
    c = r["chosen"]
    if c is None:
        layers, kv, need = "0 (no device)", "-", "-"
    else:
        layers, need = c.layers_text(), f"{c.total / 2**30:.2f}"
        kv = "device" if c.kv_on_device else "host"
    used = "-" if r["used"] is None else f"{r['used'] / 1024:.2f}"
    fits = "-" if r["used"] is None else ("yes" if r["used"] * 2**20 <= parse_size(budget) else "NO")
    s = r["speed"]
    return (f"| {label(path)} | {n_ctx} | {budget} | {layers} | {kv} | {need} | {used} | {fits} "
            f"| {s['plain']:.1f} | {s['fast']:.1f} | {s['exact']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="GGUF paths, each optionally =HEAD_MAP.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--budgets", nargs="+", default=["8G", "12G", "24G"])
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rpc", default=None, help="RPC servers' devices instead of GPUs (a run without a GPU)")
    args = ap.parse_args()
    baseline = device_used_mib()
    print(f"`python bench/device/consumer_budget.py {' '.join(sys.argv[1:])}`; decode after a {args.doc_tokens}-token "
          f"document, {args.gen} tokens, medians of {args.repeats}; device memory: nvidia-smi's used on GPU 0 "
          f"minus {baseline if baseline is not None else '-'} MiB before\n")
    print("| model | n_ctx | budget | offloaded | KV cache | estimated GiB | device GiB used | fits | plain tok/s "
          "| fast tok/s | exact tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    done = {}
    for path in args.models:
        for n_ctx in args.contexts:
            for budget in args.budgets:
                # the choice is known before loading: a budget that chooses the same as another reuses it
                chosen = fit_model(path.partition("=")[0], n_ctx, MemoryOptions(gpu_memory=budget), flash_attn=True).chosen
                key = (path, n_ctx, chosen.n_gpu_layers, chosen.kv_on_device)
                if key not in done:
                    done[key] = measure(path, n_ctx, budget, args, baseline)
                    print(f"# {done[key]['describe']}", file=sys.stderr, flush=True)
                print(row(path, n_ctx, budget, done[key]), flush=True)

if __name__ == "__main__":
    main()
