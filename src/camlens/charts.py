"""Charts of the evaluation and the sanity check: mean curves, metric bars, maps per
randomisation step and similarity curves (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .render import new_figure, overlay


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


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, by its place in the run's methods: matplotlib's tab10 (``C0``...), as
    the HTML report's palette, the same in every panel and chart of a run."""
    return {method: f"C{index % 10}" for index, method in enumerate(methods)}


CURVE_TOLERANCE = 1e-3  # probability: well below a line's width on the plot
BAR_TOLERANCE = 1e-3  # of the metric's range: 0.1 percentage points of a % metric


def curve_plot(curves: dict[str, dict[str, list[float]]], path: Path, names: dict[str, str] | None = None,
               count: int | None = None) -> None:
    """Mean deletion and insertion curves, one line per method: ``{"deletion": {method: curve}}``.

    Methods whose mean curves agree to within 0.001 everywhere share one line, labelled "A = B"."""
    draw_curve_plot(curves, names, count).savefig(path, format="png")


LEGEND_ROW = 0.19  # inches: one line of a legend at 8 points


def draw_curve_plot(curves: dict[str, dict[str, list[float]]], names: dict[str, str] | None = None,
                    count: int | None = None):
    """The matplotlib figure of :func:`curve_plot`. Each panel's legend lies under its axes,
    the figure growing with its lines, so that it never hides a curve however many methods."""
    from matplotlib.transforms import ScaledTranslation

    names = names or {}
    kinds = [kind for kind in ("deletion", "insertion") if curves.get(kind)]
    labels = {kind: _coinciding(curves[kind], names, CURVE_TOLERANCE) for kind in kinds}
    palette = method_colours(list(dict.fromkeys(m for kind in kinds for m in curves[kind])))
    entries = max((len(set(labels[kind].values())) for kind in kinds), default=0)
    figure = new_figure(5.0 * max(1, len(kinds)), 4.0 + LEGEND_ROW * (entries + 2), layout="constrained")
    axes = figure.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        drawn: list[str] = []
        for method, values in curves[kind].items():
            if labels[kind][method] in drawn:
                continue
            drawn.append(labels[kind][method])
            steps, index = len(values) - 1, len(drawn) - 1
            # Dashes and markers of their own, so that curves that nearly coincide stay apart; the
            # marker changes once the dashes wrap, so that no two of 25 lines look alike (the
            # 10 colours wrap too).
            ax.plot([i / steps for i in range(steps + 1)], values, label=labels[kind][method], color=palette[method],
                    linestyle=_DASHES[index % len(_DASHES)], marker=_MARKERS[index // len(_DASHES) % len(_MARKERS)],
                    markersize=3)
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} (mean curve{f' over {count} images' if count else ''})\n"
                     f"area under the curve: {better} is better", fontsize=9)
        ax.set_xlabel("fraction of pixels " + ("deleted" if kind == "deletion" else "inserted"))
        ax.set_ylabel("probability of the class")
        top = max((max(v) for v in curves[kind].values()), default=0.0)
        ax.set_ylim(0, min(1.0, 1.1 * top) if top > 0 else 1.0)
        shared = any(" = " in label for label in drawn)
        # Under the x axis's label, which lies a fixed distance (in inches, not in axes units)
        # below the axes whatever their height.
        under = ax.transAxes + ScaledTranslation(0, -0.55, figure.dpi_scale_trans)
        ax.legend(fontsize=8, title=f"A = B: within {CURVE_TOLERANCE:g} at every step" if shared else None,
                  title_fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=under)
    return figure


