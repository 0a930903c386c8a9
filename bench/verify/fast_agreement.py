"""How closely fast DySCO follows exact DySCO: on the golden prompts (SmolLM2 F32, the
reference's configs) and on evaluation prompts (seeded dev cases of `dysco-edge eval`).

Per prompt, greedy: token agreement (share of positions where the two answers agree, over
the longer answer), whether the answers are identical, and the Jaccard index of S at each
intervention step while both runs have fed the same tokens (after the first divergence the
contexts differ and S is not comparable).

    python bench/verify/fast_agreement.py --golden-model SMOLLM2_F32.gguf [--eval-model M.gguf]
        [--tasks passkey,kv,vt] [--length 2048] [--n 8] [--n-gpu-layers 99 --flash-attn]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dysco_edge import DyscoConfig, Model
from dysco_edge.eval.prompts import PromptRenderer
from dysco_edge.eval.tasks import make_case

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "smollm2_reference.json"


def compare(model: Model, ids: list[int], config: DyscoConfig, max_new_tokens: int) -> dict:
    runs = {mode: model.generate(token_ids=ids, dysco=config.replace(mode=mode), max_new_tokens=max_new_tokens,
                                 trace=True) for mode in ("exact", "fast")}
    exact, fast = runs["exact"], runs["fast"]
    a, b = exact.token_ids, fast.token_ids
    agree = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same_context = len(ids) + diverge  # positions fed identically by both runs
    fast_steps = {s.pos: set(s.selected.tolist()) for s in fast.trace}
    jaccard = [len(set(s.selected.tolist()) & fast_steps[s.pos]) / max(1, len(set(s.selected.tolist()) | fast_steps[s.pos]))
               for s in exact.trace if s.pos in fast_steps and s.pos < same_context]
    return {"identical": a == b, "agreement": agree, "jaccard": jaccard}


def golden_rows(model_path: str, threads: int | None) -> list[dict]:
    cases = json.loads(GOLDEN.read_text())["cases"]
    rows = []
    with Model(model_path, n_ctx=4096, n_threads=threads) as model:
        for case in cases:
            config = DyscoConfig(qr_heads=tuple(map(tuple, case["qr_heads"])), **case["config"])
            rows.append({"prompt": case["id"], **compare(model, case["prompt_ids"], config,
                                                         int(case["max_new_tokens"]))})
    return rows


def eval_rows(args) -> list[dict]:
    rows = []
    with Model(args.eval_model, n_ctx=args.length + 64, n_gpu_layers=args.n_gpu_layers,
               flash_attn=args.flash_attn, n_threads=args.threads) as model:
        renderer, config = PromptRenderer(model), model.resolve_dysco("auto")
        for task in args.tasks.split(","):
            for index in range(args.n):
                case = make_case(task, split="dev", length=args.length, index=index, measure=renderer.count)
                rendered = renderer.render(case.draft.prompt, case.draft.stop)
                cfg = config.replace(intervention_warmup=rendered.answer_warmup)
                rows.append({"prompt": f"{task}#{index}", **compare(model, rendered.ids, cfg, case.draft.max_new_tokens)})
    return rows


def summary(label: str, rows: list[dict]) -> str:
    steps = [j for r in rows for j in r["jaccard"]]
    return (f"| {label} | {len(rows)} | {sum(r['identical'] for r in rows)} | "
            f"{statistics.mean(r['agreement'] for r in rows):.3f} | {len(steps)} | "
            f"{statistics.mean(steps) if steps else float('nan'):.3f} | {min(steps) if steps else float('nan'):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden-model", help="SmolLM2-135M-Instruct F32 GGUF (the golden cases' weights)")
    ap.add_argument("--eval-model", help="a GGUF with a head map, for evaluation prompts")
    ap.add_argument("--tasks", default="passkey,kv,vt")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    args = ap.parse_args()
    print("| prompts | n | identical answers | token agreement | steps compared | Jaccard of S, mean | min |")
    print("|---|---|---|---|---|---|---|")
    if args.golden_model:
        print(summary("golden (SmolLM2 F32)", golden_rows(args.golden_model, args.threads)), flush=True)
    if args.eval_model:
        print(summary(f"eval dev {args.tasks} @ {args.length} ({Path(args.eval_model).name})", eval_rows(args)))


if __name__ == "__main__":
    main()
