"""Combine: weighted sums, upsampling, normalisation and layer fusion.

Every method ends here: ``L = ReLU(sum_k w_k A^k)`` at layer resolution (the raw map), then
``s(Up(L))`` at input resolution, then the average over target layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Bilinear upsampling of a constant map is constant only up to rounding; below this relative
# range a map counts as constant, so that rounding noise is never stretched to [0, 1].
CONSTANT_TOLERANCE = 1e-5


def weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    r"""Raw map :math:`L = \mathrm{ReLU}(\sum_k w_k A^k)`.

    ``weights`` (N, T, K) and ``activations`` (N, K, h, w) give (N, T, h, w).
    """
    return torch.relu(torch.einsum("ntk,nkhw->nthw", weights, activations))


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling ``Up`` of (N, T, h, w) maps to ``size`` (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def normalise(maps: Tensor) -> Tensor:
    r"""Min-max normalisation ``s`` of each map over its last two dimensions.

    :math:`s(M) = (M - \min M) / (\max M - \min M)`; a constant map becomes all zeros.
    """
    flat = maps.flatten(-2)
    low = flat.amin(-1, keepdim=True).unsqueeze(-1)
    high = flat.amax(-1, keepdim=True).unsqueeze(-1)
    span = high - low
    scale = torch.maximum(high.abs(), low.abs())
    constant = span <= CONSTANT_TOLERANCE * scale
    return torch.where(constant, torch.zeros_like(maps), (maps - low) / torch.where(constant, 1, span))


def fuse(maps: Sequence[Tensor]) -> Tensor:
    """Fuse the normalised maps of several target layers by averaging them."""
    return maps[0] if len(maps) == 1 else torch.stack(list(maps)).mean(dim=0)
