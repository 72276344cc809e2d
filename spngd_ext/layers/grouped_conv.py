"""Block-diagonal Kronecker factors of grouped and depthwise Conv2d, and of Conv1d (any groups).

Group k of a convolution with G groups maps its C_in/G input channels to its C_out/G output
channels with its own filters, so its Fisher block is factored on its own (KFC convention per
group): a_{n,t,k} = group k's (C_in/G)·kh·kw input patch at output position t (+1 for the bias),
g_{n,t,k} = the output gradient of its C_out/G channels; A_k = (1/N) Σ_{n,t} a aᵀ,
G_k = (1/(N·T)) Σ_{n,t} g gᵀ, and the update of group k is Ĝ_k⁻¹ [∇W_k | ∇b_k] Â_k⁻¹ with
π-damping per group. Blocks between groups are zero (the weights of different groups never meet
in one output). A Conv1d is the Conv2d over a height-1 input.

Each group's factor is one statistic (``A0``, ``G0``, ``A1``, ...), so the buffers, reduction and
estimates treat them like any other packed factor. The layer has no inverse sides: the G small
inversions of both sides run batched, from the estimates, when the layer is preconditioned
(a depthwise layer: C inversions of (kh·kw+1)² and C of 1×1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..distributed.placement import LayerCost
from ..options import Backend
from .base import CurvatureLayer, LayerCurvature, StatSpec


def _pair(v: int | Sequence[int], one_d: bool) -> tuple[int, int]:
    """A Conv1d's 1-tuple argument as the (1, v) pair of the equivalent height-1 Conv2d."""
    vals = (v,) if isinstance(v, int) else tuple(v)
    return (1, vals[0]) if one_d else (vals[0], vals[1])


