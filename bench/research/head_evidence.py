"""Evidence that detected QR heads retrieve: their attention mass on the gold passage of
held-out retrieval prompts, against 16 random heads and against all heads.

Held out from detection: other seeds (10000+), more passages per prompt (20 against 8),
and raw attention (no null-query calibration). Three query views per prompt:
  question rows      the question's tokens (QRHead's query, here uncalibrated);
  answer rows        the gold answer teacher-forced after the whole prompt: the tokens whose
                     attention DySCO's probe reads while it generates;
  last prompt token  the end of the generation prompt (e.g. "assistant\\n").
Per prompt and head set: the heads' mean attention mass on the gold passage ("gold mass"),
that mass over the mass on all passages ("gold share"), and whether the gold passage gets
more mass than any other ("top-1"). `--far N` adds the prompts whose gold passage starts
more than N tokens before the answer (e.g. N = a sliding window).

    python bench/research/head_evidence.py --model M.gguf [--head-map [LABEL=]MAP.json ...] [--prompts 32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from dysco_edge.heads.calibration import make_examples
from dysco_edge.runtime.chat import ChatTemplate
from dysco_edge.runtime.engine import Engine, EngineOptions
from dysco_edge.heads.lookup import locate_head_map
from dysco_edge.heads.maps import ModelShape, load_head_map
from dysco_edge.models import resolve
from dysco_edge.heads.layout import PromptFormat
from dysco_edge.heads.detect import NativeAttention

VIEWS = ("question rows", "answer rows", "last prompt token")


def capture_views(engine, fmt: PromptFormat, examples, layouts) -> dict[str, list[np.ndarray]]:
    """[L, H, n] attention of each view's rows, per prompt (the prefix is decoded once per prompt)."""
    attention, out = NativeAttention(engine), {view: [] for view in VIEWS}
    for example, layout in zip(examples, layouts):
        prompt = layout.prompt
        out["question rows"].append(attention(layout.prefix, layout.question))
        out["last prompt token"].append(attention(prompt[:-1], prompt[-1:]))
        out["answer rows"].append(attention(prompt, fmt.answer(example)))
    return out


def head_set_metrics(rows, layouts, heads) -> dict[str, float]:
    """Mean over prompts of gold mass, gold share and top-1 for one head set."""
    layers, idx = np.array([h[0] for h in heads]), np.array([h[1] for h in heads])
    mass, share, top1 = [], [], []
    for attn, layout in zip(rows, layouts):
        mean = attn[layers, idx].mean(axis=0)  # over the heads: one row over positions
        per_doc = np.array([mean[a:b].sum() for a, b in layout.spans])
        mass.append(per_doc[layout.gold])
        share.append(per_doc[layout.gold] / per_doc.sum())
        top1.append(float(np.argmax(per_doc) == layout.gold))
    return {"gold mass": float(np.mean(mass)), "gold share": float(np.mean(share)), "top-1": float(np.mean(top1))}


def random_sets(shape: ModelShape, draws: int, seed: int, size: int = 16) -> list[list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    every = [(layer, head) for layer in range(shape.n_layer) for head in range(shape.n_head)]
    return [[every[i] for i in rng.choice(len(every), size=size, replace=False)] for _ in range(draws)]


def table(rows, layouts, head_maps, shape: ModelShape, randoms) -> list[str]:
    """Markdown rows: each head map, the random sets (mean ± sd), all heads."""
    lines = []
    for label, head_map in head_maps:
        l_max = max(layer for layer, _ in head_map.qr_heads)
        lines.append(_row(f"{label} (L_max {l_max})", head_set_metrics(rows, layouts, head_map.qr_heads)))
    drawn = [head_set_metrics(rows, layouts, s) for s in randoms]
    keys = drawn[0].keys()
    lines.append(f"| 16 random (mean ± sd, {len(randoms)} draws) | " +
                 " | ".join(f"{np.mean([d[k] for d in drawn]):.3f} ± {np.std([d[k] for d in drawn]):.3f}"
                            for k in keys) + " |")
    every = [(layer, head) for layer in range(shape.n_layer) for head in range(shape.n_head)]
    lines.append(_row(f"all {len(every)} heads", head_set_metrics(rows, layouts, every)))
    return lines


def _row(label: str, metrics: dict[str, float]) -> str:
    return f"| {label} | " + " | ".join(f"{v:.3f}" for v in metrics.values()) + " |"


def report(views, layouts, head_maps, shape, randoms, far: int | None, answer_start) -> None:
    uniform = np.mean([(l.spans[l.gold][1] - l.spans[l.gold][0]) / sum(b - a for a, b in l.spans) for l in layouts])
    print(f"uniform attention over passage tokens: gold share {uniform:.3f}; top-1 by chance "
          f"{1 / len(layouts[0].spans):.3f}\n")
    subsets = [("all prompts", list(range(len(layouts))))]
    if far is not None:
        subsets.append((f"gold passage > {far} tokens before the answer",
                        [i for i, l in enumerate(layouts) if answer_start(l) - l.spans[l.gold][0] > far]))
    for view in VIEWS:
        for name, keep in subsets:
            print(f"{view}, {name} ({len(keep)} prompts):\n")
            print("| heads | gold mass | gold share | top-1 |\n|---|---|---|---|")
            sub_rows, sub_layouts = [views[view][i] for i in keep], [layouts[i] for i in keep]
            print("\n".join(table(sub_rows, sub_layouts, head_maps, shape, randoms)) + "\n")


def _labelled(spec: str):
    label, _, path = spec.rpartition("=")
    head_map = load_head_map(path)
    return label or head_map.name, head_map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--head-map", action="append", default=[], metavar="[LABEL=]MAP.json",
                    help="head map(s) to compare, one row each (default: the one the model gets)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--documents", type=int, default=20)
    ap.add_argument("--seed", type=int, default=10_000, help="held-out prompts' seed (detection uses 0, 1, ...)")
    ap.add_argument("--random-draws", type=int, default=20)
    ap.add_argument("--far", type=int, default=None, metavar="N", help="also report gold passages > N tokens back")
    ap.add_argument("--n-threads", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.model) if args.model else resolve("smollm2-135m")
    with Engine(path, EngineOptions(n_ctx=4096, n_threads=args.n_threads)) as engine:
        shape = ModelShape.from_gguf_metadata(engine.metadata)
        head_maps = [_labelled(spec) for spec in args.head_map] or [("detected", locate_head_map(shape, path).head_map)]
        fmt = PromptFormat.from_engine(engine, ChatTemplate.from_engine(engine))
        examples = make_examples(args.prompts, seed=args.seed, n_documents=args.documents)
        layouts = fmt.layouts(examples)
        start = time.perf_counter()
        views = capture_views(engine, fmt, examples, layouts)
        seconds = time.perf_counter() - start
    print(f"{path.name}: {args.prompts} prompts of {args.documents} passages "
          f"(~{np.mean([len(l.prompt) for l in layouts]):.0f} tokens), seed {args.seed}, {seconds:.0f} s\n")
    randoms = random_sets(shape, args.random_draws, args.seed)
    report(views, layouts, head_maps, shape, randoms, args.far, lambda l: len(l.prompt))


if __name__ == "__main__":
    main()
