"""Stability and layer-cap trade-off of detected QR heads, from head maps holding every
head's QRScore (`dysco-edge heads detect ... -o MAP.json`, run with two seeds).

For each cap K (QR heads only in layers 0..K): the top 16 of the first map, their
QRScore mass (sum of their scores) relative to the uncapped top 16, the probe cost
(L_max+1)/L, and the overlap of the two seeds' top 16 under that cap.

    python bench/research/head_caps.py SEED0.json SEED1.json [--caps 9 14 19 24]
"""
from __future__ import annotations

import argparse

import numpy as np
from dysco_edge.heads.maps import HeadMap, load_head_map
from dysco_edge.heads.qrscore import top_heads


def scores_of(head_map: HeadMap) -> np.ndarray:
    if head_map.qr_scores is None:
        raise SystemExit(f"{head_map.name}: the map holds no qr_scores (make it with dysco-edge heads detect)")
    return np.array(head_map.qr_scores)


def cap_row(first: np.ndarray, second: np.ndarray, cap: int | None, k: int = 16) -> dict:
    n_layer = first.shape[0]
    heads, other = top_heads(first, k, max_layer=cap), top_heads(second, k, max_layer=cap)
    best = sum(first[h] for h in top_heads(first, k))
    l_max = max(layer for layer, _ in heads)
    return {"cap": "none" if cap is None else f"0-{cap}", "L_max": l_max, "probe": (l_max + 1) / n_layer,
            "mass": sum(first[h] for h in heads) / best, "overlap": len(set(heads) & set(other))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", help="head map with qr_scores (seed A)")
    ap.add_argument("second", help="head map with qr_scores (seed B)")
    ap.add_argument("--caps", type=int, nargs="*", default=None, help="largest allowed layers (default: a spread)")
    args = ap.parse_args()
    first, second = (load_head_map(p) for p in (args.first, args.second))
    a, b = scores_of(first), scores_of(second)
    n_layer = a.shape[0]
    caps = args.caps if args.caps is not None else sorted({round(n_layer * f) - 1 for f in (0.4, 0.5, 0.6, 0.7, 0.8)})
    print(f"{first.name}: {n_layer} layers x {a.shape[1]} heads; seeds {first.detection.get('seed')} and "
          f"{second.detection.get('seed')}, {first.detection.get('examples')} examples each\n")
    print("| layer cap | L_max | probe cost (L_max+1)/L | QRScore mass of top 16 (vs uncapped) | top-16 overlap of the two seeds |")
    print("|---|---|---|---|---|")
    for cap in [None, *sorted(caps, reverse=True)]:
        r = cap_row(a, b, cap)
        print(f"| {r['cap']} | {r['L_max']} | {r['probe']:.2f} | {r['mass']:.3f} | {r['overlap']}/16 |")
    print(f"\ntop 16, seed {first.detection.get('seed')}: " + " ".join(f"{l}-{h}" for l, h in top_heads(a, 16)))
    print(f"top 16, seed {second.detection.get('seed')}: " + " ".join(f"{l}-{h}" for l, h in top_heads(b, 16)))


if __name__ == "__main__":
    main()
