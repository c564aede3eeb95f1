"""Render: heat-map overlays and the side-by-side comparison figure.

Pillow blends the overlays; matplotlib (imported only when a figure is drawn) lays out the
comparison figure and supplies the colour maps.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import CamlensError

DEFAULT_COLORMAP = "jet"
OVERLAY_MAX_SIDE = 512
COLORBAR_LABEL = "map value (each map scaled to 0 to 1)"


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
    rows: Sequence[Sequence[Panel]], path: Path, title: str | None = None, colormap: str = DEFAULT_COLORMAP
) -> None:
    """A grid of panels (one row per target) with a colour bar for the maps, saved as PNG at ``path``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    count = max(len(row) for row in rows)
    # Constrained layout leaves room for the colour bar, which tight_layout does not.
    figure = new_figure(2.6 * count + 0.8, 2.9 * len(rows) + (0.6 if title else 0), layout="constrained")
    axes = figure.subplots(len(rows), count, squeeze=False)
    for row_axes, row in zip(axes, rows):
        for ax, panel in zip(row_axes, row):
            ax.imshow(panel.image)
            ax.set_title(panel.title, fontsize=9)
        for ax in row_axes:
            ax.set_axis_off()
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=axes[:, 1:].ravel().tolist(),
                          fraction=0.04, shrink=0.9, pad=0.02)
    bar.set_label(COLORBAR_LABEL, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path, format="png")


def new_figure(width: float, height: float, layout: str | None = None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)
