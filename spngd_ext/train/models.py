"""Small models for 28x28 single-channel images (Fashion-MNIST and friends).

``cnn``, ``mlp`` and ``resnet`` use Conv2d, Linear and BatchNorm (K-FAC for Conv2d and Linear,
unit-wise Fisher for BatchNorm); ``resnet_bn`` adds what trips up hook-based curvature code: in-place
ReLU and residual additions. ``vit`` (a small vision transformer on 7×7 patches) exercises the
attention projections and LayerNorm, ``dwcnn`` (depthwise-separable convolutions with GroupNorm)
the grouped convolutions and GroupNorm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# The main job's CNN and ResNet-50 live in the library, where python -m spngd_ext.bench (which
# must run without this application) needs them; re-exported here.
from ..bench.models import Bottleneck, count_parameters, resnet50, small_bn_cnn

__all__ = [
    "small_bn_cnn",
    "mlp",
    "resnet_bn",
    "resnet50",
    "vit",
    "dwcnn",
    "Bottleneck",
    "MODEL_BUILDERS",
    "build_model",
    "count_parameters",
]


def mlp(num_classes: int = 10, in_features: int = 28 * 28, hidden: tuple[int, ...] = (256, 128)) -> nn.Sequential:
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
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

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


class PatchViT(nn.Module):
    """A vision transformer for small single-channel images: non-overlapping patches embedded by a
    strided Conv2d, a learned positional embedding, pre-norm ``nn.TransformerEncoderLayer`` blocks
    (``nn.MultiheadAttention`` + LayerNorm + a GELU MLP, no dropout), a final LayerNorm, the mean
    over tokens and a linear head. Every weight but the positional embedding has curvature.

    Args:
        num_classes: outputs of the head.
        in_channels: input channels.
        image_size: input height and width.
        patch: patch side (must divide ``image_size``).
        width: token width (embedding dimension).
        depth: encoder layers.
        heads: attention heads (must divide ``width``).
        mlp_ratio: the MLP's hidden width over ``width``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch: int = 7,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"PatchViT: patch={patch} must divide image_size={image_size}")
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, mlp_ratio * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, patches, width)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


def vit(num_classes: int = 10, in_channels: int = 1) -> PatchViT:
    """PatchViT on 28×28 inputs: 16 patches of 7×7, width 64, 2 layers, 4 heads (≈ 70k parameters)."""
    return PatchViT(num_classes=num_classes, in_channels=in_channels)


def dwcnn(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """A stem conv, then per width a depthwise-separable block (3×3 depthwise conv, GroupNorm, ReLU,
    1×1 conv, GroupNorm, ReLU; stride 2 after the first), pool and a linear head."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.GroupNorm(8, widths[0]),
        nn.ReLU(),
    ]
    c_in = widths[0]
    for i, width in enumerate(widths):
        layers += [
            nn.Conv2d(c_in, c_in, 3, stride=1 if i == 0 else 2, padding=1, groups=c_in, bias=False),
            nn.GroupNorm(8, c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.GroupNorm(8, width),
            nn.ReLU(),
        ]
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": small_bn_cnn,
    "mlp": mlp,
    "resnet": resnet_bn,
    "vit": vit,
    "dwcnn": dwcnn,
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh model by registry name (``cnn``, ``mlp``, ``resnet``, ``vit``, ``dwcnn``)."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_BUILDERS)}") from None
    return builder(num_classes=num_classes)


if __name__ == "__main__":
    for model_name in MODEL_BUILDERS:
        print(f"{model_name}: {count_parameters(build_model(model_name)):,} parameters")
