"""The GGAM attention head: channel attention, spatial attention and classifier on a feature map."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..capture import describe
from ..errors import CamlensError, check_positive_int


class GGAMOutput(NamedTuple):
    """What :class:`GGAM` computed for N images.

    Attributes:
        logits: (N, classes) class scores.
        channel_weights: (N, C) the channel attention ``S`` (each row sums to 1); uniform
            ``1/C`` when channel attention is off.
        spatial_weights: (N, H, W) the spatial attention ``T`` (non-negative, each map sums to
            1); uniform ``1/(HW)`` when spatial attention is off.
        features: (N, C, H, W) the feature map ``A`` the head was given, as it is in the
            autograd graph: the Grad-CAM weights of the training loss are gradients w.r.t. it.
        channel_attention: whether ``channel_weights`` were computed (the GGAM loss needs them).
    """

    logits: Tensor
    channel_weights: Tensor
    spatial_weights: Tensor
    features: Tensor
    channel_attention: bool


def spatial_weights(b: Tensor, reference: Tensor | None = None) -> Tensor:
    r"""Spatial attention of a channel-weighted map ``B`` (N, C, H, W), as (N, H, W).

    .. math::
        P_{ij} = \mathrm{ReLU}\Big(\sum_c B_{cij}\Big), \qquad
        T_{ij} = \frac{P_{ij}}{\sum_{ab} P_{ab}} \ \text{ if } \sum_{ab} P_{ab} > 0,
        \quad T_{ij} = \frac{1}{HW} \ \text{ otherwise.}

    Wherever the channel-summed map is non-negative and not all zero this is the paper's
    :math:`T = \sum_c B_c / \sum_{cij} B_{cij}`. The ReLU and the uniform fallback keep ``T`` a
    distribution (never NaN, never negative) for feature maps that can be negative (a backbone
    that does not end with a ReLU) or that are all zero.

    ``T`` does not change when ``B`` is scaled, so its gradient grows as ``1 / sum P``: when the
    channel attention puts nearly all its weight on channels that are (nearly) zero in an image,
    the gradient overflows to inf. "All zero" is therefore read relative to the map's own scale:
    the fallback applies when :math:`\sum P` is at most ``eps`` (the dtype's machine epsilon)
    times :math:`\sum_{cij} |B_{cij}|` of the same map with ``S`` uniform, i.e. the mean
    absolute feature map of the image; this bounds the gradient and leaves every other map as
    the formula says. ``reference`` (N,) gives that scale; without it, the fallback is for
    :math:`\sum P = 0` only.
    """
    p = torch.relu(b.sum(dim=1))
    total = p.sum(dim=(1, 2), keepdim=True)
    floor = 0 if reference is None else torch.finfo(total.dtype).eps * reference.detach()[:, None, None]
    positive = total > floor
    # The safe denominator: no 0/0 is computed even in the discarded branch, so no NaN appears
    # in the backward pass (where autograd's anomaly detection would stop on it).
    return torch.where(positive, p / torch.where(positive, total, 1), 1 / p[0].numel())


class GGAM(nn.Module):
    r"""Grad-CAM guided channel-spatial attention (GGAM) on a backbone feature map ``A`` (N, C, H, W).

    .. math::
        S = \mathrm{softmax}_c\big(W_2\, \mathrm{ReLU}(W_1\, \mathrm{GAP}(A) + b_1) + b_2\big), \qquad
        B = A \odot S, \qquad T = \text{:func:`spatial_weights`}(B), \qquad D = A \odot T

    with :math:`W_1: C \to \max(1, \lfloor C / r \rfloor)`, :math:`W_2` back to ``C`` (``r`` the
    ``reduction``). The classifier is a linear layer on the pooled features

    .. math::
        f_c = \sum_{ij} D_{cij} = \sum_{ij} T_{ij} A_{cij},

    a sum, not a mean, over positions: ``T`` sums to 1, so ``f`` is the ``T``-weighted average of
    ``A``, on the same scale as global average pooling (a mean would divide it by ``HW`` again).

    Ablations: a step that is off is the identity.

    - ``channel_attention=False``: ``B = A``; ``S`` is reported as uniform ``1/C``. ``T`` does not
      depend on the scale of ``B``, so this is exactly channel attention with ``S`` fixed uniform.
    - ``spatial_attention=False``: the classifier sees ``B`` instead of ``D``, average-pooled and
      scaled by ``C``: :math:`f_c = C\, S_c\, \mathrm{GAP}(A)_c`; ``T`` is reported as uniform
      ``1/(HW)``. The paper's ``D = A * T`` uses ``S`` only through ``T``, so without ``T`` the
      channel attention must act on the features themselves or the ablation would be void; the
      factor ``C`` makes a uniform ``S`` the identity (softmax weights average ``1/C``, which
      would otherwise shrink the classifier's input ``C``-fold).
    - both off: :math:`f = \mathrm{GAP}(A)`, the plain backbone with a linear classifier.

    The head has no layer that couples the images of a batch (no batch norm): image n's logits
    depend on ``A[n]`` only, which the batched Grad-CAM weights of :mod:`camlens.ggam.loss` rely on.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        reduction: int = 16,
        channel_attention: bool = True,
        spatial_attention: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("num_classes", num_classes)
        check_positive_int("reduction", reduction)
        self.channels = channels
        self.channel_attention = bool(channel_attention)
        self.spatial_attention = bool(spatial_attention)
        if self.channel_attention:
            hidden = max(1, channels // reduction)
            self.attention = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
            )
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, features: Tensor) -> GGAMOutput:
        if not isinstance(features, Tensor) or features.dim() != 4 or features.shape[1] != self.channels:
            raise CamlensError(
                f"GGAM was built for feature maps (N, {self.channels}, H, W), got {describe(features)}: "
                "give it the backbone's last feature map and its channel count"
            )
        n, c, h, w = features.shape
        if self.channel_attention:
            s = torch.softmax(self.attention(features.mean(dim=(2, 3))), dim=1)
            b = features * s[:, :, None, None]
        else:
            s = features.new_full((n, c), 1 / c)
            b = features
        if self.spatial_attention:
            t = spatial_weights(b, features.abs().mean(dim=1).sum(dim=(1, 2)))
            pooled = (features * t[:, None]).sum(dim=(2, 3))
        else:
            t = features.new_full((n, h, w), 1 / (h * w))
            pooled = b.mean(dim=(2, 3)) * (c if self.channel_attention else 1)
        return GGAMOutput(self.classifier(pooled), s, t, features, self.channel_attention)
