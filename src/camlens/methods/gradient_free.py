"""The gradient-free family beyond Score-CAM: Ablation-CAM, SS-CAM, IS-CAM and Recipro-CAM.

Ablation-CAM and Recipro-CAM change the target layer's output and run the network on from there
(:class:`Replaced`); SS-CAM and IS-CAM are Score-CAM with other masked inputs
(:meth:`ScoreCAM.perturbation <camlens.methods.scorecam.ScoreCAM.perturbation>`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..accelerate import (
    CutMemory,
    PlainForward,
    SplitForward,
    _close,
    cut,
    remember_cut,
    remembered_cut,
)
from ..capture import LayersSpec, forward_inputs
from ..combine import at_positions
from ..errors import CamlensError, check_positive_int
from ..timing import one_time
from .base import CAMMethod, Context, Cost, hooked
from .scorecam import Perturb, ScoreCAM


class _Tail(nn.Module):
    """The part of a cut network after the layer, for feature maps of given rows."""

    def __init__(self, after: nn.Module, rest: list) -> None:
        super().__init__()
        self.after = after
        self.rest = rest

    def forward(self, features: Tensor) -> object:
        return self.after(features, *self.rest)


class Replaced:
    """Target scores of the model with the output of target layer ``name`` replaced.

    :meth:`scores` takes feature maps (B, K, h, w) whose row b stands for image ``rows[b]``.
    Where the graph of the module that runs (the inference copy, else the model) can be cut at
    the layer (:func:`camlens.accelerate.cut`), the part below the layer runs once for the
    images, and each batch runs only the part after it, with whatever else that part reads (a
    skip connection, the input) taken from each row's image. The cut is checked once: given the
    images' own layer outputs, in a batch of another size than theirs, the part after the layer
    must give the model's outputs. Elsewhere (an untraceable model, a layer of tokens, unit
    targets), each batch runs the whole model on its rows' images, with a hook putting the
    feature maps in place of the layer's output: the same scores, slower.
    """

    def __init__(self, context: Context, name: str, batch_size: int, memory: CutMemory) -> None:
        self.context = context
        self.name = name
        self.memory = memory
        # A traced cut would not get the forward inputs (capture.bound_inputs): the whole model runs then.
        self.parts = None if context.targets.unit_layers or forward_inputs() is not None else self._cut(batch_size)

    def _cut(self, batch_size: int) -> tuple[nn.Module, list] | None:
        """The part after the layer and what it reads besides, checked. The cut of an earlier
        call of the same method object (its ``memory``) is reused (tracing costs about 14 ms on
        the embedded model, a fifth of an Ablation-CAM call) while the model's structure is the
        same (:func:`~camlens.accelerate.remembered_cut`) and it passes the check; else the model
        is cut afresh, and that cut is kept when it passes."""
        runner = self.context.runner
        copy = runner.copy if isinstance(runner, (PlainForward, SplitForward)) else None
        module = self.context.model if copy is None else copy
        remembered = remembered_cut(module, self.name, self.memory)
        if remembered is not None:
            checked = self._checked(remembered, copy, batch_size)
            if checked is not None:
                return checked
        with one_time("cutting the model"):
            parts = cut(module, self.name)
            checked = None if parts is None else self._checked(parts, copy, batch_size)
        remember_cut(module, self.name, None if checked is None else parts, self.memory)
        return checked

    def _checked(self, parts: tuple, copy: nn.Module | None, batch_size: int) -> tuple[nn.Module, list] | None:
        """``(after, rest)`` where ``parts`` give the model's outputs, else None."""
        context = self.context
        before, after = parts
        images = context.images if copy is None else context.runner.inference.prepare(context.images)
        features = context.full_activations[self.name]
        count = images.shape[0]
        rows = torch.cat([torch.arange(count), torch.zeros(1, dtype=torch.long)]).to(images.device)
        try:
            with torch.no_grad():
                given = before(images)
                if not (isinstance(given[0], Tensor) and given[0].dim() == images.dim()):
                    return None  # tokens, a clip's frames: rebuilt from the map by the hook
                rest = list(given[1:])
                for start in range(0, rows.numel(), batch_size):
                    chunk = rows[start : start + batch_size]
                    tail = _Tail(after, self._taken(rest, chunk, count))
                    if not _close(context.logits[chunk], self._running(tail).scorer(features[chunk])):
                        return None
        except Exception:  # whatever fails here runs through the whole model instead
            return None
        return after, rest

    @staticmethod
    def _taken(rest: list, rows: Tensor, count: int) -> list:
        """What the part after the layer reads besides it, for ``rows``: the values with a row
        per image are taken per row, the others (shapes, constants) are the same for all."""
        def per_image(value: object) -> bool:
            return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == count

        return [value.index_select(0, rows) if per_image(value) else value for value in rest]

    def _running(self, runner: nn.Module | None = None) -> Context:
        """The context with ``runner`` running the passes (by default the context's), and a
        scorer that runs it too: a compiled scorer would not run the hook that replaces."""
        return dataclasses.replace(self.context, runner=self.context.runner if runner is None else runner, scorer=None)

    def scores(self, features: Tensor, rows: Tensor) -> Tensor:
        """Target scores (B, T) of the model with the layer's output replaced by ``features``."""
        context = self.context
        if self.parts is not None:
            after, rest = self.parts
            tail = _Tail(after, self._taken(rest, rows, context.images.shape[0]))
            return self._running(tail).forward_scores(features, rows)
        layer = hooked(context.runner, {self.name: context.layers[self.name]})[self.name]
        shape = (rows.numel(), *context.images.shape[1:])

        def replace(module: nn.Module, inputs: object, output: object) -> Tensor:
            if context.reshape is not None and context.reshape.applies(output):
                return context.reshape.to_grid(output, shape, self.name)[1](features)
            return features

        handle = layer.register_forward_hook(replace)
        try:
            return self._running().forward_scores(context.images[rows], rows)
        finally:
            handle.remove()


