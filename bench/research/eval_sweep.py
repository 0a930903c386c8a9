"""Tune AttnTS and DySCO on the dev split, then write the tuned options for `dysco-edge eval --tuned`.

Stages (each a resumable `dysco-edge eval` run on the dev split into --out; `all` runs them in order):
  attnts   plain + every attention scale in FACTORS
  dysco    plain + dysco + one knob changed at a time (strength, top_k_ratio, top_p, decay)
  combine  dysco with the best value of every knob that beat the default, and its static/random twins
  pick     no decoding: read --out, print the dev table, merge the picks into --write-tuned

A variant's dev score is the mean over (task, length) cells of the cell means, on the cases every
compared variant has (paired). The table also shows the score at each length, which is where
top_k (absolute vs. a ratio of the prompt) against context length shows.

  python bench/research/eval_sweep.py MODEL.gguf --head-map heads.json --lengths 2048,8192 --n 30 \
      --out results/dev-sweep.jsonl --stage all --write-tuned results/tuned.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from dysco_edge.eval.methods import Method
from dysco_edge.eval.results import read_records
from dysco_edge.eval.run import EvalPlan, run_eval
from dysco_edge.eval.tasks import TASKS
from dysco_edge.models import resolve

FACTORS = (0.8, 0.9, 1.1, 1.2, 1.35, 1.5)
KNOB_VALUES = {
    "strength": (1.5, 3.0, 5.0),
    "top_k_ratio": (0.02, 0.05, 0.1, 0.25),
    "top_p": (0.5, 0.8, None),
    "decay": (0.0, 0.5, 0.9),
}


def stage_methods(stage: str, records: list[dict]) -> list[Method]:
    if stage == "attnts":
        return [Method("plain")] + [Method("attnts", (("factor", f),)) for f in FACTORS]
    if stage == "dysco":
        return [Method("plain"), Method("dysco")] + [Method("dysco", ((knob, v),))
                                                    for knob, values in KNOB_VALUES.items() for v in values]
    if stage == "combine":
        best = best_knobs(records)
        return [Method("plain"), Method("dysco")] + [Method(kind, tuple(best.items())) for kind in
                                                    ("dysco", "static", "random")] if best else []
    raise ValueError(f"unknown stage {stage!r}")


def scores_by_label(records: list[dict]) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in records:
        out[r["method"]][(r["task"], r["length"], r["seed"])] = r["score"]
    return out


def dev_score(cases: dict[tuple, float], keys: set[tuple]) -> tuple[float, dict[int, float]]:
    """Mean of (task, length) cell means over the given case keys, and the mean at each length."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for key in keys:
        cells[key[:2]].append(cases[key])
    means = {cell: sum(v) / len(v) for cell, v in cells.items()}
    by_length: dict[int, list[float]] = defaultdict(list)
    for (_, length), m in means.items():
        by_length[length].append(m)
    overall = sum(means.values()) / len(means) if means else float("nan")
    return overall, {L: sum(v) / len(v) for L, v in sorted(by_length.items())}


def ranking(records: list[dict], labels: list[str]) -> list[tuple[str, float, dict[int, float]]]:
    """(label, dev score, per-length) for labels present, on the cases all of them share, best first."""
    table = scores_by_label(records)
    labels = [label for label in labels if table.get(label)]
    if not labels:
        return []
    shared = set.intersection(*(set(table[label]) for label in labels))
    rows = [(label, *dev_score(table[label], shared)) for label in labels]
    return sorted(rows, key=lambda row: -row[1])


def best_knobs(records: list[dict]) -> dict:
    """Per knob, the value whose one-knob variant beat default dysco most on dev (knobs that never did are left out)."""
    labels = ["dysco"] + [Method("dysco", ((k, v),)).label for k, values in KNOB_VALUES.items() for v in values]
    rows = {label: score for label, score, _ in ranking(records, labels)}
    if "dysco" not in rows:
        return {}
    best = {}
    for knob, values in KNOB_VALUES.items():
        tried = [(rows.get(Method("dysco", ((knob, v),)).label, float("-inf")), v) for v in values]
        score, value = max(tried, key=lambda t: t[0])
        if score > rows["dysco"]:
            best[knob] = value
    return best


