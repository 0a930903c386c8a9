"""Choices the long-answer evaluation makes from its own dev results (bench/device/long_eval.sh).

    python bench/research/long_eval_pick.py levels DIR   # per task, the difficulty whose plain dev score
                                                # at 8K is nearest 0.45 (inside 0.2-0.7 if any is)
    python bench/research/long_eval_pick.py config DIR   # the DySCO variant with the best mean dev score
                                                # over the tasks: "METHOD RANDOM HEAD_MAP"

Only dev results are read: the test split never informs a choice.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

TARGET, LOW, HIGH = 0.45, 0.2, 0.7
MAPS = {"A": "default", "B": "default", "long": "long", "cap": "cap"}  # dev file group -> head map


def records(paths) -> list[dict]:
    out = []
    for path in paths:
        out += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip().endswith("}")]
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def levels(directory: Path) -> str:
    """'route:hops=10,passage:repeats=3,...': per base task, the calibrated level."""
    by_task = defaultdict(dict)
    for r in records(sorted(directory.glob("calib-*.jsonl"))):
        by_task[r["task"].partition(":")[0]].setdefault(r["task"], []).append(r["score"])
    chosen = []
    for base, specs in by_task.items():
        scored = {spec: mean(s) for spec, s in specs.items()}
        inside = {k: v for k, v in scored.items() if LOW <= v <= HIGH} or scored
        chosen.append(min(inside, key=lambda k: abs(inside[k] - TARGET)))
        print(f"{base}: " + ", ".join(f"{k} {v:.2f} (n={len(specs[k])})" for k, v in sorted(scored.items())),
              file=sys.stderr)
    return ",".join(chosen)


def config(directory: Path) -> str:
    """The best DySCO variant on dev, its random-heads twin and the head map it used."""
    cells = defaultdict(lambda: defaultdict(list))  # (group, method) -> task -> scores
    for path in sorted(directory.glob("dev-*.jsonl")):
        group = path.name.split("-")[1]
        for r in records([path]):
            cells[(group, r["method"])][r["task"]].append(r["score"])
    variants = {key: mean(mean(s) for s in tasks.values()) for key, tasks in cells.items()
                if key[1] != "plain" and not key[1].startswith("random")}
    for (group, method), score in sorted(variants.items(), key=lambda kv: -kv[1]):
        print(f"{group:5s} {method:28s} {score:.3f}", file=sys.stderr)
    group, method = max(variants, key=variants.get)
    kind, _, options = method.partition(":")
    knobs = ("mode=fast," if kind == "fast" else "") + options
    twin = "random" + (":" + knobs.rstrip(",") if knobs else "")
    return f"{method} {twin} {directory / f'heads-{MAPS[group]}.json'}"


if __name__ == "__main__":
    verb, directory = sys.argv[1], Path(sys.argv[2])
    print({"levels": levels, "config": config}[verb](directory))
