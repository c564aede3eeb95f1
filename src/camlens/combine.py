"""Combine: weighted sums, upsampling, normalisation and layer fusion.

Every method ends here: ``L = ReLU(sum_k w_k A^k)`` at layer resolution (the raw map), then
``s(Up(L))`` at input resolution, then the average over target layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

def channel_sum(weights: Tensor, activations: Tensor) -> Tensor:
    r""":math:`\sum_k w_k A^k`, before the ReLU of :func:`weighted_sum`.

    ``weights`` (N, T, K), one per channel, or (N, T, K, h, w), one per activation (then
    :math:`\sum_k w_k \odot A^k`), and ``activations`` (N, K, h, w) give (N, T, h, w).
    """
    pattern = "ntkhw,nkhw->nthw" if weights.dim() == 5 else "ntk,nkhw->nthw"
    return torch.einsum(pattern, weights, activations)


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    r"""Raw map :math:`L = \mathrm{ReLU}(\sum_k w_k A^k)`, or
    :math:`\mathrm{ReLU}(\sum_k w_k \odot A^k)` for weights per activation: the shapes of
    :func:`channel_sum`."""
    return torch.relu(channel_sum(weights, activations))


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling ``Up`` of (N, T, h, w) maps to ``size`` (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


# A map is flat when its values differ by no more than float rounding: at most this many
# epsilons of its dtype, relative to its largest magnitude. (Two computations of the same map,
# e.g. channels-last and contiguous convolutions, differ by a few epsilons where it is flat.)
FLAT_EPS = 64


def _flat(low: Tensor, high: Tensor) -> Tensor:
    eps = torch.finfo(low.dtype).eps if low.is_floating_point() else 0.0
    return (high - low) <= FLAT_EPS * eps * torch.maximum(low.abs(), high.abs())


def normalise(maps: Tensor, constant: Tensor | None = None) -> Tensor:
    r"""Min-max normalisation ``s`` of each map over its last two dimensions.

    :math:`s(M) = (M - \min M) / (\max M - \min M)`; a map that is constant (up to float
    rounding: a spread of at most ``FLAT_EPS`` epsilons of its magnitude) becomes all zeros.
    ``constant`` (broadcastable to ``maps.shape[:-2]``) marks maps known to be constant.
    """
    flat = maps.flatten(-2)
    low = flat.amin(-1)[..., None, None]
    high = flat.amax(-1)[..., None, None]
    span = high - low
    zero = (span == 0) | _flat(low, high)
    if constant is not None:
        zero = zero | constant[..., None, None]
    return torch.where(zero, torch.zeros_like(maps), (maps - low) / torch.where(zero, 1, span))


def is_constant(maps: Tensor) -> Tensor:
    """True for each (h, w) map whose values are all equal, up to float rounding (see
    :func:`normalise`); shape ``maps.shape[:-2]``."""
    flat = maps.flatten(-2)
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)
    return (high == low) | _flat(low, high)


def upsample_normalise(maps: Tensor, size: Sequence[int]) -> Tensor:
    """``s(Up(M))`` for layer-resolution maps.

    Constancy is decided at layer resolution, where it is exact: bilinear upsampling of a
    constant map is constant mathematically, but rounding can leave it a few ulps uneven, and
    ``s`` would stretch that noise to [0, 1]. Such maps become all zeros, as ``s`` says.
    """
    return normalise(upsample(maps, size), is_constant(maps))


def fuse(maps: Sequence[Tensor]) -> Tensor:
    """Fuse the normalised maps of several target layers by averaging them."""
    return maps[0] if len(maps) == 1 else torch.stack(list(maps)).mean(dim=0)
