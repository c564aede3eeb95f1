"""Score-CAM (Wang et al. 2020): gradient-free, each channel weighed by the score of its mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayersSpec
from ..combine import is_constant, upsample_normalise
from ..errors import CamlensError, check_positive_int
from ..targets import SCORE_KINDS
from .base import CAMMethod, Context


def scorecam_weights(increase: Tensor, channel_softmax: bool = False) -> Tensor:
    r"""Score-CAM weights from the Channel-wise Increase of Confidence.

    :math:`C(A^k) = f(X \circ H^k) - f(X_b)` with :math:`H^k = s(\mathrm{Up}(A^k))`;
    :math:`w_k = C(A^k)`, or :math:`\mathrm{softmax}_k\, C(A^k)` with ``channel_softmax``.
    ``increase`` (N, T, K) gives (N, T, K).
    """
    return increase.softmax(dim=-1) if channel_softmax else increase


class ScoreCAM(CAMMethod):
    r"""Score-CAM: forward the image masked by each upsampled, normalised channel.

    Channels whose activation is constant have the mask :math:`H^k = 0`, hence the same masked
    input :math:`X \cdot 0` for every image: it is forwarded once and its score shared. The
    other masked inputs are built and forwarded ``batch_size`` at a time, so memory does not
    grow with the number of channels. Cost: (non-constant channels + 1) forwards per image,
    batched, plus one forward of the baseline when one is given.

    Args:
        score: ``f``, the score of class targets: "probability" (the paper's) or "logit".
        baseline: None (the paper: the black-image term is dropped, ``C = f(M_k)``), "zeros",
            or a tensor (C, H, W) or (N, C, H, W) in the model's input space; its score is
            subtracted.
        channel_softmax: weights are the softmax over channels of ``C`` (a published variant).
        batch_size: masked inputs per forward pass. 16 was fastest on a 2-core CPU
            (benchmarks/latency.py); an accelerator usually wants more.
    """

    name = "scorecam"
    display_name = "Score-CAM"
    summary = (
        "Score-CAM (Wang et al. 2020): gradient-free, weights from the scores of masked inputs; "
        "one forward per non-constant channel, batched"
    )
    default_score = "probability"

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        score: str = "probability",
        baseline: str | Tensor | None = None,
        channel_softmax: bool = False,
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, target_layer)
        if score not in SCORE_KINDS:
            raise CamlensError(f"unknown score {score!r}: choose one of {', '.join(SCORE_KINDS)}")
        if not (baseline is None or baseline == "zeros" or isinstance(baseline, Tensor)):
            raise CamlensError("baseline must be None, 'zeros' or a tensor in the model's input space")
        check_positive_int("batch_size", batch_size)
        if not isinstance(channel_softmax, bool):
            raise CamlensError(f"channel_softmax must be True or False, got {channel_softmax!r}")
        self.score = score
        self.baseline = baseline
        self.channel_softmax = channel_softmax
        self.batch_size = batch_size

    def score_kind(self) -> str:
        return self.score

    def options(self) -> dict[str, Any]:
        baseline = self.baseline if not isinstance(self.baseline, Tensor) else "tensor"
        return {
            "score": self.score,
            "baseline": baseline,
            "channel_softmax": self.channel_softmax,
            "batch_size": self.batch_size,
        }

    def weigh(self, context: Context) -> dict[str, Tensor]:
        x = context.images
        rows = torch.arange(x.shape[0], device=x.device)
        constant = {name: is_constant(a) for name, a in context.activations.items()}
        needs_zero = self.baseline == "zeros" or any(bool(c.any()) for c in constant.values())
        zero_scores = context.forward_scores(torch.zeros_like(x[:1]), rows) if needs_zero else None
        baseline_scores = self._baseline_scores(context, rows, zero_scores)
        total = sum(int((~c).sum()) for c in constant.values()) + int(needs_zero)
        done = int(needs_zero)
        if context.progress is not None:
            context.progress(done, total)
        weights = {}
        for name, activation in context.activations.items():
            scores, done = self._masked_scores(context, activation, constant[name], zero_scores, done, total)
            if baseline_scores is not None:
                scores = scores - baseline_scores.unsqueeze(-1)
            weights[name] = scorecam_weights(scores, self.channel_softmax)
        return weights

    def _baseline_scores(
        self, context: Context, rows: Tensor, zero_scores: Tensor | None
    ) -> Tensor | None:
        if self.baseline is None:
            return None
        if isinstance(self.baseline, str):
            return zero_scores
        x = context.images
        baseline = self.baseline.to(device=x.device, dtype=x.dtype)
        if baseline.dim() == 3:
            baseline = baseline.unsqueeze(0)
        if baseline.dim() != 4 or baseline.shape[1:] != x.shape[1:] or baseline.shape[0] not in (1, x.shape[0]):
            raise CamlensError(
                f"the baseline has shape {tuple(self.baseline.shape)}; it must be {tuple(x.shape[1:])} "
                f"or {tuple(x.shape)}"
            )
        return context.forward_scores(baseline, rows)

    def _masked_scores(
        self,
        context: Context,
        activation: Tensor,
        constant: Tensor,
        zero_scores: Tensor | None,
        done: int,
        total: int,
    ) -> tuple[Tensor, int]:
        """f(X * H^k) for every image and channel: (N, T, K)."""
        x = context.images
        images, channels = constant.shape
        scores = x.new_empty(images, context.targets.count, channels)
        if zero_scores is not None:
            scores[:] = zero_scores.unsqueeze(-1)
        image_index, channel_index = (~constant).nonzero(as_tuple=True)
        for start in range(0, image_index.numel(), self.batch_size):
            rows = image_index[start : start + self.batch_size]
            cols = channel_index[start : start + self.batch_size]
            masks = upsample_normalise(activation[rows, cols].unsqueeze(1), x.shape[-2:])
            scores[rows, :, cols] = context.forward_scores(x[rows] * masks, rows)
            done += rows.numel()
            if context.progress is not None:
                context.progress(done, total)
        return scores, done
