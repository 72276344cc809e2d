"""Unit-wise (per affine unit 2×2) Fisher of LayerNorm and GroupNorm, as SP-NGD does for BatchNorm.

A unit is one (γ, β) pair. Per sample r and unit c, u = [Σ_p g·x̂, Σ_p g] over the positions p
of that sample that share the unit's affine parameters, and F_c = (1/R) Σ_r u uᵀ, stored as
(C, 3) = (γγ, γβ, ββ) like BatchNorm; the update solves (F_c + λI) [uγ, uβ] = [∇γ_c, ∇β_c] per
unit (docs/design.md, "LayerNorm and GroupNorm"). GroupNorm (and a channels-first LayerNorm such
as ConvNeXt's LayerNorm2d): a sample is an example (the input's first dimension), p its spatial
positions, as for BatchNorm and a convolution's KFC factors. A channels-last LayerNorm: a sample
is a row, one position of the leading dimensions (a token), as a Linear on the same input counts
rows, so on sequence inputs both have the scale of the per-token Fisher.

x̂ is recomputed from the input in the forward hook (with the module's own statistics), never read
from the output, which an in-place activation may overwrite. GroupNorm on the pure-PyTorch path
keeps the input instead and gets Σ g·x̂ from Σ g·x and the group moments, never writing x̂.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..options import Backend
from .base import CurvatureLayer, LayerCurvature, StatSpec


class _GroupInput(NamedTuple):
    """Forward-hook context of a GroupNorm on the pure-PyTorch path: the input itself."""

    x: Tensor


class UnitwiseNormCurvature(CurvatureLayer):
    """Unit-wise 2×2 Fisher of an affine normalisation layer (one block per affine unit).

    Its gradient segment is [∇γ, ∇β] (∇γ alone without a bias); without a bias each unit's
    Fisher is the 1×1 block F_γγ.

    Args:
        name: the module's name in the model.
        module: the normalisation module (with affine parameters).
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        if getattr(module, "weight", None) is None:
            raise ValueError(f"{name}: {type(module).__name__} without affine parameters has nothing to precondition")
        super().__init__(name, module)

    @property
    def units(self) -> int:
        """Number of affine units C (elements of γ)."""
        return self.weight.numel()

    def stat_specs(self) -> list[StatSpec]:
        return [StatSpec("F", 3 * self.units, 0)]

    def forward_stat_names(self) -> tuple[str, ...]:
        return ()

    def backward_stat_names(self) -> tuple[str, ...]:
        return ("F",)

    @abc.abstractmethod
    def normalized_input(self, x: Tensor) -> Tensor:
        """x̂ as the module's forward computes it (no affine)."""

    @abc.abstractmethod
    def unit_major(self, t: Tensor) -> Tensor:
        """``t`` (shaped like the module's input) as (samples, C, positions), units on dimension 1."""

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        x = inputs.detach()
        return self.normalized_input(x), x.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = self.unit_major(grad_out.detach()).contiguous()
        xhat = self.unit_major(cast(Tensor, context)).contiguous()
        ops.bn_unitwise_fisher(stats["F"], g, xhat, scale=1.0, decay=0.0 if first else 1.0, backend=backend)
        return g.shape[0]

    def frobenius_weights(self, name: str) -> torch.Tensor:
        """(γγ, γβ, ββ) per unit: the off-diagonal entry counts twice in the 2×2 block."""
        return torch.tensor([1.0, 2.0, 1.0]).repeat(self.units)

    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """F as (C, 3) = (γγ, γβ, ββ)."""
        return packed.view(-1, 3) * scale

    def precondition(self, grad: Tensor, curvature: LayerCurvature, damping: float, backend: Backend | str) -> Tensor:
        """Per unit (F_c + λI)⁻¹ [∇γ_c, ∇β_c] (or ∇γ_c / (F_γγ + λ) without a bias), flat like ``grad``."""
        c = self.units
        fisher = curvature.estimates["F"]
        if self.bias is None:
            return grad / (fisher[:, 0] + damping)
        u_gamma, u_beta = ops.bn_unitwise_solve(fisher, grad[:c], grad[c:], damping=damping, backend=backend)
        return torch.cat([u_gamma, u_beta])


class LayerNormCurvature(UnitwiseNormCurvature):
    """Unit-wise Fisher of an nn.LayerNorm with elementwise affine parameters.

    Args:
        name: the module's name in the model.
        module: the LayerNorm.
    """

    kind = "layernorm"
    module: nn.LayerNorm

    def _channels_first(self, t: Tensor) -> bool:
        """Whether ``t`` holds the normalised dimensions right after the example dimension, as the
        input of a LayerNorm subclass that moves the channels last around the plain LayerNorm (the
        LayerNorm2d of ConvNeXt) does; the hooks see the input and output of that forward. A plain
        nn.LayerNorm normalises the trailing dimensions; a subclass with its own forward is read as
        channels-first whenever its input allows it (its trailing dimensions may match by chance)."""
        shape = tuple(self.module.normalized_shape)
        k = len(shape)
        if t.dim() <= k or tuple(t.shape[1 : 1 + k]) != shape:
            return False
        return type(self.module).forward is not nn.LayerNorm.forward or tuple(t.shape[-k:]) != shape

    def normalized_input(self, x: Tensor) -> Tensor:
        m = self.module
        if self._channels_first(x):
            k = len(m.normalized_shape)
            dims = list(range(1 + k, x.dim())) + list(range(1, 1 + k))
            moved = x.permute(0, *dims)
            xhat = F.layer_norm(moved, m.normalized_shape, None, None, m.eps)
            return xhat.permute(0, *[dims.index(d) + 1 for d in range(1, x.dim())])
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)

    def unit_major(self, t: Tensor) -> Tensor:
        """(samples, C, positions): channels-first, the examples with their spatial positions;
        channels-last, every row of the leading dimensions as one sample of one position."""
        units = self.units
        if self._channels_first(t):
            return t.reshape(t.shape[0], units, -1)
        return t.reshape(-1, units, 1)


class GroupNormCurvature(UnitwiseNormCurvature):
    """Unit-wise Fisher of an affine nn.GroupNorm (one unit per channel).

    Args:
        name: the module's name in the model.
        module: the GroupNorm.
    """

    kind = "groupnorm"
    module: nn.GroupNorm

    def normalized_input(self, x: Tensor) -> Tensor:
        m = self.module  # GroupNorm takes (N, C, *) inputs only
        return F.group_norm(x, m.num_groups, None, None, m.eps)

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        x = inputs.detach()
        if not x.is_cuda:
            # Pure-PyTorch path: keep the input (autograd keeps it anyway) and never write x̂,
            # see ops.gn_unitwise_fisher_from_input.
            return _GroupInput(x), x.shape[0]
        return self.normalized_input(x), x.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        if not isinstance(context, _GroupInput):
            return super().accumulate_backward(grad_out, context, stats, first, backend)
        g = grad_out.detach()
        m = self.module
        decay = 0.0 if first else 1.0
        ops.gn_unitwise_fisher_from_input(
            stats["F"], g, context.x, groups=m.num_groups, eps=m.eps, scale=1.0, decay=decay
        )
        return g.shape[0]

    def unit_major(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], self.module.num_channels, math.prod(t.shape[2:]))
