"""The comparison figure with many methods: wrapped into a grid, titles legible, one colour bar;
and `camlens methods` aligned for long names, each with its cost per image."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import camlens.methods
import camlens.render as render
from camlens.render import COLORBAR_LABEL, MAX_COLUMNS, Panel, comparison_figure, draw_comparison, grid_shape
from helpers import run

LABELS = ["espresso (0.61)", "American Staffordshire terrier, Staffordshire terrier, American pit bull terrier (0.12)", "cup (0.05)", "eggnog (0.02)"]


def make_rows(methods: int, targets: int) -> list[list[Panel]]:
    """One row per target: the photo, then ``methods`` panels; each image a solid colour that
    says which target and panel it is (red = target, green = panel)."""
    names = [method.display_name for method in camlens.methods.METHODS.values()]
    rows = []
    for t in range(targets):
        titles = [f"input\n{LABELS[t]}"] + [f"{names[i % len(names)]}\n{LABELS[t]}" for i in range(methods)]
        rows.append([Panel(Image.new("RGB", (16, 16), (t, p, 0)), title) for p, title in enumerate(titles)])
    return rows


def grid_cells(figure):
    """{(line, column): axes} of the figure's grid, and the other axes (the colour bars)."""
    cells, others = {}, []
    for ax in figure.axes:
        spec = ax.get_subplotspec()
        if spec is None or ax.get_label() == "<colorbar>":
            others.append(ax)
        else:
            cells[spec.rowspan.start, spec.colspan.start] = ax
    return cells, others


