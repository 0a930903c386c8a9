"""How much attention the model puts on the gold evidence, step by step over a long answer,
with and without DySCO: what DySCO is meant to change (issue 16).

For each case of the chosen tasks, every decoding step captures every head's attention of the
token being decoded (unbiased, as the QR-head scores are), and the step's DySCO bias turns it
into the attention the biased pass actually used: p'_j = p_j e^{b_j} / sum_k p_k e^{b_k}, per
head. "plain" is DySCO at strength 1 (a zero bias: the same logits as plain decoding).

    python bench/research/gold_attention.py MODEL.gguf --tasks route,passage,chain --length 16384 --n 8 \
        --methods plain,dysco,fast --out gold.jsonl [--head-map FILE] [--n-gpu-layers 99 --flash-attn]

Prints a table of the mean gold mass by answer step (all heads and QR heads; biased and not)
and writes one JSON line per (case, method) with the per-step series.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from dysco_edge import Model  # noqa: E402
from dysco_edge.eval.methods import Method, resolve  # noqa: E402
from dysco_edge.eval.prompts import PromptRenderer  # noqa: E402
from dysco_edge.eval.scoring import score  # noqa: E402
from dysco_edge.eval.tasks import make_case  # noqa: E402
from dysco_edge.runtime.bookkeeping import default_bookkeeping  # noqa: E402
from dysco_edge.runtime.decode import dysco_tokens, plan_warmups  # noqa: E402
from dysco_edge.runtime.engine import Sampler  # noqa: E402
from dysco_edge.runtime.selection import bias_vector  # noqa: E402

BUCKETS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, 10**9))
METHODS = {"plain": "dysco:strength=1", "dysco": "dysco", "fast": "fast"}


def gold_positions(engine, ids: list[int], evidence: tuple[str, ...]) -> np.ndarray:
    """Prompt positions whose token text overlaps one of the evidence strings."""
    pieces = [engine.detokenize([t], special=True) for t in ids]
    ends = np.cumsum([len(p) for p in pieces])
    text = b"".join(pieces)
    mask = np.zeros(len(ids), dtype=bool)
    for item in evidence:
        at = text.find(item.encode("utf-8"))
        if at < 0:
            raise SystemExit(f"evidence not found in the rendered prompt: {item[:60]!r}")
        first = int(np.searchsorted(ends, at, side="right"))
        last = int(np.searchsorted(ends, at + len(item.encode("utf-8")) - 1, side="right"))
        mask[first:last + 1] = True
    return mask


def step_masses(att: np.ndarray, bias: np.ndarray, gold: np.ndarray, qr: tuple) -> dict:
    """att [n_layer, n_head, n_pos] of one token; bias [pos+1]: gold mass per head, averaged."""
    n_pos = att.shape[2]
    weight = np.ones(n_pos, dtype=np.float64)
    weight[:min(n_pos, bias.size)] = np.exp(bias[:n_pos].astype(np.float64))
    on_gold = np.zeros(n_pos, dtype=bool)
    on_gold[:min(n_pos, gold.size)] = gold[:n_pos]
    plain = att[..., on_gold].sum(-1) / np.maximum(att.sum(-1), 1e-30)
    biased_all = att * weight
    biased = biased_all[..., on_gold].sum(-1) / np.maximum(biased_all.sum(-1), 1e-30)
    rows = tuple(zip(*qr)) if qr else ((), ())
    return {"all": float(plain.mean()), "all_biased": float(biased.mean()),
            "qr": float(plain[rows].mean()) if qr else None, "qr_biased": float(biased[rows].mean()) if qr else None}


def meter(base, gold: np.ndarray, first_pos: int, rows: list):
    """The bookkeeping strategy `base`, capturing every head's attention of each answer step."""
    class Meter(base):
        def before_pass(self, native, token, pos):
            super().before_pass(native, token, pos)
            if pos >= first_pos:
                native.set_head_capture(pos, pos + 1)

        def after_pass(self, native, pos):
            super().after_pass(native, pos)
            if pos < first_pos:
                return
            att = native.head_scores()
            native.clear_head_capture()
            selected = self.trace[-1].selected
            bias = bias_vector(selected, pos, self.config.strength, self.template)
            row = step_masses(att, bias, gold, self.config.qr_heads)
            in_prompt = selected[selected < gold.size]
            row.update(step=pos - first_pos, n_selected=int(selected.size),
                       selected_on_gold=float(gold[in_prompt].mean()) if in_prompt.size else 0.0)
            rows.append(row)
    return Meter


