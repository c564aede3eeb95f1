"""Charts of the evaluation and the sanity check: mean curves, metric bars, maps per
randomisation step and similarity curves (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .render import colorize, new_figure


def curve_plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Mean deletion and insertion curves, one line per method: ``{"deletion": {method: curve}}``."""
    kinds = [kind for kind in ("deletion", "insertion") if curves.get(kind)]
    figure = new_figure(5.0 * max(1, len(kinds)), 4.0)
    axes = figure.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        for method, values in curves[kind].items():
            steps = len(values) - 1
            ax.plot([i / steps for i in range(steps + 1)], values, label=method)
        ax.set_title(f"{kind} (mean curve)")
        ax.set_xlabel("fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"))
        ax.set_ylabel("probability of the class")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def bar_chart(summary: dict, metrics: Sequence[str], titles: dict[str, str], path: Path) -> None:
    """One bar chart per metric: the mean of each method with its 95% confidence interval."""
    figure = new_figure(3.2 * len(metrics), 3.6)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    methods = list(summary)
    for ax, metric in zip(axes, metrics):
        means = [summary[m][metric]["mean"] or 0.0 for m in methods]
        errors = [summary[m][metric]["ci95"] or 0.0 for m in methods]
        ax.bar(range(len(methods)), means, yerr=errors, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
        ax.set_title(titles.get(metric, metric), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")


def sanity_figure(rows: dict[str, list[np.ndarray]], columns: Sequence[str], path: Path) -> None:
    """Maps at each randomisation step: one row per method, one column per step."""
    figure = new_figure(1.3 * len(columns) + 0.6, 1.5 * len(rows) + 0.4)
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for row_axes, (method, maps) in zip(axes, rows.items()):
        for ax, saliency, title in zip(row_axes, maps, columns):
            ax.imshow(colorize(saliency))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6)
        row_axes[0].set_ylabel(method, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")


def similarity_plot(similarity: dict[str, dict[str, list[float]]], groups: Sequence[str], threshold: float,
                    path: Path) -> None:
    """Spearman and SSIM against the trained model's map, after each randomisation step."""
    figure = new_figure(11.0, 4.0)
    axes = figure.subplots(1, 2, squeeze=False)[0]
    for ax, key in zip(axes, ("spearman", "ssim")):
        for method, values in similarity.items():
            ax.plot(range(1, len(values[key]) + 1), values[key], marker="o", markersize=3, label=method)
        if key == "spearman":
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
        ax.set_xticks(range(1, len(groups) + 1), groups, rotation=90, fontsize=6)
        ax.set_title(f"{key} with the trained model's map")
        ax.set_xlabel("randomised down to")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