def _batches(count: int, batch_size: int, device: torch.device):
    for start in range(0, count, batch_size):
        yield torch.arange(start, min(start + batch_size, count), device=device)


def ablation_weights(score: Tensor, ablated: Tensor) -> Tensor:
    r"""Ablation-CAM weights: the fraction of the score lost when channel k is zeroed.

    :math:`w^c_k = (y^c - y^c_k) / y^c`, with :math:`y^c` the target score and
    :math:`y^c_k` the score with :math:`A^k = 0`. ``score`` (N, T) and ``ablated`` (N, T, K)
    give (N, T, K). (Desai & Ramaswamy 2020; a negative :math:`y^c` turns the signs.)
    """
    score = score.unsqueeze(-1)
    return (score - ablated) / score


_CHECK = ("with a check of the model cut at the layer: a pass of the layers before it (counted as a forward) and "
          "one after it")


class _TailBatched(CAMMethod):
    """A method that re-runs the layers after the target layer on batches of ``batch_size``
    changed copies of the layer's map."""

    def __init__(
        self, model: nn.Module, target_layer: LayersSpec | None = None, batch_size: int = 16, **engine: Any
    ) -> None:
        super().__init__(model, target_layer, **engine)
        check_positive_int("batch_size", batch_size)
        self.batch_size = batch_size
        # The cuts of the model at the target layer made by this object's calls, reused by the
        # next ones (Replaced): a new object starts afresh.
        self.cuts = CutMemory()

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}


