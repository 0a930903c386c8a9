"""The evaluation report: markdown tables (method x task x length with 95% intervals, paired
differences, cost) and PNG plots of score against length, from one or more results files."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .results import read_many
from .sections import Section, average_estimate, cell_estimate, paired_difference, sections
from .stats import Estimate
from .tasks import TASKS
from ..errors import InputError

CI_NOTE = ("95% intervals: Wilson score interval for the exact-match tasks (passkey, kv, chain); percentile bootstrap "
           "(2000 resamples) for the partial-score tasks (path, mrcr, vt, route, passage; it collapses to a point when every "
           "score in a cell is equal), for the averages over tasks (cases resampled within each task) and for "
           "paired differences (same cases, both methods).")


def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(method, baseline) pairs: each method against plain, DySCO against its random-head twin, and
    fast DySCO against its exact twin (the non-inferiority of fast mode)."""
    pairs = [(m, "plain") for m in methods if m != "plain" and "plain" in methods]
    for kind, twin_kind in (("dysco", "random"), ("fast", "dysco")):
        for m in methods:
            if m == kind or m.startswith(kind + ":"):
                twin = twin_kind + m[len(kind):]
                if twin in methods:
                    pairs.append((m, twin))
    return pairs


# ---- markdown ----

def fmt(est: Estimate | None, *, signed: bool = False, n: int | None = None) -> str:
    if est is None:
        return "—"
    sign = "+" if signed else ""
    text = f"{est.mean:{sign}.2f} [{est.low:{sign}.2f}, {est.high:{sign}.2f}]"
    return text if n is None or est.n == n else f"{text} (n={est.n})"


def usual_n(section: Section) -> int:
    counts = defaultdict(int)
    for r in section.records:
        counts[(r["method"], r["task"], r["length"])] += 1
    values = sorted(counts.values())
    return values[len(values) // 2]


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def score_table(section: Section) -> list[str]:
    n = usual_n(section)
    rows = []
    for task in section.tasks:
        for method in section.methods:
            rows.append([task, method] + [fmt(cell_estimate(section, method, task, L), n=n) for L in section.lengths])
    for method in section.methods:
        rows.append(["**all tasks**", method] + [fmt(average_estimate(section, method, L)) for L in section.lengths])
    return table(["task", "method", *map(str, section.lengths)], rows)


def difference_table(section: Section) -> list[str]:
    rows = [[f"{m} − {b}"] + [fmt(paired_difference(section, m, b, L), signed=True) for L in section.lengths]
            for m, b in comparisons(section.methods)]
    return table(["difference (mean over tasks)", *map(str, section.lengths)], rows) if rows else []


def cost_table(section: Section) -> list[str]:
    rows = []
    for method in section.methods:
        row = [method]
        for length in section.lengths:
            rs = [r for r in section.records if r["method"] == method and r["length"] == length]
            row.append(_cost_cell(rs))
        rows.append(row)
    return table(["method", *map(str, section.lengths)], rows)


def _cost_cell(records: Sequence[dict]) -> str:
    if not records:
        return "—"
    k = len(records)
    wall = sum(r["wall_s"] for r in records) / k
    prefill = sum(r["prefill_s"] for r in records) / k
    tokens = sum(r["n_generated"] for r in records) / k
    return f"{wall:.2f} s ({prefill:.2f} prefill, {tokens:.0f} tok)"


def backend_note(section: Section) -> str:
    seen = {tuple(sorted(r.get("backend", {}).items())) for r in section.records}
    parts = ["; ".join(f"{k}={v}" for k, v in b) for b in sorted(seen)]
    return " / ".join(parts) or "unknown"


def section_markdown(section: Section, plot: Path | None) -> list[str]:
    lines = [f"## {section.model}, {section.split} split", "",
             f"Mean score per cell with its 95% interval; n = {usual_n(section)} cases per cell unless marked.", ""]
    lines += score_table(section) + [""]
    diffs = difference_table(section)
    if diffs:
        lines += ["Paired differences (same cases), averaged over tasks:", ""] + diffs + [""]
    cost = (f"Wall time per case (one answer alone: the prompt's prefill + the method's decoding; "
            f"backend {backend_note(section)}):")
    lines += [cost, ""] + cost_table(section) + [""]
    if plot is not None:
        lines += [f"![score against length]({plot.name})", ""]
    return lines


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_report(paths: Sequence[str | Path], out_dir: str | Path, *, name: str | None = None,
                 title: str = "DySCO evaluation", command: str | None = None) -> Path:
    """Write NAME.md (and NAME-<model>-<split>.png plots) into out_dir; returns the markdown path."""
    records = read_many(paths)
    if not records:
        raise InputError(f"no results in {', '.join(map(str, paths))}: run `dysco-edge eval` first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or Path(paths[0]).stem
    lines = [f"# {title}", ""]
    if command:
        lines += ["Reproduce:", "", "```sh", command, "```", ""]
    lines += [CI_NOTE, "", _task_notes(), ""]
    for section in sections(records):
        plot = _plot(section, out / f"{name}-{slug(section.model)}-{section.split}.png")
        lines += section_markdown(section, plot)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _task_notes() -> str:
    scored = {"passkey": "exact", "kv": "exact", "path": "partial: correct route prefix",
              "mrcr": "partial: similarity ratio", "vt": "partial: set overlap",
              "route": "partial: correct route prefix", "passage": "partial: similarity ratio",
              "chain": "exact: the number after 'Answer:'"}
    return "Tasks: " + "; ".join(f"**{t}** {spec.about} ({scored.get(t, '')})" for t, spec in TASKS.items()) + "."


def _plot(section: Section, path: Path) -> Path | None:
    try:
        from .plot import plot_section
    except ImportError:  # matplotlib is optional (pip install dysco-edge[eval])
        return None
    plot_section(section, path)
    return path
