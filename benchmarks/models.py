"""Models for the benchmarks, written from scratch (no torchvision, no downloaded weights).

- :func:`resnet18`: the standard ResNet-18 layout (He et al. 2016) with random weights from a
  fixed seed. ``layer4`` is a named module whose output is the final post-ReLU feature map,
  512 x 7 x 7 for a 224 x 224 input, which feeds ``avgpool -> flatten -> fc``.
- :func:`channel_net`: a cheap convolutional net whose target layer (``target``) has a chosen
  number of channels ``K``, so that Score-CAM's channel count (its number of forwards) can be
  varied while each forward stays cheap. Five stride-2 convolutions take a 224 x 224 input to
  7 x 7; ``target`` is a 1x1 convolution to ``K`` channels followed by a ReLU; then global
  average pooling and a linear classifier.

Both are returned in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18: conv7x7/2, maxpool, four stages of two BasicBlocks, GAP, flatten, linear."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride),
            BasicBlock(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def _init_(model: nn.Module) -> None:
    """He initialisation for convolutions; batch norm running statistics perturbed slightly.

    Fresh batch norm layers are the identity in eval mode; giving them non-trivial statistics
    and affine parameters makes the eval forward look like a trained network's (same cost,
    realistic spread of activations).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def resnet18(num_classes: int = 1000, seed: int = 0) -> ResNet18:
    """A ResNet-18 with random weights from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    _init_(model)
    return model.eval()


def channel_net(channels: int, num_classes: int = 10, width: int = 32, seed: int = 0) -> nn.Module:
    """A cheap CNN whose target layer ``target`` outputs ``channels`` maps of 7 x 7 (224 input).

    Layout: five 3x3 stride-2 convolutions (3 -> width/2 -> width -> width -> width -> width,
    each with a ReLU), ``target`` = 1x1 convolution to ``channels`` + ReLU, then
    AdaptiveAvgPool2d(1), Flatten, Linear(channels, num_classes).
    """
    torch.manual_seed(seed)
    half = max(width // 2, 1)
    widths = [3, half, width, width, width, width]
    features = []
    for cin, cout in zip(widths[:-1], widths[1:]):
        features += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*features))
    model.add_module("target", nn.Sequential(nn.Conv2d(width, channels, 1), nn.ReLU()))
    model.add_module("avgpool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(channels, num_classes))
    _init_(model)
    return model.eval()


__all__ = ["BasicBlock", "ResNet18", "channel_net", "resnet18"]
