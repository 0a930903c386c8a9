"""Where fast DySCO's CPU step time goes: plain steps against steps that add, one at a time, the
QR-head scores (capture), the in-graph fold of the importance, and the in-graph selection + bias.

    python bench/speed/fast_parts.py --ctx 4096 --steps 48 --flash off
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from dysco_edge import Model


def steps_ms(eng, tokens, start, before_step) -> float:
    """Median ms of one-token decodes at start.. (each followed by a truncate back)."""
    times = []
    for i, tok in enumerate(tokens):
        before_step(start)
        t = time.perf_counter()
        eng.decode([tok], start, want_logits=True)
        times.append((time.perf_counter() - t) * 1e3)
        eng.native.clear_bias()
        eng.truncate(start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--flash", default="off")
    args = ap.parse_args()
    with Model(n_ctx=args.ctx + 256, flash_attn=args.flash) as model:
        eng, cfg = model.engine, model.resolve_dysco("auto")
        rng = np.random.default_rng(0)
        n = args.ctx - 1
        eng.decode([int(t) for t in rng.integers(100, 20000, size=n)], 0, want_logits=False)
        tokens = [int(t) for t in rng.integers(100, 20000, size=args.steps)]
        native = eng.native
        native.set_heads(cfg.qr_heads)
        none = steps_ms(eng, tokens, n, lambda p: None)
        native.set_capture(True)
        scores = steps_ms(eng, tokens, n, lambda p: None)
        native.importance_reset(n, cfg.decay, cfg.top_p, cfg.top_k, cfg.strength, np.zeros(0, bool))
        fold = steps_ms(eng, tokens, n, lambda p: None)
        flat = np.full(n, 1.0 / n)
        # the fold advanced the importance past n: set it back before each (untimed)
        select = steps_ms(eng, tokens, n, lambda p: (native.set_importance(flat), native.fast_select(p)))
        native.set_capture(False)
    print(f"| {args.ctx} | {args.flash} | {none:.2f} | {scores:.2f} | {fold:.2f} | {select:.2f} |")


if __name__ == "__main__":
    main()
