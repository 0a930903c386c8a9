"""Issue 26 on a GPU: does a sequence decoded in a batch beside others get what it gets alone?

Two checks, each reported as a table (nothing is asserted: the answer is what the GPU kernels do):
- steps: tests/test_parallel_dysco.py's cases (two sequences sharing every ubatch, fast, exact and
  plain, each against itself alone) with every layer offloaded, flash attention off and on: whether
  each step's selected set S is equal, and how far importance and logits are from alone;
- answers: `Model(parallel=4)` with 4 threads at once against `Model(parallel=1)` one at a time,
  greedy, plain / fast / exact, on documents of DOC tokens: whether each answer's tokens are equal.

    python bench/device/check_parallel.py --smol smol.gguf --qwen qwen.gguf [--doc 2048] [--new 64]
"""
from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_parallel_dysco as steps  # noqa: E402

from dysco_edge import Model  # noqa: E402
from dysco_edge.heads.maps import shipped_head_map_file  # noqa: E402

HEADS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-coder-1.5b-instruct"}


def step_rows(paths: dict, flash: bool) -> list[str]:
    steps.ENGINE = {"n_gpu_layers": 99, "flash_attn": flash}
    rows = []
    for model, mode in steps.CASES:
        cfg = shipped_head_map_file(HEADS[model]).to_config()
        together = steps._together(paths[model], cfg, mode)
        for s in mode:  # the case's sequences (two or three of steps.DOCS)
            alone = steps._alone(paths[model], cfg, steps.DOCS[s], mode[s])
            rows.append(_compare(model, flash, mode, s, together[s], alone))
    return rows


def _compare(model: str, flash: bool, mode: dict, s: int, got: list, want: list) -> str:
    same_s = all(a[0] is None or np.array_equal(a[0], b[0]) for a, b in zip(got, want))
    imp = max((_rel(a[1], b[1]) for a, b in zip(got, want) if a[1] is not None), default=0.0)
    lg = max(float(np.max(np.abs(a[2] - b[2]))) for a, b in zip(got, want))
    top = all(int(np.argmax(a[2])) == int(np.argmax(b[2])) for a, b in zip(got, want))
    pair = "+".join(str(m) for m in mode.values())
    return (f"| {model} | {'on' if flash else 'off'} | {pair} | seq {s} ({mode[s]}) | {same_s} | {imp:.2e} | "
            f"{lg:.2e} | {top} |")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def answer_rows(path: str, doc: int, new: int, flash: bool) -> list[str]:
    prompts = _prompts(path, doc)
    rows = []
    with Model(path, n_ctx=doc + new + 64, n_gpu_layers=99, flash_attn=flash) as one:
        configs = {"plain": None, "fast": one.head_map().to_config(mode="fast"),
                   "exact": one.head_map().to_config(mode="exact")}
        alone = {}
        for mode, cfg in configs.items():
            for i, p in enumerate(prompts):
                one.prefill([])
                alone[mode, i] = one.generate(token_ids=p, dysco=cfg, max_new_tokens=new).token_ids
    with Model(path, n_ctx=doc + new + 64, n_gpu_layers=99, flash_attn=flash, parallel=len(prompts)) as many:
        for mode, cfg in configs.items():
            gate = threading.Barrier(len(prompts))

            def ask(i):
                gate.wait()
                return many.generate(token_ids=prompts[i], dysco=cfg, max_new_tokens=new).token_ids
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(ask, range(len(prompts))))
            equal = [got[i] == alone[mode, i] for i in range(len(prompts))]
            first = [_first_difference(got[i], alone[mode, i]) for i in range(len(prompts))]
            rows.append(f"| {Path(path).name} | {'on' if flash else 'off'} | {mode} | {sum(equal)}/{len(equal)} | "
                        f"{first} |")
    return rows


def _prompts(path: str, doc: int) -> list[list[int]]:
    with Model(path, n_ctx=512, n_gpu_layers=0) as m:
        rng = np.random.default_rng(7)
        words = ["harbour", "ship", "north", "cargo", "salt", "crew", "captain", "storm", "dock", "tide"]
        out = []
        for i in range(4):
            text = " ".join(f"Log {k}: the {rng.choice(words)} met the {rng.choice(words)}." for k in range(doc // 8))
            ids = m.tokenize(text, add_bos=True)[:doc - 16 - 4 * i]  # documents of different lengths
            out.append(ids + m.tokenize("\nSummarise the log:", add_bos=False))
        return out


def _first_difference(a: list[int], b: list[int]):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smol", required=True)
    ap.add_argument("--qwen", required=True)
    ap.add_argument("--doc", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    paths = {"smollm2": args.smol, "qwen": args.qwen}
    print("## Steps: a sequence sharing every ubatch with another vs alone (all layers offloaded)\n")
    print("| model | flash attention | modes | sequence | S equal every step | importance max rel diff | "
          "logits max abs diff | argmax equal every step |\n|---|---|---|---|---|---|---|---|", flush=True)
    for flash in (False, True):
        for row in step_rows(paths, flash):
            print(row, flush=True)
    print(f"\n## Answers: 4 concurrent greedy generations (Model(parallel=4)) vs each alone, {args.doc}-token "
          f"documents, {args.new} tokens\n")
    print("| model | flash attention | mode | equal answers | first differing token per answer |\n|---|---|---|---|---|",
          flush=True)
    for flash in (False, True):
        for path in (args.smol, args.qwen):
            for row in answer_rows(path, args.doc, args.new, flash):
                print(row, flush=True)


if __name__ == "__main__":
    main()
