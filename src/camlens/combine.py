"""Combine: weighted sums, upsampling, normalisation and layer fusion.

Every method ends here: ``L = ReLU(sum_k w_k A^k)`` at layer resolution (the raw map), then
``s(Up(L))`` at input resolution, then the average over target layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# How maps of 1, 2 and 3 dimensions (a signal, an image, a volume or clip) are upsampled: the
# linear interpolation of each dimension, as bilinear is for images.
INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def positions(tensor: Tensor, first: int) -> tuple[int, ...]:
    """The dimensions of ``tensor`` from ``first`` on: its positions, (h, w) for an image's map,
    (l) for a signal's, (d, h, w) for a volume's; e.g. ``first=2`` for an activation (N, K, h, w),
    3 for a gradient (N, T, K, h, w)."""
    return tuple(range(first, tensor.dim()))


def at_positions(values: Tensor, spatial: int) -> Tensor:
    """``values`` with ``spatial`` dimensions of size 1 added at the end, to broadcast over positions."""
    return values.reshape(*values.shape, *(1,) * spatial)


def channel_sum(weights: Tensor, activations: Tensor) -> Tensor:
    r""":math:`\sum_k w_k A^k`, before the ReLU of :func:`weighted_sum`.

    ``weights`` (N, T, K), one per channel, or (N, T, K, h, w), one per activation (then
    :math:`\sum_k w_k \odot A^k`), and ``activations`` (N, K, h, w) give (N, T, h, w). The
    positions may have any number of dimensions: (l) for a signal, (d, h, w) for a volume.
    """
    per_activation = weights.dim() == activations.dim() + 1
    return torch.einsum("ntk...,nk...->nt..." if per_activation else "ntk,nk...->nt...", weights, activations)


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    r"""Raw map :math:`L = \mathrm{ReLU}(\sum_k w_k A^k)`, or
    :math:`\mathrm{ReLU}(\sum_k w_k \odot A^k)` for weights per activation: the shapes of
    :func:`channel_sum`."""
    return torch.relu(channel_sum(weights, activations))


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling ``Up`` of (N, T, h, w) maps to ``size`` (align_corners=False); linear
    for (N, T, l) maps of a signal, trilinear for (N, T, d, h, w) maps of a volume or clip."""
    size = tuple(size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=INTERPOLATION[len(size)], align_corners=False)


# A map is flat when its values differ by no more than float rounding: at most this many
# epsilons of its dtype, relative to its largest magnitude. (Two computations of the same map,
# e.g. channels-last and contiguous convolutions, differ by a few epsilons where it is flat.)
FLAT_EPS = 64


def _flat(low: Tensor, high: Tensor) -> Tensor:
    eps = torch.finfo(low.dtype).eps if low.is_floating_point() else 0.0
    return (high - low) <= FLAT_EPS * eps * torch.maximum(low.abs(), high.abs())


def normalise(maps: Tensor, constant: Tensor | None = None, spatial: int = 2) -> Tensor:
    r"""Min-max normalisation ``s`` of each map over its last ``spatial`` dimensions (two for
    an image's (h, w), one for a signal, three for a volume).

    :math:`s(M) = (M - \min M) / (\max M - \min M)`; a map that is constant (up to float
    rounding: a spread of at most ``FLAT_EPS`` epsilons of its magnitude) becomes all zeros.
    ``constant`` (broadcastable to ``maps.shape[:-spatial]``) marks maps known to be constant.
    """
    flat = maps.flatten(-spatial)
    low = at_positions(flat.amin(-1), spatial)
    high = at_positions(flat.amax(-1), spatial)
    span = high - low
    zero = (span == 0) | _flat(low, high)
    if constant is not None:
        zero = zero | at_positions(constant, spatial)
    return torch.where(zero, torch.zeros_like(maps), (maps - low) / torch.where(zero, 1, span))


def is_constant(maps: Tensor, spatial: int = 2) -> Tensor:
    """True for each map (its last ``spatial`` dimensions: (h, w) for an image) whose values are
    all equal, up to float rounding (see :func:`normalise`); shape ``maps.shape[:-spatial]``."""
    flat = maps.flatten(-spatial)
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)
    return (high == low) | _flat(low, high)


def upsample_normalise(maps: Tensor, size: Sequence[int]) -> Tensor:
    """``s(Up(M))`` for layer-resolution maps.

    Constancy is decided at layer resolution, where it is exact: bilinear upsampling of a
    constant map is constant mathematically, but rounding can leave it a few ulps uneven, and
    ``s`` would stretch that noise to [0, 1]. Such maps become all zeros, as ``s`` says.
    """
    spatial = len(size)
    return normalise(upsample(maps, size), is_constant(maps, spatial), spatial)


def fuse(maps: Sequence[Tensor]) -> Tensor:
    """Fuse the normalised maps of several target layers by averaging them."""
    return maps[0] if len(maps) == 1 else torch.stack(list(maps)).mean(dim=0)
