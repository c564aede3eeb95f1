"""What is explained: classes (one, a list, top-k), units, or any score of the model's output.

A target spec is turned into :class:`Targets` once the model's output on the clean images is
known. ``Targets.score`` then gives the (rows, T) scores of any batch whose rows are copies
of the images (noisy copies, masked inputs), so every method computes scores the same way.

**Target functions.** Besides classes and units, a target is any function from the model's
output (the tensor the method's ``output=`` option picks, N rows) to one score per row:
``target(output) -> (B,)`` for a batch of B rows, differentiable with torch operations. Give
one function for every image, one per image (a list of N), or T per image (a list of N lists).
A function is called on whole batches: every row of a batch it gets is a version of an image
it explains (the image itself, a noisy copy, a masked input), so a plain function must not
depend on which image a row comes from. A target with data per image (a mask, a reference
embedding) subclasses :class:`ScoreTarget` and implements ``score(output, rows)``: ``rows[b]``
is the image that row b is a version of, to index its data with. The ready-made ones are
:class:`SemanticSegmentationTarget`, :class:`MultiLabelTarget`, :class:`RegressionTarget` and
:class:`SimilarityTarget`. Explanations of target functions have ``targets`` -1,
``score_kind`` "target" and no ``probabilities``; the methods' ``score`` option (logit or
probability) applies to class targets only.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import describe, resolve_layer
from .errors import CamlensError, first_line

SCORE_KINDS = ("logit", "probability", "exp")


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
    ``position=(i, j)`` of that channel (``(i,)`` on a signal's layer, ``(d, i, j)`` on a
    volume's). The layer must be at or after the target layer.
    """

    layer: str | int | nn.Module
    channel: int
    position: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_index(self.channel):
            raise CamlensError(f"a unit's channel is an integer index, got {self.channel!r}")
        if self.position is not None and not (
            isinstance(self.position, (tuple, list))
            and 1 <= len(self.position) <= 3
            and all(map(_is_index, self.position))
        ):
            raise CamlensError(f"a unit's position is None or a pair of integers (i, j) (one per dimension of the "
                               f"layer's map: (i,) for a signal, (d, i, j) for a volume), got {self.position!r}")
        if self.position is not None:
            object.__setattr__(self, "position", tuple(self.position))


class ScoreTarget:
    """A target function with data per image: ``score(output, rows)`` gives the scores (B,) of
    a batch whose row b is a version of image ``rows[b]``. Called as a plain function,
    ``target(output)``, row b is image b."""

    # Whether the target's data are places in the image that a flipped or resized copy moves
    # (boxes): AugmentSmooth refuses such a target (a segmentation mask it moves itself).
    moves_with_the_image: ClassVar[bool] = False

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, images: int) -> None:
        """Raise a CamlensError when the target's data per image does not fit ``images`` images
        (called once per explanation, before any score); by default, nothing to check."""

    def resolved(self, output: Tensor) -> ScoreTarget:
        """This target as it scores the images of one explanation, given the model's output on
        them (before any masked or noisy copy is scored): by default itself. A target whose data
        come from that output (the detections a :class:`~camlens.detection.BoxTarget` explains)
        fixes them here."""
        return self

    def __call__(self, output: Tensor) -> Tensor:
        return self.score(output, torch.arange(output.shape[0], device=output.device))


def _check_count(data: Tensor, shape: int, images: int, what: str) -> None:
    """Data given per image (``shape`` + 1 dimensions) has one entry for each of ``images``:
    more would be silently ignored (data meant for other images), fewer cannot be read."""
    if data.dim() == shape + 1 and data.shape[0] < images:
        raise CamlensError(
            f"the {what} of shape {tuple(data.shape)} has no entry for image {data.shape[0]}: give one for all "
            f"images, or one per image (images first) for the {images} image(s)"
        )
    if data.dim() == shape + 1 and data.shape[0] > images:
        raise CamlensError(
            f"the {what} of shape {tuple(data.shape)} holds {data.shape[0]} entries for {images} image(s): give "
            "one for all images, or exactly one per image (images first)"
        )


def _per_image(data: Tensor, rows: Tensor, shape: int, what: str) -> Tensor:
    """``data`` for each row: the same for all (``shape`` dimensions) or one per image (one more)."""
    if data.dim() == shape:
        return data.expand(rows.shape[0], *data.shape)
    if data.dim() == shape + 1 and int(rows.max()) < data.shape[0]:
        return data[rows]
    raise CamlensError(
        f"the {what} of shape {tuple(data.shape)} has no entry for image {int(rows.max())}: give one for "
        "all images, or one per image (images first)"
    )


