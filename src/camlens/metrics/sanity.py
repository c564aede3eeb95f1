"""The model-randomisation sanity check (Adebayo et al. 2018), cascading from the top.

The layers of a copy of the model are re-initialised one group at a time, from the output
towards the input; after each step the method's map is compared with the map of the trained
model. A method whose maps stay similar while the model is destroyed is not explaining the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import preserved
from ..errors import CamlensError

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..P of each row, ties given the mean of the ranks they span (batched)."""
    rows, count = values.shape
    ordered, order = values.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1 + torch.arange(rows, device=values.device)[:, None] * count
    position = torch.arange(count, device=values.device, dtype=torch.float64).expand(rows, -1)
    first = torch.full((rows * count,), float("inf"), dtype=torch.float64, device=values.device)
    last = torch.full((rows * count,), -1.0, dtype=torch.float64, device=values.device)
    first.scatter_reduce_(0, group.flatten(), position.flatten(), "amin")
    last.scatter_reduce_(0, group.flatten(), position.flatten(), "amax")
    mean_rank = ((first + last) / 2)[group] + 1
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(first: Tensor, second: Tensor, spatial: int = 2) -> Tensor:
    """Spearman rank correlation of each pair of maps (..., H, W), ties averaged; NaN where a map
    is constant (the correlation is undefined). ``spatial``: the maps' dimensions of positions,
    (H, W) here; 1 for a signal's (..., L), 3 for a volume's (..., D, H, W)."""
    a = _average_ranks(first.flatten(-spatial).reshape(-1, first.shape[-spatial:].numel()).double())
    b = _average_ranks(second.flatten(-spatial).reshape(-1, second.shape[-spatial:].numel()).double())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    value = torch.where(norm > 0, (a * b).sum(dim=1) / torch.where(norm > 0, norm, 1), float("nan"))
    return value.reshape(first.shape[:-spatial])


