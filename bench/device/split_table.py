"""One table from two bench_decode.py outputs, one GPU and two (run.sh split-speed): decode tok/s per
context and mode, two GPUs over one, and DySCO over plain in each setting.

    python bench/device/split_table.py one-gpu.md two-gpus.md
"""
from __future__ import annotations

import sys


def rows(path: str) -> dict[tuple[str, str], dict[str, str]]:
    """(context, mode) -> decode tok/s, its ratio to plain and GPU MiB, from bench_decode's table."""
    out = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].isdigit():
            out[(cells[0], cells[1])] = {"tps": cells[4], "ratio": cells[5], "mib": cells[8]}
    return out


def main() -> None:
    one, two = rows(sys.argv[1]), rows(sys.argv[2])
    print("| context | mode | 1 GPU decode tok/s | 2 GPUs decode tok/s | 2 GPUs / 1 GPU "
          "| DySCO / plain, 1 GPU | DySCO / plain, 2 GPUs | GPU MiB (1 / 2) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in one:
        if key not in two:
            continue
        a, b = one[key], two[key]
        speedup = float(b["tps"]) / float(a["tps"])
        dysco = key[1] != "plain"
        print(f"| {key[0]} | {key[1]} | {a['tps']} | {b['tps']} | {speedup:.3f}x | {a['ratio'] if dysco else ''} "
              f"| {b['ratio'] if dysco else ''} | {a['mib']} / {b['mib']} |")


if __name__ == "__main__":
    main()