def _check_index(index: object, what: str) -> int:
    if not _is_index(index) or index < 0:
        raise CamlensError(f"the {what} is an integer index >= 0, got {index!r}")
    return int(index)


def _column(output: Tensor, index: int, what: str, plural: str) -> Tensor:
    if output.dim() < 2:
        raise CamlensError(
            f"{what} {index} of an output of shape {tuple(output.shape)}: the model's output holds one value "
            f"per image, not (N, {plural}, ...) (pick another one with output=)"
        )
    if index >= output.shape[1]:
        raise CamlensError(
            f"{what} {index} of an output of shape {tuple(output.shape)}: the model's output has "
            f"{output.shape[1]} {plural} (valid: 0 to {output.shape[1] - 1}; pick another output with output=)"
        )
    return output[:, index]


class SemanticSegmentationTarget(ScoreTarget):
    r"""A class of a segmentation output (N, classes, H, W), summed over a pixel mask:
    :math:`y = \sum_{ij} M_{ij} S^c_{ij}` (pytorch-grad-cam's SemanticSegmentationTarget).

    ``mask``: (H, W) for every image, or (N, H, W) one per image; boolean or weights, at the
    output's resolution.
    """

    def __init__(self, category: int, mask: Tensor) -> None:
        self.category = _check_index(category, "category")
        self.mask = torch.as_tensor(mask)
        if self.mask.dim() not in (2, 3):
            raise CamlensError(f"a segmentation mask is (H, W) or (N, H, W), got shape {tuple(self.mask.shape)}")

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        if output.dim() != 4:
            raise CamlensError(f"a segmentation output is (N, classes, H, W), got shape {tuple(output.shape)}")
        scores = _column(output, self.category, "class", "classes")
        mask = _per_image(self.mask.to(device=output.device), rows, 2, "mask")
        if scores.shape != mask.shape:
            raise CamlensError(
                f"the segmentation mask is {tuple(mask.shape[1:])} but the model's output is "
                f"{tuple(output.shape[2:])} per class: give the mask at the output's resolution"
            )
        return (scores * mask.to(scores.dtype)).flatten(1).sum(dim=1)

    def check(self, images: int) -> None:
        _check_count(self.mask, 2, images, "mask")

    def __repr__(self) -> str:
        return f"SemanticSegmentationTarget(category={self.category}, mask of shape {tuple(self.mask.shape)})"


class MultiLabelTarget(ScoreTarget):
    r"""One label of a multi-label output (N, labels): its logit :math:`z_l` (``score="logit"``),
    its own probability :math:`\sigma(z_l)` (``"probability"``: a sigmoid per label, not a
    softmax over labels), or :math:`\exp(z_l)` (``"exp"``, the score Grad-CAM++'s closed form
    assumes)."""

    def __init__(self, label: int, score: str = "logit") -> None:
        self.label = _check_index(label, "label")
        if score not in SCORE_KINDS:
            raise CamlensError(f"unknown score {score!r}: choose one of {', '.join(SCORE_KINDS)}")
        self.kind = score

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        logit = _column(output, self.label, "label", "labels")
        if logit.dim() != 1:
            raise CamlensError(f"a multi-label output is (N, labels), got shape {tuple(output.shape)}")
        if self.kind == "exp":
            return logit.exp()
        return logit if self.kind == "logit" else torch.sigmoid(logit)

    def __repr__(self) -> str:
        return f"MultiLabelTarget(label={self.label}, score={self.kind!r})"


class RegressionTarget(ScoreTarget):
    """A regression output: the output itself when it is (N,) or (N, 1), else its ``index``-th
    value (N, outputs)."""

    def __init__(self, index: int | None = None) -> None:
        self.index = None if index is None else _check_index(index, "output index")

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        if self.index is not None:
            output = _column(output, self.index, "output", "outputs")
        elif output.dim() == 2 and output.shape[1] == 1:
            output = output[:, 0]
        if output.dim() != 1:
            raise CamlensError(
                f"a regression output is (N,) or (N, 1), got shape {tuple(output.shape)}: name the output "
                "to explain, RegressionTarget(index)"
            )
        return output

    def __repr__(self) -> str:
        return f"RegressionTarget(index={self.index})"


