"""DySCO with the layers split over two GPUs against the same model on one GPU (check_cuda.py's
comparisons, here 1 GPU is the reference): probe and capture scores, biased logits, and whole
DySCO decodes in exact and fast mode (token agreement, Jaccard of every step's selected set).
QR heads sit in the first, a middle and the last layers, so both GPUs hold some. Run with
DYSCO_SCHED_REPORT=1 to list the backend of every DySCO node (expect CUDA0 and CUDA1 only).

    python bench/device/split_check.py MODEL.gguf [--tensor-split 1,1]
    python bench/device/split_check.py MODEL.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053   # dry run, no GPU
"""
from __future__ import annotations

import argparse
import sys

from check_cuda import check_inputs, options, pass_diffs, run_agreement

from dysco_edge.runtime.engine import Engine, SplitOptions


def settings(args, fa: bool):
    """(one device: split mode none on device 0, two: layers split by the shares); with --rpc the
    devices are RPC servers' (a run of the script's own logic on a machine without GPUs)."""
    return (options(True, fa, split=SplitOptions(mode="none", main_gpu=0, rpc=args.rpc or ())),
            options(True, fa, split=SplitOptions(mode="layer", tensor_split=args.tensor_split, rpc=args.rpc or ())))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--tensor-split", default="1,1")
    ap.add_argument("--rpc", help="host:port,host:port: RPC servers' devices instead of GPUs")
    args = ap.parse_args()
    print(f"model: {args.model}")
    for label, opts in zip(("1 GPU", "2 GPUs"), settings(args, True)):
        with Engine(args.model, opts) as eng:
            print(f"{label}: {eng.where()}", flush=True)
            n_layer = eng.n_layer
    ids, heads, bias, config = check_inputs(n_layer)
    print(f"QR heads (layer, head): {heads}\n")
    print("| 2 GPUs vs 1 | probe scores max abs diff | capture scores max abs diff | biased logits rel diff "
          "| probe leaves no trace | exact: tokens equal | mean Jaccard | min Jaccard "
          "| fast: tokens equal | mean Jaccard | min Jaccard |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for fa in (True, False):
        one, two = settings(args, fa)
        cells = [pass_diffs(args.model, one, two, ids, heads, bias)]
        cells += [run_agreement(args.model, one, two, ids, config.replace(mode=m)) for m in ("exact", "fast")]
        print(f"| FA {'on' if fa else 'off'} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
