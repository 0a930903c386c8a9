"""Confidence intervals for the evaluation report.

Wilson score interval for the cells of exact-match tasks (every score 0 or 1); percentile
bootstrap (2000 resamples, fixed seed) for the cells of partial-score tasks, for averages over
tasks (cases resampled within each task) and for paired differences between methods on the
same cases. A bootstrap interval collapses to a point when every score in a cell is equal.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ..errors import InputError

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int
    how: str  # "wilson" or "bootstrap"

    def __post_init__(self):
        if self.n < 1 or not self.low <= self.mean + 1e-12 or not self.mean <= self.high + 1e-12:
            raise ValueError(f"inconsistent estimate {self}")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion."""
    if n < 1 or not 0 <= successes <= n:
        raise InputError(f"need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_group_mean(groups: Sequence[Sequence[float]], *, n_boot: int = N_BOOT, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of group means, resampling within each group."""
    if not groups or any(len(g) == 0 for g in groups):
        raise InputError("every group needs at least one value")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for group in groups:
        values = np.asarray(group, dtype=np.float64)
        picks = rng.integers(0, values.size, size=(n_boot, values.size))
        total += values[picks].mean(axis=1)
    means = total / len(groups)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def estimate(scores: Sequence[float], *, exact: bool) -> Estimate:
    """Mean with a 95% interval: Wilson for an exact-match task, else bootstrap."""
    if not scores:
        raise InputError("no scores to estimate from")
    mean = float(np.mean(scores))
    if exact:
        if not all(s in (0.0, 1.0) for s in scores):
            raise InputError("an exact-match cell holds a score other than 0 or 1")
        low, high = wilson(int(sum(scores)), len(scores))
        return Estimate(mean, min(low, mean), max(high, mean), len(scores), "wilson")
    low, high = bootstrap_group_mean([scores])
    return Estimate(mean, min(low, mean), max(high, mean), len(scores), "bootstrap")


def group_estimate(groups: Sequence[Sequence[float]]) -> Estimate:
    """Mean of group means (e.g. tasks) with a bootstrap interval; also for paired differences."""
    mean = float(np.mean([np.mean(g) for g in groups]))
    low, high = bootstrap_group_mean(groups)
    return Estimate(mean, min(low, mean), max(high, mean), sum(len(g) for g in groups), "bootstrap")
