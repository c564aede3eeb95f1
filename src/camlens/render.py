"""Render: heat-map overlays and the side-by-side comparison figure.

Pillow blends the overlays; matplotlib (imported only when a figure is drawn) lays out the
comparison figure and supplies the colour maps.
"""

from __future__ import annotations

import difflib
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import CamlensError

DEFAULT_COLORMAP = "jet"
OVERLAY_MAX_SIDE = 512
COLORBAR_LABEL = "map value (each map scaled to 0 to 1)"
# The comparison figure: at most MAX_COLUMNS cells a line, each CELL_WIDTH x CELL_HEIGHT inches,
# titles wrapped at TITLE_CHARACTERS (9-point DejaVu Sans fits about 40 in a cell's width); cells
# shrink when the lines of cells would be taller than MAX_CELLS_HEIGHT inches, to MIN_SCALE at most.
MAX_COLUMNS = 6
CELL_WIDTH, CELL_HEIGHT = 2.6, 2.9
TITLE_CHARACTERS = 36
MAX_CELLS_HEIGHT, MIN_SCALE = 26.0, 0.75


def check_colormap(name: str) -> str:
    """``name`` if matplotlib knows the colour map, else a CamlensError that suggests some."""
    from matplotlib import colormaps

    if name in colormaps:
        return name
    close = difflib.get_close_matches(name, list(colormaps), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else " (any matplotlib colour map: jet, turbo, viridis, inferno, ...)"
    raise CamlensError(f"unknown colour map {name!r}{hint}")


def colorize(saliency: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(H, W) values in [0, 1] to an (H, W, 3) uint8 RGB image through a matplotlib colour map."""
    from matplotlib import colormaps

    rgba = colormaps[colormap](np.clip(saliency, 0.0, 1.0))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(
    image: Image.Image, saliency: np.ndarray, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP
) -> Image.Image:
    """The map, bilinearly resized to the image, coloured and blended over it."""
    field = Image.fromarray(np.asarray(saliency, dtype=np.float32), mode="F")
    field = field.resize(image.size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(colorize(np.asarray(field), colormap))
    return Image.blend(image.convert("RGB"), heat, alpha)


def model_view(image: Image.Image, box: Sequence[float], max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The region of the photo the model sees (``box``), at up to ``max_side`` pixels."""
    left, top, right, bottom = box
    scale = min(1.0, max_side / max(right - left, bottom - top))
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, box=tuple(box), reducing_gap=3.0)


def captioned(image: Image.Image, text: str) -> Image.Image:
    """The image with ``text`` on a white strip below it (shortened to fit), the image untouched."""
    from matplotlib import font_manager

    size = max(10, image.width // 24)
    font = ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), size)
    draw = ImageDraw.Draw(image)
    while len(text) > 1 and draw.textlength(text, font=font) > image.width - size:
        text = text[:-2] + "…"
    strip = round(size * 1.6)
    result = Image.new("RGB", (image.width, image.height + strip), (255, 255, 255))
    result.paste(image, (0, 0))
    ImageDraw.Draw(result).text((size // 2, image.height + strip // 2), text, fill=(20, 20, 20), font=font, anchor="lm")
    return result


@dataclass
class Panel:
    """One cell of the comparison figure."""

    image: Image.Image
    title: str


def comparison_figure(
    rows: Sequence[Sequence[Panel]], path: Path, title: str | None = None, colormap: str = DEFAULT_COLORMAP,
    columns: int = MAX_COLUMNS,
) -> None:
    """The comparison figure (see :func:`draw_comparison`) saved as PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(draw_comparison(rows, title, colormap, columns))
    canvas.draw()
    # RGB, not matplotlib's RGBA: the figure is opaque, and the file is an eighth smaller.
    Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).save(path, format="PNG")


def grid_shape(panels: int, columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """(lines, columns) for ``panels`` cells wrapped at ``columns``, the lines filled evenly:
    7 panels at 6 columns are 2 lines of 4, not 6 and 1."""
    lines = -(-panels // columns)
    return lines, -(-panels // lines)


def draw_comparison(
    rows: Sequence[Sequence[Panel]], title: str | None = None, colormap: str = DEFAULT_COLORMAP,
    columns: int = MAX_COLUMNS,
):
    """A matplotlib figure of the panels: each row (one per target: the photo, then the methods)
    wrapped into lines of at most ``columns`` cells, and one colour bar for all the maps."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lines, count = grid_shape(max(len(row) for row in rows), columns)
    total = lines * len(rows)
    # Many lines (several targets, many methods): smaller cells, text included, down to
    # MIN_SCALE, to keep the figure and its file a sensible size.
    scale = max(MIN_SCALE, min(1.0, MAX_CELLS_HEIGHT / (CELL_HEIGHT * total)))
    height = CELL_HEIGHT * scale * total
    font = max(7.5, 9 * scale)  # points: smaller is hard to read at 100 dpi
    # Constrained layout leaves room for the colour bar, which tight_layout does not.
    width = CELL_WIDTH * scale * count
    figure = new_figure(width + 0.8, height + 0.8 + (0.6 if title else 0), layout="constrained")
    axes = figure.subplots(total, count, squeeze=False)
    for group, row in enumerate(rows):
        for ax, panel in zip(axes[group * lines:(group + 1) * lines].ravel(), row):
            ax.imshow(panel.image)
            ax.set_title(fitted(panel.title, int(TITLE_CHARACTERS * 9 * scale / font)), fontsize=font)
    for ax in axes.ravel():
        ax.set_axis_off()
    # On top, under the title: beside a figure of many lines, a bar would be far from most of them.
    # About 0.15 inches thick and 0.1 from the grid, whatever the figure's size.
    shrink = min(0.6, 4 / count)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=axes.ravel().tolist(), location="top",
                          fraction=0.35 / height, pad=0.1 / height, shrink=shrink, aspect=shrink * width / 0.15)
    bar.set_label(COLORBAR_LABEL, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def fitted(title: str, width: int = TITLE_CHARACTERS) -> str:
    """Each line of ``title`` wrapped to ``width`` characters, so that no title runs into its neighbours."""
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def new_figure(width: float, height: float, layout: str | None = None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)
