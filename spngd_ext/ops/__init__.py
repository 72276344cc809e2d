"""The curvature primitives: one public function per op, dispatching to CUDA kernels or pure PyTorch.

The optimizer calls only these. Where each op runs is decided in one place,
:func:`spngd_ext.ops.dispatch.use_kernel`: ``backend="auto"`` takes the compiled kernel
(``torch.ops.spngd_ext.<op>``) when the extension is built and the tensors are on a GPU, else the
pure-PyTorch implementation in :mod:`spngd_ext.ops.torch_path` (the production CPU path, and the
float64 oracle the kernels are tested against). ``backend="cuda"`` insists on the kernel and
raises if it cannot be used; ``backend="torch"`` always takes the PyTorch path. ``backend`` is a
:class:`~spngd_ext.options.Backend` or its string value.

Dtypes on the kernel path: ``pack_upper``/``unpack_upper`` take float32/float64/bf16/fp16 (the cast
is fused), ``cholesky_inverse_damped`` float32 or float64. The accumulating ops
(``accumulate_factor``, ``conv_a_factor``, ``bn_unitwise_fisher``) keep a float32 state and read
float32/bf16/fp16 inputs (no float64); ``bn_unitwise_solve`` takes float32 only. For other dtypes
``backend="auto"`` runs the PyTorch path (so float64 statistics stay float64) and ``backend="cuda"``
raises ``TypeError``.

Every function checks its arguments (:mod:`spngd_ext.ops.checks`) and raises
``ValueError``/``TypeError`` naming the argument. Loading the compiled extension and the fake (meta)
implementations that let ``torch.compile`` trace through the ops are in :mod:`spngd_ext.ops.extension`.

Modules: ``dispatch`` (kernel or PyTorch), ``checks`` (argument checks), ``torch_path`` (pure
PyTorch), ``conv_gram`` (the im2col-free conv A factor for stride 1), ``extension`` (the compiled ops).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import torch_path
from .checks import check_bn_fisher_args, check_same_device, check_state, check_tensor, pair
from .conv_gram import conv_a_factor_shifted, supports_shifted_gram
from .dispatch import FLOAT_DTYPES, FP32_KERNEL_DTYPES, Backend, use_kernel
from .extension import cuda_ops_available, extension_error, extension_loaded
from .torch_path import packed_size

__all__ = [
    "Backend",
    "packed_size",
    "pack_upper",
    "unpack_upper",
    "accumulate_factor",
    "conv_a_factor",
    "cholesky_inverse_damped",
    "bn_unitwise_fisher",
    "bn_unitwise_fisher_from_input",
    "bn_unitwise_solve",
    "precondition",
    "kl_clip_coefficient",
    "kl_clip_from_total",
    "momentum_update",
    "cuda_ops_available",
    "extension_loaded",
    "extension_error",
]

# --------------------------------------------------------------------------------------------
# Symmetric packing
# --------------------------------------------------------------------------------------------


def pack_upper(mats: Sequence[Tensor], *, dtype: torch.dtype | None = None, backend: Backend | str = Backend.AUTO) -> Tensor:
    """Upper triangles (row by row) of square matrices, concatenated into one 1-D buffer.

    The inverse of :func:`unpack_upper` (which the optimizer uses to read its packed factors);
    SPNGD accumulates factors packed directly, so it does not call this op itself.

    Args:
        mats: square matrices (only their upper triangles are read), on one device.
        dtype: the output dtype (None: the first matrix's).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.

    ``dtype`` casts on the way (e.g. fp32 factors to bf16 for communication).
    """
    op = "pack_upper"
    mats = list(mats)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype (float32/float64/bf16/fp16) or None, got {dtype}")
    for i, m in enumerate(mats):
        check_tensor(f"mats[{i}]", m, op, dim=2)
        if m.shape[0] != m.shape[1]:
            raise ValueError(f"{op}: mats[{i}] must be square, got shape {tuple(m.shape)}")
    if mats:
        check_same_device(op, **{f"mats[{i}]": m for i, m in enumerate(mats)})
    if use_kernel(backend, mats, op):
        return torch.ops.spngd_ext.pack_upper(mats, dtype)
    return torch_path.pack_upper(mats, dtype=dtype)


def unpack_upper(
    buffer: Tensor,
    sizes: Sequence[int],
    *,
    scale: float | Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
    offset: int = 0,
    backend: Backend | str = Backend.AUTO,
) -> list[Tensor]:
    """Full symmetric matrices of the given sizes from ``buffer[offset:]``, each times ``scale``.

    Args:
        buffer: the 1-D packed buffer.
        sizes: the matrix sizes, in buffer order.
        scale: a float, or a 1-D tensor with one entry per matrix on the buffer's device.
        dtype: the output dtype.
        offset: where the first matrix starts in ``buffer``.
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "unpack_upper"
    check_tensor("buffer", buffer, op, dim=1)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype (float32/float64/bf16/fp16), got {dtype}")
    sizes = [int(n) for n in sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"{op}: sizes must be positive, got {sizes}")
    need = offset + sum(packed_size(n) for n in sizes)
    if offset < 0 or need > buffer.numel():
        raise ValueError(f"{op}: buffer has {buffer.numel()} elements, sizes {sizes} at offset {offset} need {need}")
    if isinstance(scale, Tensor):
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(len(sizes))
        if scale.dim() != 1 or scale.numel() != len(sizes):
            raise ValueError(f"{op}: scale must be a float or a 1-D tensor of {len(sizes)} entries, got shape {tuple(scale.shape)}")
        check_same_device(op, buffer=buffer, scale=scale)
    if use_kernel(backend, [buffer], op):
        if not isinstance(scale, Tensor):
            scale = torch.full((len(sizes),), float(scale), dtype=torch.float32, device=buffer.device)
        return list(torch.ops.spngd_ext.unpack_upper(buffer, sizes, scale.float().contiguous(), offset, dtype))
    return torch_path.unpack_upper(buffer, sizes, scale=scale, dtype=dtype, offset=offset)


# --------------------------------------------------------------------------------------------
# Factor accumulation
# --------------------------------------------------------------------------------------------


def accumulate_factor(state: Tensor, x: Tensor, *, scale: float, decay: float, backend: Backend | str = Backend.AUTO) -> Tensor:
    """In place ``state = decay·state + scale·packed_upper(xᵀx)``; x is (rows, d). Returns state.

    ``decay=0`` overwrites state (NaN in it is ignored). Accumulation is in state's dtype (fp32+).

    Args:
        state: the packed (d(d+1)/2,) float32/float64 accumulator.
        x: the (rows, d) rows.
        scale: factor of the new Gram.
        decay: factor of the old state (0: overwrite).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "accumulate_factor"
    check_tensor("state", state, op)
    check_tensor("x", x, op, dim=2)
    check_state(op, state, packed_size(x.shape[1]))
    check_same_device(op, state=state, x=x)
    if use_kernel(backend, [state, x], op, FP32_KERNEL_DTYPES):
        torch.ops.spngd_ext.accumulate_factor(state, x.contiguous(), float(scale), float(decay))
        return state
    return torch_path.accumulate_factor(state, x, float(scale), float(decay))


def conv_a_factor(
    state: Tensor,
    x: Tensor,
    *,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    has_bias: bool,
    scale: float,
    decay: float,
    backend: Backend | str = Backend.AUTO,
) -> Tensor:
    """In place ``state = decay·state + scale·Σ_{n,t} a aᵀ`` for conv patches a (+1 if has_bias).

    x is (N, C, H, W) in NCHW or channels-last memory layout; the kernel never builds im2col.

    Args:
        state: the packed accumulator of size C·kh·kw (+1 with a bias).
        x: the conv input.
        kernel_size, stride, padding, dilation: the convolution's geometry (int or pair).
        has_bias: append the constant 1 to every patch.
        scale: factor of the new Gram.
        decay: factor of the old state (0: overwrite).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "conv_a_factor"
    check_tensor("x", x, op, dim=4)
    k = pair("kernel_size", kernel_size, op)
    s = pair("stride", stride, op)
    p = pair("padding", padding, op)
    d = pair("dilation", dilation, op)
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"{op}: need kernel_size, stride, dilation >= 1 and padding >= 0, got {k}, {s}, {d}, {p}")
    for axis in (0, 1):
        if x.shape[2 + axis] + 2 * p[axis] < d[axis] * (k[axis] - 1) + 1:
            raise ValueError(
                f"{op}: the kernel does not fit the padded input (input {tuple(x.shape)}, kernel_size {k}, padding {p}, dilation {d})"
            )
    dim = x.shape[1] * k[0] * k[1] + int(has_bias)
    check_state(op, state, packed_size(dim))
    check_same_device(op, state=state, x=x)
    if use_kernel(backend, [state, x], op, FP32_KERNEL_DTYPES):
        torch.ops.spngd_ext.conv_a_factor(state, x, list(k), list(s), list(p), list(d), bool(has_bias), float(scale), float(decay))
        return state
    if supports_shifted_gram(s, d):  # no im2col: 3-11x faster on CPU (bench/conv_a_cpu.py)
        return conv_a_factor_shifted(state, x, k, p, bool(has_bias), float(scale), float(decay))
    return torch_path.conv_a_factor(state, x, k, s, p, d, bool(has_bias), float(scale), float(decay))


