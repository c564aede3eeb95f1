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


# -- signals, volumes and clips ------------------------------------------------------------------

MONTAGE_SLICES = 8  # slices of a volume, or frames of a clip, shown at most (evenly spaced)
MONTAGE_SIDE = 160  # each slice drawn at least this many pixels on its longer side (nearest, no blur)


def picture(values: np.ndarray) -> Image.Image:
    """An input's (C, H, W) values as a picture, scaled from their own minimum and maximum to
    0..255: RGB for three channels, else the first channel in grey. An input is preprocessed
    (normalised) data, not a photo: the scaling shows its contrast, not its colours as captured."""
    return _pixels(_scaled(values))


def _scaled(values: np.ndarray) -> np.ndarray:
    """``values`` scaled from their minimum and maximum to [0, 1] (all 0 where they are constant)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


def _pixels(scaled: np.ndarray) -> Image.Image:
    """(C, H, W) values in [0, 1] as RGB: the three channels, or the first in grey."""
    pixels = (scaled * 255 + 0.5).astype(np.uint8)
    if pixels.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")
    return Image.fromarray(pixels[0], mode="L").convert("RGB")


def chosen_slices(count: int, most: int = MONTAGE_SLICES) -> list[int]:
    """Up to ``most`` indices of ``count`` slices, evenly spaced, the first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def slice_montage(
    values: np.ndarray, saliency: np.ndarray | None, frames: bool = False, alpha: float = 0.5,
    colormap: str = DEFAULT_COLORMAP, most: int = MONTAGE_SLICES,
) -> Image.Image:
    """A volume's slices (or a clip's frames, ``frames``) with the map over each: ``values``
    (C, D, H, W), ``saliency`` (D, H, W) in [0, 1] (None: the input alone). Up to ``most`` slices,
    evenly spaced, each captioned with its index; a volume's on lines of four, a clip's frames in
    one strip. The slices share one grey scale (the whole input's minimum and maximum)."""
    scaled = _scaled(values)
    depth, height, width = scaled.shape[1:]
    zoom = max(1, -(-MONTAGE_SIDE // max(height, width)))
    cells = []
    for index in chosen_slices(depth, most):
        cell = _pixels(scaled[:, index])
        cell = cell.resize((width * zoom, height * zoom), Image.Resampling.NEAREST)
        if saliency is not None:
            cell = overlay(cell, saliency[index], alpha, colormap)
        cells.append(captioned(cell, f"{'frame' if frames else 'slice'} {index}"))
    columns = len(cells) if frames else min(4, len(cells))
    lines = -(-len(cells) // columns)
    cell_width, cell_height = cells[0].size
    gap = 4
    sheet = Image.new("RGB", (columns * cell_width + (columns - 1) * gap, lines * cell_height + (lines - 1) * gap),
                      (255, 255, 255))
    for place, cell in enumerate(cells):
        line, column = divmod(place, columns)
        sheet.paste(cell, (column * (cell_width + gap), line * (cell_height + gap)))
    return sheet


SIGNAL_CHANNELS = 6  # channels of a signal drawn at most, one panel each
SIGNAL_POINTS = 600  # a longer signal is drawn as the span (minimum to maximum) of as many runs of samples,
# fewer than the axes have pixels across: each run, and the largest map value in it, keeps a column


def signal_band(
    values: np.ndarray, saliency: np.ndarray | None, title: str | None = None, colormap: str = DEFAULT_COLORMAP,
    most: int = SIGNAL_CHANNELS,
) -> Image.Image:
    """A signal's channels, one panel each (the first ``most``), over the map drawn as a coloured
    band along time: ``values`` (C, L), ``saliency`` (L,) in [0, 1] (None: the signal alone). A
    signal longer than ``SIGNAL_POINTS`` samples is drawn as its envelope (each column the span of
    its samples) over the map's largest value in each column, so that a long recording draws as
    fast as a short one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    values = np.asarray(values, dtype=np.float64)
    channels, length = values.shape
    shown = min(channels, most)
    figure = new_figure(8.0, 0.6 + 1.3 * shown + (0.3 if title else 0), layout="constrained")
    axes = figure.subplots(shown, 1, squeeze=False, sharex=True)[:, 0]
    x = np.arange(length)
    edges = np.linspace(0, length, SIGNAL_POINTS + 1).astype(int) if length > SIGNAL_POINTS else None
    band = None if saliency is None else np.asarray(saliency, dtype=np.float64)
    if band is not None and edges is not None:
        band = np.maximum.reduceat(band, edges[:-1])  # a brief salient stretch stays in its column
    for channel, ax in enumerate(axes):
        trace = values[channel]
        low, high = float(trace.min()), float(trace.max())
        margin = (high - low) * 0.08 or 1.0
        if band is not None:
            ax.imshow(band[None], aspect="auto", cmap=colormap, vmin=0, vmax=1,
                      extent=(-0.5, length - 0.5, low - margin, high + margin), alpha=0.55, interpolation="nearest")
        if edges is not None:  # each of SIGNAL_POINTS columns drawn as the span of its samples
            ax.fill_between((edges[:-1] + edges[1:] - 1) / 2, np.minimum.reduceat(trace, edges[:-1]),
                            np.maximum.reduceat(trace, edges[:-1]), color="black", linewidth=0.6)
        else:
            ax.plot(x, trace, color="black", linewidth=0.9)
        ax.set_xlim(-0.5, length - 0.5)
        ax.set_ylim(low - margin, high + margin)
        ax.set_ylabel(f"channel {channel}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("sample" + (f" (channels {shown} to {channels - 1} not drawn)" if shown < channels else ""),
                        fontsize=8)
    # The bar's room is kept without a map: the signal alone then lies exactly under the figure with one.
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=list(axes), location="right",
                          fraction=0.04, pad=0.01)
    bar.set_label("map (0 to 1)", fontsize=7)  # short: the label runs along a panel as high as one channel
    bar.ax.tick_params(labelsize=7)
    bar.ax.set_visible(saliency is not None)
    if title:
        figure.suptitle(title, fontsize=10)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def array_kind(values: np.ndarray) -> str:
    """What an array input is, by its shape: a signal (C, L), an image (C, H, W), a clip (3, T, H, W:
    RGB frames) or a volume (C, D, H, W, other channels), as :func:`input_figure` draws it."""
    if np.ndim(values) == 2:
        return "signal"
    if np.ndim(values) == 3:
        return "image"
    return "clip" if np.shape(values)[0] == 3 else "volume"


def input_figure(
    values: np.ndarray, saliency: np.ndarray | None, colormap: str = DEFAULT_COLORMAP, title: str | None = None,
) -> Image.Image:
    """The figure of one input (C, *positions) with its map (*positions) over it (None: the input
    alone): a signal's band (1-D), an image's overlay (2-D), a clip's frame strip (3-D, three
    channels) or a volume's montage of slices (3-D, other channels)."""
    spatial = np.ndim(values) - 1
    if spatial == 1:
        return signal_band(values, saliency, title, colormap)
    if spatial == 2:
        view = picture(values)
        side = max(view.size)
        if side < MONTAGE_SIDE * 2:  # a small array drawn larger, pixel for pixel
            zoom = -(-MONTAGE_SIDE * 2 // side)
            view = view.resize((view.width * zoom, view.height * zoom), Image.Resampling.NEAREST)
        return view if saliency is None else overlay(view, saliency, colormap=colormap)
    if spatial == 3:
        return slice_montage(values, saliency, frames=array_kind(values) == "clip", colormap=colormap)
    raise CamlensError(f"an input to draw is (C, L), (C, H, W) or (C, D, H, W), got shape {np.shape(values)}")


def stacked(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures one under another, left-aligned, on white."""
    width = max(p.width for p in pictures)
    sheet = Image.new("RGB", (width, sum(p.height for p in pictures) + gap * (len(pictures) - 1)), (255, 255, 255))
    top = 0
    for p in pictures:
        sheet.paste(p, (0, top))
        top += p.height + gap
    return sheet


BOX_COLOUR = (255, 255, 255)


def draw_box(image: Image.Image, box: Sequence[float], text: str | None = None) -> Image.Image:
    """``image`` with a detection's ``box`` (x1, y1, x2, y2 in its pixels) drawn on it: a white
    outline over a dark one (visible on any map), and ``text`` on a dark label at its top left."""
    from matplotlib import font_manager

    drawn = image.convert("RGB")
    draw = ImageDraw.Draw(drawn)
    width = max(2, round(max(drawn.size) / 160))
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0), drawn.width - 1), min(max(x2, 0), drawn.width - 1)))
    y1, y2 = sorted((min(max(y1, 0), drawn.height - 1), min(max(y2, 0), drawn.height - 1)))
    draw.rectangle((x1, y1, x2, y2), outline=(0, 0, 0), width=width + 2)
    draw.rectangle((x1 + 1, y1 + 1, x2 - 1, y2 - 1), outline=BOX_COLOUR, width=width)
    if text:
        size = max(10, drawn.width // 30)
        font = ImageFont.truetype(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans")), size)
        left, top, right, bottom = font.getbbox(text)
        high = bottom - top + 6
        y = max(0, y1 - high)  # above the box, or inside it at the image's top edge
        draw.rectangle((x1, y, x1 + right - left + 6, y + high), fill=(20, 20, 20))
        draw.text((x1 + 3, y + 3 - top), text, fill=BOX_COLOUR, font=font)
    return drawn


def draw_relative_box(image: Image.Image, box: Sequence[float], text: str | None = None) -> Image.Image:
    """:func:`draw_box` of a box given as fractions (0 to 1) of the image's width and height."""
    width, height = image.size
    return draw_box(image, [float(v) * (width if i % 2 == 0 else height) for i, v in enumerate(box)], text)
