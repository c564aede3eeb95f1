"""CAM (Zhou et al. 2016): the classifier's own weights, for features -> GAP -> linear heads."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..capture import LayersSpec, resolve_layer
from ..errors import CamlensError
from .base import CAMMethod, Context, Cost


def cam_weights(fc_weight: Tensor, classes: Tensor) -> Tensor:
    r"""CAM weights :math:`w^c_k = W_{fc}[c, k]`, the classifier weight from channel k to class c.

    ``fc_weight`` (classes, K) and ``classes`` (N, T) give (N, T, K). The bias is ignored.
    """
    return fc_weight[classes]


def linear_like(module: nn.Module) -> bool:
    """Whether ``module`` can be CAM's classifier: an ``nn.Linear``, or a module holding a linear
    layer's tensors without its type (a ``torch.export`` model's layers, unflattened, are
    ``InterpreterModule`` objects): a 2-D ``weight`` (out, in), no or a 1-D ``bias`` (out,), no
    submodules. Not an ``nn.Embedding``. Either way :meth:`CAM._check_head` checks that the model's
    logits are ``fc(GAP(A))``."""
    if isinstance(module, nn.Linear):
        return True
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        not isinstance(module, nn.Embedding)
        and isinstance(weight, Tensor) and weight.dim() == 2 and weight.is_floating_point()
        and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape[:1]))
        and next(module.children(), None) is None
    )


class CAM(CAMMethod):
    """Class Activation Mapping: needs ``features -> global average pooling -> linear``.

    Args:
        fc: the linear classifier (module or name). None finds the last ``nn.Linear`` (or
            linear layer of an exported model, :func:`linear_like`) whose inputs match the target
            layer's channels. Either way camlens checks that the
            model's logits are ``fc(GAP(A))`` and raises a clear error if they are not.
    """

    name = "cam"
    display_name = "CAM"
    summary = "CAM (Zhou et al. 2016): classifier weights of a GAP + linear head; one forward"

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayersSpec | None = None,
        fc: str | nn.Module | None = None,
        **engine: Any,
    ) -> None:
        super().__init__(model, target_layer, **engine)
        self.fc = None if fc is None else resolve_layer(model, fc)[1]
        if self.fc is not None and not linear_like(self.fc):
            raise CamlensError(f"fc must be an nn.Linear (or a linear layer of an exported model), not "
                               f"{type(self.fc).__name__}")

    def cost(self, channels: int, height: int, width: int) -> Cost:
        return Cost(1, after=1, note="after the layer: the check that the logits are fc(GAP(layer))")

    def options(self) -> dict[str, Any]:
        return {"fc": None if self.fc is None else resolve_layer(self.model, self.fc)[0]}

    def weigh(self, context: Context) -> dict[str, Tensor]:
        classes = context.targets.classes
        if classes is None:
            raise CamlensError("CAM explains classes only; use Grad-CAM family methods for units and target functions")
        weights = {}
        for name, activation in context.full_activations.items():
            fc = self.fc or self._find_fc(activation.shape[1], name)
            self._check_head(fc, activation, context.logits, name, self.name_of(fc))
            weight = cam_weights(fc.weight.detach(), classes)
            weights[name] = context.select(name, weight, 2)
        return weights

    def name_of(self, module: nn.Module) -> str:
        """``module``'s name in the model ("" where it is not one of its modules)."""
        return next((name for name, each in self.model.named_modules() if each is module), "")

    def _find_fc(self, channels: int, layer: str) -> nn.Module:
        linears = [m for m in self.model.modules() if linear_like(m) and m.weight.shape[1] == channels]
        if not linears:
            raise CamlensError(
                f"CAM needs a head 'features -> global average pooling -> linear', but the model "
                f"has no nn.Linear with {channels} inputs (the channels of layer {layer!r}); "
                "name the classifier (fc=), or use Grad-CAM, which needs no particular head"
            )
        return linears[-1]

    @staticmethod
    def _check_head(fc: nn.Module, activation: Tensor, logits: Tensor, layer: str, fc_name: str = "") -> None:
        if fc.weight.shape[1] != activation.shape[1]:
            raise CamlensError(
                f"the classifier takes {fc.weight.shape[1]} inputs but layer {layer!r} has "
                f"{activation.shape[1]} channels: CAM needs the layer that feeds the global pooling"
            )
        predicted = fc(activation.flatten(2).mean(dim=2))
        tolerance = 1e-4 * max(1.0, logits.abs().max().item())
        if predicted.shape != logits.shape or (predicted - logits).abs().max().item() > tolerance:
            raise CamlensError(
                f"the model's output is not fc(global average pool of layer {layer!r})"
                + (f", fc being {fc_name!r}" if fc_name else "") + ": CAM needs a "
                "head 'features -> global average pooling -> linear' with that layer as the "
                "features, and this model does something else between the layer and its linear classifier "
                "(a norm, an activation, another layer); explain the layer the pooling reads, where there is "
                "one, or use Grad-CAM, which needs no particular head"
            )