# --------------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------------


def cholesky_inverse_damped(
    mats: Tensor, damping: Tensor | float, *, backend: Backend | str = Backend.AUTO
) -> tuple[Tensor, Tensor]:
    """Batched ``(M_b + damping_b·I)⁻¹`` via Cholesky; returns ``(inverses, info)``.

    mats: (B, n, n) symmetric (only the lower triangle is read by the factorisation), float32 or
    float64. damping: a float or a (B,) tensor. ``info[b] != 0`` flags a failed matrix (not PD,
    or a non-finite result); no exception, no host synchronisation.

    Args:
        mats: (B, n, n) symmetric matrices.
        damping: the shift per matrix (float or (B,) tensor).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "cholesky_inverse_damped"
    check_tensor("mats", mats, op, dim=3)
    if mats.shape[1] != mats.shape[2]:
        raise ValueError(f"{op}: mats must be (B, n, n), got shape {tuple(mats.shape)}")
    if mats.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: mats must be float32 or float64, got {mats.dtype}")
    if isinstance(damping, Tensor):
        if damping.shape != (mats.shape[0],):
            raise ValueError(f"{op}: damping must be a float or a ({mats.shape[0]},) tensor, got shape {tuple(damping.shape)}")
        check_same_device(op, mats=mats, damping=damping)
    if use_kernel(backend, [mats], op):
        if not isinstance(damping, Tensor):
            damping = torch.full((mats.shape[0],), float(damping), dtype=mats.dtype, device=mats.device)
        inv, info = torch.ops.spngd_ext.cholesky_inverse_damped(mats.contiguous(), damping.to(mats.dtype).contiguous())
        return inv, info
    return torch_path.cholesky_inverse_damped(mats, damping)


# --------------------------------------------------------------------------------------------
# BatchNorm, unit-wise
# --------------------------------------------------------------------------------------------


def bn_unitwise_fisher(
    state: Tensor, grad_out: Tensor, xhat: Tensor, *, scale: float, decay: float, backend: Backend | str = Backend.AUTO
) -> Tensor:
    """In place ``state = decay·state + scale·Σ_n u uᵀ`` per channel, stored (C, 3) = (γγ, γβ, ββ).

    u_{n,c} = [Σ_hw g·x̂, Σ_hw g]; grad_out and xhat are (N, C) or (N, C, *) of one shape.

    Args:
        state: the (C, 3) float32/float64 accumulator.
        grad_out: the BN output gradient.
        xhat: the normalised input.
        scale: factor of the new sums.
        decay: factor of the old state (0: overwrite).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "bn_unitwise_fisher"
    check_bn_fisher_args(op, state, grad_out, "xhat", xhat)
    if use_kernel(backend, [state, grad_out, xhat], op, FP32_KERNEL_DTYPES):
        if grad_out.dtype != xhat.dtype:  # the kernel reads both in one dtype
            common = torch.promote_types(grad_out.dtype, xhat.dtype)
            grad_out, xhat = grad_out.to(common), xhat.to(common)
        torch.ops.spngd_ext.bn_unitwise_fisher(state, grad_out.contiguous(), xhat.contiguous(), float(scale), float(decay))
        return state
    return torch_path.bn_unitwise_fisher(state, grad_out, xhat, float(scale), float(decay))


