"""The result of every method: maps, raw maps, weights, targets, scores and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .targets import UnitTarget


@dataclass
class Explanation:
    """What a method computed for N images and T targets per image.

    Attributes:
        maps: (N, T, H, W) float tensor in [0, 1] at input resolution; the per-layer maps
            ``s(Up(raw))`` averaged over the target layers. For signals (N, C, L) they are
            (N, T, L), for volumes and clips (N, C, D, H, W) (N, T, D, H, W): the input's own shape.
        raw: ``{layer: (N, T, h, w)}`` at layer resolution, after ReLU, before normalisation.
        weights: ``{layer: (N, T, K)}`` channel weights, or ``{layer: (N, T, K, h, w)}``
            weights per activation (HiResCAM, LayerCAM, ...: see the method); channels left
            out by a channel subset have weight 0.
        targets: (N, T) class indices; -1 where the targets are units (see ``units``) or
            target functions (see :mod:`camlens.targets`).
        scores: (N, T) the model's score for each target on the clean images, of kind
            ``score_kind`` ("logit", "probability", "unit", or "target" for target functions).
        probabilities: (N, T) softmax probability of each class target, None for units and
            target functions.
        method: the method's registry name.
        target_layers: names of the layers the maps come from.
        default_layer: True when the target layer was chosen automatically.
        units: the unit targets, when units were explained.
        channels: ``{layer: channel indices}`` when a channel subset was used.
        options: the method's options, as used.
        logits: (N, classes) the model's output on the clean images, from the method's own
            forward pass (so predictions need no second one).
    """

    maps: Tensor
    raw: dict[str, Tensor]
    weights: dict[str, Tensor]
    targets: Tensor
    scores: Tensor
    score_kind: str
    probabilities: Tensor | None
    method: str
    target_layers: tuple[str, ...]
    default_layer: bool = False
    units: tuple[UnitTarget, ...] | None = None
    channels: dict[str, list[int]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    logits: Tensor | None = None

    @property
    def images(self) -> int:
        return self.maps.shape[0]

    @property
    def targets_per_image(self) -> int:
        return self.maps.shape[1]

    @property
    def blank(self) -> Tensor:
        """(N, T) bool: True where the map is blank, zero everywhere. A raw map that is the same
        value at every position (most often 0: the weighted sum of the channels is negative or
        zero everywhere, and the ReLU leaves nothing) has no place that matters more than another:
        its normalised map is all zeros. See :meth:`blank_reasons`."""
        return self.maps.flatten(2).amax(dim=2) <= 0

    def blank_reasons(self) -> dict[tuple[int, int], str]:
        """Why each blank map is blank, keyed by (image, target), from its raw maps and weights."""
        reasons = {}
        for n, t in self.blank.nonzero().tolist():
            found = []
            for name, raw in self.raw.items():
                weight = self.weights.get(name)
                found.append(_why_blank(raw[n, t], None if weight is None else weight[n, t]))
            reasons[(n, t)] = "; ".join(dict.fromkeys(found))
        return reasons

    def to_numpy(self) -> dict[str, Any]:
        """The tensors as NumPy arrays (on the CPU), with ``raw`` and ``weights`` keyed by layer."""

        def convert(tensor: Tensor) -> np.ndarray:
            tensor = tensor.detach().cpu()
            if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: float32 holds each value exactly
                tensor = tensor.float()
            return tensor.numpy()

        return {
            "maps": convert(self.maps),
            "raw": {name: convert(t) for name, t in self.raw.items()},
            "weights": {name: convert(t) for name, t in self.weights.items()},
            "targets": convert(self.targets),
            "scores": convert(self.scores),
            "probabilities": None if self.probabilities is None else convert(self.probabilities),
        }

    def __repr__(self) -> str:
        n, t, *size = self.maps.shape
        layers = ", ".join(map(repr, self.target_layers))
        return (
            f"Explanation(method={self.method!r}, images={n}, targets_per_image={t}, "
            f"size={'x'.join(map(str, size))}, target_layers=[{layers}], score_kind={self.score_kind!r})"
        )


def _why_blank(raw: Tensor, weight: Tensor | None) -> str:
    """Why a raw map (h, w) is constant, from its weights: per channel (K,), or per activation."""
    if bool((raw != 0).any()):
        return "the map has the same value at every position"
    if weight is not None and bool((weight == 0).all()):
        return ("every weight is 0: the score's gradient at the layer is zero or negative everywhere (the "
                "score falls where the layer is active, and the method keeps positive gradients only), or the "
                "layer's activations are zero")
    if weight is not None and weight.dim() == 1 and bool((weight <= 0).all()):
        return "every channel's weight is negative or zero: the score falls where the layer is active"
    return "the weighted activations sum to zero or less at every position, which the ReLU sets to 0"


def warn_blank(explanation: Explanation, stacklevel: int = 3) -> None:
    """A :class:`~camlens.errors.BlankMapWarning` naming the blank maps of ``explanation`` and why."""
    reasons = explanation.blank_reasons()
    if not reasons:
        return
    import warnings

    from .errors import BlankMapWarning

    shown = [f"image {n}, target {t}: {why}" for (n, t), why in list(reasons.items())[:5]]
    more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
    warnings.warn(BlankMapWarning(
        f"{explanation.method}: {len(reasons)} of {explanation.blank.numel()} maps are blank (zero everywhere; "
        f"Explanation.blank flags them): {'; '.join(shown)}{more}"
    ), stacklevel=stacklevel)
