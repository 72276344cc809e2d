"""Accumulating the curvature statistics: Kronecker factors (dense rows, conv patches) and the
BatchNorm unit-wise Fisher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import torch_path
from .checks import check_bn_fisher_args, check_same_device, check_state, check_tensor, pair
from .conv_gram import conv_a_factor_shifted, supports_shifted_gram
from .dispatch import FP32_KERNEL_DTYPES, Backend, use_kernel
from .torch_path import packed_size

__all__ = [
    "accumulate_factor",
    "conv_a_factor",
    "bn_unitwise_fisher",
    "bn_unitwise_fisher_from_input",
    "gn_unitwise_fisher_from_input",
]


def accumulate_factor(
    state: Tensor, x: Tensor, *, scale: float, decay: float, backend: Backend | str = Backend.AUTO
) -> Tensor:
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
        torch.ops.spngd_ext.conv_a_factor(
            state, x, list(k), list(s), list(p), list(d), bool(has_bias), float(scale), float(decay)
        )
        return state
    if supports_shifted_gram(s, d):  # no im2col: 3-11x faster on CPU (bench/conv_a_cpu.py)
        return conv_a_factor_shifted(state, x, k, p, bool(has_bias), float(scale), float(decay))
    return torch_path.conv_a_factor(state, x, k, s, p, d, bool(has_bias), float(scale), float(decay))


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
        torch.ops.spngd_ext.bn_unitwise_fisher(
            state, grad_out.contiguous(), xhat.contiguous(), float(scale), float(decay)
        )
        return state
    return torch_path.bn_unitwise_fisher(state, grad_out, xhat, float(scale), float(decay))


def bn_unitwise_fisher_from_input(
    state: Tensor, grad_out: Tensor, x: Tensor, *, eps: float, scale: float, decay: float
) -> Tensor:
    """As :func:`bn_unitwise_fisher`, but from the BatchNorm *input* ``x`` normalised with its own
    batch statistics (training mode): x̂ is never materialised. Pure PyTorch on any device (no
    kernel); the optimizer uses it on CPU, where it is 1.5–2.6x faster than writing x̂ and summing
    (the main CNN's BatchNorm shapes at batch 64–256, one thread, ``bench/unitwise_sums.py``).

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


def gn_unitwise_fisher_from_input(
    state: Tensor, grad_out: Tensor, x: Tensor, *, groups: int, eps: float, scale: float, decay: float
) -> Tensor:
    """As :func:`bn_unitwise_fisher`, for a GroupNorm with ``groups`` groups, from its *input* ``x``
    (normalised per example and group as the module does): x̂ is never materialised. Pure PyTorch
    on any device (no kernel); the optimizer uses it on CPU.

    Args:
        state: the (C, 3) float32/float64 accumulator.
        grad_out: the GroupNorm output gradient, (N, C, *).
        x: the GroupNorm input.
        groups: the module's number of groups (divides C).
        eps: the module's epsilon.
        scale: factor of the new sums.
        decay: factor of the old state (0: overwrite).
    """
    op = "gn_unitwise_fisher_from_input"
    check_bn_fisher_args(op, state, grad_out, "x", x)
    channels = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ValueError(f"{op}: groups must be a positive int dividing the {channels} channels, got {groups!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    ug, ub = torch_path.gn_unit_gradients_from_input(grad_out, x, groups, float(eps))
    return torch_path.bn_unitwise_fisher_from_sums(state, ug, ub, float(scale), float(decay))
