"""Decode speed on the CPU by the thread that calls llama_decode (issue 26's CPU finding).

ggml's CPU backend runs each graph in an OpenMP parallel region. The same generation is timed
(128 tokens after a cached 1024-token prompt, greedy, plain) as this process's main thread runs it,
streamed in the main thread, run in a pool thread while the main thread waits, and in the main
thread again afterwards, on `Model(parallel=P)`. Tok/s of each run, three runs per way.

    python bench/speed/thread_effect.py MODEL.gguf [--parallel 1] [--threads 2]

Run it pinned to the cores it may use (taskset -c 14,15 ...), with OMP_WAIT_POLICY or
GOMP_SPINCOUNT set to compare libgomp's waiting policies.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from dysco_edge import Model

DOC = "In 1801 the Heron left Arden with 12 crew and salt. " * 80


def tok_per_s(model: Model, ids: list[int], stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        pieces = model.generate(token_ids=ids, dysco=None, max_new_tokens=128, stream=True)
        for _ in pieces:
            pass
        generation = pieces.result
    else:
        generation = model.generate(token_ids=ids, dysco=None, max_new_tokens=128)
    return len(generation.token_ids) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with Model(args.model, n_ctx=1792, n_gpu_layers=0, n_threads=args.threads, flash_attn=False,
               parallel=args.parallel) as model:
        ids = model.tokenize(DOC, add_bos=True)[:1024]
        ways = [("main thread", lambda: tok_per_s(model, ids, False)),
                ("main thread, streamed", lambda: tok_per_s(model, ids, True)),
                ("pool thread, streamed", lambda: ThreadPoolExecutor(1).submit(tok_per_s, model, ids, True).result()),
                ("main thread again", lambda: tok_per_s(model, ids, False))]
        for label, way in ways:
            print(f"{label}: {[round(way(), 1) for _ in range(3)]}", flush=True)


if __name__ == "__main__":
    main()
