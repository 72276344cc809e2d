"""Per-layer-type curvature math: which modules are supported and how each yields its statistics."""

from __future__ import annotations

from torch import nn

from .attention import AttentionProjectionCurvature, attention_layers
from .base import CurvatureLayer, KroneckerLayer, LayerCurvature, StatSpec
from .batchnorm import BatchNormCurvature
from .conv import Conv2dCurvature
from .coverage import Coverage, ParameterCoverage, classify_model
from .embedding import EmbeddingCurvature
from .grouped_conv import GroupedConvCurvature
from .linear import LinearCurvature
from .norm import GroupNormCurvature, LayerNormCurvature, UnitwiseNormCurvature

__all__ = [
    "CurvatureLayer",
    "KroneckerLayer",
    "StatSpec",
    "LayerCurvature",
    "LinearCurvature",
    "Conv2dCurvature",
    "GroupedConvCurvature",
    "BatchNormCurvature",
    "UnitwiseNormCurvature",
    "LayerNormCurvature",
    "GroupNormCurvature",
    "AttentionProjectionCurvature",
    "EmbeddingCurvature",
    "Coverage",
    "ParameterCoverage",
    "curvature_layer_for",
    "find_curvature_layers",
    "classify",
]

_NO_AFFINE = "normalisation without affine parameters (nothing to precondition)"


def _layer_or_reason(name: str, module: nn.Module) -> CurvatureLayer | list[CurvatureLayer] | str | None:
    """The curvature handler(s) for a module; a reason string for an unsupported configuration of
    a supported type; None for a module type without curvature."""
    if isinstance(module, nn.MultiheadAttention):
        return list(attention_layers(name, module))
    if isinstance(module, nn.Linear):
        return LinearCurvature(name, module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return (
                f"{type(module).__name__} padding={module.padding!r}, padding_mode={module.padding_mode!r}: "
                "Kronecker curvature supports numeric zero padding"
            )
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            return Conv2dCurvature(name, module)
        return GroupedConvCurvature(name, module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(
        module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    ):
        return BatchNormCurvature(name, module) if module.affine else _NO_AFFINE
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "Embedding(sparse=True): sparse gradients have no curvature here"
        return EmbeddingCurvature(name, module)
    if isinstance(module, nn.LayerNorm):
        return LayerNormCurvature(name, module) if module.weight is not None else _NO_AFFINE
    if isinstance(module, nn.GroupNorm):
        return GroupNormCurvature(name, module) if module.affine else _NO_AFFINE
    return None


def curvature_layer_for(name: str, module: nn.Module) -> CurvatureLayer | None:
    """The curvature handler for a module, or None when its parameters (if any) stay first-order
    or need several handlers (nn.MultiheadAttention: see :func:`classify`).

    Args:
        name: the module's name in the model.
        module: the module.
    """
    result = _layer_or_reason(name, module)
    if isinstance(result, list):
        return result[0] if len(result) == 1 else None
    return result if isinstance(result, CurvatureLayer) else None


def find_curvature_layers(model: nn.Module) -> list[CurvatureLayer]:
    """Supported layers in ``named_modules()`` order, skipping those with no trainable weight; an
    unsupported configuration warns once, naming its parameters (see :func:`classify`).

    Args:
        model: the model (not wrapped).
    """
    return classify_model(model, _layer_or_reason)[0]


def classify(model: nn.Module) -> tuple[list[CurvatureLayer], Coverage]:
    """The curvature layers of ``model`` (as :func:`find_curvature_layers`) and the coverage of
    every parameter: which curvature it gets, or why it trains first-order.

    Args:
        model: the model (not wrapped).
    """
    return classify_model(model, _layer_or_reason)
