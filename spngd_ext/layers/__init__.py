"""Per-layer-type curvature math: which modules are supported and how each yields its statistics."""

from __future__ import annotations

import warnings

from torch import nn

from .base import CurvatureLayer, KroneckerLayer, LayerCurvature, StatSpec
from .batchnorm import BatchNormCurvature
from .conv import Conv2dCurvature
from .linear import LinearCurvature

__all__ = [
    "CurvatureLayer",
    "KroneckerLayer",
    "StatSpec",
    "LayerCurvature",
    "LinearCurvature",
    "Conv2dCurvature",
    "BatchNormCurvature",
    "curvature_layer_for",
    "find_curvature_layers",
]


def curvature_layer_for(name: str, module: nn.Module) -> CurvatureLayer | None:
    """The curvature handler for a module, or None when it stays first-order.

    Grouped convolutions and non-affine BatchNorm are not supported: one warning, then plain
    gradient for their parameters.
    """
    if isinstance(module, nn.Linear):
        return LinearCurvature(name, module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            warnings.warn(
                f"SPNGD: {name} (Conv2d, groups={module.groups}, padding={module.padding!r}, "
                f"padding_mode={module.padding_mode!r}) is trained with the plain gradient; "
                "Kronecker curvature supports groups=1 with numeric zero padding",
                stacklevel=3,
            )
            return None
        return Conv2dCurvature(name, module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, nn.SyncBatchNorm):
        if not module.affine:
            return None
        return BatchNormCurvature(name, module)
    if isinstance(module, nn.SyncBatchNorm) and module.affine:
        return BatchNormCurvature(name, module)
    return None


def find_curvature_layers(model: nn.Module) -> list[CurvatureLayer]:
    """Supported layers in ``named_modules()`` order, skipping those with no trainable weight."""
    layers = []
    for name, module in model.named_modules():
        layer = curvature_layer_for(name or "<root>", module)
        if layer is not None and module.weight is not None:
            layers.append(layer)
    return layers
