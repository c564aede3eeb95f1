"""Gradient methods: Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import LayersSpec
from ..combine import at_positions, positions
from ..errors import CamlensError, check_positive_int
from .base import CAMMethod, Context, Cost


def gradcam_weights(grad: Tensor) -> Tensor:
    r"""Grad-CAM weights :math:`w^c_k = \frac{1}{hw} \sum_{ij} \partial y^c / \partial A^k_{ij}`.

    ``grad`` (N, T, K, h, w) gives (N, T, K); (N, T, K, l) and (N, T, K, d, h, w) alike.
    """
    return grad.mean(dim=positions(grad, 3))


def gradcampp_weights(activation: Tensor, d1: Tensor, d2: Tensor, d3: Tensor) -> Tensor:
    r"""Grad-CAM++ weights in closed form (exponential score assumption).

    .. math::
        \alpha^{kc}_{ij} = \frac{D_2}{2 D_2 + (\sum_{ab} A^k_{ab}) D_3}, \qquad
        w^c_k = \sum_{ij} \alpha^{kc}_{ij}\, \mathrm{ReLU}(D_1)

    For Grad-CAM++ ``D1, D2, D3 = g, g^2, g^3`` with ``g`` the gradient; for Smooth Grad-CAM++
    they are the means of ``g, g^2, g^3`` over the noisy copies. ``alpha`` is 0 where its
    denominator is 0 (where ``g = 0``, and at the isolated points where ``sum A * g = -2``).
    ``activation`` (N, K, h, w), the ``D`` (N, T, K, h, w); returns (N, T, K).
    """
    total = at_positions(activation.sum(dim=positions(activation, 2))[:, None], activation.dim() - 2)
    denominator = 2 * d2 + total * d3
    defined = denominator != 0
    alpha = torch.where(defined, d2 / torch.where(defined, denominator, 1), 0)
    return (alpha * torch.relu(d1)).sum(dim=positions(alpha, 3))


class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatially averaged gradients."""

    name = "gradcam"
    display_name = "Grad-CAM"
    summary = "Grad-CAM (Selvaraju et al. 2017): mean gradient per channel; one forward + backward"
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        return {name: gradcam_weights(grad) for name, grad in context.gradients.items()}


class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018): pixel-weighted positive gradients, closed form."""

    name = "gradcam++"
    display_name = "Grad-CAM++"
    summary = "Grad-CAM++ (Chattopadhyay et al. 2018): closed-form pixel weights; one forward + backward"
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        weights = {}
        for name, grad in context.gradients.items():
            grad2 = grad * grad
            weights[name] = gradcampp_weights(context.activations[name], grad, grad2, grad2 * grad)
        return weights


class SmoothGradCAMPlusPlus(CAMMethod):
    r"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ on derivatives averaged over noisy copies.

    ``n_samples`` copies ``X + N(0, sigma^2)`` with ``sigma = noise_level * (max X - min X)``
    per image; ``D1, D2, D3`` are the means of each copy's ``g, g^2, g^3``; ``A`` is the clean
    image's activation; the weights are :func:`gradcampp_weights` of those. With one copy and
    no noise this is Grad-CAM++ exactly.

    Args:
        n_samples: number of noisy copies per image.
        noise_level: standard deviation of the noise as a fraction of each image's value range.
        seed: seed of a private generator; or pass ``generator``. Neither: torch's global RNG.
        generator: a CPU ``torch.Generator``. The noise for all N images is drawn in one call
            of shape (N, n_samples, C, H, W) on the CPU, so results do not depend on the device
            or on ``batch_size``.
        batch_size: noisy copies per forward pass. 8 was the fastest on a 2-core CPU (a forward
            and backward of 8 copies cost less per copy than of 1, 16 or 32:
            benchmarks/levers.py); an accelerator usually wants more.
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "smoothgradcam++"
    display_name = "Smooth Grad-CAM++"
    summary = (
        "Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ on derivatives averaged over "
        "noisy copies; n_samples batched forwards + backwards"
    )

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        n_samples: int = 8,
        noise_level: float = 0.15,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, **engine)
        check_positive_int("n_samples", n_samples)
        check_positive_int("batch_size", batch_size)
        if (
            not isinstance(noise_level, numbers.Real)
            or isinstance(noise_level, bool)
            or not math.isfinite(noise_level)
            or noise_level < 0
        ):
            raise CamlensError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
        if seed is not None and generator is not None:
            raise CamlensError("give either seed or generator, not both")
        if seed is not None and (
            not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not -(2**63) <= seed < 2**64
        ):
            raise CamlensError(f"seed must be an integer that fits in 64 bits, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise CamlensError(f"generator must be a torch.Generator, not {type(generator).__name__}")
        if generator is not None and generator.device.type != "cpu":
            raise CamlensError("the noise generator must be a CPU torch.Generator")
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.seed = None if seed is None else int(seed)
        self.generator = generator
        self.batch_size = batch_size

    def cost(self, channels: int, height: int, width: int) -> Cost:
        return Cost(1 + self.n_samples, 1 + self.n_samples)

    def options(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "noise_level": self.noise_level,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def noise(self, images: Tensor) -> Tensor:
        """Standard normal noise (N, n_samples, C, *positions), on the CPU, from the method's generator.

        Drawn in float64 and then cast: torch draws other numbers from one seed in float32, so a
        float32 model would otherwise see other noise than its float64 copy."""
        generator = self.generator
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed)
        shape = (images.shape[0], self.n_samples, *images.shape[1:])
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(images.dtype)

    def weigh(self, context: Context) -> dict[str, Tensor]:
        x = context.images
        count = x.shape[0]
        flat = x.flatten(1)
        sigma = self.noise_level * (flat.amax(dim=1) - flat.amin(dim=1))
        noise = self.noise(x).flatten(0, 1)
        rows = torch.arange(count, device=x.device).repeat_interleave(self.n_samples)
        moments: dict[str, list[Tensor]] = {}
        def noisy(start: int) -> tuple[Tensor, Tensor]:
            chunk = rows[start : start + self.batch_size]
            step = noise[start : start + self.batch_size].to(x.device)
            return chunk, x[chunk] + step * at_positions(sigma[chunk], x.dim() - 1)

        for start in range(0, rows.numel(), self.batch_size):
            chunk, copies = noisy(start)
            if not bool(torch.isfinite(copies).all()):
                bad = sorted({  # every image whose copies overflow, not only this batch's
                    int(image)
                    for begin in range(start, rows.numel(), self.batch_size)
                    for part, made in [noisy(begin)]
                    for image in part[~torch.isfinite(made).flatten(1).all(1)]
                })
                raise CamlensError(
                    f"noise_level {self.noise_level} makes noisy copies of image(s) {bad} overflow "
                    f"{x.dtype}: use a smaller noise_level (it is a fraction of the value range)"
                )
            for name, grad in context.gradients_at(copies, chunk).items():
                if name not in moments:
                    moments[name] = [grad.new_zeros(count, *grad.shape[1:]) for _ in range(3)]
                grad2 = grad * grad
                for total, power in zip(moments[name], (grad, grad2, grad2 * grad)):
                    total.index_add_(0, chunk, power)
            if context.progress is not None:
                context.progress(min(start + self.batch_size, rows.numel()), rows.numel())
        return {
            name: gradcampp_weights(
                context.activations[name], *(total / self.n_samples for total in totals)
            )
            for name, totals in moments.items()
        }
