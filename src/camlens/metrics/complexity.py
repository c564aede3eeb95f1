r"""Complexity: how concentrated is a map? Quantus's complexity category (Hedström et al. 2023).

A map that puts its weight on a few positions is easier to read than one spread over all of
them; these metrics say how concentrated each map is, whatever the model does with it. Every
function takes maps (N, *positions) (an image's (N, H, W), a signal's (N, L), a volume's
(N, D, H, W); e.g. ``explanation.maps[:, t]``), uses their absolute values, and returns one
value per map, as Quantus does (its ``abs=True``; its default normalisation by the largest
absolute value changes none of these but ``effective_complexity``'s threshold, whose default
here is on the same scale: camlens's maps already have their largest value at 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import CamlensError
from .localisation import _check_maps


def _flat(maps: object) -> Tensor:
    """``maps`` (N, *positions) as (N, positions) absolute values in float64."""
    _check_maps(maps, (2, 3, 4))
    if not maps.is_floating_point() or not bool(torch.isfinite(maps).all()):
        raise CamlensError("maps must hold finite floating-point values")
    return maps.detach().flatten(1).double().abs()


def sparseness(maps: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Sparseness (Chalasani et al. 2020, "Concise explanations of neural networks using
    adversarial training"): the Gini index of each map's absolute values,

    .. math:: G = \frac{\sum_{i=1}^{n} (2i - n - 1)\, a_{(i)}}{n \sum_{i=1}^{n} a_{(i)}}

    with :math:`a_{(1)} \le \dots \le a_{(n)}` the sorted values, each plus ``eps`` first (as
    Quantus adds 1e-7: an all-zero map is then defined, 0). 0 for a constant map; a map with
    one non-zero position gives :math:`(n - 1)/n` (1 as n grows). Higher: more concentrated.
    """
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise CamlensError(f"eps must be a finite number >= 0, got {eps!r}")
    values = _flat(maps) + eps
    n = values.shape[1]
    ordered = values.sort(dim=1).values
    rank = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    total = ordered.sum(dim=1)
    gini = ((2 * rank - n - 1) * ordered).sum(dim=1) / (n * total)
    return torch.where(total > 0, gini, torch.zeros_like(gini))


def complexity(maps: Tensor) -> Tensor:
    r"""Complexity (Bhatt et al. 2020, "Evaluating and aggregating feature-based model
    explanations"): the entropy of each map's fractional contributions,

    .. math:: H = -\sum_i p_i \ln p_i, \qquad p_i = |a_i| / \sum_j |a_j|

    (natural logarithm, :math:`0 \ln 0 = 0`, as Quantus's ``scipy.stats.entropy``). 0 for a map
    with one non-zero position, :math:`\ln n` for a constant one; NaN for an all-zero (blank)
    map, which has no contributions. Lower: more concentrated.
    """
    values = _flat(maps)
    total = values.sum(dim=1, keepdim=True)
    p = values / torch.where(total > 0, total, 1)
    entropy = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1)), torch.zeros_like(p)).sum(dim=1)
    return torch.where(total[:, 0] > 0, entropy, torch.full_like(entropy, math.nan))


def effective_complexity(maps: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Effective complexity (Nguyen & Martínez 2020, "On quantitative aspects of model
    interpretability"): the number of positions whose absolute value exceeds ``eps``
    (Quantus's default, 1e-5, on maps scaled to a largest value of 1, as camlens's are).
    Lower: fewer positions matter. Returned as float64 counts, out of :math:`n` positions.
    """
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise CamlensError(f"eps must be a finite number >= 0, got {eps!r}")
    return (_flat(maps) > eps).sum(dim=1).double()