def run_case(model, renderer, head_map, case, method: Method) -> dict:
    engine = model.engine
    rendered = renderer.render(case.draft.prompt, case.draft.stop)
    ids = rendered.ids
    decoding = resolve(method, head_map=head_map, shape=model.shape, n_prompt=len(ids),
                       answer_warmup=rendered.answer_warmup, seed=case.seed)
    config = model.prompter.with_template_sequences(decoding.config)
    gold = gold_positions(engine, ids, case.draft.evidence)
    rows: list[dict] = []
    warm = plan_warmups(len(ids), config.context_warmup, config.intervention_warmup)
    engine.clear()
    sampler = Sampler()
    try:
        tokens = list(dysco_tokens(engine, ids, config, warm, reuse=0, sampler=sampler,
                                   max_new_tokens=case.draft.max_new_tokens, is_end=engine.is_end, trace=[],
                                   bookkeeping=meter(default_bookkeeping(config), gold, len(ids) - 1, rows)))
    finally:
        sampler.close()
        engine.native.clear_bias(-1)
    text = cut_at_stop(engine.detokenize(tokens).decode("utf-8", "replace"), rendered.stop)
    return {"task": case.task, "length": case.length, "index": case.index, "method": method.label,
            "score": score(case.draft.scorer, text, case.draft.gold), "prediction": text,
            "n_gold_tokens": int(gold.sum()), "n_prompt": len(ids), "steps": rows}


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def summarize(records: list[dict]) -> str:
    lines = ["| task | method | n | score | " + " | ".join(f"steps {a}-{min(b, 999) - 1}" for a, b in BUCKETS)
             + " | selected on gold |", "|---|---|---|---|" + "---|" * len(BUCKETS) + "---|"]
    keys = sorted({(r["task"], r["method"]) for r in records})
    for task, method in keys:
        group = [r for r in records if (r["task"], r["method"]) == (task, method)]
        cells = [_bucket_cell(group, a, b) for a, b in BUCKETS]
        sel = np.mean([s["selected_on_gold"] for r in group for s in r["steps"]]) if group else 0.0
        lines.append(f"| {task} | {method} | {len(group)} | {np.mean([r['score'] for r in group]):.2f} | "
                     + " | ".join(cells) + f" | {sel:.3f} |")
    return "\n".join(lines)


def _bucket_cell(group: list[dict], a: int, b: int) -> str:
    """Mean gold mass over all heads (biased as used / unbiased) and over QR heads, in that bucket."""
    steps = [s for r in group for s in r["steps"] if a <= s["step"] < b]
    if not steps:
        return "-"
    used = np.mean([s["all_biased"] for s in steps])
    raw = np.mean([s["all"] for s in steps])
    qr = np.mean([s["qr"] for s in steps if s["qr"] is not None] or [np.nan])
    return f"{used:.3f} / {raw:.3f} (QR {qr:.3f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tasks", default="route,passage,chain")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--methods", default="plain,dysco,fast",
                    help=f"names from {', '.join(METHODS)} or eval method specs like dysco:strength=4")
    ap.add_argument("--head-map")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    methods = [Method.parse(METHODS.get(m, m)) for m in args.methods.split(";" if ";" in args.methods else ",")]
    records = []
    with Model(args.model, n_ctx=args.length, n_gpu_layers=args.n_gpu_layers, flash_attn=args.flash_attn,
               n_batch=2048 if args.n_gpu_layers else 512, n_threads=args.threads, head_map=args.head_map) as model, \
            open(args.out, "a", encoding="utf-8") as out:
        renderer, head_map = PromptRenderer(model), model.head_map()
        for task in args.tasks.split(","):
            for index in range(args.n):
                case = make_case(task, split=args.split, length=args.length, index=index, measure=renderer.count)
                for method in methods:
                    record = run_case(model, renderer, head_map, case, method)
                    record["method"] = next((k for k, v in METHODS.items() if v == method.label), method.label)
                    out.write(json.dumps(record) + "\n")
                    out.flush()
                    records.append(record)
                    print(f"{task} #{index} {record['method']}: score {record['score']:.2f}", file=sys.stderr)
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
