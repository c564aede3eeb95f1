"""Localisation: does the map point at the object? Boxes are (x_min, y_min, x_max, y_max) in the
map's pixel coordinates, edges continuous: pixel (row i, column j) covers [j, j+1) x [i, i+1)
and lies in a box when its centre (j + 0.5, i + 0.5) does. An image may have several boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from ..errors import CamlensError

Box = Sequence[float]
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def _check_maps(maps: object, dims: tuple[int, ...] = (3,)) -> None:
    """Maps (N, H, W); with ``dims`` (2, 3, 4), of signals (N, L) and volumes (N, D, H, W) too."""
    if not isinstance(maps, Tensor) or maps.dim() not in dims or maps.numel() == 0:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        also = " (or (N, L) for signals, (N, D, H, W) for volumes)" if len(dims) > 1 else ""
        raise CamlensError(f"maps must have shape (N, H, W){also}, e.g. explanation.maps[:, t], got {got}")


def _check_boxes(boxes: object, count: int | None = None) -> None:
    """Boxes per image (``count`` images), or one image's boxes (``count`` None)."""
    try:
        items = list(boxes)
    except TypeError:
        items = None
    if count is not None:
        if items is None or len(items) != count:
            raise CamlensError(f"boxes must be a list of {count} lists of boxes, one list per image")
        for image_boxes in items:
            _check_boxes(image_boxes)
        return
    for box in items if items is not None else [boxes]:
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            values = []
        if len(values) != 4 or not all(map(math.isfinite, values)):
            raise CamlensError(f"a box is four finite numbers (x_min, y_min, x_max, y_max), got {box!r}")


def box_mask(boxes: Sequence[Box], height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W) bool mask of the pixels whose centre lies in any of ``boxes``."""
    _check_boxes(boxes)
    ys = torch.arange(height, device=device, dtype=torch.float64) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float64) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes:
        inside_y = (ys >= y0) & (ys <= y1)
        inside_x = (xs >= x0) & (xs <= x1)
        mask |= inside_y[:, None] & inside_x[None, :]
    return mask


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Energy-based pointing game: :math:`\sum_{\text{box}} L / \sum L` per image. Higher is better.

    ``maps`` (N, H, W), ``masks`` (N, H, W) bool; (N, L) for signals and (N, D, H, W) for
    volumes alike, the mask then of samples or voxels. An all-zero map scores 0.
    """
    _check_maps(maps, (2, 3, 4))
    if not isinstance(masks, Tensor) or masks.shape != maps.shape:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise CamlensError(f"masks must have the maps' shape {tuple(maps.shape)}, got {got}")
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0)


def pointing_game(maps: Tensor, boxes: Sequence[Sequence[Box]], tolerance: float = 15.0) -> Tensor:
    """A hit (1.0) when the map's maximum lies within ``tolerance`` pixels of a box, else 0.0.

    The maximum is the first pixel of largest value in row-major order; its centre is measured
    to the nearest point of each box.
    """
    _check_maps(maps)
    _check_boxes(boxes, maps.shape[0])
    count, height, width = maps.shape
    index = maps.reshape(count, -1).argmax(dim=1)
    y = (index // width).double() + 0.5
    x = (index % width).double() + 0.5
    hits = torch.zeros(count, dtype=torch.float64, device=maps.device)
    for n, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes:
            dx = torch.clamp(torch.stack([x0 - x[n], x[n] - x1]).max(), min=0)
            dy = torch.clamp(torch.stack([y0 - y[n], y[n] - y1]).max(), min=0)
            if torch.hypot(dx, dy) <= tolerance:
                hits[n] = 1.0
    return hits


def connected_components(masks: Tensor) -> Tensor:
    """8-connected components of (N, H, W) bool masks: (N, H, W) labels, 0 for background,
    1, 2, ... for the components of each mask (scipy.ndimage.label, on the CPU)."""
    labels = np.zeros(masks.shape, dtype=np.int64)
    for n, mask in enumerate(masks.cpu().numpy()):
        labels[n] = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)[0]
    return torch.from_numpy(labels).to(masks.device)


def localisation_boxes(maps: Tensor, threshold: float = 0.2) -> Tensor:
    """The CAM paper's box: threshold at ``threshold`` x the map's maximum, then the bounding box
    of the largest connected component (8-connected; of equal largest ones, the one whose first
    pixel comes first in row-major order). (N, 4) as (x_min, y_min, x_max, y_max), pixel edges;
    an all-zero map gives an empty box (0, 0, 0, 0).
    """
    _check_maps(maps)
    count, height, width = maps.shape
    peak = maps.reshape(count, -1).amax(dim=1)
    masks = (maps >= threshold * peak.view(-1, 1, 1)) & (peak.view(-1, 1, 1) > 0)
    labels = connected_components(masks)
    boxes = torch.zeros(count, 4, dtype=torch.float64, device=maps.device)
    for n in range(count):
        sizes = torch.bincount(labels[n].flatten(), minlength=1)
        sizes[0] = 0
        if int(sizes.max()) == 0:
            continue
        rows, cols = (labels[n] == sizes.argmax()).nonzero(as_tuple=True)
        boxes[n] = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).double()
    return boxes


