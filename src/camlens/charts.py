"""Charts of the evaluation and the sanity check: mean curves, metric bars, maps per
randomisation step and similarity curves (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .render import colorize, new_figure


_DASHES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1))]
_MARKERS = ["o", "s", "^", "v", "D"]


def _coinciding(values: dict[str, Sequence[float | None]], names: dict[str, str], tolerance: float) -> dict[str, str]:
    """Each method's label, the methods whose values agree to within ``tolerance`` named together
    ("CAM = Grad-CAM"), so that none is drawn hidden under another. (CAM and Grad-CAM are equal in
    theory on a pooled layer, but their floats differ in the last digits.)"""

    def same(a: Sequence[float | None], b: Sequence[float | None]) -> bool:
        return len(a) == len(b) and all(
            (x is None) == (y is None) and (x is None or abs(x - y) <= tolerance) for x, y in zip(a, b)
        )

    groups: list[list[str]] = []
    for method, value in values.items():
        group = next((g for g in groups if same(values[g[0]], value)), None)
        if group is None:
            groups.append([method])
        else:
            group.append(method)
    return {m: " = ".join(names.get(g, g) for g in group) for group in groups for m in group}


CURVE_TOLERANCE = 1e-3  # probability: well below a line's width on the plot
BAR_TOLERANCE = 1e-3  # of the metric's range: 0.1 percentage points of a % metric


def curve_plot(curves: dict[str, dict[str, list[float]]], path: Path, names: dict[str, str] | None = None,
               count: int | None = None) -> None:
    """Mean deletion and insertion curves, one line per method: ``{"deletion": {method: curve}}``.

    Methods whose mean curves agree to within 0.001 everywhere share one line, labelled "A = B"."""
    names = names or {}
    kinds = [kind for kind in ("deletion", "insertion") if curves.get(kind)]
    figure = new_figure(5.0 * max(1, len(kinds)), 4.0)
    axes = figure.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        labels = _coinciding(curves[kind], names, CURVE_TOLERANCE)
        drawn: list[str] = []
        for method, values in curves[kind].items():
            if labels[method] in drawn:
                continue
            drawn.append(labels[method])
            steps = len(values) - 1
            # Dashes and markers of their own, so that curves that nearly coincide stay apart.
            ax.plot([i / steps for i in range(steps + 1)], values, label=labels[method],
                    linestyle=_DASHES[(len(drawn) - 1) % len(_DASHES)], marker=_MARKERS[(len(drawn) - 1) % len(_MARKERS)],
                    markersize=3)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} (mean curve{f' over {count} images' if count else ''})\n"
                     f"area under the curve: {better} is better", fontsize=9)
        ax.set_xlabel("fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"))
        ax.set_ylabel("probability of the class")
        top = max((max(v) for v in curves[kind].values()), default=0.0)
        ax.set_ylim(0, min(1.0, 1.1 * top) if top > 0 else 1.0)
        shared = any(" = " in label for label in drawn)
        ax.legend(fontsize=8, title=f"A = B: within {CURVE_TOLERANCE:g} at every step" if shared else None,
                  title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")


def bar_chart(summary: dict, metrics: Sequence[str], titles: dict[str, str], path: Path,
              names: dict[str, str] | None = None, higher_is_better: dict[str, bool] | None = None,
              ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """One bar chart per metric: the mean of each method with its 95% confidence interval, the
    interval cut at the metric's ``ranges`` (a share cannot exceed 100%). Methods whose mean and
    interval agree to within 0.1% of the range share a colour and say so under their bar
    ("Grad-CAM (= CAM)")."""
    names = names or {}
    figure = new_figure(3.2 * len(metrics), 3.9)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    methods = list(summary)
    colours = [f"C{i}" for i in range(10)]
    for ax, metric in zip(axes, metrics):
        low, high = (ranges or {}).get(metric, (-np.inf, np.inf))
        values = {m: (summary[m][metric]["mean"], summary[m][metric]["ci95"]) for m in methods}
        scale = high - low if np.isfinite(high - low) else max((abs(v) for pair in values.values() for v in pair if v), default=1.0)
        labels = _coinciding(values, names, BAR_TOLERANCE * scale)
        firsts = list(dict.fromkeys(labels.values()))
        means = [np.nan if values[m][0] is None else values[m][0] for m in methods]
        spans = [0.0 if values[m][1] is None else values[m][1] for m in methods]
        below = [min(s, mean - low) if np.isfinite(mean) else 0.0 for s, mean in zip(spans, means)]
        above = [min(s, high - mean) if np.isfinite(mean) else 0.0 for s, mean in zip(spans, means)]
        ax.bar(range(len(methods)), means, yerr=[below, above], capsize=3,
               color=[colours[firsts.index(labels[m]) % len(colours)] for m in methods])
        ticks = []
        for m in methods:
            first = labels[m].split(" = ")[0]
            own = names.get(m, m)
            ticks.append(own if " = " not in labels[m] or own == first else f"{own} (= {first})")
        ax.set_xticks(range(len(methods)), ticks, rotation=45, ha="right", fontsize=8)
        counts = sorted({summary[m][metric]["n"] for m in methods})
        better = "" if higher_is_better is None else ("higher" if higher_is_better[metric] else "lower") + " is better, "
        ax.set_title(f"{titles.get(metric, metric)}\n{better}n = {'/'.join(map(str, counts))}", fontsize=9)
        tops = [mean + up for mean, up in zip(means, above) if np.isfinite(mean)]
        top = max(tops, default=0.0)
        ax.set_ylim(low if np.isfinite(low) else None, min(high, top * 1.1) if top > 0 else None)
    figure.suptitle("mean ± 95% confidence interval; (= A): the same bar as A, to within 0.1% of the "
                    "metric's range", fontsize=9)
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