@pytest.mark.parametrize("panels", range(1, 41))
def test_grid_shape_is_the_fewest_lines_then_the_fewest_columns(panels):
    lines, columns = grid_shape(panels, 6)
    fewest = -(-panels // 6)  # lines of at most 6 cells
    assert lines == fewest
    assert lines * columns >= panels and columns <= 6
    assert lines * (columns - 1) < panels  # one column fewer would not hold them
    assert grid_shape(17, 6) == (3, 6) and grid_shape(7, 6) == (2, 4) and grid_shape(6, 6) == (1, 6)


@pytest.mark.parametrize(("methods", "targets", "lines", "columns"), [  # lines per target
    (1, 1, 1, 2),    # the photo and one method
    (5, 1, 1, 6),    # the default five methods: one line, as before
    (10, 1, 2, 6),
    (16, 1, 3, 6),
    (16, 4, 3, 6),   # --top-k 4 with sixteen methods: twelve lines
    (12, 3, 3, 5),   # 13 panels a target: three lines of 5, 5 and 3
])
def test_panels_wrap_into_the_grid_photo_first(methods, targets, lines, columns):
    rows = make_rows(methods, targets)
    figure = draw_comparison(rows, title="photo.png, layer features")
    cells, others = grid_cells(figure)
    assert max(cells)[0] + 1 == lines * targets and max(c for _, c in cells) + 1 == columns <= MAX_COLUMNS
    shown = {}
    for (line, column), ax in cells.items():
        if ax.images:
            t, p, _ = np.asarray(ax.images[0].get_array())[0, 0]
            shown[int(t), int(p)] = (line, column)
            title = " ".join(ax.get_title().split())
            assert title == " ".join(rows[t][p].title.split())  # every word of the title, wrapped or not
        assert not ax.axison
    # Row-major, the photo first, each target starting on a line of its own.
    assert shown == {(t, p): (t * lines + p // columns, p % columns)
                     for t in range(targets) for p in range(methods + 1)}
    # One colour bar, labelled, above the whole grid.
    assert len(others) == 1
    bar = others[0]
    assert bar.get_xlabel() == COLORBAR_LABEL or bar.get_ylabel() == COLORBAR_LABEL
    assert figure._suptitle.get_text() == "photo.png, layer features"


def test_titles_fit_and_the_layout_is_sensible_with_sixteen_methods_and_four_targets():
    for targets in (1, 4):
        figure = draw_comparison(make_rows(16, targets), title="photo.png, layer features\nexplained: ...")
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        page = figure.bbox
        cells, (bar,) = grid_cells(figure)
        images = [ax for ax in cells.values() if ax.images]
        titles = [ax.title.get_window_extent(renderer) for ax in images]
        boxes = [ax.get_window_extent(renderer) for ax in images]
        for i, title in enumerate(titles):
            # Inside the page, clear of every other title and of every image (its own included).
            assert page.x0 <= title.x0 and title.x1 <= page.x1 and page.y0 <= title.y0 and title.y1 <= page.y1
            assert not any(title.overlaps(other) for j, other in enumerate(titles) if j != i)
            assert not any(title.overlaps(box) for box in boxes)
            # Legible: at least 7.5 points.
            assert images[i].title.get_fontsize() >= 7.5
        assert bar.get_window_extent(renderer).y0 > max(t.y1 for t in titles)  # above the grid
        width, height = figure.get_size_inches() * figure.dpi
        assert width <= 1700 and height <= (1100 if targets == 1 else 2800)
        # Cells stay large enough to see a map: at least 170 pixels a side.
        assert min(box.width for box in boxes) >= 170 and min(box.height for box in boxes) >= 170


def test_comparison_figure_writes_an_rgb_png_of_the_figure(tmp_path, monkeypatch):
    drawn = []
    draw = render.draw_comparison
    monkeypatch.setattr(render, "draw_comparison", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    for methods, targets in ((1, 1), (16, 1), (16, 3)):
        path = tmp_path / f"{methods}x{targets}.png"
        comparison_figure(make_rows(methods, targets), path, title="t")
        picture = Image.open(path)
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.size == tuple(round(v) for v in drawn[-1].get_size_inches() * drawn[-1].dpi)
    assert len(drawn) == 3


def test_explain_with_every_method_draws_them_all_in_one_figure(tmp_path, monkeypatch, capsys):
    """`camlens explain` with every registered method, on a tiny model: one figure, every method
    under its display name, in the order asked."""
    (tmp_path / "grid_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=4), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "grid_models", raising=False)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    drawn = []
    draw = render.draw_comparison
    monkeypatch.setattr(render, "draw_comparison", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    names = list(camlens.methods.METHODS)
    args = ["explain", tmp_path / "p.png", "--model", "grid_models:net", "--input-size", "16",
            "--target-layer", "1", "--top-k", "2", "--out", tmp_path / "out"]
    for name in names:
        args += ["-m", name]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["methods"] == names
    (figure,) = drawn
    cells, _ = grid_cells(figure)
    lines, columns = grid_shape(len(names) + 1)
    titles = [" ".join(cells[line, column].get_title().split()) for line in range(lines) for column in range(columns)]
    displays = [camlens.methods.METHODS[name].display_name for name in names]
    assert [title.split(" ")[0] for title in titles[: len(names) + 1]] == ["input"] + [d.split(" ")[0] for d in displays]
    assert all(d in t for d, t in zip(displays, titles[1:]))
    assert Image.open(tmp_path / "out" / "p" / "comparison.png").size == tuple(
        round(v) for v in figure.get_size_inches() * figure.dpi)


def test_methods_command_aligns_long_names_and_gives_each_cost(capsys):
    width = max(map(len, camlens.methods.METHODS)) + 1
    assert width > 17  # gradcam-elementwise is longer than the old 16 characters
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(camlens.methods.METHODS)
    for line, (name, method) in zip(lines, camlens.methods.METHODS.items()):
        # Every summary starts in the same column, one space after the longest name.
        assert line[:width].rstrip() == name and line[width:] == method.summary
    for name, method in camlens.methods.METHODS.items():
        # The last clause of the summary is the cost per image: forward and backward passes.
        assert "; " in method.summary and "forward" in method.summary.rsplit("; ", 1)[1], name