class AblationCAM(_TailBatched):
    r"""Ablation-CAM (Desai & Ramaswamy, WACV 2020): each channel weighed by the score it costs.

    Channel :math:`k` of the target layer is set to 0 (the paper's ablation; pytorch-grad-cam
    uses a large negative value instead where the layer has negative activations) and the
    network run on from the layer, giving :math:`y^c_k`; :func:`ablation_weights` gives
    :math:`w^c_k = (y^c - y^c_k)/y^c` and the map is :math:`\mathrm{ReLU}(\sum_k w^c_k A^k)`.
    The target score is by default the logit, the paper's class score. A channel that is all
    zero already ablates to the layer's own output: :math:`w^c_k = 0`, nothing forwarded.
    Only the layers after the target layer run for the ablations, where the network can be cut
    there (:class:`Replaced`). Cost per image: one forward of those layers per channel that is
    not all zero, plus one for :math:`y^c` (computed the same way, so that rounding cancels),
    ``batch_size`` ablations at a time.

    Args:
        batch_size: ablated copies of the layer's output per forward pass.
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "ablationcam"
    display_name = "Ablation-CAM"
    summary = (
        "Ablation-CAM (Desai & Ramaswamy 2020): gradient-free, each channel weighed by the share of "
        "the score lost when it is zeroed; (channels not all zero + 1) forwards of the layers after "
        "the target layer, batched"
    )

    def cost(self, channels: int, height: int, width: int) -> Cost:
        return Cost(2, after=channels + 3, at_most=True, note="a channel that is zero everywhere is not ablated; " + _CHECK)

    def weigh(self, context: Context) -> dict[str, Tensor]:
        x = context.images
        count = x.shape[0]
        live = {name: a.flatten(2).ne(0).any(dim=-1) for name, a in context.activations.items()}
        total = sum(count + int(alive.sum()) for alive in live.values())
        done = 0
        weights = {}
        for name, alive in live.items():
            replaced = Replaced(context, name, self.batch_size, self.cuts)
            full = context.full_activations[name]
            subset = context.channels[name]
            image_index, channel_index = alive.nonzero(as_tuple=True)
            # The layer's own output first (no channel: -1), then each ablation.
            rows = torch.cat([torch.arange(count, device=x.device), image_index])
            channels = torch.cat([torch.full((count,), -1, dtype=torch.long, device=x.device), channel_index])
            scores = x.new_empty(rows.numel(), context.targets.count)
            for chunk in _batches(rows.numel(), self.batch_size, x.device):
                features = full[rows[chunk]]
                ablate = (channels[chunk] >= 0).nonzero().flatten()
                zeroed = channels[chunk][ablate]
                features[ablate, zeroed if subset is None else subset[zeroed]] = 0
                scores[chunk] = replaced.scores(features, rows[chunk])
                done += chunk.numel()
                if context.progress is not None:
                    context.progress(done, total)
            score = scores[:count]
            zero = (score == 0).any(dim=1)
            if bool(zero.any()):
                raise CamlensError(
                    f"Ablation-CAM divides by the target score, which is 0 for image(s) "
                    f"{zero.nonzero().flatten().tolist()}: explain another target or score"
                )
            ablated = score.unsqueeze(-1).repeat(1, 1, alive.shape[1])
            ablated[image_index, :, channel_index] = scores[count:]
            weights[name] = ablation_weights(score, ablated)
        return weights


def _check_seed(seed: object) -> None:
    if seed is not None and (
        not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64
    ):
        raise CamlensError(f"seed must be an integer that fits in 64 bits, got {seed!r}")


class SSCAM(ScoreCAM):
    r"""SS-CAM (Wang, Naidu et al. 2020, "Smoothed Score-CAM"): Score-CAM on noisy masks.

    Each mask :math:`H^k = s(\mathrm{Up}(A^k))` is forwarded in ``n_samples`` noisy versions
    and its score is their mean: with ``noise="mask"`` (the paper's SS-CAM(1), noise on the
    feature map) :math:`C(A^k) = \frac{1}{N} \sum_{i=1}^{N} f\big(X \circ (H^k + \delta_i)\big)`,
    with ``noise="input"`` (SS-CAM(2), on the masked input)
    :math:`\frac{1}{N} \sum_i f(X \circ H^k + \delta_i)`, :math:`\delta_i \sim
    \mathcal{N}(0, \sigma^2)` per pixel (and per input channel for ``"input"``); then as
    Score-CAM (baseline, channel softmax, Faster Score-CAM's ``top_channels``). The defaults,
    :math:`N = 35` and :math:`\sigma = 2` on the mask, which spans [0, 1], are those of the
    authors' code and of TorchCAM. (The authors' code adds its noise to the upsampled map before
    normalisation, with a standard deviation of :math:`(2 / \mathrm{range})^2`; this follows
    the paper and TorchCAM: noise on the normalised mask.) The same N draws serve every channel
    and image (common random numbers): each weight is still the mean over N independent draws,
    the differences between channels, which make the map, carry less sampling noise, an image's
    map does not depend on the others in the batch, and the noise is drawn once per call
    (N x H x W).
    Constant channels (:math:`H^k = 0`) share the N forwards of their image's
    :math:`X \circ \delta_i`. Cost per image: ``n_samples`` forwards per non-constant channel
    (plus ``n_samples`` if a channel is constant), batched.

    Args:
        n_samples: noisy versions of each mask.
        sigma: standard deviation of the noise, on the mask (in units of its [0, 1] range), or
            with ``noise="input"`` in the model's input space.
        noise: ``"mask"`` or ``"input"``, where the noise goes (above).
        seed: seed of the noise's generator; None draws from torch's global generator.
        score, baseline, channel_softmax, batch_size, top_channels, optimize, compile: as
            :class:`~camlens.methods.scorecam.ScoreCAM`.
    """

    name = "sscam"
    display_name = "SS-CAM"
    summary = (
        "SS-CAM (Wang et al. 2020): Score-CAM with scores averaged over noisy masks; "
        "n_samples forwards per non-constant channel, batched"
    )
    blank_zero_mask = False  # X * (0 + noise) is not blank

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        n_samples: int = 35,
        sigma: float = 2.0,
        noise: str = "mask",
        seed: int | None = None,
        score: str = "probability",
        baseline: str | Tensor | None = None,
        channel_softmax: bool = False,
        batch_size: int = 16,
        top_channels: int | float | None = None,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, score=score, baseline=baseline, channel_softmax=channel_softmax,
                         batch_size=batch_size, top_channels=top_channels, **engine)
        check_positive_int("n_samples", n_samples)
        if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma < 0:
            raise CamlensError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if noise not in ("mask", "input"):
            raise CamlensError(f"noise must be 'mask' or 'input', got {noise!r}")
        _check_seed(seed)
        self.n_samples = n_samples
        self.sigma = float(sigma)
        self.noise = noise
        self.seed = None if seed is None else int(seed)

    def forwards_per_channel(self) -> int:
        return self.n_samples

    def options(self) -> dict[str, Any]:
        return {**super().options(), "n_samples": self.n_samples, "sigma": self.sigma, "noise": self.noise,
                "seed": self.seed}

    def draws(self, images: Tensor) -> Tensor:
        r"""The noise :math:`\delta_i` (n_samples, 1 or C, H, W) for ``images`` (N, C, H, W) (or
        signals, volumes: their positions as the images'):
        drawn on the CPU from the method's seed in float64, then cast to the images' device and
        dtype, so the same on every device and in every precision (a float32 and a float64 copy
        of a model get the same draws up to rounding; torch draws other numbers from one seed
        in each dtype)."""
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        shape = (self.n_samples, 1 if self.noise == "mask" else images.shape[1], *images.shape[2:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float64) * self.sigma
        return noise.to(device=images.device, dtype=images.dtype)

    def perturbation(self, context: Context) -> tuple[int, Perturb]:
        noise = self.draws(context.images)
        if self.noise == "mask":
            return self.n_samples, lambda images, masks, version: images * (masks + noise[version])
        return self.n_samples, lambda images, masks, version: images * masks + noise[version]


class ISCAM(ScoreCAM):
    r"""IS-CAM (Naidu et al. 2020, "Integrated Score-CAM"): Score-CAM on accumulated masks.

    The mask is accumulated over ``n_steps`` steps, :math:`M_i = M_{i-1} + \frac{i}{N} H^k`
    for :math:`i = 1 \dots N` (the paper's algorithm, as TorchCAM implements it), so
    :math:`M_i = \frac{i (i + 1)}{2 N} H^k`, and the score is the mean
    :math:`C(A^k) = \frac{1}{N} \sum_{i=1}^{N} f(X \circ M_i)`; then as Score-CAM (baseline,
    channel softmax, ``top_channels``). The masks grow past :math:`H^k` (to
    :math:`\frac{N+1}{2} H^k`): this is the paper's accumulation, not Integrated Gradients'
    straight path from 0 to :math:`X \circ H^k`. Constant channels give :math:`X \circ 0`
    at every step, forwarded once for all images. Cost per image: ``n_steps`` forwards per
    non-constant channel, batched.

    Args:
        n_steps: steps of the accumulation (the paper's N; 10 as in TorchCAM).
        score, baseline, channel_softmax, batch_size, top_channels, optimize, compile: as
            :class:`~camlens.methods.scorecam.ScoreCAM`.
    """

    name = "iscam"
    display_name = "IS-CAM"
    summary = (
        "IS-CAM (Naidu et al. 2020): Score-CAM with scores averaged over masks accumulated in "
        "n_steps steps; n_steps forwards per non-constant channel, batched"
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        n_steps: int = 10,
        score: str = "probability",
        baseline: str | Tensor | None = None,
        channel_softmax: bool = False,
        batch_size: int = 16,
        top_channels: int | float | None = None,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, score=score, baseline=baseline, channel_softmax=channel_softmax,
                         batch_size=batch_size, top_channels=top_channels, **engine)
        check_positive_int("n_steps", n_steps)
        self.n_steps = n_steps

    def forwards_per_channel(self) -> int:
        return self.n_steps

    def options(self) -> dict[str, Any]:
        return {**super().options(), "n_steps": self.n_steps}

    def perturbation(self, context: Context) -> tuple[int, Perturb]:
        x = context.images
        step = torch.arange(1, self.n_steps + 1, device=x.device, dtype=x.dtype)
        scale = step * (step + 1) / (2 * self.n_steps)
        return self.n_steps, lambda images, masks, version: images * (masks * at_positions(scale[version], x.dim() - 1))


class ReciproCAM(_TailBatched):
    r"""Recipro-CAM (Byun & Lee 2022, "Recipro-CAM: Fast gradient-free visual explanations for
    convolutional neural networks"): the score of the layer's features at one position.

    For each position :math:`(i, j)` of the target layer, the network runs on from the layer
    with the features at that position only, :math:`A \odot M^{ij}` (:math:`M^{ij}` one at
    :math:`(i, j)`, 0 elsewhere, for every channel), and the map is the target's score there:
    :math:`L^c_{ij} = f^c(A \odot M^{ij})`, by default the probability (the paper's softmax).
    The weights recorded are these scores, (N, T, h, w): the map is not a weighted sum of
    channels. With a channel subset, the other channels are 0 in every :math:`A \odot M^{ij}`.
    The authors' code also offers a 3x3 Gaussian mask around the position; the default, the
    one-hot mask, is what this computes.

    Why this method among the recent gradient-free ones: it costs h w forwards of only the
    layers after the target layer (49 for a 7x7 layer, against a full forward per non-constant
    channel for Score-CAM: 450 to 940 on the embedded model's sample views), it needs no
    gradients, and its paper reports faithfulness (Average Drop, Increase, ADCC) on a par with
    Score-CAM's at a small fraction of its time; Intel's OpenVINO explanation tools offer it
    for CNNs. pytorch-grad-cam and TorchCAM do not.

    Args:
        batch_size: masked copies of the layer's output per forward pass.
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "reciprocam"
    display_name = "Recipro-CAM"
    summary = (
        "Recipro-CAM (Byun & Lee 2022): gradient-free, the map is the score of the layer's "
        "features kept at one position at a time; h x w forwards of the layers after the target layer, batched"
    )
    default_score = "probability"
    # Its map is a score per position, not a weighted sum of the layer's channels: EigenSmooth,
    # which decomposes the weighted channels, refuses it.
    weighs_channels: ClassVar[bool] = False

    def cost(self, channels: int, height: int, width: int) -> Cost:
        return Cost(2, after=height * width + 2, at_most=True, note=_CHECK)

    def weigh(self, context: Context) -> dict[str, Tensor]:
        x = context.images
        count = x.shape[0]
        total = sum(count * math.prod(a.shape[2:]) for a in context.activations.values())
        done = 0
        maps = {}
        for name, full in context.full_activations.items():
            replaced = Replaced(context, name, self.batch_size, self.cuts)
            where = full.shape[2:]  # (h, w); (l) or (d, h, w) alike
            positions = math.prod(where)
            keep = None
            if context.channels[name] is not None:
                keep = at_positions(full.new_zeros(1, full.shape[1]), len(where))
                keep[0, context.channels[name]] = 1
            scores = x.new_empty(count * positions, context.targets.count)
            for chunk in _batches(count * positions, self.batch_size, x.device):
                rows, position = chunk // positions, chunk % positions
                spot = torch.zeros(chunk.numel(), positions, dtype=full.dtype, device=x.device)
                spot[torch.arange(chunk.numel(), device=x.device), position] = 1
                features = full[rows] * spot.view(-1, 1, *where)
                scores[chunk] = replaced.scores(features if keep is None else features * keep, rows)
                done += chunk.numel()
                if context.progress is not None:
                    context.progress(done, total)
            maps[name] = scores.view(count, *where, -1).movedim(-1, 1)
        return maps

    def raw_map(self, name: str, weight: Tensor, activation: Tensor) -> Tensor:
        return torch.relu(weight)

    @staticmethod
    def _scatter(weight: Tensor, context: Context, name: str) -> Tensor:
        return weight  # scores per position: no channels to fill in