def bar_chart(summary: dict, metrics: Sequence[str], titles: dict[str, str], path: Path,
              names: dict[str, str] | None = None, higher_is_better: dict[str, bool] | None = None,
              ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """One bar chart per metric: the mean of each method with its 95% bootstrap interval
    (:func:`camlens.evaluate.mean_interval`; inside the metric's ``ranges`` already, and cut at
    them all the same). One colour per method in every panel (:func:`method_colours`); methods
    whose mean and interval agree to within 0.1% of the range say so by their bar
    ("Grad-CAM (= CAM)")."""
    draw_bar_chart(summary, metrics, titles, names, higher_is_better, ranges).savefig(path, format="png")


BAR_ROW = 0.26  # inches per method: room for its name at 8 points


def draw_bar_chart(summary: dict, metrics: Sequence[str], titles: dict[str, str], names: dict[str, str] | None = None,
                   higher_is_better: dict[str, bool] | None = None, ranges: dict[str, tuple[float, float]] | None = None):
    """The matplotlib figure of :func:`bar_chart`: horizontal bars, so that each method's name is
    written once, level, beside its bar, in the order given from the top; panels two abreast at
    most, each as tall as its methods need."""
    names = names or {}
    methods = list(summary)
    columns = min(2, len(metrics))
    rows = -(-len(metrics) // columns)
    longest = max(len(names.get(m, m)) for m in methods)
    # The longest name may carry "(= another name)"; about 0.06 inch per character at 8 points.
    width = max(4.6, columns * (2.6 + 0.06 * 2 * longest))
    figure = new_figure(width, rows * (1.2 + BAR_ROW * len(methods)) + 0.5, layout="constrained")
    palette = method_colours(methods)
    for index, metric in enumerate(metrics):
        ax = figure.add_subplot(rows, columns, index + 1)
        low, high = (ranges or {}).get(metric, (-np.inf, np.inf))
        stats = {m: summary[m][metric] for m in methods}
        values = {m: (stats[m]["mean"], stats[m].get("low"), stats[m].get("high")) for m in methods}
        scale = high - low if np.isfinite(high - low) else max((abs(v) for pair in values.values() for v in pair if v), default=1.0)
        labels = _coinciding(values, names, BAR_TOLERANCE * scale)
        means = [np.nan if values[m][0] is None else values[m][0] for m in methods]
        # The interval (inside the range already: a bootstrap of the mean), cut at the range all the same.
        below = [0.0 if values[m][1] is None or not np.isfinite(mean) else max(0.0, mean - max(values[m][1], low))
                 for m, mean in zip(methods, means)]
        above = [0.0 if values[m][2] is None or not np.isfinite(mean) else max(0.0, min(values[m][2], high) - mean)
                 for m, mean in zip(methods, means)]
        # One colour per method, the same in every panel (and in every chart: method_colours).
        ax.barh(range(len(methods)), means, xerr=[below, above], capsize=3,
                color=[palette[m] for m in methods])
        ticks = []
        for m in methods:
            first = labels[m].split(" = ")[0]
            own = names.get(m, m)
            ticks.append(own if " = " not in labels[m] or own == first else f"{own} (= {first})")
        ax.set_yticks(range(len(methods)), ticks, fontsize=8)
        ax.set_ylim(len(methods) - 0.5, -0.5)  # the first method on top, as it is read
        counts = sorted({summary[m][metric]["n"] for m in methods})
        better = "" if higher_is_better is None else ("higher" if higher_is_better[metric] else "lower") + " is better, "
        ax.set_title(f"{titles.get(metric, metric)}\n{better}n = {'/'.join(map(str, counts))}", fontsize=9)
        tops = [mean + up for mean, up in zip(means, above) if np.isfinite(mean)]
        top = max(tops, default=0.0)
        ax.set_xlim(low if np.isfinite(low) else None, min(high, top * 1.1) if top > 0 else None)
        ax.tick_params(axis="x", labelsize=8)
    figure.suptitle("mean and 95% bootstrap interval (none for n < 5)\n(= A): the same bar as A, to within 0.1% "
                    "of the metric's range", fontsize=9)
    return figure


def sanity_figure(photo, rows: dict[str, list[np.ndarray]], columns: Sequence[str],
                  notes: dict[str, Sequence[str]], path: Path, per_line: int = 11) -> None:
    """Maps over ``photo`` (a PIL image: what the model sees) at each randomisation step, one
    row per method and one column per step, wrapped every ``per_line`` steps so that the labels
    stay legible; ``notes`` go under the maps."""
    lines = [range(start, min(start + per_line, len(columns))) for start in range(0, len(columns), per_line)]
    width = min(per_line, len(columns))
    figure = new_figure(1.55 * width + 0.5, (1.8 * len(rows) + 0.5) * len(lines))
    figure.set_layout_engine("constrained")
    for block, steps in zip(np.atleast_1d(figure.subfigures(len(lines), 1)), lines):
        axes = block.subplots(len(rows), width, squeeze=False)
        for row_axes, (method, maps) in zip(axes, rows.items()):
            for ax in row_axes[len(steps):]:
                ax.set_axis_off()
            for ax, step in zip(row_axes, steps):
                ax.imshow(overlay(photo, maps[step]))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(notes[method][step], fontsize=9, labelpad=2)
            row_axes[0].set_ylabel(method, fontsize=10)
        for ax, step in zip(axes[0], steps):
            ax.set_title(columns[step], fontsize=10)
    figure.savefig(path, format="png")


SIMILARITY_TOLERANCE = 1e-3  # of a Spearman or SSIM value: well below a line's width on the plot


def similarity_plot(similarity: dict[str, dict[str, list[float]]], groups: Sequence[str], threshold: float,
                    path: Path, verdicts: dict[str, str] | None = None) -> None:
    """Spearman and SSIM against the trained model's map, after each randomisation step, one
    line per method (labelled with its verdict, if given).

    A blank map (NaN Spearman: no correlation is defined) is drawn as a cross at the foot of
    the Spearman axis, and its SSIM is crossed too, so that no step silently disappears.
    Methods whose values agree to within 0.001 at every step share one line, labelled "A = B".
    """
    verdicts = verdicts or {}

    def known(values: Sequence[float]) -> list[float | None]:
        return [None if np.isnan(v) else float(v) for v in values]

    labels = _coinciding({m: known(v["spearman"]) + known(v["ssim"]) for m, v in similarity.items()}, {},
                         SIMILARITY_TOLERANCE)
    drawn: dict[str, str] = {}  # each line's label: the first method of its group
    for method, label in labels.items():
        drawn.setdefault(label, method)
    figure = new_figure(12.0, 5.0)
    axes = figure.subplots(1, 2, squeeze=False)[0]
    steps = range(1, len(groups) + 1)
    for ax, key in zip(axes, ("spearman", "ssim")):
        for index, (label, method) in enumerate(drawn.items()):
            values = similarity[method]
            blank = [i for i, v in enumerate(values["spearman"]) if np.isnan(v)]
            verdict = verdicts.get(method)
            line, = ax.plot(steps, values[key], linestyle=_DASHES[index % len(_DASHES)],
                            marker=_MARKERS[index % len(_MARKERS)], markersize=4,
                            label=f"{label}: {verdict}" if verdict else label)
            if blank:
                floor = [-1.0] * len(blank) if key == "spearman" else [values[key][i] for i in blank]
                ax.plot([i + 1 for i in blank], floor, linestyle="none", marker="x", markersize=8,
                        markeredgewidth=1.5, color=line.get_color())
        if key == "spearman":
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold}")
            ax.set_ylim(-1.08, 1.05)
            if any(np.isnan(v["spearman"]).any() for v in similarity.values()):
                ax.plot([], [], linestyle="none", marker="x", color="black", label="blank map (counts as changed)")
        ax.set_xticks(list(steps), groups, rotation=90, fontsize=8)
        ax.set_title(f"{'Spearman' if key == 'spearman' else 'SSIM'} with the trained model's map", fontsize=11)
        ax.set_xlabel("randomised down to", fontsize=9)
        shared = any(" = " in label for label in drawn)
        ax.legend(fontsize=8, title=f"A = B: within {SIMILARITY_TOLERANCE:g} at every step" if shared else None,
                  title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")


def training_curves(history: Sequence[dict], path: Path) -> None:
    """A training run's history: losses (train CE, train L_GGAM) and accuracies (train,
    validation) per epoch, the best epoch (highest validation accuracy, the first of equals,
    as the run keeps it) marked on both panels."""
    epochs = [row["epoch"] for row in history]
    figure = new_figure(10.0, 4.0)
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported only when a chart is drawn
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_ce"] for row in history], marker="o", markersize=3, label="train CE")
    loss_ax.plot(epochs, [row["train_ggam"] for row in history], marker="s", markersize=3, linestyle="--",
                 label="train L_GGAM")
    loss_ax.set_ylabel("loss (mean over the training images)")
    loss_ax.set_title("loss per epoch", fontsize=9)
    accuracy_ax.plot(epochs, [row["train_accuracy"] for row in history], marker="o", markersize=3,
                     label="train")
    accuracy_ax.plot(epochs, [row["val_accuracy"] for row in history], marker="s", markersize=3,
                     linestyle="--", label="validation")
    accuracy_ax.set_ylim(-0.02, 1.02)
    accuracy_ax.set_ylabel("accuracy")
    accuracy_ax.set_title("accuracy per epoch", fontsize=9)
    if history:
        best = max(history, key=lambda row: row["val_accuracy"])
        for ax in (loss_ax, accuracy_ax):
            ax.axvline(best["epoch"], color="grey", linestyle=":", label=f"best epoch ({best['epoch']})")
        accuracy_ax.plot([best["epoch"]], [best["val_accuracy"]], marker="*", markersize=12, color="C1",
                         linestyle="none")
    for ax in (loss_ax, accuracy_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
