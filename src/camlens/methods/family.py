"""The rest of the gradient family, and Eigen-CAM.

XGrad-CAM weighs channels; HiResCAM, element-wise Grad-CAM and LayerCAM weigh each activation
(weights (N, T, K, h, w)); Eigen-Grad-CAM and Eigen-CAM project on a first principal component
(their :meth:`~camlens.methods.base.CAMMethod.raw_map` centres the weighted sum).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..capture import LayersSpec, resolve_layer
from ..combine import at_positions, channel_sum, positions
from ..errors import CamlensError
from .base import CAMMethod, Context


def xgradcam_weights(activation: Tensor, grad: Tensor) -> Tensor:
    r"""XGrad-CAM weights (Fu et al. 2020):
    :math:`w^c_k = \sum_{ij} \frac{A^k_{ij}}{\sum_{ab} A^k_{ab}} \frac{\partial y^c}{\partial A^k_{ij}}`.

    :math:`w^c_k = 0` where :math:`\sum_{ab} A^k_{ab} = 0`: after a ReLU that is a channel that
    is zero everywhere, which adds nothing to the map whatever its weight. (pytorch-grad-cam and
    TorchCAM add 1e-7 and 1e-8 to the denominator instead, which changes every weight slightly,
    and weighs a channel whose values cancel out by 1e7 or 1e8 times its gradient sum.)
    ``activation`` (N, K, h, w), ``grad`` (N, T, K, h, w); returns (N, T, K).
    """
    total = activation.sum(dim=positions(activation, 2))[:, None]
    weighted = (activation[:, None] * grad).sum(dim=positions(grad, 3))
    defined = total != 0
    return torch.where(defined, weighted / torch.where(defined, total, 1), 0)


def hirescam_weights(grad: Tensor) -> Tensor:
    r"""HiResCAM weights (Draelos & Carin 2020): the gradient itself, per activation,
    :math:`w^c_{kij} = \partial y^c / \partial A^k_{ij}`, so that the map
    :math:`\mathrm{ReLU}(\sum_k w^c_k \odot A^k)` is the gradient times the activation summed
    over channels. ``grad`` (N, T, K, h, w) is returned as is."""
    return grad


def gradcam_elementwise_weights(activation: Tensor, grad: Tensor) -> Tensor:
    r"""Element-wise Grad-CAM weights (pytorch-grad-cam's GradCAMElementWise): its map is
    :math:`\mathrm{ReLU}(\sum_k \mathrm{ReLU}(g^k \odot A^k))`, the ReLU inside the sum, which is
    :math:`\mathrm{ReLU}(\sum_k w_k \odot A^k)` with
    :math:`w_{kij} = g^k_{ij}\,[g^k_{ij} A^k_{ij} > 0]`. Where the activation is non-negative
    (after a ReLU) that is LayerCAM's map, :math:`\mathrm{ReLU}(g A) = \mathrm{ReLU}(g) A`;
    the two differ on layers with negative values.
    ``activation`` (N, K, h, w), ``grad`` (N, T, K, h, w); returns (N, T, K, h, w)."""
    return torch.where(grad * activation[:, None] > 0, grad, 0)


def layercam_weights(grad: Tensor) -> Tensor:
    r"""LayerCAM weights (Jiang et al. 2021): :math:`w^c_{kij} = \mathrm{ReLU}(\partial y^c /
    \partial A^k_{ij})`, per activation; the map is :math:`\mathrm{ReLU}(\sum_k w^c_k \odot A^k)`.
    ``grad`` (N, T, K, h, w); returns (N, T, K, h, w)."""
    return torch.relu(grad)


def layercam_scale(raw: Tensor, gamma: float) -> Tensor:
    r"""LayerCAM's scaling of a shallow layer's map:
    :math:`\hat M = \tanh(\gamma M / \max M)` per map (:math:`\gamma = 2` in the paper), which
    lifts the small values of shallow layers before maps of several layers are fused. ``raw`` (N, T, h, w), non-negative; an
    all-zero map stays zero."""
    peak = raw.amax(dim=positions(raw, 2), keepdim=True)
    return torch.tanh(gamma * raw / torch.where(peak > 0, peak, 1))


def principal_axis(features: Tensor, spatial: int = 2) -> Tensor:
    r"""The first principal axis :math:`v` of each (K, h, w) slice of ``features`` (..., K, h, w)
    (``spatial``: the dimensions of positions, (h, w) here; one for a signal, three for a volume):
    positions are the samples and channels the features, centred over positions,
    :math:`X = F - \bar F` (hw x K), and :math:`v` is the first right singular vector of
    :math:`X`; the projection on it is :math:`X v`, of shape h x w (pytorch-grad-cam's
    ``get_2d_projection``).

    The sign of a singular vector is arbitrary. :math:`v` is signed so that the largest
    magnitude of :math:`X v` is a positive value, i.e. :math:`v` is flipped where
    :math:`|\min X v| > \max X v` (the sign correction of Seg-Eigen-CAM, Chung & Ying 2025,
    Eq. 13, which pytorch-grad-cam offers as ``get_2d_projection_with_sign_correction``): the
    positions the component sets most apart then show in the map after its ReLU. In an exact
    tie the sign the SVD gives stays. Returns (..., K), unit vectors (any unit vector where
    :math:`X = 0`).
    """
    samples = features.flatten(-spatial).transpose(-2, -1)
    centred = samples - samples.mean(dim=-2, keepdim=True)
    # torch.linalg.svd supports neither MPS tensors nor half precision: the CPU and float32 there.
    device, dtype = centred.device, centred.dtype
    on = centred.to(
        "cpu" if device.type == "mps" else device,
        torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype,
    )
    axis = torch.linalg.svd(on, full_matrices=False).Vh[..., 0, :].to(device, dtype)
    projection = (centred @ axis[..., None]).squeeze(-1)
    flip = -projection.amin(dim=-1) > projection.amax(dim=-1)
    return torch.where(flip[..., None], -axis, axis)


def projection_map(weight: Tensor, activation: Tensor) -> Tensor:
    r"""The raw map of the Eigen methods, :math:`\mathrm{ReLU}(S - \bar S)` with
    :math:`S = \sum_k w_k A^k` (or :math:`\sum_k w_k \odot A^k`) and :math:`\bar S` its mean
    over positions: with weights made from :func:`principal_axis`, the centred projection
    :math:`\mathrm{ReLU}(X v)`. The ReLU keeps the positions on the positive side of the
    component, as pytorch-grad-cam does. Shapes as :func:`~camlens.combine.channel_sum`."""
    summed = channel_sum(weight, activation)
    return torch.relu(summed - summed.mean(dim=positions(summed, 2), keepdim=True))


class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al. 2020): channel weights are the gradients averaged with the
    activation's own spatial distribution as weights (:func:`xgradcam_weights`)."""

    name = "xgradcam"
    display_name = "XGrad-CAM"
    summary = (
        "XGrad-CAM (Fu et al. 2020): gradients averaged over each channel's normalised "
        "activation; one forward + backward"
    )
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        return {
            name: xgradcam_weights(context.activations[name], grad)
            for name, grad in context.gradients.items()
        }


class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020): the gradient weighs each activation
    (:func:`hirescam_weights`). It equals Grad-CAM where the gradient is spatially constant
    (a global-average-pool + linear head over the target layer)."""

    name = "hirescam"
    display_name = "HiResCAM"
    summary = "HiResCAM (Draelos & Carin 2020): gradient times activation; one forward + backward"
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        return {name: hirescam_weights(grad) for name, grad in context.gradients.items()}


class GradCAMElementWise(CAMMethod):
    """Element-wise Grad-CAM (pytorch-grad-cam): the positive part of gradient times activation,
    summed over channels (:func:`gradcam_elementwise_weights`)."""

    name = "gradcam-elementwise"
    display_name = "Element-wise Grad-CAM"
    summary = (
        "Element-wise Grad-CAM (pytorch-grad-cam): positive part of gradient times activation; "
        "one forward + backward"
    )
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        return {
            name: gradcam_elementwise_weights(context.activations[name], grad)
            for name, grad in context.gradients.items()
        }


ScaleSpec = Union[None, float, Mapping[Union[str, nn.Module], float]]


class LayerCAM(CAMMethod):
    r"""LayerCAM (Jiang et al. 2021): the positive gradient weighs each activation
    (:func:`layercam_weights`).

    The paper scales the maps of shallow layers, :func:`layercam_scale` with
    :math:`\gamma = 2`, before fusing them with deeper ones, and not the map of the last layer:
    so by default nothing is scaled, which is right for the default target layer (the last).

    Args:
        scale: :math:`\gamma`, applied to the raw map of every target layer (a positive
            number), or ``{layer: gamma}`` for the named target layers only (the paper's use:
            the shallow layers of a fusion, e.g. ``{"features.4": 2.0}``); None: no scaling.
            The scaled map is the Explanation's raw map.
        optimize, compile: how the model is run (:class:`~camlens.methods.base.CAMMethod`).
    """

    name = "layercam"
    display_name = "LayerCAM"
    summary = (
        "LayerCAM (Jiang et al. 2021): positive gradient times activation, optional tanh "
        "scaling of shallow layers; one forward + backward"
    )
    needs_gradients = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        scale: ScaleSpec = None,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, **engine)
        self.scale: float | dict[str, float] | None
        if scale is None:
            self.scale = None
        elif isinstance(scale, Mapping):
            self.scale = {resolve_layer(model, layer)[0]: self._gamma(gamma) for layer, gamma in scale.items()}
        else:
            self.scale = self._gamma(scale)

    @staticmethod
    def _gamma(value: object) -> float:
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise CamlensError(
                f"LayerCAM's scale is a positive number (the paper's gamma, 2), a dict "
                f"{{layer: gamma}}, or None for no scaling; got {value!r}"
            )
        return float(value)

    def options(self) -> dict[str, Any]:
        return {"scale": dict(self.scale) if isinstance(self.scale, dict) else self.scale}

    def weigh(self, context: Context) -> dict[str, Tensor]:
        if isinstance(self.scale, dict):
            unknown = [name for name in self.scale if name not in context.layers]
            if unknown:
                raise CamlensError(
                    f"LayerCAM's scale names {', '.join(map(repr, unknown))}, which is not a "
                    f"target layer (target layers: {', '.join(context.layers)})"
                )
        return {name: layercam_weights(grad) for name, grad in context.gradients.items()}

    def raw_map(self, name: str, weight: Tensor, activation: Tensor) -> Tensor:
        return self.finish_map(name, super().raw_map(name, weight, activation))

    def finish_map(self, name: str, raw: Tensor) -> Tensor:
        """Layer ``name``'s raw map (N, T, h, w), scaled where ``scale`` says: the step after the
        map is formed, which :class:`~camlens.methods.meta.EigenSmooth` applies to its map too."""
        gamma = self.scale.get(name) if isinstance(self.scale, dict) else self.scale
        return raw if gamma is None else layercam_scale(raw, gamma)


class EigenGradCAM(CAMMethod):
    r"""Eigen-Grad-CAM (pytorch-grad-cam): Eigen-CAM's projection of gradient times activation,
    :math:`g^k \odot A^k`, on its first principal component (:func:`principal_axis`), per image
    and target.

    Its weights, per activation, are :math:`w_{kij} = v_k\, g^k_{ij}`, with :math:`v` that
    component, so that :math:`\sum_k w_k \odot A^k` is the uncentred projection and the raw map
    (:func:`projection_map`) the centred one, after a ReLU.
    """

    name = "eigengradcam"
    display_name = "Eigen-Grad-CAM"
    summary = (
        "Eigen-Grad-CAM (pytorch-grad-cam): first principal component of gradient times "
        "activation; one forward + backward"
    )
    needs_gradients = True

    def weigh(self, context: Context) -> dict[str, Tensor]:
        weights = {}
        for name, grad in context.gradients.items():
            spatial = grad.dim() - 3
            axis = principal_axis(grad * context.activations[name][:, None], spatial)
            weights[name] = at_positions(axis, spatial) * grad
        return weights

    def raw_map(self, name: str, weight: Tensor, activation: Tensor) -> Tensor:
        return projection_map(weight, activation)


class EigenCAM(CAMMethod):
    r"""Eigen-CAM (Muhammad & Yeasin 2020): the target layer's activation projected on its first
    principal component (:func:`principal_axis`); gradient-free and class-agnostic (the same
    map for every target).

    Its channel weights are that component :math:`v`, so that the raw map
    (:func:`projection_map`) is :math:`\mathrm{ReLU}(\sum_k v_k (A^k - \bar{A^k}))`, each
    channel centred over positions (as a principal component is defined, and as
    pytorch-grad-cam does).
    """

    name = "eigencam"
    display_name = "Eigen-CAM"
    summary = (
        "Eigen-CAM (Muhammad & Yeasin 2020): gradient-free, first principal component of the "
        "activation, the same map for every target; one forward"
    )

    def weigh(self, context: Context) -> dict[str, Tensor]:
        count = context.targets.count
        return {
            name: principal_axis(activation, activation.dim() - 2)[:, None].repeat(1, count, 1)
            for name, activation in context.activations.items()
        }

    def raw_map(self, name: str, weight: Tensor, activation: Tensor) -> Tensor:
        return projection_map(weight, activation)