def pick(records: list[dict]) -> dict:
    """The tuned file: the best attnts factor and the best dysco variant on dev."""
    labels = sorted({r["method"] for r in records})
    tuned = {}
    attnts = ranking(records, [label for label in labels if label.startswith("attnts:")])
    if attnts:
        tuned["attnts"] = dict(Method.parse(attnts[0][0]).options)
    dysco = ranking(records, [label for label in labels if label == "dysco" or label.startswith("dysco:")])
    if dysco:
        tuned["dysco"] = dict(Method.parse(dysco[0][0]).options)
    return tuned


def print_table(records: list[dict], stream=sys.stdout) -> None:
    labels = sorted({r["method"] for r in records})
    for family in ("attnts", "dysco", "static", "random"):
        rows = ranking(records, ["plain"] + [label for label in labels if label.split(":")[0] == family])
        if len(rows) < 2:
            continue
        lengths = list(rows[0][2])
        print(f"\n| {family} variant (dev, paired cases) | mean | " + " | ".join(map(str, lengths)) + " |", file=stream)
        print("|---|---|" + "---|" * len(lengths), file=stream)
        for label, score, per_length in rows:
            print(f"| {label} | {score:.3f} | " + " | ".join(f"{per_length[L]:.3f}" for L in lengths) + " |",
                  file=stream)


def model_path(args: argparse.Namespace) -> Path:
    return Path(args.model) if args.model else resolve("smollm2-135m")


def model_records(args: argparse.Namespace) -> list[dict]:
    """This model's records in --out (a file may hold several models: never compare across them)."""
    name = model_path(args).name
    return [r for r in read_records(args.out) if r["model"] == name]


def write_tuned(path: str, tuned: dict) -> dict:
    """Merge into an existing tuned file: a sweep of one kind keeps the other kinds' choices."""
    target = Path(path)
    merged = json.loads(target.read_text(encoding="utf-8")) if target.exists() else {}
    merged.update(tuned)
    target.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    return merged


def run_stage(stage: str, args: argparse.Namespace, time_left: float | None) -> bool:
    """Run one decoding stage; True when it finished (False: the time limit stopped it)."""
    methods = stage_methods(stage, model_records(args))
    if not methods:
        print(f"{stage}: no knob beat the default on dev; nothing to combine", file=sys.stderr)
        return True
    plan = EvalPlan(model_path(args), tuple(args.tasks.split(",")),
                    tuple(int(x) for x in args.lengths.split(",")), "dev", args.n, tuple(methods), Path(args.out),
                    head_map=Path(args.head_map) if args.head_map else None, n_gpu_layers=args.n_gpu_layers,
                    flash_attn=args.flash_attn, n_threads=args.threads, time_limit=time_left)
    return run_eval(plan).remaining == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--head-map")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--n", type=int, default=30, help="dev cases per task and length")
    ap.add_argument("--out", required=True, help="dev results (JSONL, appended)")
    ap.add_argument("--stage", choices=("attnts", "dysco", "combine", "pick", "all"), default="all")
    ap.add_argument("--write-tuned", metavar="FILE", help="write the picked options here (stage pick / all)")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--time-limit", type=float, help="seconds for this call, over all stages")
    args = ap.parse_args(argv)
    stages = ("attnts", "dysco", "combine") if args.stage == "all" else () if args.stage == "pick" else (args.stage,)
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    for stage in stages:
        time_left = None if deadline is None else max(1e-3, deadline - time.monotonic())
        if not run_stage(stage, args, time_left):
            print(f"time limit reached in stage {stage}: run the same command again to continue", file=sys.stderr)
            return 0
    records = model_records(args)
    print_table(records)
    if args.write_tuned and args.stage in ("pick", "all"):
        tuned = write_tuned(args.write_tuned, pick(records))
        print(f"\ntuned on dev: {json.dumps(tuned)} -> {args.write_tuned}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
