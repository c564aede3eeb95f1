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
            ``s(Up(raw))`` averaged over the target layers.
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
        n, t, h, w = self.maps.shape
        layers = ", ".join(map(repr, self.target_layers))
        return (
            f"Explanation(method={self.method!r}, images={n}, targets_per_image={t}, "
            f"size={h}x{w}, target_layers=[{layers}], score_kind={self.score_kind!r})"
        )
