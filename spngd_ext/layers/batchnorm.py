"""Unit-wise (per-channel 2×2) Fisher of BatchNorm1d/2d, as in SP-NGD.

Per example and channel u = [Σ_hw g·x̂, Σ_hw g]; F_c = (1/N) Σ_n u uᵀ, stored as (C, 3) =
(γγ, γβ, ββ). x̂ is never taken from the BN output (in-place activations overwrite it): the CUDA
path recomputes x̂ from the input in the forward hook, the pure-PyTorch path keeps the input and
gets Σ g·x̂ from Σ g·x and the batch moments (cheaper on CPU than writing x̂).

Under data parallelism x̂ follows the module: a plain BatchNorm normalises each rank's shard with
that shard's statistics (so does x̂ here); a SyncBatchNorm in training mode normalises with the
whole batch's statistics, so x̂ is recomputed with the global per-channel mean and variance (one
all-gather of each rank's count, mean and sum of squared deviations per BN layer and refresh).
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from .. import ops
from ..options import Backend
from .base import CurvatureLayer, LayerCurvature, StatSpec


class _BatchInput(NamedTuple):
    """Forward-hook context of a BN normalising with its batch statistics: the input itself."""

    x: torch.Tensor


class BatchNormCurvature(CurvatureLayer):
    """Unit-wise Fisher of an affine BatchNorm1d/2d (or SyncBatchNorm): one 2×2 block per channel.

    Its gradient segment is [∇γ, ∇β]; the update solves (F_c + λI) u_c = [∇γ_c, ∇β_c] per channel.

    Args:
        name: the module's name in the model.
        module: the BatchNorm module (affine).
    """

    kind = "batchnorm"
    module: nn.modules.batchnorm._BatchNorm

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        if not module.affine:
            raise ValueError(f"{name}: BatchNorm without affine parameters has nothing to precondition")
        super().__init__(name, module)

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return self.module.num_features

    def stat_specs(self) -> list[StatSpec]:
        return [StatSpec("F", 3 * self.channels, 0)]

    def forward_stat_names(self) -> tuple[str, ...]:
        return ()

    def backward_stat_names(self) -> tuple[str, ...]:
        return ("F",)

    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ as the forward computed it: batch statistics in training mode, running ones in eval."""
        m = self.module
        x = x.detach()
        reduce_dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if (m.training or not m.track_running_stats or m.running_mean is None) and self._sync_group() is None:
            # One fused kernel (batch statistics, no affine, running stats untouched) instead of
            # mean + var + arithmetic: one pass over the input instead of three.
            return torch.nn.functional.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
        if m.training or not m.track_running_stats or m.running_mean is None:
            mean = x.mean(dim=reduce_dims)
            var = x.var(dim=reduce_dims, unbiased=False)
            group = self._sync_group()
            if group is not None:  # SyncBatchNorm normalised with the statistics of the whole batch
                mean, var = _global_moments(x, mean, var, group)
        else:
            mean, var = m.running_mean, m.running_var  # type: ignore[assignment]  # not None: checked above
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)

    def _sync_group(self):
        """The process group a SyncBatchNorm in training mode synchronises over (None: local BN)."""
        m = self.module
        if not (isinstance(m, nn.SyncBatchNorm) and m.training):
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = m.process_group if m.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def splits_by_example(self, tensor: Tensor) -> bool:
        return tensor.shape[0] >= 2

    def slice_context(self, context: object, part: slice) -> object:
        """x̂ of the examples ``part`` (normalised with the whole call's moments)."""
        if isinstance(context, _BatchInput):
            context = self.normalized_input(context.x)
        return cast(Tensor, context)[part]

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        m = self.module
        batch_stats = m.training or not m.track_running_stats or m.running_mean is None
        if not inputs.is_cuda and batch_stats and self._sync_group() is None:
            # Pure-PyTorch path: keep the input (autograd keeps it anyway; an in-place change to it
            # would fail BN's own backward) and skip x̂, see ops.bn_unitwise_fisher_from_input.
            return _BatchInput(inputs.detach()), inputs.shape[0]
        return self.normalized_input(inputs), inputs.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = grad_out.detach()
        decay = 0.0 if first else 1.0
        if isinstance(context, _BatchInput):
            ops.bn_unitwise_fisher_from_input(stats["F"], g, context.x, eps=self.module.eps, scale=1.0, decay=decay)
        else:
            ops.bn_unitwise_fisher(stats["F"], g, cast(Tensor, context), scale=1.0, decay=decay, backend=backend)
        return g.shape[0]

    def frobenius_weights(self, name: str) -> torch.Tensor:
        """(γγ, γβ, ββ) per unit: the off-diagonal entry counts twice in the 2×2 block."""
        return torch.tensor([1.0, 2.0, 1.0]).repeat(self.channels)

    def estimate_from_packed(self, name: str, packed: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """F as (C, 3) = (γγ, γβ, ββ)."""
        return packed.view(-1, 3) * scale

    def precondition(
        self, grad: torch.Tensor, curvature: LayerCurvature, damping: float, backend: Backend | str
    ) -> torch.Tensor:
        """Per channel (F_c + λI)⁻¹ [∇γ_c, ∇β_c], flat as [uγ, uβ]."""
        c = self.channels
        u_gamma, u_beta = ops.bn_unitwise_solve(
            curvature.estimates["F"], grad[:c], grad[c:], damping=damping, backend=backend
        )
        return torch.cat([u_gamma, u_beta])


def _global_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over every rank's batch (one all-gather of the local
    count, mean and sum of squared deviations; combined with the parallel-variance formula)."""
    import torch.distributed as dist

    dtype = torch.promote_types(x.dtype, torch.float32)
    rows = x.numel() // max(1, x.shape[1])
    local = torch.cat([x.new_full((1,), float(rows), dtype=dtype), mean.to(dtype), var.to(dtype) * rows])
    world = dist.get_world_size(group)
    gathered = torch.empty(world * local.numel(), dtype=dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    gathered = gathered.view(world, -1)
    c = mean.numel()
    counts, means, m2 = gathered[:, :1], gathered[:, 1 : 1 + c], gathered[:, 1 + c :]
    total = counts.sum()
    g_mean = (counts * means).sum(dim=0) / total
    g_var = (m2 + counts * (means - g_mean) ** 2).sum(dim=0) / total
    return g_mean.to(x.dtype), g_var.to(x.dtype)
