"""PNG plots of score against context length, one panel per task plus the average over tasks
(needs matplotlib: pip install dysco-edge[eval])."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and GPU machines
import matplotlib.pyplot as plt

from .sections import Section, average_estimate, cell_estimate

COLUMNS = 3


def plot_section(section: Section, path: Path) -> None:
    panels = [*section.tasks, None]  # None: the average over tasks
    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.2 * COLUMNS, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, panels):
        _panel(ax, section, task)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(f"{section.model}, {section.split} split: score vs context length (95% intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panel(ax, section: Section, task: str | None) -> None:
    lengths = section.lengths
    for i, method in enumerate(section.methods):
        points = [(L, average_estimate(section, method, L) if task is None else cell_estimate(section, method, task, L))
                  for L in lengths]
        points = [(L, e) for L, e in points if e is not None]
        if not points:
            continue
        xs = [L * (1 + 0.02 * (i - len(section.methods) / 2)) for L, _ in points]  # dodge overlapping bars
        ys = [e.mean for _, e in points]
        err = [[e.mean - e.low for _, e in points], [e.high - e.mean for _, e in points]]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=2, linewidth=1, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("all tasks (mean)" if task is None else task, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
