"""The configurations a small GPU forces, each against the CPU through the public API: tokens of
plain, exact and fast decoding and the selected set of every DySCO step.

    python bench/device/consumer_check.py --model M.gguf [--configs partial no-kv-offload q8_0 q4_0]
        [--doc-tokens 1500] [--gen 24] [--rpc 127.0.0.1:50052]   # RPC: a run without a GPU
    python bench/device/consumer_check.py --model M.gguf --cpu-quantized   # q8_0/q4_0 vs f16, all on the CPU

Configurations: `partial` offloads the layers from the middle of the QR heads' layers on (so QR
layers sit on both sides of the split), `no-kv-offload` every layer with the KV cache in host
memory, `q8_0`/`q4_0` every layer with that K and V cache type and flash attention. Each is
compared with the same options on the CPU (the backend's check: bit-equal arithmetic is not
expected on a GPU, the agreement is reported), and the quantized ones also with F16 KV on the CPU
(the quality oracle: quantized cells change the logits; agreement up to the first differing token
and the Jaccard of the steps before it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speed"))
from bench_api import document  # noqa: E402  (the benchmark's seeded records)

from dysco_edge import Model  # noqa: E402

QUESTION = "Which records mention the harbor? List their numbers."
CONFIGS = ("partial", "no-kv-offload", "q8_0", "q4_0")
QUANTIZED = ("q8_0", "q4_0")


def split_layers(model: Model) -> int:
    """n_gpu_layers whose first offloaded block lies between the QR heads' first and last layers (at
    the median of their layers). llama.cpp's count takes the output head first: one more than blocks."""
    layers = sorted(layer for layer, _ in model.resolve_dysco("auto").qr_heads)
    first = layers[len(layers) // 2]
    if first == layers[0]:
        first = next((x for x in layers if x > layers[0]), layers[0] + 1)
    return model.shape.n_layer - first + 1


def config_options(name: str, n_gpu: int) -> dict:
    if name == "partial":
        return dict(n_gpu_layers=n_gpu)
    if name == "no-kv-offload":
        return dict(n_gpu_layers=-1, kv_offload=False)
    return dict(n_gpu_layers=-1, cache_type_k=name, cache_type_v=name, flash_attn="on")


def decodes(path: str, options: dict, doc_tokens: int, gen: int) -> dict:
    """Tokens of plain, exact and fast decoding, the selected sets of the DySCO steps, and where it ran."""
    with Model(path, n_ctx=doc_tokens + gen + 256, **options) as model:
        prompt = f"{document(model, doc_tokens)}\n\nQuestion: {QUESTION}"
        config = model.resolve_dysco("auto")
        out = {"where": model.where(), "plain": model.generate(prompt, dysco=None, max_new_tokens=gen).token_ids}
        for mode in ("exact", "fast"):
            g = model.generate(prompt, dysco=config.replace(mode=mode), max_new_tokens=gen, trace=True)
            out[mode] = (g.token_ids, [set(step.selected.tolist()) for step in g.trace])
        return out


def agreement(tokens, want) -> str:
    """'equal' or 'first differs at k/n'."""
    k = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), None)
    if k is None and len(tokens) == len(want):
        return "equal"
    return f"differ from {k if k is not None else min(len(tokens), len(want))}/{len(want)}"


def jaccard(sets, want_sets, tokens, want) -> str:
    """Mean and min Jaccard of the selected sets over the steps fed the same tokens (a step's set is
    chosen before its token: up to and including the first differing one)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(want))
    steps = len(sets) - len(tokens) + same + 1  # the prompt's teacher-forced steps come first
    scores = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(sets[:steps], want_sets[:steps])]
    return f"{sum(scores) / len(scores):.4f} / {min(scores):.4f} ({len(scores)} steps)" if scores else "-"


def row(name: str, vs: str, got: dict, want: dict) -> str:
    cells = [name, vs, agreement(got["plain"], want["plain"])]
    for mode in ("exact", "fast"):
        (tokens, sets), (want_tokens, want_sets) = got[mode], want[mode]
        cells += [agreement(tokens, want_tokens), jaccard(sets, want_sets, tokens, want_tokens)]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--head-map", default=None, help="head map JSON (default: the one Model finds)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--doc-tokens", type=int, default=1500)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--rpc", default=None, help="RPC servers' devices instead of GPUs (a run without a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (1 against RPC servers of one thread: CPU flash attention rounds by thread count)")
    ap.add_argument("--cpu-quantized", action="store_true", help="only q8_0/q4_0 against f16, all on the CPU")
    ap.add_argument("--print-split", action="store_true", help="print the partial configuration's n_gpu_layers")
    args = ap.parse_args()
    cpu = dict(n_gpu_layers=0, flash_attn="on", n_threads=args.threads, head_map=args.head_map)
    runs = {}

    def run(key: str, options: dict) -> dict:
        if key not in runs:
            runs[key] = decodes(args.model, options, args.doc_tokens, args.gen)
            print(f"# {key}: {runs[key]['where']}", file=sys.stderr, flush=True)
        return runs[key]

    if args.print_split or not args.cpu_quantized:
        with Model(args.model, n_gpu_layers=0, n_ctx=512, head_map=args.head_map) as probe:
            n_gpu = split_layers(probe)
        if args.print_split:
            print(n_gpu)
            return
    print(f"model: {Path(args.model).name}; document {args.doc_tokens} tokens, {args.gen} generated, greedy\n")
    print("| configuration | against | plain tokens | exact tokens | exact Jaccard mean / min | fast tokens "
          "| fast Jaccard mean / min |")
    print("|---|---|---|---|---|---|---|")
    if args.cpu_quantized:
        for name in QUANTIZED:
            got = run(f"cpu {name}", dict(cpu, cache_type_k=name, cache_type_v=name))
            print(row(f"{name} KV (CPU)", "f16 KV (CPU)", got, run("cpu f16", cpu)), flush=True)
    else:
        config_rows(args, run, cpu, n_gpu)


def config_rows(args, run, cpu: dict, n_gpu: int) -> None:
    """Each configuration against the same options on the CPU (and, quantized, against f16 there)."""
    device = dict({"rpc": args.rpc} if args.rpc else {}, n_threads=args.threads, head_map=args.head_map)
    for name in args.configs:
        options = dict(config_options(name, n_gpu), **device)
        got = run(name, options)
        types = {k: v for k, v in options.items() if k.startswith("cache_type")}
        want = run(f"cpu {types.get('cache_type_k', 'f16')}", dict(cpu, **types))
        print(row(f"{name} ({got['where']})", "the same on the CPU", got, want), flush=True)
        if name in QUANTIZED:
            print(row(f"{name}", "f16 KV on the CPU", got, run("cpu f16", cpu)), flush=True)


if __name__ == "__main__":
    main()