def bn_unitwise_fisher_from_input(
    state: Tensor, grad_out: Tensor, x: Tensor, *, eps: float, scale: float, decay: float
) -> Tensor:
    """As :func:`bn_unitwise_fisher`, but from the BatchNorm *input* ``x`` normalised with its own
    batch statistics (training mode): x̂ is never materialised. Pure PyTorch on any device (no
    kernel); the optimizer uses it on CPU, where it is 1.0–4.2x cheaper than writing x̂.

    Args:
        state: the (C, 3) float32/float64 accumulator.
        grad_out: the BN output gradient.
        x: the BN input.
        eps: the BN's epsilon.
        scale: factor of the new sums.
        decay: factor of the old state (0: overwrite).
    """
    op = "bn_unitwise_fisher_from_input"
    check_bn_fisher_args(op, state, grad_out, "x", x)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    ug, ub = torch_path.bn_unit_gradients_from_input(grad_out, x, float(eps))
    return torch_path.bn_unitwise_fisher_from_sums(state, ug, ub, float(scale), float(decay))


def bn_unitwise_solve(
    fisher: Tensor, grad_gamma: Tensor, grad_beta: Tensor, *, damping: float, backend: Backend | str = Backend.AUTO
) -> tuple[Tensor, Tensor]:
    """Per channel ``(F_c + damping·I)⁻¹ [∇γ_c, ∇β_c]``; a singular channel keeps its gradient.

    Args:
        fisher: the (C, 3) = (γγ, γβ, ββ) Fisher.
        grad_gamma: ∇γ, (C,).
        grad_beta: ∇β, (C,).
        damping: λ.
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "bn_unitwise_solve"
    check_tensor("fisher", fisher, op, dim=2)
    channels = fisher.shape[0]
    if fisher.shape[1] != 3:
        raise ValueError(f"{op}: fisher must be (C, 3), got {tuple(fisher.shape)}")
    for name, t in (("grad_gamma", grad_gamma), ("grad_beta", grad_beta)):
        check_tensor(name, t, op, dim=1)
        if t.shape[0] != channels:
            raise ValueError(f"{op}: {name} must have {channels} entries, got {t.shape[0]}")
    check_same_device(op, fisher=fisher, grad_gamma=grad_gamma, grad_beta=grad_beta)
    if use_kernel(backend, [fisher, grad_gamma, grad_beta], op, (torch.float32,)):
        ug, ub = torch.ops.spngd_ext.bn_unitwise_solve(
            fisher.contiguous(), grad_gamma.contiguous(), grad_beta.contiguous(), float(damping)
        )
        return ug, ub
    return torch_path.bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping)


# --------------------------------------------------------------------------------------------
# Preconditioning, KL clip, update
# --------------------------------------------------------------------------------------------


def precondition(g_inv: Tensor, grad: Tensor, a_inv: Tensor, *, backend: Backend | str = Backend.AUTO) -> Tensor:
    """U = Ĝ⁻¹ · grad · Â⁻¹ (grad d_out × d_in), or batched over a leading dimension.

    The optimizer calls it for each group of equally shaped Kronecker layers with both inverses.

    Args:
        g_inv: Ĝ⁻¹, (d_out, d_out) or (B, d_out, d_out).
        grad: the gradient matrix, (d_out, d_in) or (B, d_out, d_in).
        a_inv: Â⁻¹, (d_in, d_in) or (B, d_in, d_in).
        backend: validated only (the GEMMs are cuBLAS/MKL either way).
    """
    op = "precondition"
    for name, t in (("g_inv", g_inv), ("grad", grad), ("a_inv", a_inv)):
        check_tensor(name, t, op)
    if grad.dim() not in (2, 3) or g_inv.dim() != grad.dim() or a_inv.dim() != grad.dim():
        raise ValueError(f"{op}: g_inv, grad, a_inv must all be 2-D or all 3-D, got {g_inv.dim()}, {grad.dim()}, {a_inv.dim()}")
    for name, t in (("g_inv", g_inv), ("a_inv", a_inv)):
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{op}: {name} must be square, got shape {tuple(t.shape)}")
    if g_inv.shape[-1] != grad.shape[-2] or a_inv.shape[-2] != grad.shape[-1]:
        raise ValueError(
            f"{op}: shapes do not chain: g_inv {tuple(g_inv.shape)}, grad {tuple(grad.shape)}, a_inv {tuple(a_inv.shape)}"
        )
    if grad.dim() == 3 and not (g_inv.shape[0] == grad.shape[0] == a_inv.shape[0]):
        raise ValueError(f"{op}: batch sizes differ: g_inv {g_inv.shape[0]}, grad {grad.shape[0]}, a_inv {a_inv.shape[0]}")
    check_same_device(op, g_inv=g_inv, grad=grad, a_inv=a_inv)
    use_kernel(backend, [grad], op)  # validates backend (the GEMMs below are cuBLAS/MKL either way)
    # Two GEMMs through cuBLAS/MKL are already the fastest form; ordering by cost picks the cheaper
    # association ((Ĝ⁻¹∇)Â⁻¹ vs Ĝ⁻¹(∇Â⁻¹) cost the same flops, so keep the PyTorch path's order).
    return torch_path.precondition(g_inv, grad.to(g_inv.dtype), a_inv)


def kl_clip_coefficient(
    updates: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[float], kl_clip: float
) -> Tensor:
    """ν = min(1, sqrt(kl_clip / Σ lr² ⟨U, ∇⟩)) as a 0-dim device tensor (no ``.item()``).

    The single-process form, for callers holding every layer's update. SPNGD itself sums
    lr²·⟨U, ∇⟩ per owning rank and combines the shares with :func:`kl_clip_from_total`.

    Args:
        updates: per layer, the preconditioned update U.
        grads: per layer, the gradient ∇ (shaped like U).
        lrs: per layer, the learning rate.
        kl_clip: the bound κ (> 0).
    """
    if not (isinstance(kl_clip, (int, float)) and kl_clip > 0 and math.isfinite(kl_clip)):
        raise ValueError(f"kl_clip_coefficient: kl_clip must be > 0 and finite, got {kl_clip!r}")
    if not (len(updates) == len(grads) == len(lrs)):
        raise ValueError("kl_clip_coefficient: updates, grads and lrs must have one entry per layer")
    if not updates:
        return torch.ones(())
    for i, (u, g) in enumerate(zip(updates, grads)):
        if u.shape != g.shape:
            raise ValueError(f"kl_clip_coefficient: updates[{i}] has shape {tuple(u.shape)} but grads[{i}] has {tuple(g.shape)}")
    check_same_device("kl_clip_coefficient", **{f"updates[{i}]": u for i, u in enumerate(updates)},
                       **{f"grads[{i}]": g for i, g in enumerate(grads)})
    # One fused reduction: stack the per-layer dot products, then a single weighted sum.
    dots = torch._foreach_mul([u.float() for u in updates], [g.float() for g in grads])
    sums = torch.stack([d.sum() for d in dots])
    lr_sq = torch.tensor([lr * lr for lr in lrs], dtype=torch.float32).to(sums.device, non_blocking=True)
    return kl_clip_from_total((sums * lr_sq).sum(), kl_clip)


def kl_clip_from_total(total: Tensor, kl_clip: float) -> Tensor:
    """ν = min(1, sqrt(kl_clip / total)) on the device; ν = 1 when total is not positive and finite.

    Args:
        total: the 0-dim sum Σ lr²·⟨U, ∇⟩.
        kl_clip: the bound κ (> 0).
    """
    if not (isinstance(kl_clip, (int, float)) and kl_clip > 0 and math.isfinite(kl_clip)):
        raise ValueError(f"kl_clip_from_total: kl_clip must be > 0 and finite, got {kl_clip!r}")
    ok = torch.isfinite(total) & (total > 0)
    nu = torch.sqrt(kl_clip / torch.where(ok, total, torch.ones_like(total)))
    return torch.where(ok, torch.clamp(nu, max=1.0), torch.ones_like(nu))


def momentum_update(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """Multi-tensor torch-SGD update, in place: d = U + wd·θ; v ← m·v + d; θ ← θ − lr·v.

    ``momentum_buffers`` must already exist (the optimizer initialises v = d on the first step).
    Uses ``torch._foreach_*`` (one multi-tensor launch per stage on CUDA).

    Args:
        params: the parameters (updated in place).
        updates: their updates U.
        momentum_buffers: their momentum buffers v (updated in place).
        lr: the learning rate η.
        momentum: m.
        weight_decay: wd.
    """
    op = "momentum_update"
    if not (len(params) == len(updates) == len(momentum_buffers)):
        raise ValueError(f"{op}: params, updates and momentum_buffers must have the same length, got "
                         f"{len(params)}, {len(updates)}, {len(momentum_buffers)}")
    if not params:
        return
    for i, (p, u, b) in enumerate(zip(params, updates, momentum_buffers)):
        if u.shape != p.shape or b.shape != p.shape:
            raise ValueError(f"{op}: updates[{i}] {tuple(u.shape)} and momentum_buffers[{i}] {tuple(b.shape)} must match params[{i}] {tuple(p.shape)}")
        if not (p.device == u.device == b.device):
            raise ValueError(f"{op}: all tensors must be on one device, got params[{i}] on {p.device}, "
                             f"updates[{i}] on {u.device}, momentum_buffers[{i}] on {b.device}")
    d = list(updates)
    if weight_decay != 0:
        d = list(torch._foreach_add(d, list(params), alpha=weight_decay))
    if momentum != 0:
        torch._foreach_mul_(list(momentum_buffers), momentum)
        torch._foreach_add_(list(momentum_buffers), d)
        d = list(momentum_buffers)
    torch._foreach_add_(list(params), d, alpha=-lr)