def box_iou(first: Tensor, second: Tensor) -> Tensor:
    """Intersection over union of boxes (..., 4) with continuous edges; 0 when both are empty."""
    x0 = torch.maximum(first[..., 0], second[..., 0])
    y0 = torch.maximum(first[..., 1], second[..., 1])
    x1 = torch.minimum(first[..., 2], second[..., 2])
    y1 = torch.minimum(first[..., 3], second[..., 3])
    intersection = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)

    def area(box: Tensor) -> Tensor:
        return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)

    union = area(first) + area(second) - intersection
    return torch.where(union > 0, intersection / torch.where(union > 0, union, 1), 0)


def localisation_correct(maps: Tensor, boxes: Sequence[Sequence[Box]], threshold: float = 0.2,
                         iou: float = 0.5) -> tuple[Tensor, Tensor]:
    """Weakly supervised localisation: (best IoU with any ground-truth box, 1.0 if >= ``iou``)."""
    _check_maps(maps)
    _check_boxes(boxes, maps.shape[0])
    predicted = localisation_boxes(maps, threshold)
    best = torch.zeros(maps.shape[0], dtype=torch.float64, device=maps.device)
    for n, image_boxes in enumerate(boxes):
        if image_boxes:
            truth = torch.tensor(image_boxes, dtype=torch.float64, device=maps.device).view(-1, 4)
            best[n] = box_iou(predicted[n].expand_as(truth), truth).max()
    return best, (best >= iou).double()


# -- against a mask of the object (Quantus's localisation category) ---------------------------------

def _against(maps: object, masks: object) -> tuple[Tensor, Tensor]:
    """Maps (N, *positions) and boolean masks of their shape, as (N, positions) float64 and bool."""
    _check_maps(maps, (2, 3, 4))
    if not isinstance(masks, Tensor) or masks.shape != maps.shape:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise CamlensError(f"masks must have the maps' shape {tuple(maps.shape)}, got {got}")
    return maps.detach().flatten(1).double(), masks.flatten(1).bool()


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI"): the share of the map's mass
    inside the mask, :math:`R_{in} / R_{tot}` (Quantus's ``RelevanceMassAccuracy``). On camlens's
    non-negative maps the energy pointing game's value, but NaN, not 0, for an all-zero map,
    whose share is undefined. Higher is better."""
    values, inside = _against(maps, masks)
    total = values.sum(dim=1)
    within = (values * inside).sum(dim=1)
    return torch.where(total != 0, within / torch.where(total != 0, total, 1), math.nan)


def _top(values: Tensor, count: Tensor | int) -> Tensor:
    """(N, positions) bool: each row's ``count`` largest values, ties broken by position (the
    first wins), so that results never depend on a sort's whims (Quantus's unstable argsort)."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    count = torch.as_tensor(count, device=values.device).reshape(-1, 1)
    return rank < count


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Relevance rank accuracy (Arras et al. 2022): with :math:`K` the mask's size, the share of
    the map's :math:`K` highest positions that lie inside the mask (Quantus's
    ``RelevanceRankAccuracy``; ties broken by position). NaN for an empty mask. Higher is better."""
    values, inside = _against(maps, masks)
    size = inside.sum(dim=1)
    hits = (_top(values, size) & inside).sum(dim=1).double()
    return torch.where(size > 0, hits / size.clamp(min=1), math.nan)


def top_k_intersection(maps: Tensor, masks: Tensor, k: int = 1000) -> Tensor:
    r"""Top-k intersection (Theiner et al. 2022, "Interpretable semantic photo geolocation"): the
    share of the map's ``k`` highest positions inside the mask, :math:`|T_k \cap S| / k`
    (Quantus's ``TopKIntersection``, k = 1000 by default; ties broken by position). Higher is
    better."""
    values, inside = _against(maps, masks)
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= values.shape[1]):
        raise CamlensError(f"k must be an integer from 1 to the maps' {values.shape[1]} positions, got {k!r}")
    return (_top(values, k) & inside).sum(dim=1).double() / k


def mask_auc(maps: Tensor, masks: Tensor) -> Tensor:
    r"""AUC (Fawcett 2006) of each map as a score of its positions against the mask as labels:
    the area under the ROC curve, as Quantus's ``AUC`` takes it from scikit-learn, which equals
    the probability that a position inside the mask scores higher than one outside, ties
    counting a half (Mann-Whitney). NaN where the mask is empty or everything. Higher is better;
    0.5 is chance."""
    from .sanity import _average_ranks

    values, inside = _against(maps, masks)
    ranks = _average_ranks(values)  # 1-based, ties averaged
    positive = inside.sum(dim=1).double()
    negative = inside.shape[1] - positive
    rank_sum = (ranks * inside).sum(dim=1)
    auc = (rank_sum - positive * (positive + 1) / 2) / torch.where(positive * negative > 0, positive * negative, 1)
    return torch.where(positive * negative > 0, auc, math.nan)
