"""One verb for every method: ``camlens.explain``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .capture import LayersSpec
from .errors import CamlensError
from .explanation import Explanation
from .methods import get_method
from .methods.base import CAMMethod, ChannelsSpec, Progress
from .methods.meta import smoothed
from .targets import TargetSpec


def explain(
    model: nn.Module,
    images: Tensor,
    method: str = "gradcam",
    target_layer: LayersSpec | None = None,
    targets: TargetSpec = None,
    *,
    channels: ChannelsSpec = None,
    progress: Progress | None = None,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
    forward_args: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    images_as: str | None = None,
    **options: Any,
) -> Explanation:
    """Explain ``images`` with ``method`` for ``targets``; ``options`` go to the method.

    Equivalent to ``get_method(method)(model, target_layer, **options)(images, targets, ...)``;
    build the method object yourself to reuse it across calls. ``aug_smooth`` and
    ``eigen_smooth`` wrap it in :class:`~camlens.methods.meta.AugmentSmooth` (its default
    augmentations) and :class:`~camlens.methods.meta.EigenSmooth`. ``forward_args``,
    ``forward_kwargs`` and ``images_as``: what the model takes besides the images
    (:meth:`CAMMethod.__call__ <camlens.methods.base.CAMMethod.__call__>`).
    """
    cls = get_method(method)
    accepted = [
        name
        for init in (cls.__init__, CAMMethod.__init__)
        for name, parameter in inspect.signature(init).parameters.items()
        if name not in ("self", "model", "target_layer") and parameter.kind != parameter.VAR_KEYWORD
    ]
    accepted = list(dict.fromkeys(accepted))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise CamlensError(
            f"unknown option(s) {', '.join(unknown)} for method {cls.name!r} (its options: {valid})"
        )
    method_object = smoothed(cls(model, target_layer=target_layer, **options), aug_smooth, eigen_smooth)
    return method_object(images, targets, channels=channels, progress=progress, forward_args=forward_args,
                         forward_kwargs=forward_kwargs, images_as=images_as)
