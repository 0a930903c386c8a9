"""Evaluation results grouped for reporting: one Section per (model, split), with the
estimates of its cells, averages and paired differences (used by report.py and plot.py)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .scoring import EXACT_SCORERS
from .stats import Estimate, estimate, group_estimate
from .tasks import TASKS

KIND_ORDER = ("plain", "dysco", "fast", "static", "random", "attnts")


@dataclass(frozen=True)
class Section:
    """The results of one model on one split."""
    model: str
    split: str
    records: tuple[dict, ...]

    @property
    def tasks(self) -> list[str]:
        seen = {r["task"] for r in self.records}
        return [t for t in TASKS if t in seen] + sorted(seen - set(TASKS))

    @property
    def lengths(self) -> list[int]:
        return sorted({r["length"] for r in self.records})

    @property
    def methods(self) -> list[str]:
        kinds = {r["method"]: r["kind"] for r in self.records}
        rank = {k: i for i, k in enumerate(KIND_ORDER)}
        return sorted(kinds, key=lambda m: (rank.get(kinds[m], len(rank)), m))

    def exact(self, task: str) -> bool:
        """An exact-match task: its scorer only gives 0 or 1 (records without a scorer: all scores 0/1)."""
        return all(r["scorer"] in EXACT_SCORERS if "scorer" in r else r["score"] in (0.0, 1.0)
                   for r in self.records if r["task"] == task)

    def scores(self, method: str, task: str, length: int) -> dict[int, float]:
        """seed -> score of one cell."""
        return {r["seed"]: r["score"] for r in self.records
                if r["method"] == method and r["task"] == task and r["length"] == length}


def sections(records: Iterable[dict]) -> list[Section]:
    grouped: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        grouped[(r["model"], r["split"])].append(r)
    return [Section(model, split, tuple(rs)) for (model, split), rs in sorted(grouped.items())]


# ---- numbers ----

def cell_estimate(section: Section, method: str, task: str, length: int) -> Estimate | None:
    scores = list(section.scores(method, task, length).values())
    return estimate(scores, exact=section.exact(task)) if scores else None


def average_estimate(section: Section, method: str, length: int) -> Estimate | None:
    """Mean over tasks of the task means; only when the method has every task at this length."""
    groups = [list(section.scores(method, task, length).values()) for task in section.tasks]
    return group_estimate(groups) if all(groups) else None


def paired_difference(section: Section, method: str, baseline: str, length: int) -> Estimate | None:
    """method - baseline on the cases both ran, averaged over tasks (tasks lacking pairs are left out)."""
    groups = []
    for task in section.tasks:
        a, b = section.scores(method, task, length), section.scores(baseline, task, length)
        diffs = [a[s] - b[s] for s in a.keys() & b.keys()]
        if diffs:
            groups.append(diffs)
    if not groups:
        return None
    return group_estimate(groups)