def ssim(first: Tensor, second: Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) of each pair of maps (..., H, W): Gaussian window,
    K1 = 0.01, K2 = 0.03, averaged over the positions where the window fits."""
    shape = first.shape[:-2]
    x = first.reshape(-1, 1, *first.shape[-2:]).double()
    y = second.reshape(-1, 1, *second.shape[-2:]).double()
    size = min(window, x.shape[-1], x.shape[-2])
    offsets = torch.arange(size, dtype=torch.float64, device=x.device) - size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    def blur(t: Tensor) -> Tensor:
        # The Gaussian window is separable: two 1-D passes, 2 x 11 products a pixel instead of
        # 11 x 11 (21 maps of 224 x 224: 6.1 s, now 1.7 s, on a busy 2-core CPU).
        return F.conv2d(F.conv2d(t, kernel.view(1, 1, size, 1)), kernel.view(1, 1, 1, size))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=(1, 2, 3)).reshape(shape)


def ssim_uniform(first: Tensor, second: Tensor, window: int = 7, spatial: int = 2) -> Tensor:
    """Structural similarity of each pair of maps (..., H, W) as scikit-image's
    ``structural_similarity`` computes it at its defaults, which Quantus uses: a ``window`` x
    ``window`` uniform window, sample covariances (n / (n - 1)), K1 = 0.01, K2 = 0.03, the data
    range of the pair (its largest value minus its smallest), averaged over the positions where the
    window fits (scikit-image pads, then crops the padded border away: the same positions). NaN
    where the pair is one constant. ``spatial``: the maps' dimensions, 1 for sequences (..., L)
    (a ``window``-long window), 3 for volumes (..., D, H, W)."""
    shape = first.shape[:-spatial]
    x = first.reshape(-1, 1, *first.shape[-spatial:]).double()
    y = second.reshape(-1, 1, *second.shape[-spatial:]).double()
    if min(x.shape[2:]) < window:
        raise CamlensError(f"maps of {'x'.join(map(str, x.shape[2:]))} are smaller than the window of {window}")
    both = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
    data_range = (both.amax(dim=1) - both.amin(dim=1)).view(-1, *(1,) * (spatial + 1))
    size = window**spatial
    kernel = torch.full((1, 1, *(window,) * spatial), 1.0 / size, dtype=torch.float64, device=x.device)
    convolve = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]

    def mean(t: Tensor) -> Tensor:
        return convolve(t, kernel)

    norm = size / (size - 1)
    mu_x, mu_y = mean(x), mean(y)
    var_x = norm * (mean(x * x) - mu_x**2)
    var_y = norm * (mean(y * y) - mu_y**2)
    cov = norm * (mean(x * y) - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    result = value.flatten(1).mean(dim=1)
    return torch.where(data_range.flatten() > 0, result, math.nan).reshape(shape)


def random_logit(method, images: Tensor, classes: Tensor, seed: int | Sequence[int] = 0,
                 explanation=None, flat: bool = False) -> Tensor:
    r"""Random logit (Sixt et al. 2020, "When explanations lie: why many modified BP attributions
    fail"): the similarity (:func:`ssim_uniform`, Quantus's default) between each image's map for
    its class and its map for another class drawn at random (uniformly among the others, from
    ``seed``: one int for all images, or one per image). A map that follows the class differs:
    lower is better; a class-agnostic method (Eigen-CAM) scores 1. Cost: one more explanation
    per image. ``explanation``: the method's explanation of ``images`` for ``classes``, where it
    is at hand (its first target's maps are used). ``flat``: as Quantus's ``RandomLogit`` does,
    compare the maps flattened to sequences (a window of 7 along the rows, running from one row
    into the next), where camlens compares them as the images they are, as Sixt et al. do."""
    classes = torch.as_tensor(classes).long().reshape(-1)
    first = explanation if explanation is not None else method(images, classes)
    count, total = first.maps.shape[0], first.logits.shape[1]
    if total < 2:
        raise CamlensError("random logit needs a model of at least 2 classes")
    if isinstance(seed, int):  # one generator, a draw per image in turn
        draws = torch.randint(total - 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    else:  # a generator per image: its draw does not depend on the other images
        draws = [int(torch.randint(total - 1, (1,), generator=torch.Generator().manual_seed(int(value))))
                 for value in seed]
    if len(draws) != count:
        raise CamlensError(f"random logit takes one seed, or one per image ({count}), got {len(draws)}")
    # Uniform over the classes but the image's own.
    others = [draw + int(draw >= int(classes[n])) for n, draw in enumerate(draws)]
    second = method(images, torch.tensor(others))
    a, b = first.maps[:, 0], second.maps[:, 0]  # (N, *positions): an image's, a signal's, a volume's
    return ssim_uniform(a.flatten(1), b.flatten(1), spatial=1) if flat else ssim_uniform(a, b, spatial=a.dim() - 1)


def randomisation_groups(model: nn.Module, example: Tensor) -> list[str]:
    """Groups of parameters to randomise, from the output to the input.

    A group is the shallowest module, below the model, that owns parameters and is not a plain
    container (Sequential, ModuleList, ModuleDict): a residual block, a convolution, the
    classifier. They are ordered by when they finish in a forward pass, last first.
    """
    modules = dict(model.named_modules())
    groups: list[str] = []
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        parts = name.split(".")
        group = name
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if not isinstance(modules[prefix], CONTAINERS):
                group = prefix
                break
        if group not in groups:
            groups.append(group)
    finished: list[str] = []
    with preserved(model), torch.no_grad():  # every module's own mode back, also on an error
        handles = [
            modules[g].register_forward_hook(lambda m, i, o, g=g: finished.append(g) if g not in finished else None)
            for g in groups
        ]
        try:
            model(example)
        finally:
            for handle in handles:
                handle.remove()
    return list(reversed(finished))


def reinitialise(module: nn.Module) -> None:
    """Fresh random parameters for a module and its children (their own initialisation where
    they have one, a small normal distribution otherwise); batch norm statistics are reset too."""
    for child in module.modules():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
        else:
            for parameter in child.parameters(recurse=False):
                nn.init.normal_(parameter, std=0.02)


def cascade_steps(groups: Sequence[str], steps: int | None = None) -> list[list[str]]:
    """The groups re-initialised at each step: one group a step, or ``steps`` steps spread
    evenly over the cascade. The first step is always the top group alone (the classifier) and
    the last ends with the bottom one, so a coarse cascade keeps both ends of the test."""
    groups = list(groups)
    if steps is None or steps >= len(groups):
        return [[group] for group in groups]
    if steps < 1:
        raise CamlensError(f"steps must be at least 1, not {steps}")
    if steps == 1:
        return [groups]
    ends = [1 + round(i * (len(groups) - 1) / (steps - 1)) for i in range(steps)]
    return [groups[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def cascading_randomisation(
    explain: Callable[[nn.Module], Tensor],
    model: nn.Module,
    example: Tensor,
    groups: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    steps: int | None = None,
) -> dict:
    """Maps of the trained model and after each cumulative randomisation step, with similarities.

    ``explain(model)`` returns the maps (N, T, H, W) to compare (it is called on a copy; the
    caller's model is never changed). ``steps`` coarsens the cascade (:func:`cascade_steps`);
    ``progress(done, total)`` counts maps, the trained model's included. Returns ``{"groups"
    (every group, top first), "steps" (the groups of each step), "maps" (steps + 1, N, T, H, W),
    "spearman" (steps, N, T), "ssim" (steps, N, T)}``. Maps of signals (N, T, L) and volumes
    (N, T, D, H, W) are ranked over all their positions; their "ssim" is None (SSIM compares an
    image's windows).
    """
    work = copy.deepcopy(model)
    groups = list(groups) if groups is not None else randomisation_groups(work, example[:1])
    plan = cascade_steps(groups, steps)
    modules = dict(work.named_modules())
    maps = [explain(work).detach()]
    if progress is not None:
        progress(1, len(plan) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, names in enumerate(plan):
            for name in names:
                reinitialise(modules[name])
            maps.append(explain(work).detach())
            if progress is not None:
                progress(step + 2, len(plan) + 1)
    stacked = torch.stack(maps)
    reference = stacked[:1].expand_as(stacked[1:])
    spatial = stacked.dim() - 3  # (steps + 1, N, T, *positions)
    return {
        "groups": groups,
        "steps": plan,
        "maps": stacked,
        "spearman": spearman(stacked[1:], reference, spatial),
        # SSIM compares an image's windows: undefined (None) for the maps of signals and volumes.
        "ssim": ssim(stacked[1:], reference) if spatial == 2 else None,
    }


def sanity_verdict(spearman: Sequence[float | None], threshold: float = 0.5, max_similar: float = 0.25,
                   trained_blank: bool = False) -> dict:
    """How long a map survives the cascade, and the verdict that follows.

    ``spearman`` holds the correlation with the trained model's map after each step, top
    first; None or NaN (a blank map) counts as changed. A step is *similar* when the
    correlation is at least ``threshold``. Verdicts: FAIL when the map is still similar with
    every group randomised (it does not depend on the weights); LATE when it changes by the
    end but is similar at more than ``max_similar`` of the steps; PASS otherwise.
    UNTESTED when the trained model's own map is blank: there is nothing to compare with.
    ``changed_from`` is the first step (0-based) after which the map is never similar again.
    """
    if not spearman:
        raise CamlensError("no randomisation steps to judge")
    # A NaN bound passes every comparison: every verdict would be PASS.
    if not (isinstance(threshold, (int, float)) and -1 <= threshold <= 1):
        raise CamlensError(f"threshold must be a Spearman correlation in [-1, 1], got {threshold!r}")
    if not (isinstance(max_similar, (int, float)) and 0 <= max_similar <= 1):
        raise CamlensError(f"max_similar must be a fraction in [0, 1], got {max_similar!r}")
    similar = [v is not None and not math.isnan(v) and v >= threshold for v in spearman]
    count = sum(similar)
    last_similar = max((i for i, s in enumerate(similar) if s), default=-1)
    changed_from = last_similar + 1 if last_similar + 1 < len(similar) else None
    if trained_blank:
        verdict = "UNTESTED"
    elif similar[-1]:
        verdict = "FAIL"
    elif count > max_similar * len(similar):
        verdict = "LATE"
    else:
        verdict = "PASS"
    return {"verdict": verdict, "similar_steps": count, "similar_fraction": count / len(similar),
            "changed_from": changed_from}
