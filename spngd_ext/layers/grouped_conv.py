"""Block-diagonal Kronecker factors of grouped and depthwise Conv2d, and of Conv1d (any groups).

Group k of a convolution with G groups maps its C_in/G input channels to its C_out/G output
channels with its own filters, so its Fisher block is factored on its own (KFC convention per
group): a_{n,t,k} = group k's (C_in/G)·kh·kw input patch at output position t (+1 for the bias),
g_{n,t,k} = the output gradient of its C_out/G channels; A_k = (1/N) Σ_{n,t} a aᵀ,
G_k = (1/(N·T)) Σ_{n,t} g gᵀ, and the update of group k is Ĝ_k⁻¹ [∇W_k | ∇b_k] Â_k⁻¹ with
π-damping per group. Blocks between groups are zero (the weights of different groups never meet
in one output). A Conv1d is the Conv2d over a height-1 input.

Each group's factor is one statistic (``A0``, ``G0``, ``A1``, ...), so the buffers, reduction and
estimates treat them like any other packed factor. The statistics of all groups are computed at
once (one batched product per chunk of examples for the A_k, one per example for the G_k) and
written with one operation per side into their run of the buffer; the estimates are read back
with one gather per layer (:meth:`GroupedConvCurvature.estimates_from_run`). The layer has no
inverse sides: the G small inversions of both sides run batched, from the estimates, when the
layer is preconditioned (a depthwise layer: C inversions of (kh·kw+1)² and C of 1×1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..distributed.placement import LayerCost
from ..ops.torch_path import triu_flat_index
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
    reads_estimates_as_run = True
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
        self._unpack_index: dict[tuple[int, int, torch.device], Tensor] = {}

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
        states = [stats[k] for k in self._a_names]
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        grams = patch_grams(x, self.groups, *geometry, ones=self.bias is not None, dtype=states[0].dtype)
        write_packed(states, grams, first)
        return None, x.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = self._as_2d(grad_out.detach(), 1 if self.one_d else 2)
        states = [stats[k] for k in self._g_names]
        cols = g.reshape(g.shape[0], self.groups, self.dim_g, -1).to(states[0].dtype)
        # one batched (C_out/G × T)·(T × C_out/G) product per example and group, on a view
        write_packed(states, (cols @ cols.transpose(-1, -2)).sum(0), first)
        return cols.shape[0] * cols.shape[3]

    # ---- curvature -----------------------------------------------------------------------------
    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """The dense symmetric factor of one group from its packed upper triangle."""
        dim = self.dim_a if name.startswith("A") else self.dim_g
        return (packed[self._full_index(dim, 1, packed.device)] * scale).view(dim, dim)

    def _full_index(self, dim: int, count: int, device: torch.device) -> Tensor:
        """For ``count`` packed (dim × dim) upper triangles back to back, the position of each
        (k, i, j) of the full matrices: one gather unpacks them all (cached)."""
        key = (dim, count, device)
        index = self._unpack_index.get(key)
        if index is None:
            i, j = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
            lo, hi = torch.minimum(i, j), torch.maximum(i, j)
            one = (lo * dim - lo * (lo - 1) // 2 + (hi - lo)).reshape(-1)
            index = (one + dim * (dim + 1) // 2 * torch.arange(count).unsqueeze(1)).reshape(-1).to(device)
            self._unpack_index[key] = index
        return index

    def estimates_from_run(self, run: Tensor, scale: Tensor | float) -> dict[str, Tensor]:
        """All groups' factors as ``{"A": (G, dim_a, dim_a), "G": (G, dim_g, dim_g)}`` from their
        run of the estimate buffer (A0…A{G−1}, then G0…G{G−1}, packed), in one gather."""
        na, groups = self.dim_a * (self.dim_a + 1) // 2, self.groups
        key = (-1, groups, run.device)
        index = self._unpack_index.get(key)
        if index is None:
            a_index = self._full_index(self.dim_a, groups, run.device)
            index = torch.cat([a_index, groups * na + self._full_index(self.dim_g, groups, run.device)])
            self._unpack_index[key] = index
        full = run[index]
        a = full[: groups * self.dim_a**2].view(groups, self.dim_a, self.dim_a)
        g = full[groups * self.dim_a**2 :].view(groups, self.dim_g, self.dim_g)
        if isinstance(scale, Tensor):  # one bias correction per statistic
            return {"A": a * scale[:groups].view(-1, 1, 1), "G": g * scale[groups:].view(-1, 1, 1)}
        return {"A": a * scale, "G": g * scale}

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
        est = curvature.estimates  # stacked (estimates_from_run) or by statistic name
        a = est["A"] if "A" in est else torch.stack([est[n] for n in self._a_names])
        g = est["G"] if "G" in est else torch.stack([est[n] for n in self._g_names])
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


_CHUNK_ELEMENTS = 1 << 19  # patch values per batched product: about 2 MB of float32, cache-sized


def patch_grams(
    x: Tensor,
    groups: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    ones: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Σ_{n,t} a aᵀ of every group at once: (G, D, D), a = group k's (C_in/G)·kh·kw input patch
    at output position t in ``F.unfold``'s (channel, ki, kj) order, extended by a constant 1 when
    ``ones`` (D = (C_in/G)·kh·kw + 1: the bias's row and column and the count come out of the same
    product).

    The patches of all taps are one strided view of the padded input (each tap's input shifted by
    the tap), copied in one operation into a (G, D, examples·T) matrix in ``dtype``, then one
    batched (D × L)·(L × D) product over the groups; done over chunks of examples of about
    ``_CHUNK_ELEMENTS`` patch values so the matrix stays in cache.

    Args:
        x: the (N, C_in, H, W) input.
        groups: G.
        kernel_size, stride, padding, dilation: the convolution's geometry (pairs).
        ones: append the constant 1 to every patch.
        dtype: the dtype of the products (the statistics').
    """
    n, c_in, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    c, taps = c_in // groups, kh * kw
    d = c * taps + int(ones)
    padded = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()
    hp, wp = h + 2 * ph, w + 2 * pw
    # (G, C_in/G, kh, kw, N, oh, ow): every tap's shifted input, a strided view of the padded input
    shifted = padded.as_strided(
        (groups, c, kh, kw, n, oh, ow),
        (c * hp * wp, hp * wp, dh * wp, dw, c_in * hp * wp, sh * wp, sw),
    )
    grams = torch.zeros(groups, d, d, dtype=dtype, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // (groups * d * oh * ow))
    for start in range(0, n, step):
        part = shifted[:, :, :, :, start : start + step]
        cols = torch.empty(groups, d, part.shape[4], oh, ow, dtype=dtype, device=x.device)
        cols[:, : c * taps].view(part.shape).copy_(part)
        if ones:
            cols[:, -1].fill_(1.0)
        flat = cols.view(groups, d, -1)
        grams.baddbmm_(flat, flat.transpose(1, 2))
    return grams


def write_packed(states: Sequence[Tensor], grams: Tensor, first: bool) -> None:
    """states[k] ← (0 if first else states[k]) + packed upper triangle of grams[k]: one operation
    on one (G, packed size) view when the states lie back to back in one buffer (the optimizer's
    accumulator), else one multi-tensor operation (separate tensors, or under ``torch.compile``,
    which does not trace the storage check).

    Args:
        states: the packed accumulators of the groups, in group order.
        grams: the (G, d, d) symmetric matrices.
        first: overwrite (the first contribution of a refresh).
    """
    d = grams.shape[1]
    packed = grams.reshape(grams.shape[0], -1)[:, triu_flat_index(d, grams.device)]
    if not torch.compiler.is_compiling() and _back_to_back(states):
        run = states[0].as_strided(packed.shape, (packed.shape[1], 1))
        if first:
            run.copy_(packed)
        else:
            run.add_(packed)
    elif first:
        torch._foreach_copy_(list(states), list(packed.unbind(0)))
    else:
        torch._foreach_add_(list(states), list(packed.unbind(0)))


def _back_to_back(states: Sequence[Tensor]) -> bool:
    """Whether the 1-D ``states`` follow each other without gaps in one storage."""
    head = states[0]
    step = head.numel() * head.element_size()
    storage = head.untyped_storage().data_ptr()
    return all(
        s.is_contiguous()
        and s.numel() == head.numel()
        and s.untyped_storage().data_ptr() == storage
        and s.data_ptr() == head.data_ptr() + k * step
        for k, s in enumerate(states)
    )