class SimilarityTarget(ScoreTarget):
    r"""Cosine similarity of an embedding output (N, D) to a reference embedding:
    :math:`y = \frac{e \cdot r}{\max(\lVert e \rVert \lVert r \rVert, \epsilon)}` (as
    ``torch.nn.functional.cosine_similarity``, pytorch-grad-cam's SimilarityToConceptTarget).

    ``reference``: (D,) for every image, or (N, D) one per image. Outputs with more dimensions
    are flattened after the first.
    """

    def __init__(self, reference: Tensor) -> None:
        self.reference = torch.as_tensor(reference)
        if self.reference.dim() not in (1, 2) or not self.reference.is_floating_point():
            raise CamlensError(
                f"a reference embedding is a float tensor (D,) or (N, D), got {describe(self.reference)} "
                f"of {self.reference.dtype}"
            )

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        if output.dim() < 2:
            raise CamlensError(
                f"an embedding output is (N, D), got shape {tuple(output.shape)}: one value per image has no "
                "direction to compare (pick the embedding with output=)"
            )
        embedding = output.flatten(1)
        reference = _per_image(self.reference.to(device=output.device, dtype=output.dtype), rows, 1, "reference")
        if reference.shape != embedding.shape:
            raise CamlensError(
                f"the reference embedding has {reference.shape[1]} values but the model's output "
                f"{embedding.shape[1]} per image"
            )
        return F.cosine_similarity(embedding, reference, dim=1)

    def check(self, images: int) -> None:
        _check_count(self.reference, 1, images, "reference")

    def __repr__(self) -> str:
        return f"SimilarityTarget(reference of shape {tuple(self.reference.shape)})"


TargetFunction = Callable[[Tensor], Tensor]
TargetSpec = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, TopK, ClassTarget,
                   UnitTarget, Sequence[UnitTarget], TargetFunction, Sequence[TargetFunction],
                   Sequence[Sequence[TargetFunction]]]


