"""Memory over many short generations in one process: RSS after a warm-up and after N more
generations (DySCO and plain alternating), to show nothing accumulates per generation.

    python bench/speed/bench_memory.py [--n 1000] [--head-map FILE]
"""
from __future__ import annotations

import argparse
import resource

from dysco_edge import Model
from dysco_edge.heads.maps import load_head_map


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--head-map", required=True)
    args = ap.parse_args()
    model = Model(n_ctx=1024)
    config = load_head_map(args.head_map).to_config()
    questions = [f"In one word: what colour is item number {i}?" for i in range(args.n)]
    for q in questions[:50]:
        model.generate(q, dysco=config, max_new_tokens=8, trace=True)
    before = rss_mib()
    for i, q in enumerate(questions):
        model.generate(q, dysco=config if i % 2 == 0 else None, max_new_tokens=8, trace=i % 3 == 0)
    after = rss_mib()
    print("| generations | RSS after warm-up (MiB) | RSS after (MiB) | growth per generation (KiB) |")
    print("|---|---|---|---|")
    print(f"| {args.n} | {before:.1f} | {after:.1f} | {(after - before) * 1024 / args.n:.2f} |")


if __name__ == "__main__":
    main()
