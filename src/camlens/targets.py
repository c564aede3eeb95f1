"""What is explained: classes (one, a list, top-k) or units, and the score taken from each.

A target spec is turned into :class:`Targets` once the model's output on the clean images is
known. ``Targets.score`` then gives the (rows, T) scores of any batch whose rows are copies
of the images (noisy copies, masked inputs), so every method computes scores the same way.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from .capture import resolve_layer
from .errors import CamlensError

SCORE_KINDS = ("logit", "probability")


def _is_index(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_score_kind(score: str | None) -> None:
    if score is not None and score not in SCORE_KINDS:
        raise CamlensError(f"unknown score {score!r}: choose one of {', '.join(SCORE_KINDS)}")


@dataclass(frozen=True)
class TopK:
    """The k highest-scoring classes of each image, in decreasing order: k maps per image."""

    k: int = 1
    score: str | None = None

    def __post_init__(self) -> None:
        if not _is_index(self.k) or self.k < 1:
            raise CamlensError(f"top-k needs a positive integer k, got {self.k!r}")
        _check_score_kind(self.score)


@dataclass(frozen=True)
class ClassTarget:
    """Given classes: an int (every image), one int per image, or a list of T ints per image."""

    classes: int | Sequence[int] | Sequence[Sequence[int]] | Tensor
    score: str | None = None

    def __post_init__(self) -> None:
        _check_score_kind(self.score)


@dataclass(frozen=True)
class UnitTarget:
    """A unit of a layer (Smooth Grad-CAM++'s neuron-level API).

    The score is the mean activation of ``channel`` of ``layer``, or the single activation at
    ``position=(i, j)`` of that channel. The layer must be at or after the target layer.
    """

    layer: str | int | nn.Module
    channel: int
    position: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not _is_index(self.channel):
            raise CamlensError(f"a unit's channel is an integer index, got {self.channel!r}")
        if self.position is not None and not (
            isinstance(self.position, (tuple, list))
            and len(self.position) == 2
            and all(map(_is_index, self.position))
        ):
            raise CamlensError(f"a unit's position is None or a pair of integers (i, j), got {self.position!r}")
        if self.position is not None:
            object.__setattr__(self, "position", tuple(self.position))


TargetSpec = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, TopK, ClassTarget,
                   UnitTarget, Sequence[UnitTarget]]


@dataclass
class Targets:
    """Resolved targets for N images: T targets each, and how to score them."""

    classes: Tensor | None  # (N, T) class indices, None for unit targets
    units: tuple[UnitTarget, ...] | None
    unit_layers: dict[str, nn.Module]  # name -> module for unit targets
    unit_names: tuple[str, ...]  # layer name of each unit target
    score_kind: str  # "logit", "probability" or "unit"

    @property
    def count(self) -> int:
        return self.classes.shape[1] if self.classes is not None else len(self.units or ())

    def score(self, logits: Tensor, unit_outputs: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        """Scores (B, T) of a batch whose row b is a version of image ``rows[b]``."""
        if self.classes is not None:
            values = logits if self.score_kind == "logit" else logits.softmax(dim=1)
            return values.gather(1, self.classes[rows])
        columns = []
        for unit, name in zip(self.units or (), self.unit_names):
            channel = unit_outputs[name][:, unit.channel]
            if unit.position is None:
                columns.append(channel.mean(dim=(-2, -1)))
            else:
                columns.append(channel[:, unit.position[0], unit.position[1]])
        return torch.stack(columns, dim=1)

    def as_index_tensor(self, images: int) -> Tensor:
        """Class indices (N, T), with -1 standing for unit targets."""
        if self.classes is not None:
            return self.classes
        return torch.full((images, self.count), -1, dtype=torch.long)


def _unit_list(spec: object) -> tuple[UnitTarget, ...] | None:
    if isinstance(spec, UnitTarget):
        return (spec,)
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(u, UnitTarget) for u in spec):
        return tuple(spec)
    return None


def unit_layers(model: nn.Module, spec: TargetSpec) -> dict[str, nn.Module]:
    """The layers whose outputs unit targets read (empty for class targets)."""
    units = _unit_list(spec)
    if units is None:
        return {}
    return dict(resolve_layer(model, unit.layer) for unit in units)


def resolve_targets(
    model: nn.Module,
    spec: TargetSpec,
    logits: Tensor,
    unit_outputs: Mapping[str, Tensor],
    default_score: str,
) -> Targets:
    """Turn a target spec into :class:`Targets`, given the model's logits on the clean images."""
    images, classes = logits.shape
    units = _unit_list(spec)
    if units is not None:
        names = tuple(resolve_layer(model, unit.layer)[0] for unit in units)
        for unit, name in zip(units, names):
            _check_unit(unit, name, unit_outputs[name])
        layers = dict(resolve_layer(model, unit.layer) for unit in units)
        return Targets(None, units, layers, names, "unit")

    if spec is None:
        spec = TopK(1)
    if isinstance(spec, TopK):
        if spec.k > classes:
            raise CamlensError(f"top-{spec.k} asked for, but the model has only {classes} classes")
        index = logits.topk(spec.k, dim=1).indices
        return Targets(index, None, {}, (), spec.score or default_score)
    score = default_score
    if isinstance(spec, ClassTarget):
        score = spec.score or default_score
        spec = spec.classes
    index = _class_index(spec, images)
    out_of_range = (index < 0) | (index >= classes)
    if bool(out_of_range.any()):
        bad = index[out_of_range][0].item()
        raise CamlensError(
            f"class {bad} is out of range: the model has {classes} classes "
            f"(valid: 0 to {classes - 1})"
        )
    return Targets(index.to(logits.device), None, {}, (), score)


def _class_index(spec: object, images: int) -> Tensor:
    if isinstance(spec, bool):
        raise CamlensError("a class target is an integer index, not a boolean")
    if isinstance(spec, int):
        return torch.full((images, 1), spec, dtype=torch.long)
    try:
        index = torch.as_tensor(spec)
    except (TypeError, ValueError, RuntimeError):
        raise CamlensError(
            "targets must be None (top-1), an int, a list of ints (one per image), "
            "a list of lists (several per image), TopK, ClassTarget or UnitTarget(s)"
        ) from None
    if index.numel() == 0:
        raise CamlensError(
            f"the targets are empty (shape {tuple(index.shape)}): give one class per image, "
            "a list of classes per image, or None for each image's top-1 class"
        )
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.dtype.is_complex:
        raise CamlensError(f"class targets must be integers, got {index.dtype}")
    index = index.long()
    if index.dim() == 0:
        return index.expand(images, 1).clone()
    if index.dim() == 1:
        if index.numel() != images:
            raise CamlensError(
                f"{index.numel()} class targets for {images} image(s): give one class per image, "
                "or a list of lists for several classes per image (e.g. [[3, 5]])"
            )
        return index.unsqueeze(1)
    if index.dim() == 2 and index.shape[0] == images and index.shape[1] > 0:
        return index
    raise CamlensError(
        f"class targets of shape {tuple(index.shape)} do not fit {images} image(s): "
        "use (images,) or (images, targets per image)"
    )


def _check_unit(unit: UnitTarget, name: str, output: Tensor) -> None:
    channels, height, width = output.shape[1:]
    if not 0 <= unit.channel < channels:
        raise CamlensError(
            f"unit channel {unit.channel} is out of range: layer {name!r} has {channels} channels "
            f"(valid: 0 to {channels - 1})"
        )
    if unit.position is not None:
        i, j = unit.position
        if not (0 <= i < height and 0 <= j < width):
            raise CamlensError(
                f"unit position {(i, j)} is outside layer {name!r}'s {height}x{width} map"
            )