@dataclass
class Targets:
    """Resolved targets for N images: T targets each, and how to score them."""

    classes: Tensor | None  # (N, T) class indices, None for unit targets and target functions
    units: tuple[UnitTarget, ...] | None
    unit_layers: dict[str, nn.Module]  # name -> module for unit targets
    unit_names: tuple[str, ...]  # layer name of each unit target
    score_kind: str  # "logit", "probability", "exp", "unit" or "target"
    # Target functions: one row of T for every image, or one row per image.
    functions: tuple[tuple[TargetFunction, ...], ...] | None = None

    @property
    def count(self) -> int:
        if self.functions is not None:
            return len(self.functions[0])
        return self.classes.shape[1] if self.classes is not None else len(self.units or ())

    def score(self, logits: Tensor, unit_outputs: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        """Scores (B, T) of a batch whose row b is a version of image ``rows[b]``."""
        if self.functions is not None:
            return torch.stack([self._function_scores(t, logits, rows) for t in range(self.count)], dim=1)
        if self.classes is not None:
            if self.score_kind == "exp":  # exp(logit): the score Grad-CAM++'s closed form assumes
                return logits.gather(1, self.classes[rows]).exp()
            values = logits if self.score_kind == "logit" else logits.softmax(dim=1)
            return values.gather(1, self.classes[rows])
        columns = []
        for unit, name in zip(self.units or (), self.unit_names):
            channel = unit_outputs[name][:, unit.channel]
            if unit.position is None:
                columns.append(channel.flatten(1).mean(dim=1))
            else:
                columns.append(channel[(slice(None), *unit.position)])
        return torch.stack(columns, dim=1)

    def _function_scores(self, t: int, output: Tensor, rows: Tensor) -> Tensor:
        """Target ``t`` of each row: one call for the whole batch when every image has the same
        function, else one per image in the batch (a batch holds the versions of a few)."""
        if len(self.functions) == 1:
            return _call(self.functions[0][t], output, rows)
        scores = None
        for image in rows.unique().tolist():
            where = (rows == image).nonzero().flatten()
            part = _call(self.functions[image][t], output[where], rows[where])
            scores = part.new_zeros(rows.shape[0]) if scores is None else scores
            scores = scores.index_put((where,), part)
        return scores

    def as_index_tensor(self, images: int) -> Tensor:
        """Class indices (N, T), with -1 standing for unit targets and target functions."""
        if self.classes is not None:
            return self.classes
        return torch.full((images, self.count), -1, dtype=torch.long)


def _target_name(target: object) -> str:
    """A target function by its name (``<lambda>``, ``score_of``), a ScoreTarget by its repr."""
    if isinstance(target, ScoreTarget):
        return repr(target)
    name = getattr(target, "__qualname__", None)
    return repr(target) if name is None else name.replace(".<locals>", "")


def _call(target: TargetFunction, output: Tensor, rows: Tensor) -> Tensor:
    """``target``'s scores (B,) of ``output`` (B, ...), checked."""
    try:
        scores = target.score(output, rows) if isinstance(target, ScoreTarget) else target(output)
    except CamlensError:
        raise
    except Exception as error:
        raise CamlensError(
            f"the target {_target_name(target)} failed on the model's output of shape {tuple(output.shape)}: "
            f"{first_line(error)}"
        ) from error
    count = output.shape[0]
    if isinstance(scores, Tensor) and scores.shape == (count, 1):
        scores = scores[:, 0]
    if not isinstance(scores, Tensor) or scores.shape != (count,) or not scores.is_floating_point():
        got = describe(scores)
        if isinstance(scores, Tensor) and not scores.is_floating_point():
            got += f" of {scores.dtype}"
        raise CamlensError(
            f"the target {_target_name(target)} returned {got} for an output of shape {tuple(output.shape)}: "
            f"a target function returns one float score per row, shape ({count},), differentiable (no .long(), "
            ".argmax() or comparisons)"
        )
    return scores


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
    images = logits.shape[0]
    functions = _function_table(spec, images)
    if functions is not None:
        bound: dict[int, ScoreTarget] = {}  # one resolution per target object, shared by the rows

        def resolved(function: TargetFunction) -> TargetFunction:
            if not isinstance(function, ScoreTarget):
                return function
            if id(function) not in bound:
                bound[id(function)] = function.resolved(logits)
            return bound[id(function)]

        functions = tuple(tuple(map(resolved, row)) for row in functions)
        for row in functions:
            for function in row:
                if isinstance(function, ScoreTarget):
                    function.check(images)
        return Targets(None, None, {}, (), "target", functions)
    units = _unit_list(spec)
    if units is not None:
        names = tuple(resolve_layer(model, unit.layer)[0] for unit in units)
        for unit, name in zip(units, names):
            _check_unit(unit, name, unit_outputs[name])
        layers = dict(resolve_layer(model, unit.layer) for unit in units)
        return Targets(None, units, layers, names, "unit")

    if logits.dim() != 2:
        raise CamlensError(
            f"class targets need class scores (N, classes), but the model's output is {describe(logits)}: "
            "pick the class scores with output=, or explain this output with a target function "
            "(camlens.RegressionTarget, SemanticSegmentationTarget, MultiLabelTarget, SimilarityTarget, "
            "or your own function of the output)"
        )
    classes = logits.shape[1]
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


def _is_function(value: object) -> bool:
    # Tensors and the target dataclasses are not callable; nn.Modules are, and may be targets.
    return callable(value) and not isinstance(value, type)


def _function_table(spec: object, images: int) -> tuple[tuple[TargetFunction, ...], ...] | None:
    """Target functions as rows of T: one row for every image, or one per image; None when
    ``spec`` holds none."""
    if _is_function(spec):
        return ((spec,),)
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    rows = [list(row) if isinstance(row, (list, tuple)) else [row] for row in spec]
    given = [_is_function(item) for row in rows for item in row]
    if not any(given):
        return None
    if not all(given):
        raise CamlensError(
            "targets mix functions with other kinds: give functions only (one for all images, one per "
            "image, or a list per image), or classes, or units"
        )
    if len(rows) != images:
        raise CamlensError(
            f"{len(rows)} target functions (or lists of them) for {images} image(s): give one function for "
            "every image, or one (or a list) per image"
        )
    if len({len(row) for row in rows}) != 1 or not rows[0]:
        raise CamlensError("give every image the same number of target functions (at least one)")
    return tuple(tuple(row) for row in rows)


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
            "a list of lists (several per image), TopK, ClassTarget, UnitTarget(s) or target functions"
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
    channels, *where = output.shape[1:]
    if not 0 <= unit.channel < channels:
        raise CamlensError(
            f"unit channel {unit.channel} is out of range: layer {name!r} has {channels} channels "
            f"(valid: 0 to {channels - 1})"
        )
    if unit.position is not None:
        size = "x".join(map(str, where))
        if len(unit.position) != len(where):
            raise CamlensError(f"unit position {unit.position} has {len(unit.position)} coordinate(s); layer "
                               f"{name!r}'s {size} map has {len(where)} dimension(s)")
        if not all(0 <= i < side for i, side in zip(unit.position, where)):
            raise CamlensError(
                f"unit position {unit.position} is outside layer {name!r}'s {size} map"
            )
