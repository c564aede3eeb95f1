"""Faithfulness: does the model's confidence follow the map? (Score-CAM paper, section 5.)

Every function takes the model, the preprocessed images X (N, C, H, W), maps L (N, H, W) in
[0, 1] at input resolution and the classes c (N,) (signals (N, C, L) with maps (N, L), volumes
and clips (N, C, D, H, W) with maps (N, D, H, W) alike: "pixels" are then samples or voxels), runs the forwards it needs in batches of
``batch_size`` with no gradients, and returns per-image values, so that means and confidence
intervals can be taken over any subset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import forward, input_spatial, model_failures, preserved
from ..errors import CamlensError, check_positive_int


def _check_images(images: object, model: nn.Module | None = None) -> None:
    """A batch: (N, C, H, W) images, (N, C, L) signals, (N, C, D, H, W) volumes or clips; with
    ``model``, of the dimensions its first convolution takes (a 2-D one may take clips)."""
    spatial = None if model is None else input_spatial(model)
    dims = {3, 4, 5} if spatial is None else {4, 5} if spatial == 2 else {spatial + 2}
    if not isinstance(images, Tensor) or images.dim() not in dims or images.numel() == 0 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        shape = {None: "(N, C, H, W) (or (N, C, L) signals, (N, C, D, H, W) volumes)", 2: "(N, C, H, W)",
                 1: "(N, C, L)", 3: "(N, C, D, H, W)"}[spatial]
        raise CamlensError(f"images must be a non-empty float tensor {shape}, got {got}")


def _check_classes(classes: object, count: int) -> Tensor:
    """``classes`` as a (count,) integer tensor."""
    try:
        index = torch.as_tensor(classes)
    except (TypeError, ValueError, RuntimeError):
        index = None
    if index is None or index.shape != (count,) or index.is_floating_point() or index.dtype == torch.bool:
        got = f"{index.dtype} of shape {tuple(index.shape)}" if index is not None else type(classes).__name__
        raise CamlensError(f"classes must be {count} integer class indices, one per image, got {got}")
    return index.long()


def _check_maps(images: Tensor, maps: object) -> None:
    _check_images(images)
    expected = (images.shape[0], *images.shape[2:])
    if not isinstance(maps, Tensor) or tuple(maps.shape) != expected:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise CamlensError(
            f"maps must have shape {expected} (one map per image, at input resolution, e.g. "
            f"explanation.maps[:, t]), got {got}"
        )


@torch.no_grad()
def class_probabilities(model: nn.Module, inputs: Tensor, classes: Tensor, batch_size: int = 32) -> Tensor:
    """Softmax probability of ``classes[b]`` for each row b of ``inputs``, in batches: (B,)."""
    _check_images(inputs, model)
    classes = _check_classes(classes, inputs.shape[0]).to(inputs.device)
    check_positive_int("batch_size", batch_size)
    with preserved(model):
        parts = []
        for start in range(0, inputs.shape[0], batch_size):
            with model_failures(model, inputs):
                logits = forward(model, inputs[start : start + batch_size])
            chunk = classes[start : start + batch_size]
            if bool(((chunk < 0) | (chunk >= logits.shape[1])).any()):
                raise CamlensError(
                    f"class {chunk[(chunk < 0) | (chunk >= logits.shape[1])][0].item()} is out of range: "
                    f"the model has {logits.shape[1]} classes (valid: 0 to {logits.shape[1] - 1})"
                )
            parts.append(logits.softmax(dim=1).gather(1, chunk[:, None])[:, 0])
    return torch.cat(parts)


def explanation_images(images: Tensor, maps: Tensor) -> Tensor:
    """The explanation image :math:`E = X \\circ L` (the map broadcast over channels)."""
    return images * maps.unsqueeze(1)


def average_drop(original: Tensor, explained: Tensor) -> Tensor:
    r"""Per-image drop :math:`100 \max(0, Y - O) / Y`; its mean is the Average Drop (%). Lower is better.

    ``original`` is Y, the probability of the class on X; ``explained`` is O, on E.
    """
    return 100.0 * torch.clamp(original - explained, min=0) / original


def average_increase(original: Tensor, explained: Tensor) -> Tensor:
    r"""Per-image :math:`100 \cdot 1[Y < O]`; its mean is the Average Increase (%). Higher is better."""
    return 100.0 * (original < explained).to(original.dtype)


def drop_and_increase(
    model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, batch_size: int = 32,
    probability: Tensor | None = None,
) -> dict[str, Tensor]:
    """Y, O, and the per-image drop and increase: 2N forwards, N when Y (``probability``, the
    class's probability on the images, e.g. ``Explanation.probabilities``) is given."""
    _check_images(images, model)
    _check_maps(images, maps)
    original = probability if probability is not None else class_probabilities(model, images, classes, batch_size)
    explained = class_probabilities(model, explanation_images(images, maps), classes, batch_size)
    return {
        "probability": original,
        "explained_probability": explained,
        "drop": average_drop(original, explained),
        "increase": average_increase(original, explained),
    }


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Depthwise Gaussian blur, edges replicated (the insertion metric's starting image): along
    each dimension of positions in turn, last first (a signal's one, a volume's three)."""
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
        raise CamlensError(f"the blur's kernel_size must be a positive odd integer, got {kernel_size!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise CamlensError(f"the blur's sigma must be a finite number > 0, got {sigma!r}")
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - radius
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels, spatial = images.shape[1], images.dim() - 2
    convolve = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    blurred = F.pad(images, (radius, radius) * spatial, mode="replicate")
    for axis in reversed(range(spatial)):
        shape = [kernel_size if each == axis else 1 for each in range(spatial)]
        blurred = convolve(blurred, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
    return blurred


def _ranked_curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    classes: Tensor,
    start: Tensor,
    finish: Tensor,
    steps: int,
    batch_size: int,
    known: tuple[int, Tensor] | None = None,
) -> Tensor:
    """Probability of c as the pixels, in decreasing order of L, go from ``start`` to ``finish``.

    After step s of ``steps`` the first ``round(s * HW / steps)`` ranked pixels show ``finish``,
    the others ``start``. Ties in L are broken by pixel index, so curves are reproducible.
    Returns (N, steps + 1).
    """
    check_positive_int("batch_size", batch_size)
    plan = CurvePlan(images, maps, classes, start, finish, steps, known)
    for begin in range(0, plan.rows.numel(), batch_size):
        index = torch.arange(begin, min(begin + batch_size, plan.rows.numel()), device=images.device)
        plan.fill(index, class_probabilities(model, plan.inputs(index), plan.classes[plan.rows[index]], batch_size))
    return plan.curves


class CurvePlan:
    """The perturbed inputs of a deletion or insertion curve, as rows (image, step) to forward.

    ``inputs(index)`` builds the rows ``index`` (so that batches are built as they are
    forwarded), ``fill(index, probabilities)`` puts their probabilities into ``curves``; the
    step given by ``known`` (step, probabilities) is filled at once and has no row.
    """

    def __init__(
        self,
        images: Tensor,
        maps: Tensor,
        classes: Tensor,
        start: Tensor,
        finish: Tensor,
        steps: int,
        known: tuple[int, Tensor] | None = None,
    ) -> None:
        _check_maps(images, maps)
        check_positive_int("steps", steps)
        self.classes = _check_classes(classes, images.shape[0]).to(images.device)
        count, _, *where = images.shape  # (H, W); a signal's (L), a volume's (D, H, W)
        pixels = math.prod(where)
        order = torch.sort(maps.reshape(count, pixels), dim=1, descending=True, stable=True).indices
        self.rank = torch.empty_like(order)
        self.rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(count, -1))
        self.revealed = torch.tensor(
            [math.floor(s * pixels / steps + 0.5) for s in range(steps + 1)], device=images.device
        )
        self.rows = torch.arange(count, device=images.device).repeat_interleave(steps + 1)
        self.steps = torch.arange(steps + 1, device=images.device).repeat(count)
        self.curves = images.new_empty(count, steps + 1)
        if known is not None:
            self.curves[:, known[0]] = known[1].to(self.curves)
            keep = self.steps != known[0] % (steps + 1)
            self.rows, self.steps = self.rows[keep], self.steps[keep]
        self.start, self.finish, self.shape = start, finish, tuple(where)

    def inputs(self, index: Tensor) -> Tensor:
        rows, step = self.rows[index], self.steps[index]
        mask = (self.rank[rows] < self.revealed[step][:, None]).view(-1, 1, *self.shape).to(self.start.dtype)
        return self.start[rows] * (1 - mask) + self.finish[rows] * mask

    def fill(self, index: Tensor, probabilities: Tensor) -> None:
        self.curves[self.rows[index], self.steps[index]] = probabilities


def deletion_curve(
    model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, steps: int = 16,
    baseline: float = 0.0, batch_size: int = 32, probability: Tensor | None = None,
) -> Tensor:
    """Deletion (Petsiuk et al. 2018): the most salient pixels are replaced by ``baseline`` first.

    Cost: N x (steps + 1) forwards, batched; N x steps when ``probability`` (of the class on
    the unmodified images, step 0) is given. Returns (N, steps + 1); lower area is better.
    """
    if not (isinstance(baseline, (int, float)) and math.isfinite(baseline)):
        raise CamlensError(f"the deletion baseline must be a finite number, got {baseline!r}")
    _check_images(images, model)
    known = None if probability is None else (0, probability)
    return _ranked_curve(model, images, maps, classes, images, torch.full_like(images, baseline), steps,
                         batch_size, known)


def insertion_curve(
    model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, steps: int = 16,
    kernel_size: int = 11, sigma: float = 5.0, batch_size: int = 32, probability: Tensor | None = None,
) -> Tensor:
    """Insertion: the most salient pixels of X are revealed first on a blurred copy of X.

    Cost: N x (steps + 1) forwards, batched; N x steps when ``probability`` (of the class on
    the unmodified images, the last step) is given. Returns (N, steps + 1); higher area is better.
    """
    _check_images(images, model)
    _check_maps(images, maps)
    blurred = gaussian_blur(images, kernel_size, sigma)
    known = None if probability is None else (steps, probability)
    return _ranked_curve(model, images, maps, classes, blurred, images, steps, batch_size, known)


def area_under_curve(curves: Tensor) -> Tensor:
    """Trapezoidal area of (N, S + 1) curves over x evenly spaced on [0, 1]: (N,)."""
    if not isinstance(curves, Tensor) or curves.dim() != 2 or curves.shape[1] < 2:
        got = tuple(curves.shape) if isinstance(curves, Tensor) else type(curves).__name__
        raise CamlensError(f"curves must have shape (N, steps + 1) with steps >= 1, got {got}")
    steps = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(dim=1) / (2 * steps)


def random_subsets(count: int, features: int, runs: int, size: int, seed: int = 0) -> Tensor:
    """(count, runs, size) feature indices: for each of ``count`` images, ``runs`` subsets of
    ``size`` distinct features out of ``features``, drawn uniformly from ``seed`` (on the CPU, so
    the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    # Image by image, from one generator: the draws do not depend on how many images come after,
    # and memory holds one image's keys at a time.
    return torch.stack([torch.rand(runs, features, generator=generator).argsort(dim=1)[:, :size]
                        for _ in range(count)])


@torch.no_grad()
def faithfulness_correlation(
    model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, runs: int = 100, subset_size: int = 224,
    baseline: float | str = "black", score: str = "logit", seed: int = 0, batch_size: int = 32,
) -> Tensor:
    r"""Faithfulness correlation (Bhatt et al. 2020, "Evaluating and aggregating feature-based
    model explanations"): over ``runs`` random subsets :math:`S` of ``subset_size`` input
    features, the Pearson correlation between what the map gives them and what the model loses
    without them,

    .. math:: \rho\Big(\sum_{i \in S} L_i,\; f_c(x) - f_c(x_{[x_S = b]})\Big)

    As Quantus computes it (its defaults: 100 runs of 224, baseline "black", logits): the
    features are the input's values, each channel at each position (C x H x W of them), each
    given the map's value at its position; :math:`x_{[x_S = b]}` sets those of :math:`S` to the
    baseline, ``"black"`` the image's smallest value (or a number); :math:`f_c` is the class's
    logit (``score="probability"``: its softmax probability). Higher is better (1: the map ranks
    every subset as the model does); NaN where either side does not vary. Subsets from ``seed``
    (:func:`random_subsets`); cost: ``runs`` forwards per image, batched, and one of the image.
    """
    _check_images(images, model)
    _check_maps(images, maps)
    classes = _check_classes(classes, images.shape[0]).to(images.device)
    for name, value in (("runs", runs), ("subset_size", subset_size), ("batch_size", batch_size)):
        check_positive_int(name, value)
    count, features = images.shape[0], images[0].numel()
    positions = maps[0].numel()
    if runs < 2 or subset_size > features:
        raise CamlensError(f"faithfulness correlation needs at least 2 runs of at most the input's {features} values, "
                           f"got runs={runs}, subset_size={subset_size}")
    if baseline != "black" and not (isinstance(baseline, (int, float)) and not isinstance(baseline, bool)
                                    and math.isfinite(baseline)):
        raise CamlensError(f"the baseline is 'black' (the image's smallest value) or a finite number, got {baseline!r}")
    if score not in ("logit", "probability"):
        raise CamlensError(f"score is 'logit' or 'probability', got {score!r}")
    subsets = random_subsets(count, features, runs, subset_size, seed).to(images.device)  # (N, runs, size)
    flat_images = images.flatten(1)
    fill = flat_images.amin(dim=1) if baseline == "black" else torch.full((count,), float(baseline)).to(images)
    # Feature c * positions + p (channels first) is given the map's value at position p.
    given = maps.detach().flatten(1).double().gather(1, (subsets % positions).flatten(1)).view(count, runs, -1).sum(dim=2)

    def scores(inputs: Tensor, rows: Tensor) -> Tensor:
        with preserved(model), model_failures(model, inputs):
            logits = forward(model, inputs)
        values = logits if score == "logit" else logits.softmax(dim=1)
        return values.gather(1, classes[rows, None])[:, 0].double()

    clean = torch.cat([scores(images[s : s + batch_size], torch.arange(s, min(s + batch_size, count), device=images.device))
                       for s in range(0, count, batch_size)])
    pairs = torch.arange(count * runs, device=images.device)
    lost = images.new_empty(count * runs, dtype=torch.float64)
    for start in range(0, pairs.numel(), batch_size):
        chunk = pairs[start : start + batch_size]
        rows, run = chunk // runs, chunk % runs
        perturbed = flat_images[rows].scatter(1, subsets[rows, run], fill[rows, None].expand(-1, subset_size))
        lost[chunk] = clean[rows] - scores(perturbed.view(chunk.numel(), *images.shape[1:]), rows)
    lost = lost.view(count, runs)
    a, b = given - given.mean(dim=1, keepdim=True), lost - lost.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norm > 0, (a * b).sum(dim=1) / torch.where(norm > 0, norm, 1), math.nan)
