"""Score-CAM (Wang et al. 2020): gradient-free, each channel weighed by the score of its mask."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capture import LayersSpec
from ..combine import is_constant, upsample_normalise
from ..errors import CamlensError, check_positive_int
from ..explanation import Explanation
from ..targets import SCORE_KINDS
from .base import CAMMethod, Context, Cost

# make(images, masks, version) -> masked inputs: see ScoreCAM.perturbation.
Perturb = Callable[[Tensor, Tensor, Tensor], Tensor]


def scorecam_weights(increase: Tensor, channel_softmax: bool = False, chosen: Tensor | None = None) -> Tensor:
    r"""Score-CAM weights from the Channel-wise Increase of Confidence.

    :math:`C(A^k) = f(X \circ H^k) - f(X_b)` with :math:`H^k = s(\mathrm{Up}(A^k))`;
    :math:`w_k = C(A^k)`, or :math:`\mathrm{softmax}_k\, C(A^k)` with ``channel_softmax``.
    ``increase`` (N, T, K) gives (N, T, K). With ``chosen`` (N, K) boolean, only the chosen
    channels :math:`S` weigh: :math:`w_k = 0` for :math:`k \notin S`, and the softmax runs over
    :math:`S`.
    """
    if chosen is None:
        return increase.softmax(dim=-1) if channel_softmax else increase
    chosen = chosen.unsqueeze(1)
    if channel_softmax:
        return increase.masked_fill(~chosen, float("-inf")).softmax(dim=-1)
    return torch.where(chosen, increase, torch.zeros_like(increase))


def top_variance_channels(activations: Tensor, count: int) -> Tensor:
    r"""The ``count`` channels of each image with the largest spatial variance, (N, count).

    :math:`\mathrm{Var}(A^k) = \frac{1}{hw} \sum_{ij} (A^k_{ij} - \bar{A^k})^2` for
    ``activations`` (N, K, h, w); in decreasing variance, equal variances in increasing channel
    index.
    """
    variance = activations.flatten(2).var(dim=-1, correction=0)
    return variance.sort(dim=1, descending=True, stable=True).indices[:, :count]


class ScoreCAM(CAMMethod):
    r"""Score-CAM: forward the image masked by each upsampled, normalised channel.

    Channels whose activation is constant have the mask :math:`H^k = 0`, hence the same masked
    input :math:`X \cdot 0` for every image: it is forwarded once and its score shared. The
    other masked inputs are built and forwarded ``batch_size`` at a time, so memory does not
    grow with the number of channels. Cost: (non-constant channels + 1) forwards per image,
    batched, plus one forward of the baseline when one is given.

    ``top_channels`` makes it Faster Score-CAM (an approximation, opt-in): per image only the
    set :math:`S` of the ``top_channels`` channels with the largest spatial variance
    :math:`\mathrm{Var}(A^k)` (:func:`top_variance_channels`) is forwarded, and
    :math:`w_k = C(A^k)` for :math:`k \in S`, :math:`w_k = 0` otherwise (with
    ``channel_softmax``, the softmax over :math:`S`). The cost falls to :math:`|S|` forwards
    (plus the shared one of :math:`X \cdot 0` if :math:`S` holds a constant channel).
    Each Explanation records :math:`S` per image in ``options["chosen_channels"]``
    (``{layer: [[k, ...] per image]}``). With every channel chosen it is Score-CAM exactly.

    Args:
        score: ``f``, the score of class targets: "probability" (the paper's) or "logit".
        baseline: None (the paper: the black-image term is dropped, ``C = f(M_k)``), "zeros",
            or a tensor (C, H, W) or (N, C, H, W) in the model's input space; its score is
            subtracted.
        channel_softmax: weights are the softmax over channels of ``C`` (a published variant).
        batch_size: masked inputs per forward pass. 16 was fastest on a 2-core CPU
            (benchmarks/latency.py); an accelerator usually wants more.
        top_channels: None (exact, every channel), a count (int >= 1; at most every channel)
            or a fraction of the target layer's channels, or of the ``channels`` subset
            (float in (0, 1], rounded half up to a count, at least 1). On the embedded
            EfficientNet-Lite0 (1280 channels, 450 to 940 of them non-constant on the 32
            views of the sample photos) 32 channels cost 3.4-7.1% of the exact forwards; the
            maps' Spearman correlation with the exact ones had a median of 0.98, but fell to
            0.75 for a class other than the predicted one (benchmarks/fast_scorecam.py).
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "scorecam"
    display_name = "Score-CAM"
    summary = (
        "Score-CAM (Wang et al. 2020): gradient-free, weights from the scores of masked inputs; "
        "one forward per non-constant channel, batched"
    )
    default_score = "probability"
    # Whether every version of a zero mask is the all-zero input, whatever the image.
    blank_zero_mask: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        score: str = "probability",
        baseline: str | Tensor | None = None,
        channel_softmax: bool = False,
        batch_size: int = 16,
        top_channels: int | float | None = None,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, **engine)
        if score not in SCORE_KINDS:
            raise CamlensError(f"unknown score {score!r}: choose one of {', '.join(SCORE_KINDS)}")
        if not (baseline is None or baseline == "zeros" or isinstance(baseline, Tensor)):
            raise CamlensError("baseline must be None, 'zeros' or a tensor in the model's input space")
        check_positive_int("batch_size", batch_size)
        if not isinstance(channel_softmax, bool):
            raise CamlensError(f"channel_softmax must be True or False, got {channel_softmax!r}")
        if not (
            top_channels is None
            or (isinstance(top_channels, int) and not isinstance(top_channels, bool) and top_channels >= 1)
            or (isinstance(top_channels, float) and 0 < top_channels <= 1)
        ):
            raise CamlensError(
                f"top_channels must be a number of channels (an integer >= 1) or a fraction of them "
                f"(a float in (0, 1]), or None for every channel; got {top_channels!r}"
            )
        self.top_channels = top_channels
        self.score = score
        self.baseline = baseline
        self.channel_softmax = channel_softmax
        self.batch_size = batch_size

    def score_kind(self) -> str:
        return self.score

    def forwards_per_channel(self) -> int:
        """Masked inputs forwarded per non-constant channel (a time estimate's unit)."""
        return 1

    def cost(self, channels: int, height: int, width: int) -> Cost:
        top = self.top_channels
        if top is not None:
            channels = min(channels, max(1, int(top * channels + 0.5))) if isinstance(top, float) else min(top, channels)
        return Cost(2 + channels * self.forwards_per_channel(), at_most=True,
                    note="a constant channel is not forwarded; the all-zero input is, where the baseline needs it")

    def options(self) -> dict[str, Any]:
        baseline = self.baseline if not isinstance(self.baseline, Tensor) else "tensor"
        options = {
            "score": self.score,
            "baseline": baseline,
            "channel_softmax": self.channel_softmax,
            "batch_size": self.batch_size,
        }
        # Only when set: exact Score-CAM records what it always did, so its earlier
        # `camlens evaluate` folders still resume.
        if self.top_channels is not None:
            options["top_channels"] = self.top_channels
        return options

    def masks(self, activations: Tensor, size: Sequence[int]) -> Tensor:
        r"""The masks :math:`H^k = s(\mathrm{Up}(A^k))` (B, 1, H, W) of single-channel maps (B, 1, h, w)."""
        return upsample_normalise(activations, size)

    def _top(self, activations: Tensor) -> Tensor | None:
        """The chosen channels (N, count) of ``activations`` (N, K, h, w), most variance first;
        None when every channel is weighed (``top_channels`` None)."""
        if self.top_channels is None:
            return None
        channels = activations.shape[1]
        if isinstance(self.top_channels, float):
            count = max(1, int(self.top_channels * channels + 0.5))
        else:
            count = min(self.top_channels, channels)
        return top_variance_channels(activations, count)

    def perturbation(self, context: Context) -> tuple[int, Perturb]:
        r"""How each mask makes masked inputs: ``(S, make)``, each mask forwarded in S versions,
        ``make(images, masks, version)`` giving those of the versions ``version`` (B,) of
        ``images`` (B, C, H, W) under ``masks`` (B, 1, H, W); a channel's score is the mean of
        theirs. Score-CAM: one version, :math:`X \circ H^k`. (SS-CAM and IS-CAM make others.)"""
        return 1, lambda images, masks, version: images * masks

    def weigh(self, context: Context) -> dict[str, Tensor]:
        x = context.images
        rows = torch.arange(x.shape[0], device=x.device)
        versions, make = self.perturbation(context)
        constant = {name: is_constant(a, a.dim() - 2) for name, a in context.activations.items()}
        chosen = {name: self._chosen(a) for name, a in context.activations.items()}
        # Constant channels have the mask H^k = 0, hence the same masked inputs: forwarded once
        # for all images where a zero mask blanks the input, else once per image (through the
        # first of its constant channels), and shared.
        shared = {name: chosen[name] & constant[name] for name in chosen}
        forwarded = {name: chosen[name] & ~constant[name] for name in chosen}
        if not self.blank_zero_mask:
            for name, same in shared.items():
                forwarded[name] |= same & (same.cumsum(dim=1) == 1)
        needs_zero = self.baseline == "zeros" or (
            self.blank_zero_mask and any(bool(same.any()) for same in shared.values())
        )
        zero_scores = context.forward_scores(torch.zeros_like(x[:1]), rows) if needs_zero else None
        baseline_scores = self._baseline_scores(context, rows, zero_scores)
        total = versions * sum(int(f.sum()) for f in forwarded.values()) + int(needs_zero)
        done = int(needs_zero)
        if context.progress is not None:
            context.progress(done, total)
        weights = {}
        for name, activation in context.activations.items():
            scores, done = self._masked_scores(context, activation, forwarded[name], (versions, make), done, total)
            same = shared[name]
            if bool(same.any()):
                if self.blank_zero_mask:
                    fill = zero_scores.unsqueeze(-1)
                else:
                    first = same.int().argmax(dim=1).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
                    fill = scores.gather(2, first)
                scores = torch.where(same.unsqueeze(1), fill, scores)
            if baseline_scores is not None:
                scores = scores - baseline_scores.unsqueeze(-1)
            subset = None if self.top_channels is None else chosen[name]
            weights[name] = scorecam_weights(scores, self.channel_softmax, subset)
        return weights

    def _chosen(self, activations: Tensor) -> Tensor:
        chosen = torch.ones(activations.shape[:2], dtype=torch.bool, device=activations.device)
        top = self._top(activations)
        return chosen if top is None else chosen.zero_().scatter_(1, top, True)

    def _explanation(
        self, context: Context, weights: dict[str, Tensor], scores: Tensor, chosen: bool
    ) -> Explanation:
        explanation = super()._explanation(context, weights, scores, chosen)
        if self.top_channels is not None:
            layer_channels = {}
            for name, activation in context.activations.items():
                top = self._top(activation)
                subset = context.channels[name]  # numbered as in the layer, also under a channel subset
                layer_channels[name] = (top if subset is None else subset[top]).tolist()
            explanation.options["chosen_channels"] = layer_channels
        return explanation

    def _baseline_scores(
        self, context: Context, rows: Tensor, zero_scores: Tensor | None
    ) -> Tensor | None:
        if self.baseline is None:
            return None
        if isinstance(self.baseline, str):
            return zero_scores
        x = context.images
        baseline = self.baseline.to(device=x.device, dtype=x.dtype)
        if baseline.dim() == x.dim() - 1:
            baseline = baseline.unsqueeze(0)
        if baseline.dim() != x.dim() or baseline.shape[1:] != x.shape[1:] or baseline.shape[0] not in (1, x.shape[0]):
            raise CamlensError(
                f"the baseline has shape {tuple(self.baseline.shape)}; it must be {tuple(x.shape[1:])} "
                f"or {tuple(x.shape)}"
            )
        return context.forward_scores(baseline, rows)

    def _masked_scores(
        self,
        context: Context,
        activation: Tensor,
        forwarded: Tensor,
        perturbation: tuple[int, Perturb],
        done: int,
        total: int,
    ) -> tuple[Tensor, int]:
        """The mean over the versions of f(make(X, H^k, version)) (N, T, K) for the ``forwarded``
        (N, K) channels, 0 for the others: ``batch_size`` masked inputs at a time."""
        x = context.images
        versions, make = perturbation
        sums = x.new_zeros(*forwarded.shape, context.targets.count)
        image_index, channel_index = forwarded.nonzero(as_tuple=True)
        count = image_index.numel() * versions
        for start in range(0, count, self.batch_size):
            flat = torch.arange(start, min(start + self.batch_size, count), device=x.device)
            pair, version = flat // versions, flat % versions
            rows, cols = image_index[pair], channel_index[pair]
            masks = self.masks(activation[rows, cols].unsqueeze(1), x.shape[2:])
            scores = context.forward_scores(make(x[rows], masks, version), rows)
            sums.index_put_((rows, cols), scores, accumulate=True)
            done += flat.numel()
            if context.progress is not None:
                context.progress(done, total)
        return (sums / versions).transpose(1, 2), done
