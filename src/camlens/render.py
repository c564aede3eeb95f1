"""Render: heat-map overlays and the side-by-side comparison figure.

Pillow blends the overlays; matplotlib (imported only when a figure is drawn) lays out the
comparison figure and supplies the colour maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_COLORMAP = "jet"
OVERLAY_MAX_SIDE = 512


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


@dataclass
class Panel:
    """One cell of the comparison figure."""

    image: Image.Image
    title: str


def comparison_figure(rows: Sequence[Sequence[Panel]], path: Path, title: str | None = None) -> None:
    """A grid of panels (one row per target), saved as PNG at ``path``."""
    count = max(len(row) for row in rows)
    figure = new_figure(2.6 * count, 2.9 * len(rows) + (0.4 if title else 0))
    axes = figure.subplots(len(rows), count, squeeze=False)
    for row_axes, row in zip(axes, rows):
        for ax, panel in zip(row_axes, row):
            ax.imshow(panel.image)
            ax.set_title(panel.title, fontsize=9)
        for ax in row_axes:
            ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, format="png")


def new_figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)
