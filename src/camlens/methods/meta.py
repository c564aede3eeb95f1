"""Meta-methods: smoothing around any method.

:class:`AugmentSmooth` explains augmented copies of each image (flips, rescalings, pixel
multipliers), maps each copy's map back onto the image and averages them;
:class:`EigenSmooth` makes a method's raw map the first principal component of its weighted
activations instead of their sum. Both are called like the method they wrap and give its
Explanation, and they compose: ``AugmentSmooth(EigenSmooth(GradCAM(model)))``.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..capture import ForwardInputs, batch_of
from ..combine import FLAT_EPS, at_positions
from ..errors import CamlensError
from ..explanation import Explanation
from ..targets import (
    ClassTarget,
    ScoreTarget,
    SemanticSegmentationTarget,
    TargetSpec,
    _function_table,
    _is_function,
    _per_image,
)
from .base import CAMMethod, ChannelsSpec, Progress, finished, nested
from .family import principal_axis, projection_map


def eigen_map(weight: Tensor, activation: Tensor) -> Tensor:
    r"""Raw map from the first principal component of the weighted activations.

    Per image and target, :math:`X \in \mathbb{R}^{hw \times K}` holds the weighted activations
    :math:`w_k A^k` (or :math:`w_k \odot A^k` for weights per activation), one row per position
    (the samples) and one column per channel; :math:`X_c` is :math:`X` centred over positions
    and :math:`v` its first principal axis (:func:`~camlens.methods.family.principal_axis`, the
    first right singular vector of :math:`X_c`). Then

    .. math:: L = \mathrm{ReLU}(\epsilon\, X_c v), \qquad
        \epsilon = \operatorname{sign} \textstyle\sum_k v_k

    The sign of :math:`v` is arbitrary in an SVD; :math:`\epsilon` fixes it so that the
    projection's covariance with the method's own map before ReLU (:math:`\sum_k w_k A^k`,
    centred: :math:`X_c \mathbf{1}`), which is :math:`\sigma_1^2 \sum_k v_k`, is not negative:
    the smoothed map points the way the method's map does. Where :math:`\sum_k v_k = 0`
    (within float rounding: ``FLAT_EPS`` epsilons times :math:`\sqrt{K}`), the sign of
    ``principal_axis`` stays: the projection's value of largest magnitude is positive.
    (pytorch-grad-cam's ``get_2d_projection`` keeps whatever sign its SVD returns.)
    ``weight`` (N, T, K) or (N, T, K, h, w), ``activation`` (N, K, h, w); returns (N, T, h, w).
    """
    spatial = activation.dim() - 2  # (h, w); (l) for a signal, (d, h, w) for a volume
    per_activation = weight if weight.dim() == 3 + spatial else at_positions(weight, spatial)
    axis = principal_axis(per_activation * activation.unsqueeze(1), spatial)  # v: (N, T, K)
    total = axis.sum(dim=-1, keepdim=True)
    tied = total.abs() <= FLAT_EPS * torch.finfo(total.dtype).eps * axis.shape[-1] ** 0.5
    axis = torch.where(tied | (total > 0), axis, -axis)
    # X_c v = sum_k v_k w_k A^k centred over positions: the Eigen methods' projection map.
    return projection_map(axis * weight if weight.dim() == 3 else at_positions(axis, spatial) * weight, activation)


class _Smoothing:
    """What the meta-methods share: the wrapped method's attributes (name, model, fast_forward,
    batch_size, ...) read through, and options that add the smoothing's to the method's.

    ``name`` stays the method's registry name (what ``get_method`` takes, the key of results);
    ``display_name``, the title of its figures and table rows, says how it is smoothed:
    ``"Grad-CAM (aug-smooth)"``, ``"Grad-CAM (eigen-smooth)"``, both as
    ``"Grad-CAM (aug-smooth, eigen-smooth)"``.
    """

    label: ClassVar[str] = ""  # the smoothing in display names

    def __init__(self, method: CAMMethod | _Smoothing) -> None:
        self.method = method

    def __getattr__(self, name: str) -> Any:
        if name == "method":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.method, name)

    @property
    def display_name(self) -> str:
        """The method's display name with the smoothings around it, outermost first."""
        labels, method = [], self
        while isinstance(method, _Smoothing):
            labels.append(method.label)
            method = method.method
        return f"{method.display_name or method.name} ({', '.join(labels)})"

    def smoothing(self) -> dict[str, Any]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The wrapped method's options and this smoothing's."""
        return {**self.method.options(), **self.smoothing()}


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise CamlensError(f"progress must be a function progress(done, total), not {type(progress).__name__}")


class EigenSmooth(_Smoothing):
    """Principal-component smoothing (pytorch-grad-cam's ``eigen_smooth``) of any method.

    The method weighs as it always does; its raw map is then :func:`eigen_map` of its weights
    and activations instead of their weighted sum (or of its own ``raw_map``), followed by what
    the method does to a layer's map once formed, its ``finish_map`` (LayerCAM's scaling of
    shallow layers). The Explanation is the method's with that raw map and the maps made from it
    (normalised, upsampled, fused over layers as usual); ``weights`` are the method's, and
    ``options`` add ``"eigen_smooth": True``. The cost is the method's plus one SVD per image and
    target. A method whose map is not a weighted sum of channels (Recipro-CAM: a score per
    position) is refused: it has no weighted channels to decompose.
    """

    label = "eigen-smooth"

    def __init__(self, method: CAMMethod) -> None:
        if not isinstance(method, CAMMethod):
            hint = (
                ": smooth both ways with AugmentSmooth(EigenSmooth(method))"
                if isinstance(method, _Smoothing)
                else ""
            )
            raise CamlensError(f"EigenSmooth wraps a camlens method object, not {type(method).__name__}{hint}")
        if not getattr(method, "weighs_channels", True):
            raise CamlensError(
                f"eigen smoothing takes the principal component of a method's weighted channels, and "
                f"{method.display_name or method.name}'s map is not a weighted sum of channels: explain it "
                "without eigen smoothing"
            )
        super().__init__(method)

    def smoothing(self) -> dict[str, Any]:
        return {"eigen_smooth": True}

    def __call__(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        channels: ChannelsSpec = None,
        progress: Progress | None = None,
        forward_args: object = None,
        forward_kwargs: Mapping[str, object] | None = None,
        images_as: str | None = None,
    ) -> Explanation:
        # A shallow copy per call, so the method object the user holds is never changed; it
        # shares the method's inference copy.
        method = copy.copy(self.method)
        # What the method does after forming a layer's map (LayerCAM's scaling of shallow layers)
        # it does to the smoothed map too.
        finish = getattr(method, "finish_map", None)
        if finish is None:
            method.raw_map = lambda name, weight, activation: eigen_map(weight, activation)
        else:
            method.raw_map = lambda name, weight, activation: finish(name, eigen_map(weight, activation))
        with nested():
            explanation = method(images, targets, channels=channels, progress=progress, forward_args=forward_args,
                                 forward_kwargs=forward_kwargs, images_as=images_as)
        explanation.options = {**explanation.options, **self.smoothing()}
        return finished(explanation)


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """Distinct positive finite numbers in increasing order, 1 (the unaugmented copy) among them."""
    if isinstance(values, (numbers.Real, str, bytes)) or not isinstance(values, Sequence):
        raise CamlensError(f"{name} must be a list of positive numbers, got {values!r}")
    for value in values:
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise CamlensError(f"{name} must be positive finite numbers, got {value!r}")
    return tuple(sorted({1.0, *map(float, values)}))


def _resized(tensor: Tensor, size: Sequence[int]) -> Tensor:
    """``tensor`` (..., h, w) resized to ``size``: bilinear, antialiased when it shrinks."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return flat.reshape(*tensor.shape[:-2], *size)


