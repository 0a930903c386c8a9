"""DySCO on a GPU backend (Vulkan: lavapipe here, NVIDIA's driver on the H200) against the CPU backend
of the same library, on a real model with its shipped head map.

Each side runs in a child process of its own: the CPU side with GGML_VK_VISIBLE_DEVICES="" (no Vulkan
device, so no op is offloaded, not even a prefill's), the GPU side with every layer offloaded. Per
flash-attention setting and K-cache type, a Markdown row: probe and capture scores max abs diff, biased
logits relative diff, then plain, exact and fast decoding (greedy, TOKENS new tokens after a random
PROMPT-token prompt): tokens equal (and the first that differs), mean and min Jaccard of S per step.
Exits 1 when a decoding's tokens differ or its min Jaccard is below --min-jaccard.

    python bench/device/check_vulkan.py --model smollm2-135m --flash-attn off on --type-k f16 q8_0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MODES = ("plain", "exact", "fast")
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "f32": 0}  # ggml type ids (llama_cpp.GGML_TYPE_*)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="catalog name or GGUF path")
    ap.add_argument("--head-map", default=None, help="head map JSON (default: the one found for the model)")
    ap.add_argument("--flash-attn", nargs="+", default=["off", "on"], choices=("off", "on"))
    ap.add_argument("--type-k", nargs="+", default=["f16"], choices=sorted(KV_TYPES))
    ap.add_argument("--prompt", type=int, default=600, help="prompt tokens (random ids)")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per decoding")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="decodings compared")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--min-jaccard", type=float, default=0.9, help="least Jaccard of S accepted at any step")
    ap.add_argument("--json", type=Path, default=None, help="also write every row's numbers here")
    ap.add_argument("--side", choices=("cpu", "gpu"), help=argparse.SUPPRESS)  # a child's side
    ap.add_argument("--fa", choices=("off", "on"), help=argparse.SUPPRESS)
    ap.add_argument("--kv", choices=sorted(KV_TYPES), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One side's outputs, as JSON in args.out."""
    from dysco_edge.heads.maps import ModelShape, load_head_map
    from dysco_edge.heads.lookup import locate_head_map
    from dysco_edge.models import resolve
    from dysco_edge.runtime.decode import dysco_tokens, plan_warmups
    from dysco_edge.runtime.engine import Engine, EngineOptions, Sampler

    path = resolve(args.model)
    opts = EngineOptions(n_ctx=args.n_ctx, n_gpu_layers=99 if args.side == "gpu" else 0, flash_attn=args.fa == "on",
                         type_k=KV_TYPES[args.kv])
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(100, 20000, size=args.prompt)]
    bias = np.zeros(len(ids), dtype=np.float32)
    bias[rng.choice(len(ids), len(ids) // 5, replace=False)] = np.log(2.0)
    out = {}
    with Engine(path, opts) as eng:
        found = locate_head_map(ModelShape.from_gguf_metadata(eng.metadata), path,
                                user_map=load_head_map(args.head_map) if args.head_map else None)
        if found is None:
            raise SystemExit(f"no head map for {path}: give --head-map")
        config = found.head_map.to_config()
        out.update(probe_and_bias(eng, ids, list(config.qr_heads), bias))
        for mode in args.modes:
            eng.clear()
            trace = []
            if mode == "plain":
                tokens = plain_tokens(eng, ids, args.tokens, Sampler())
            else:
                tokens = list(dysco_tokens(eng, ids, config.replace(mode=mode), plan_warmups(len(ids), 8, 4), reuse=0,
                                           sampler=Sampler(), max_new_tokens=args.tokens, is_end=lambda t: False,
                                           trace=trace))
                eng.native.set_capture(False)
            out[mode] = {"tokens": tokens, "selected": [s.selected.tolist() for s in trace]}
    args.out.write_text(json.dumps(out))


def probe_and_bias(eng, ids, heads, bias) -> dict:
    """Probe scores of the last prompt token, then the capture scores and logits of its biased pass."""
    from check_cuda import probe_and_bias_on  # beside this script: the same step CUDA's check runs
    probe, capture, logits, no_trace = probe_and_bias_on(eng, ids, heads, bias)
    return {"probe": probe.tolist(), "capture": capture.tolist(), "logits": logits.tolist(), "no_trace": no_trace}


def plain_tokens(eng, ids, n_new, sampler) -> list[int]:
    eng.decode(ids, 0)
    tokens = []
    for pos in range(len(ids), len(ids) + n_new):
        tokens.append(sampler.sample(eng))
        eng.decode(tokens[-1:], pos)
    return tokens


def run_side(args: argparse.Namespace, side: str, fa: str, kv: str, tmp: Path) -> dict:
    out = tmp / f"{side}-{fa}-{kv}.json"
    env = dict(os.environ)
    if side == "cpu":
        env["GGML_VK_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, __file__, "--model", args.model, "--prompt", str(args.prompt), "--tokens", str(args.tokens),
           "--n-ctx", str(args.n_ctx), *(["--head-map", args.head_map] if args.head_map else []), "--modes", *args.modes, "--side", side, "--fa", fa, "--kv", kv, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def decoding_cells(want: dict, got: dict) -> dict:
    """Tokens equal, the first differing token, mean and min Jaccard of S while both fed the same tokens."""
    a, b = want["tokens"], got["tokens"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    steps = len(want["selected"]) if first is None else min(first + 1, len(want["selected"]))
    jac = [len(set(x) & set(y)) / max(1, len(set(x) | set(y)))
           for x, y in zip(want["selected"][:steps], got["selected"][:steps])]
    return {"equal": a == b, "first_diff": first, "jaccard_mean": float(np.mean(jac)) if jac else None,
            "jaccard_min": float(np.min(jac)) if jac else None}


def compare(want: dict, got: dict) -> dict:
    logits_w, logits_g = np.array(want["logits"]), np.array(got["logits"])
    row = {"probe_diff": float(np.max(np.abs(np.array(got["probe"]) - want["probe"]))),
           "capture_diff": float(np.max(np.abs(np.array(got["capture"]) - want["capture"]))),
           "logits_rel": float(np.max(np.abs(logits_g - logits_w)) / np.max(np.abs(logits_w))),
           "no_trace": got["no_trace"]}
    for mode in MODES:
        if mode in want:
            row[mode] = decoding_cells(want[mode], got[mode])
    return row


def row_ok(row: dict, min_jaccard: float) -> bool:
    return row["no_trace"] and all(row[m]["equal"] and (row[m]["jaccard_min"] is None or row[m]["jaccard_min"] >= min_jaccard)
                                   for m in MODES if m in row)


def markdown_row(fa: str, kv: str, row: dict) -> str:
    def dec(c):
        tokens = "equal" if c["equal"] else f"differ at {c['first_diff']}"
        return tokens if c["jaccard_mean"] is None else f"{tokens}, J {c['jaccard_mean']:.3f} / {c['jaccard_min']:.3f}"
    return (f"| {fa} | {kv} | {row['probe_diff']:.2e} | {row['capture_diff']:.2e} | {row['logits_rel']:.2e} "
            f"| {row['no_trace']} | " + " | ".join(dec(row[m]) if m in row else "-" for m in MODES) + " |")


def main() -> int:
    args = parse_args()
    if args.side:
        child(args)
        return 0
    print("| FA | K cache | probe scores max abs diff | capture scores max abs diff | biased logits rel diff "
          "| probe leaves no trace | plain | exact (J mean / min) | fast (J mean / min) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for kv in args.type_k:
            for fa in args.flash_attn:
                row = compare(run_side(args, "cpu", fa, kv, Path(tmp)), run_side(args, "gpu", fa, kv, Path(tmp)))
                print(markdown_row(fa, kv, row), flush=True)
                rows.append({"flash_attn": fa, "type_k": kv, **row})
                ok &= row_ok(row, args.min_jaccard)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
