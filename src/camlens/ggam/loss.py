"""The GGAM loss: Grad-CAM weights of the true class as the target of the channel attention."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..capture import describe, gradients
from ..errors import CamlensError
from ..methods.gradcam import gradcam_weights
from .module import GGAMOutput


def ggam_loss(channel_weights: Tensor, beta: Tensor, renormalise: bool = True) -> Tensor:
    r"""Symmetric KL divergence between the channel attention ``S`` and the squashed Grad-CAM
    weights, per image, averaged over the batch. ``S``, ``beta``: (N, C).

    .. math::
        \tilde\beta = \sigma(\beta) \ \Big(\text{renormalised: } \tilde\beta / \textstyle\sum_c \tilde\beta_c\Big),
        \qquad
        L = \tfrac12 \big(\mathrm{KL}(S \,\|\, \tilde\beta) + \mathrm{KL}(\tilde\beta \,\|\, S)\big)
          = \tfrac12 \sum_c (S_c - \tilde\beta_c)(\log S_c - \log \tilde\beta_c)

    ``renormalise=True`` (the default) makes :math:`\tilde\beta` a distribution, as KL requires:
    sigmoid outputs do not sum to 1. With ``renormalise=False`` the KL is the generalised one for
    unnormalised measures, :math:`\sum_c p_c \log(p_c/q_c) - p_c + q_c`, which is >= 0 and 0 only
    for ``p = q``; its symmetrised form is the same right-hand side as above (the linear terms
    cancel). :math:`\log\tilde\beta` is computed from ``logsigmoid`` (and ``log_softmax`` of it)
    without rounding to 0; both logarithms are clamped below at ``log(tiny)`` of the dtype, a
    non-decreasing map, so every term stays >= 0 and finite even where ``S`` underflows to 0.
    """
    if not isinstance(channel_weights, Tensor) or not isinstance(beta, Tensor) or channel_weights.dim() != 2 \
            or channel_weights.shape != beta.shape:
        raise CamlensError(
            f"the GGAM loss compares channel weights and Grad-CAM weights of the same shape (N, C), "
            f"got {describe(channel_weights)} and {describe(beta)}"
        )
    log_q = F.logsigmoid(beta)
    if renormalise:
        log_q = torch.log_softmax(log_q, dim=1)
    floor = math.log(torch.finfo(log_q.dtype).tiny)
    log_q = log_q.clamp_min(floor)
    log_p = torch.log(channel_weights.clamp_min(torch.finfo(channel_weights.dtype).tiny))
    terms = (channel_weights - log_q.exp()) * (log_p - log_q)
    return terms.sum(dim=1).mean() / 2


def label_gradcam_weights(result: GGAMOutput, labels: Tensor, detach: bool = True) -> Tensor:
    r"""Grad-CAM weights of each image's true class on the feature map ``A``, (N, C):

    .. math::
        \beta^k_c = \frac{1}{HW} \sum_{ij} \frac{\partial y^k}{\partial A_{cij}}, \qquad k = \text{label}

    One backward of the summed label logits, down to ``A`` only, through camlens's
    :func:`camlens.capture.gradients` and :func:`camlens.methods.gradcam.gradcam_weights` (the
    same as ``camlens.explain(..., method="gradcam")`` on the backbone's output layer). This is
    batched over the images because image n's logit depends on ``A[n]`` only: the GGAM head has
    no batch-coupling layer, and a backbone's batch norm lies below ``A``, outside the gradient.
    The graph is kept for the training loss's own backward.

    ``detach=True``: ``beta`` is a constant target (no graph through it; cheaper).
    ``detach=False``: the graph of the gradient is built (``create_graph``), so the loss's
    gradient flows through ``beta`` into the head and the backbone (second order).
    """
    labels = _check_labels(labels, result.logits)
    features = result.features
    if not result.logits.requires_grad or not features.requires_grad:
        raise CamlensError(
            "the Grad-CAM weights need the logits and the feature map in the autograd graph: "
            "run the model with gradients enabled (not under torch.no_grad()) and trainable parameters"
        )
    scores = result.logits.gather(1, labels[:, None])
    grad = gradients(scores, {"features": features}, create_graph=not detach, retain_graph=True)["features"]
    beta = gradcam_weights(grad)[:, 0]
    return beta.detach() if detach else beta


class GGAMLoss(NamedTuple):
    """``total = ce + lam * ggam``; ``beta`` the Grad-CAM weights used (None without channel attention)."""

    total: Tensor
    ce: Tensor
    ggam: Tensor
    beta: Tensor | None


def ggam_training_loss(
    result: GGAMOutput,
    labels: Tensor,
    lam: float = 1.0,
    detach: bool = True,
    renormalise: bool = True,
) -> GGAMLoss:
    r"""The training loss :math:`L = L_{CE} + \lambda L_{GGAM}` of one batch.

    ``L_CE`` is the mean cross-entropy of ``result.logits``; ``L_GGAM`` is :func:`ggam_loss` of
    the channel attention and :func:`label_gradcam_weights` (``detach``, ``renormalise`` as
    there). Without channel attention there is no ``S`` and the GGAM loss is undefined: it is
    0 and no Grad-CAM backward is made (``beta`` is None).
    """
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise CamlensError(f"lambda (the GGAM loss weight) must be a finite number >= 0, got {lam!r}")
    labels = _check_labels(labels, result.logits)
    ce = F.cross_entropy(result.logits, labels)
    if not result.channel_attention:
        return GGAMLoss(ce, ce, ce.new_zeros(()), None)
    beta = label_gradcam_weights(result, labels, detach=detach)
    ggam = ggam_loss(result.channel_weights, beta, renormalise=renormalise)
    return GGAMLoss(ce + lam * ggam, ce, ggam, beta)


def _check_labels(labels: object, logits: Tensor) -> Tensor:
    n, classes = logits.shape
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise CamlensError(f"labels must be an integer tensor of shape ({n},), got {describe(labels)}")
    labels = labels.long().to(logits.device)
    bad = labels[(labels < 0) | (labels >= classes)].unique()
    if bad.numel():
        raise CamlensError(f"labels must be class indices from 0 to {classes - 1}, got {bad[:10].tolist()}")
    return labels
