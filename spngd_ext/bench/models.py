"""The models the benchmarks and the self-test step: the main job's small BatchNorm CNN and a
ResNet-50 built from plain torch modules (no torchvision needed on a GPU machine without network).

The training application (:mod:`spngd_ext.train.models`) uses these same definitions.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["small_bn_cnn", "resnet50", "Bottleneck", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_bn_relu_pool(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def small_bn_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Three 3x3 conv+BN+ReLU+2x2-max-pool stages (16, 32, 64 channels), then one linear layer.

    29,178 parameters for 10 classes on 28x28 inputs (28 -> 14 -> 7 -> 3; the 64x3x3 features go
    straight to the classifier): the main job's model. Every conv has stride 1 and "same" padding,
    the case the shifted-correlation A factor (:mod:`spngd_ext.ops.conv_gram`) computes without im2col.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
    """
    return nn.Sequential(
        *_conv_bn_relu_pool(in_channels, 16),
        *_conv_bn_relu_pool(16, 32),
        *_conv_bn_relu_pool(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, num_classes),
    )


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand, shortcut.

    Args:
        c_in: input channels.
        planes: width of the 3x3 conv; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 conv and of the projection.
        project: whether the shortcut is a 1x1 conv + BN (the first block of a stage).
    """

    def __init__(self, c_in: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        c_out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if project:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Sequential:
    """ImageNet ResNet-50 v1.5 (torchvision's layer shapes: 25,557,032 parameters for 1000 classes).

    Its K-FAC factors span sizes 147 ... 4609 and its BatchNorm widths 64 ... 2048.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images.
    """
    blocks: list[nn.Module] = []
    c_in = 64
    for stage, (planes, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(n):
            blocks.append(Bottleneck(c_in, planes, 2 if (b == 0 and stage > 0) else 1, project=b == 0))
            c_in = planes * 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2048, num_classes),
    )
