"""Small models for 28x28 single-channel images (Fashion-MNIST and friends).

Each one uses the layer types SP-NGD preconditions (Conv2d, Linear, BatchNorm), so a training
run exercises every curvature path: K-FAC for Conv2d and Linear, unit-wise Fisher for BatchNorm.
``resnet_bn`` adds what trips up hook-based curvature code: in-place ReLU and residual additions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["small_bn_cnn", "mlp", "resnet_bn", "resnet50", "MODEL_BUILDERS", "build_model", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
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

    29,178 parameters for 10 classes: the main job's model (28x28 -> 14 -> 7 -> 3, and the
    64x3x3 features go straight to the classifier). An earlier version downsampled with stride-2
    convolutions and global average pooling; at batch 4096 and 150 steps it held momentum SGD to
    75% test accuracy (this one: 86%), far from the issue's SGD reference, so it was replaced.
    Every conv here has stride 1 and "same" padding, the case the shifted-correlation A factor
    (:mod:`spngd_ext.conv_gram`) computes without im2col.
    """
    return nn.Sequential(
        *_conv_bn_relu_pool(in_channels, 16),
        *_conv_bn_relu_pool(16, 32),
        *_conv_bn_relu_pool(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, num_classes),
    )


def mlp(
    num_classes: int = 10, in_features: int = 28 * 28, hidden: tuple[int, ...] = (256, 128)
) -> nn.Sequential:
    """Flatten, then Linear+BatchNorm1d+ReLU per hidden width, then a linear classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU.

    The ReLUs are in place and the addition is ``out += shortcut``-style, on purpose: an
    optimizer that captures layer inputs/outputs through hooks must cope with both.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class ResNetBN(nn.Module):
    """Stem conv, one residual block per stage (16, 32, 64 channels), pool, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            blocks.append(ResidualBlock(c_in, width, stride=1 if i == 0 else 2))
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_bn(num_classes: int = 10, in_channels: int = 1) -> ResNetBN:
    return ResNetBN(num_classes=num_classes, in_channels=in_channels)


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand, shortcut."""

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

    For the GPU benchmarks (the issue's factor sizes 147 ... 4609 and BN widths 64 ... 2048), so
    they need no torchvision on a machine without network; not one of the 28x28 models below.
    """
    blocks: list[nn.Module] = []
    c_in = 64
    for stage, (planes, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(n):
            blocks.append(Bottleneck(c_in, planes, 2 if (b == 0 and stage > 0) else 1, project=b == 0))
            c_in = planes * 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes),
    )


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": small_bn_cnn,
    "mlp": mlp,
    "resnet": resnet_bn,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh model by registry name (``cnn``, ``mlp``, ``resnet``)."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_BUILDERS)}") from None
    return builder(num_classes=num_classes)


if __name__ == "__main__":
    for model_name in MODEL_BUILDERS:
        print(f"{model_name}: {count_parameters(build_model(model_name)):,} parameters")
