"""One table from two bench_api.py outputs, one GPU and two (run.sh split-speed): decode tok/s per
context and mode, two GPUs over one, and DySCO over plain in each setting.

    python bench/device/split_table.py one-gpu.md two-gpus.md
"""
from __future__ import annotations

import sys

MODES = ("plain", "fast", "exact")


def rows(path: str) -> dict[tuple[str, str], float]:
    """(context, mode) -> decode tok/s, from bench_api's decode table (context, prompt tokens, then
    plain, fast and exact tok/s)."""
    out = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0].isdigit():
            out.update({(cells[0], mode): float(cells[2 + i]) for i, mode in enumerate(MODES)})
    return out


def main() -> None:
    one, two = rows(sys.argv[1]), rows(sys.argv[2])
    print("| context | mode | 1 GPU decode tok/s | 2 GPUs decode tok/s | 2 GPUs / 1 GPU "
          "| DySCO / plain, 1 GPU | DySCO / plain, 2 GPUs |")
    print("|---|---|---|---|---|---|---|")
    for (context, mode), a in one.items():
        if (context, mode) not in two:
            continue
        b = two[(context, mode)]
        vs_plain = ["" if mode == "plain" else f"{t[(context, mode)] / t[(context, 'plain')]:.3f}x" for t in (one, two)]
        print(f"| {context} | {mode} | {a:.1f} | {b:.1f} | {b / a:.3f}x | {vs_plain[0]} | {vs_plain[1]} |")


if __name__ == "__main__":
    main()