def _back(tensor: Tensor, flip: bool, size: Sequence[int]) -> Tensor:
    """A copy's map (..., h', w') in the image's geometry: un-flipped, resized back to ``size``."""
    return _resized(tensor.flip(-1) if flip else tensor, size)


class _Following(ScoreTarget):
    """A :class:`ScoreTarget` of ``images`` images, given to a batch of augmented copies laid out
    copy by copy (row ``a * images + i`` is copy ``a`` of image ``i``): each row is scored with
    its image's data. A :class:`SemanticSegmentationTarget`'s pixel mask moves with the copy:
    flipped where the copy is (``flips[a]``), and resized to the copy's output where the copy
    is resized (by the nearest cell centre for a boolean or integer mask, bilinear and
    antialiased for weights)."""

    def __init__(self, target: ScoreTarget, images: int, flips: Sequence[bool], resized: bool) -> None:
        if target.moves_with_the_image:
            raise CamlensError(f"augmentation smoothing flips and resizes the images, which moves what {target!r} "
                               "compares them with: explain it without augmentation smoothing")
        self.target = target
        self.images = images
        self.flips = torch.tensor(list(flips), dtype=torch.bool)
        self.resized = resized

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        images = rows % self.images
        if not isinstance(self.target, SemanticSegmentationTarget):
            return self.target.score(output, images)
        mask = _per_image(self.target.mask.to(output.device), images, 2, "mask")
        # Resized first, then flipped, as the copy is: a flipped copy's mask is then the mirror
        # image of the unflipped copy's (nearest resizing is not symmetric left-right).
        size = tuple(output.shape[-2:])
        if self.resized and output.dim() == 4 and tuple(mask.shape[-2:]) != size:
            # Weights as the copy's pixels are resized (_resized: bilinear, antialiased when
            # shrunk); a boolean or integer mask by the nearest cell centre (no half-cell shift).
            if mask.dtype.is_floating_point:
                mask = _resized(mask.to(output.dtype), size)
            else:
                mask = F.interpolate(mask.unsqueeze(1).to(output.dtype), size=size, mode="nearest-exact").squeeze(1)
        flipped = self.flips.to(rows.device)[rows // self.images]
        mask = torch.where(flipped.view(-1, 1, 1), mask.flip(-1), mask)
        rows_here = torch.arange(rows.shape[0], device=rows.device)
        return SemanticSegmentationTarget(self.target.category, mask).score(output, rows_here)

    def check(self, images: int) -> None:
        self.target.check(self.images)

    def __repr__(self) -> str:
        return repr(self.target)


def _followed(targets: TargetSpec, images: int, flips: Sequence[bool], resized: bool) -> TargetSpec:
    """``targets`` for the augmented copies (``len(flips)`` copies of each of ``images`` images,
    copy by copy): target functions with data per image (:class:`ScoreTarget`) read their image's
    data, a segmentation mask moves with its copy (:class:`_Following`), and a list of functions
    given per image is repeated for each copy. Anything else is given as it is."""
    table = _function_table(targets, images)
    if table is None:
        return targets

    def follow(function: Any) -> Any:
        return _Following(function, images, flips, resized) if isinstance(function, ScoreTarget) else function

    if _is_function(targets):
        return follow(targets)
    return [[follow(f) for f in table[i % images]] for i in range(images * len(flips))]


class AugmentSmooth(_Smoothing):
    r"""Test-time augmentation smoothing (pytorch-grad-cam's ``aug_smooth``) of any method.

    Each image :math:`X` (H x W) is explained in every copy :math:`a(X)` of the set
    :math:`\mathcal{A}`: the product of flipped left-right or not (``flip``), resized by each of
    ``scales`` and multiplied by each of ``factors``. Each copy's map is mapped back onto
    :math:`X` (:math:`a^{-1}`: resized back to H x W, un-flipped; a factor moves nothing) and

    .. math:: \bar M = \frac{1}{|\mathcal{A}|} \sum_{a \in \mathcal{A}} a^{-1}\big(M(a(X))\big)

    The maps :math:`M` are each copy's normalised maps, so every copy counts the same whatever
    its scores, as in pytorch-grad-cam; :math:`\bar M` is in [0, 1] and not normalised again
    (like the fusion of layers). The unaugmented copy is always in :math:`\mathcal{A}` (1 is
    added to ``scales`` and ``factors``, as ttach does).

    Targets: class targets are resolved on the unaugmented images (the top-1 or top-k there)
    and the same classes are explained in every copy, even where a copy's own top-1 differs.
    Target functions given per image are repeated for each copy; a :class:`ScoreTarget`'s data
    per image (a reference embedding, a mask) is read for each copy's image, and a
    :class:`~camlens.targets.SemanticSegmentationTarget`'s pixel mask moves with the copy
    (flipped with it; resized to its output when it is resized: by the nearest cell centre for a
    boolean mask, bilinear and antialiased for weights, as the copy's pixels are). Unit targets and plain functions are given to every copy as they are:
    a unit at a position, or a plain function that reads positions of the output, is not moved
    with the copy.

    The Explanation: ``maps`` :math:`\bar M`; ``raw`` and ``weights`` the means over the copies
    of theirs, each mapped back likewise onto the unaugmented copy's layer resolution (channel
    weights (N, T, K) have no geometry: their plain mean); so ``maps`` is not ``s(Up(raw))``.
    ``targets``, ``scores``, ``probabilities`` and ``logits`` are the unaugmented images'.
    ``options`` add ``"aug_smooth": {"flip", "scales", "factors"}``.

    Defaults: pytorch-grad-cam's set (ttach's ``HorizontalFlip`` x ``Multiply(0.9, 1, 1.1)``),
    six copies: its "scales" multiply the pixel values, they do not resize. Spatial scales are
    opt-in (``scales=(1.0, 1.1)``) because they change the input size, which not every model
    accepts, and the cost grows with its square.

    Args:
        method: a camlens method object, or :class:`EigenSmooth` of one.
        flip: also explain each image flipped left-right.
        scales: spatial scales: a copy is resized to round(s H) x round(s W) (bilinear,
            antialiased) before it is explained, and its map resized back.
        factors: multipliers of the model's input values (after its normalisation, as
            pytorch-grad-cam applies them).

    Cost: :math:`|\mathcal{A}|` times the method's, in 1 + ``len(scales)`` calls of it: the
    unaugmented images first (they fix the targets), then all copies of one size in one batch.
    """

    label = "aug-smooth"

    def __init__(
        self,
        method: CAMMethod | EigenSmooth,
        flip: bool = True,
        scales: Sequence[float] = (1.0,),
        factors: Sequence[float] = (0.9, 1.0, 1.1),
    ) -> None:
        if not isinstance(method, (CAMMethod, _Smoothing)):
            raise CamlensError(f"AugmentSmooth wraps a camlens method object, not {type(method).__name__}")
        if not isinstance(flip, bool):
            raise CamlensError(f"flip must be True or False, got {flip!r}")
        super().__init__(method)
        self.flip = flip
        self.scales = _numbers("scales", scales)
        self.factors = _numbers("factors", factors)

    def smoothing(self) -> dict[str, Any]:
        return {"aug_smooth": {"flip": self.flip, "scales": list(self.scales), "factors": list(self.factors)}}

    def copies(self) -> dict[float, list[tuple[bool, float]]]:
        """The augmentations ``{scale: [(flip, factor), ...]}`` but the unaugmented one."""
        flips = (False, True) if self.flip else (False,)
        return {
            scale: [(f, factor) for f in flips for factor in self.factors if (scale, f, factor) != (1.0, False, 1.0)]
            for scale in self.scales
        }

    def __call__(
        self,
        images: Tensor,
        targets: TargetSpec = None,
        *,
        channels: ChannelsSpec = None,
        progress: Progress | None = None,
        forward_args: object = None,
        forward_kwargs: Mapping[str, object] | None = None,
        images_as: str | None = None,
    ) -> Explanation:
        _check_progress(progress)
        if isinstance(images, Tensor) and batch_of(images, self.method.model).dim() != 4:
            raise CamlensError(
                f"augmentation smoothing flips and rescales images (N, C, H, W); inputs of shape {tuple(images.shape)} "
                "are signals, volumes or clips, which it does not apply to: explain them without it"
            )
        plan = self.copies()
        count = 1 + sum(map(len, plan.values()))
        images_count = images.shape[0] if isinstance(images, Tensor) and images.dim() == 4 else 1
        images_total = count * images_count
        seen = {"images": 0, "work": 0}  # over the calls so far: images explained, progress total
        forward = ForwardInputs.make(forward_args, forward_kwargs, images_as, images_count)

        def explain(batch: Tensor, spec: TargetSpec) -> Explanation:
            rows, last = (batch.shape[0] if batch.dim() == 4 else 1), [0]  # a 3-D image is one image
            # The batch holds copies of the images in order, one after another: row b is image b % N.
            taken = None if forward is None else forward.take(torch.arange(rows) % images_count)
            passed = {} if taken is None else {"forward_args": taken.args, "forward_kwargs": taken.kwargs,
                                              "images_as": taken.images_as}

            def report(done: int, total: int) -> None:
                # The calls to come are assumed to cost what this one does per image.
                last[0] = total
                rest = round(total * (images_total - seen["images"] - rows) / rows)
                progress(seen["work"] + done, seen["work"] + total + rest)

            with nested():
                explanation = self.method(batch, spec, channels=channels, progress=report if progress else None,
                                          **passed)
            seen["images"] += rows
            seen["work"] += last[0]
            return explanation

        first = explain(images, targets)
        x = (images if images.dim() == 4 else images.unsqueeze(0)).to(first.maps.device)
        n, size = x.shape[0], x.shape[-2:]
        # Class targets, as resolved on the unaugmented images (-1 stands for other targets).
        classes = first.targets if bool((first.targets >= 0).all()) else None
        maps = first.maps.clone()
        raw = {name: r.clone() for name, r in first.raw.items()}
        weights = {name: w.clone() for name, w in first.weights.items()}
        for scale, augmentations in plan.items():
            if not augmentations:
                continue
            shape = [max(1, round(scale * side)) for side in size]
            base = _resized(x, shape)
            batch = torch.cat([(base.flip(-1) if f else base) * factor for f, factor in augmentations])
            if classes is not None:
                spec = ClassTarget(classes.repeat(len(augmentations), 1), first.score_kind)
            else:
                spec = _followed(targets, n, [f for f, _ in augmentations], scale != 1.0)
            try:
                out = explain(batch, spec)
            except CamlensError as error:
                if scale == 1.0:
                    raise
                raise CamlensError(
                    f"{error} (on the copies resized by {scale} to {shape[0]}x{shape[1]}: a model that takes "
                    "one input size only needs scales=(1.0,))"
                ) from error
            for index, (f, _) in enumerate(augmentations):
                part = slice(index * n, (index + 1) * n)
                maps += _back(out.maps[part], f, size)
                for name in raw:
                    raw[name] += _back(out.raw[name][part], f, first.raw[name].shape[-2:])
                    weight = out.weights[name][part]
                    weights[name] += weight if weight.dim() == 3 else _back(weight, f, first.weights[name].shape[-2:])
        return finished(replace(
            first,
            maps=maps / count,
            raw={name: r / count for name, r in raw.items()},
            weights={name: w / count for name, w in weights.items()},
            options={**first.options, **self.smoothing()},
        ))


def smoothed(method: CAMMethod, aug_smooth: bool = False, eigen_smooth: bool = False) -> Any:
    """``method`` with the smoothings asked for: :class:`EigenSmooth` inside
    :class:`AugmentSmooth` (its default augmentations) when both are."""
    for flag, value in (("aug_smooth", aug_smooth), ("eigen_smooth", eigen_smooth)):
        if not isinstance(value, bool):
            raise CamlensError(f"{flag} must be True or False, got {value!r}")
    if eigen_smooth:
        method = EigenSmooth(method)
    return AugmentSmooth(method) if aug_smooth else method
