"""GGAM on a backbone: a classifier that camlens can explain as it explains any CNN."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..capture import describe
from ..errors import CamlensError
from ..models import EfficientNetLite0, Preprocess, efficientnet_lite0
from .module import GGAM, GGAMOutput


class GGAMNet(nn.Module):
    """A backbone and a :class:`GGAM` head on its feature map.

    ``backbone`` is any module whose forward returns the feature map ``A`` (N, ``channels``,
    H, W) that GGAM attends to. For a network whose forward returns something else (class
    scores, a tuple), wrap the layers up to that map in a module of their own, as
    :class:`EfficientNetLite0Features` does for the embedded model.

    ``forward`` returns the logits only, so every camlens method and command works on the
    model unchanged; its default target layer is ``backbone``, the map GGAM attends to (the
    head computes no 4-D map of its own in a submodule). :meth:`attend` returns the whole
    :class:`GGAMOutput`, for :func:`camlens.ggam.ggam_training_loss`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        channels: int,
        num_classes: int,
        reduction: int = 16,
        channel_attention: bool = True,
        spatial_attention: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise CamlensError(f"the backbone must be an nn.Module returning a feature map, got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = GGAM(channels, num_classes, reduction, channel_attention, spatial_attention)
        # Kept so that a saved run can be rebuilt with the same head.
        self.num_classes = num_classes
        self.reduction = reduction
        self.channel_attention = self.head.channel_attention
        self.spatial_attention = self.head.spatial_attention

    def attend(self, x: Tensor) -> GGAMOutput:
        features = self.backbone(x)
        if not isinstance(features, Tensor):
            raise CamlensError(
                f"the backbone returned {describe(features)}, not a feature map (N, C, H, W): "
                "give GGAMNet a module that returns the feature map GGAM should attend to"
            )
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(x).logits


class EfficientNetLite0Features(EfficientNetLite0):
    """EfficientNet-Lite0 up to its final feature map ``features`` (1280 x 7 x 7 at 224 x 224):
    the pooling and the ImageNet classifier are removed."""

    def __init__(self) -> None:
        super().__init__()
        del self.pool, self.dropout, self._fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return self.features(self._bn1(self._conv_head(x)))


def ggam_efficientnet_lite0(
    num_classes: int,
    pretrained: bool = True,
    reduction: int = 16,
    channel_attention: bool = True,
    spatial_attention: bool = True,
    class_names: Sequence[str] | None = None,
    preprocess: Preprocess | None = None,
) -> GGAMNet:
    """GGAM on the final 1280-channel feature map of the embedded EfficientNet-Lite0.

    ``pretrained``: the backbone starts from the embedded ImageNet weights (no download); the
    head is always new. The model carries ``preprocess`` (the backbone's unless given) and
    ``class_names`` (``class 0``, ... unless given), as camlens's commands expect.
    """
    # The embedded model's own loader (weights, preprocessing), its classifier left out.
    lite = efficientnet_lite0(pretrained)
    backbone = EfficientNetLite0Features()
    backbone.load_state_dict({k: v for k, v in lite.state_dict().items() if not k.startswith("_fc.")})
    model = GGAMNet(backbone, 1280, num_classes, reduction=reduction,
                    channel_attention=channel_attention, spatial_attention=spatial_attention)
    if class_names is not None:
        class_names = list(class_names)
        if len(class_names) != num_classes or not all(isinstance(n, str) for n in class_names):
            raise CamlensError(f"give {num_classes} class names (strings), one per class; got {len(class_names)}")
    model.class_names = class_names
    model.preprocess = preprocess or lite.preprocess
    return model
