"""The evaluation's charts stay legible from 1 to 16 methods (issue 10, point 7): every name once,
level and apart, and the curves' legend off the curves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from camlens.charts import bar_chart, curve_plot, draw_bar_chart, draw_curve_plot
from camlens.evaluate import HIGHER_IS_BETTER, RANGES, TITLES
from camlens.methods import METHODS

METRICS = ["drop", "increase", "deletion", "insertion"]


def methods(count: int) -> dict[str, str]:
    """The first ``count`` registered methods with their display names, the longest real ones."""
    return {m: METHODS[m].display_name for m in list(METHODS)[:count]}


def summary(names: dict[str, str]) -> dict:
    """Distinct bars, except that the second method repeats the first: its name gets "(= first)"."""
    out = {}
    for i, method in enumerate(names):
        k = 0 if i == 1 else i
        out[method] = {"drop": {"mean": 5.0 + 4 * k, "low": 2.0 + 4 * k, "high": 8.0 + 4 * k, "n": 32},
                       # an interval past the range is cut at 100
                       "increase": {"mean": 95.0 - 5 * k, "low": 85.0 - 5 * k, "high": 105.0 - 5 * k, "n": 32},
                       "deletion": {"mean": 0.1 + 0.02 * k, "low": 0.07 + 0.02 * k, "high": 0.13 + 0.02 * k,
                                    "n": 31 + (k == 3)},
                       "insertion": {"mean": 0.3 + 0.03 * k, "low": 0.25 + 0.03 * k, "high": 0.35 + 0.03 * k, "n": 32}}
    return out


def overlap(a, b) -> bool:
    """Strictly overlapping window extents (touching edges do not count)."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def rendered(figure):
    """The figure laid out and drawn as savefig draws it (a bare Figure's own canvas draws nothing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    return figure


def texts(figure):
    """Every non-empty visible text of the figure: tick labels, titles, axis labels, suptitle."""
    found = [figure._suptitle] if figure._suptitle else []
    for ax in figure.axes:
        low, high = sorted(ax.get_xlim())  # tick labels beyond the limits are listed but not drawn
        found += [t for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
        found += [*ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label]
    return [t for t in found if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("count", [1, 5, 16])
def test_bar_chart_names_every_method_once_per_panel_without_overlap(tmp_path, count):
    names = methods(count)
    stats = summary(names)
    bar_chart(stats, METRICS, TITLES, tmp_path / "metrics.png", names, HIGHER_IS_BETTER, RANGES)
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.format == "PNG"

    figure = rendered(draw_bar_chart(stats, METRICS, TITLES, names, HIGHER_IS_BETTER, RANGES))
    assert len(figure.axes) == len(METRICS)
    assert len({round(ax.get_position().x0, 3) for ax in figure.axes}) <= 2  # two columns at most
    for ax, metric in zip(figure.axes, METRICS):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        top, bottom = (ax.get_yticklabels()[i].get_window_extent().y0 for i in (0, -1))
        assert top > bottom or count == 1  # the first method on top
        # In the order given, each name once, the repeated bar saying whose it is.
        assert [label.split(" (= ")[0] for label in labels] == list(names.values())
        if count > 1:
            first, second = list(names.values())[:2]
            assert labels[1] == f"{second} (= {first})"
        assert f"{'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better, n = " in ax.get_title()
        bars = ax.collections[0].get_segments()  # the error bars: horizontal, one per method
        assert len(bars) == count and all(s[0, 1] == s[1, 1] for s in bars)
        assert max(s[:, 0].max() for s in bars) <= RANGES[metric][1]
    assert figure.axes[2].get_title().endswith("n = 31/32" if count > 3 else "n = 31")
    assert np.allclose(sorted(figure.axes[1].collections[0].get_segments()[0][:, 0]), [85.0, 100.0])

    shown = texts(figure)
    boxes = [t.get_window_extent() for t in shown]
    frame = figure.bbox
    for text, box in zip(shown, boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
    for i, (a, box) in enumerate(zip(shown, boxes)):
        for b, other in zip(shown[i + 1:], boxes[i + 1:]):
            assert not overlap(box, other), (a.get_text(), b.get_text())
    for ax in figure.axes:  # no name runs into a neighbouring panel's bars
        assert ax.get_window_extent().width >= 2 * figure.dpi  # bars long enough to compare
        for label in ax.get_yticklabels():
            assert not any(overlap(label.get_window_extent(), other.get_window_extent()) for other in figure.axes)


def test_bar_chart_grows_with_the_methods():
    heights = [draw_bar_chart(summary(methods(n)), METRICS, TITLES, methods(n)).get_size_inches()[1]
               for n in (1, 5, 16)]
    assert heights[0] < heights[1] < heights[2]


@pytest.mark.parametrize("count", [5, 16])
def test_curve_legend_stays_off_the_curves(tmp_path, count):
    names = methods(count)
    rising = {m: [0.1 + 0.02 * i + 0.05 * step for step in range(9)] for i, m in enumerate(names)}
    curves = {"deletion": {m: v[::-1] for m, v in rising.items()}, "insertion": rising}
    curve_plot(curves, tmp_path / "curves.png", names, 32)
    assert (tmp_path / "curves.png").stat().st_size > 0

    figure = rendered(draw_curve_plot(curves, names, 32))
    for ax in figure.axes:
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == list(names.values())
        looks = {(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in ax.lines}
        assert len(looks) == count  # no two lines alike
        box = legend.get_window_extent()
        assert not overlap(box, ax.get_window_extent())  # the data area
        assert ax.get_window_extent().height >= 2.5 * figure.dpi  # which the legend did not squash
        assert not overlap(box, ax.xaxis.label.get_window_extent())
        assert figure.bbox.y0 <= box.y0 and box.x0 >= figure.bbox.x0 and box.x1 <= figure.bbox.x1
    assert not overlap(*(ax.get_legend().get_window_extent() for ax in figure.axes))