class GroupedConvCurvature(CurvatureLayer):
    """Per-group Kronecker factors of a grouped/depthwise nn.Conv2d or an nn.Conv1d (numeric zero padding).

    Its gradient segment is [∇W, ∇b] as the parameters hold them; the update is computed per group.

    Args:
        name: the module's name in the model.
        module: the Conv1d or Conv2d.
    """

    kind = "grouped_conv"
    module: nn.Conv1d | nn.Conv2d

    def __init__(self, name: str, module: nn.Conv1d | nn.Conv2d) -> None:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"{name}: {type(module).__name__} needs numeric zero padding, got "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}"
            )
        super().__init__(name, module)
        self.one_d = isinstance(module, nn.Conv1d)
        m = module
        self.kernel_size = _pair(m.kernel_size, self.one_d)
        self.stride = _pair(m.stride, self.one_d)
        self.dilation = _pair(m.dilation, self.one_d)
        pad = _pair(cast("tuple[int, ...]", m.padding), self.one_d)
        self.padding = (0, pad[1]) if self.one_d else pad
        self.groups = m.groups
        self.dim_a = m.in_channels // m.groups * self.kernel_size[0] * self.kernel_size[1] + int(m.bias is not None)
        self.dim_g = m.out_channels // m.groups
        self._a_names = tuple(f"A{k}" for k in range(self.groups))
        self._g_names = tuple(f"G{k}" for k in range(self.groups))
        self._unpack_index: dict[tuple[int, torch.device], Tensor] = {}

    def stat_specs(self) -> list[StatSpec]:
        na, ng = self.dim_a * (self.dim_a + 1) // 2, self.dim_g * (self.dim_g + 1) // 2
        a_specs = [StatSpec(n, na, self.dim_a) for n in self._a_names]
        return a_specs + [StatSpec(n, ng, self.dim_g) for n in self._g_names]

    def forward_stat_names(self) -> tuple[str, ...]:
        return self._a_names

    def backward_stat_names(self) -> tuple[str, ...]:
        return self._g_names

    def placement_cost(self) -> LayerCost:
        a_cost = self.groups * self.dim_a**3
        g_cost = self.groups * self.dim_g**3
        return LayerCost(self.name, elementwise=self.grad_numel * 3 + a_cost + g_cost)

    # ---- accumulation ----------------------------------------------------------------------
    def _as_2d(self, t: Tensor, spatial_dims: int) -> Tensor:
        """A batched 4-D (N, C, H, W) view of an input or output gradient."""
        if t.dim() == spatial_dims + 1:  # unbatched
            t = t.unsqueeze(0)
        return t.unsqueeze(2) if self.one_d else t

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        x = self._as_2d(inputs.detach(), 1 if self.one_d else 2)
        n = x.shape[0]
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        # unfold orders the patch as (channel, kh, kw): group k's channels are one contiguous run,
        # so (N, G, patch, T) is a view and no row matrix is copied out of it
        cols = patches.view(n, self.groups, -1, patches.shape[2])
        _accumulate_grams(cols, [stats[k] for k in self._a_names], first, ones=self.bias is not None)
        return None, n

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = self._as_2d(grad_out.detach(), 1 if self.one_d else 2)
        cols = g.reshape(g.shape[0], self.groups, self.dim_g, -1)
        _accumulate_grams(cols, [stats[k] for k in self._g_names], first)
        return cols.shape[0] * cols.shape[3]

    # ---- curvature -----------------------------------------------------------------------------
    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """The dense symmetric factor of one group from its packed upper triangle."""
        dim = self.dim_a if name.startswith("A") else self.dim_g
        # One gather through a cached index (this runs for every group at every step): the
        # position in the row-major packed upper triangle of each (i, j) of the full matrix.
        key = (dim, packed.device)
        index = self._unpack_index.get(key)
        if index is None:
            i, j = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
            lo, hi = torch.minimum(i, j), torch.maximum(i, j)
            index = (lo * dim - lo * (lo - 1) // 2 + (hi - lo)).reshape(-1).to(packed.device)
            self._unpack_index[key] = index
        return (packed[index] * scale).view(dim, dim)

    def group_gradients(self, grad: Tensor) -> Tensor:
        """The flat [∇W, ∇b] segment as (G, C_out/G, dim_a) per-group matrices [∇W_k | ∇b_k]."""
        w_numel = self.weight.numel()
        mats = grad[:w_numel].view(self.groups, self.dim_g, -1)
        if self.bias is not None:
            mats = torch.cat([mats, grad[w_numel:].view(self.groups, self.dim_g, 1)], dim=2)
        return mats

    def precondition(self, grad: Tensor, curvature: LayerCurvature, damping: float, backend: Backend | str) -> Tensor:
        """Per group Ĝ_k⁻¹ [∇W_k | ∇b_k] Â_k⁻¹ with π-damping per group; a group whose damped
        factor fails its Cholesky keeps the identity on that side. Flat like ``grad``."""
        est = curvature.estimates
        a = torch.stack([est[n] for n in self._a_names])
        g = torch.stack([est[n] for n in self._g_names])
        mean_a = a.diagonal(dim1=1, dim2=2).sum(1) / self.dim_a
        mean_g = g.diagonal(dim1=1, dim2=2).sum(1) / self.dim_g
        ok = torch.isfinite(mean_a) & torch.isfinite(mean_g) & (mean_a > 0) & (mean_g > 0)
        pi = torch.where(ok, torch.sqrt(torch.where(ok, mean_a / torch.where(ok, mean_g, 1.0), 1.0)), 1.0)
        root = damping**0.5
        a_inv, a_info = ops.cholesky_inverse_damped(a, pi * root, backend=backend)
        g_inv, g_info = ops.cholesky_inverse_damped(g, root / pi, backend=backend)
        eye_a = torch.eye(self.dim_a, dtype=a.dtype, device=a.device)
        eye_g = torch.eye(self.dim_g, dtype=g.dtype, device=g.device)
        a_inv = torch.where((a_info == 0).view(-1, 1, 1), a_inv, eye_a)
        g_inv = torch.where((g_info == 0).view(-1, 1, 1), g_inv, eye_g)
        u = g_inv @ self.group_gradients(grad) @ a_inv
        w_numel = self.weight.numel()
        if self.bias is None:
            return u.reshape(-1)
        return torch.cat([u[:, :, :-1].reshape(w_numel), u[:, :, -1].reshape(-1)])


def _accumulate_grams(cols: Tensor, states: Sequence[Tensor], first: bool, ones: bool = False) -> None:
    """states[k] (packed upper triangles) ← (0 if first else states[k]) + packed(Σ_n c c ᵀ) with c the
    columns cols[n, k] (N, G, d, T) of group k, each extended by a constant 1 when ``ones`` (a bias):
    one batched (d × T)·(T × d) product per example and group, without copying the columns."""
    c = cols.to(states[0].dtype)
    grams = (c @ c.transpose(-1, -2)).sum(0)
    if ones:
        sums = c.sum(dim=(0, 3))  # (G, d): the products with the constant 1
        count = torch.full_like(sums[:, :1], float(c.shape[0] * c.shape[3]))
        edge = torch.cat([sums, count], dim=1)
        grams = torch.cat([torch.cat([grams, sums.unsqueeze(2)], dim=2), edge.unsqueeze(1)], dim=1)
    d = grams.shape[1]
    iu = torch.triu_indices(d, d, device=grams.device)
    packed = grams[:, iu[0], iu[1]]
    for k, state in enumerate(states):
        if first:
            state.copy_(packed[k])
        else:
            state.add_(packed[k])
