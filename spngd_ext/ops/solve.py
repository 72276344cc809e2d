"""Using the curvature: damped Cholesky inversion, the BatchNorm 2×2 solve, Kronecker preconditioning."""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_path
from .checks import check_same_device, check_tensor
from .dispatch import Backend, use_kernel

__all__ = ["cholesky_inverse_damped", "bn_unitwise_solve", "precondition"]


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
            raise ValueError(
                f"{op}: damping must be a float or a ({mats.shape[0]},) tensor, got shape {tuple(damping.shape)}"
            )
        check_same_device(op, mats=mats, damping=damping)
    if use_kernel(backend, [mats], op):
        if not isinstance(damping, Tensor):
            damping = torch.full((mats.shape[0],), float(damping), dtype=mats.dtype, device=mats.device)
        inv, info = torch.ops.spngd_ext.cholesky_inverse_damped(mats.contiguous(), damping.to(mats.dtype).contiguous())
        return inv, info
    return torch_path.cholesky_inverse_damped(mats, damping)


def bn_unitwise_solve(
    fisher: Tensor,
    grad_gamma: Tensor,
    grad_beta: Tensor,
    *,
    damping: float | Tensor,
    backend: Backend | str = Backend.AUTO,
) -> tuple[Tensor, Tensor]:
    """Per channel ``(F_c + damping·I)⁻¹ [∇γ_c, ∇β_c]``; a singular channel keeps its gradient.

    Args:
        fisher: the (C, 3) = (γγ, γβ, ββ) Fisher.
        grad_gamma: ∇γ, (C,).
        grad_beta: ∇β, (C,).
        damping: λ; a 0-dim tensor (the compiled step's λ) takes the PyTorch path, whose
            elementwise 2×2 solve the compiler fuses (the kernel takes λ as a host float).
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
    if not isinstance(damping, Tensor) and use_kernel(backend, [fisher, grad_gamma, grad_beta], op, (torch.float32,)):
        ug, ub = torch.ops.spngd_ext.bn_unitwise_solve(
            fisher.contiguous(), grad_gamma.contiguous(), grad_beta.contiguous(), float(damping)
        )
        return ug, ub
    return torch_path.bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping)


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
        raise ValueError(
            f"{op}: g_inv, grad, a_inv must all be 2-D or all 3-D, got {g_inv.dim()}, {grad.dim()}, {a_inv.dim()}"
        )
    for name, t in (("g_inv", g_inv), ("a_inv", a_inv)):
        if t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{op}: {name} must be square, got shape {tuple(t.shape)}")
    if g_inv.shape[-1] != grad.shape[-2] or a_inv.shape[-2] != grad.shape[-1]:
        raise ValueError(
            f"{op}: shapes do not chain: g_inv {tuple(g_inv.shape)}, grad {tuple(grad.shape)}, a_inv {tuple(a_inv.shape)}"
        )
    if grad.dim() == 3 and not (g_inv.shape[0] == grad.shape[0] == a_inv.shape[0]):
        raise ValueError(
            f"{op}: batch sizes differ: g_inv {g_inv.shape[0]}, grad {grad.shape[0]}, a_inv {a_inv.shape[0]}"
        )
    check_same_device(op, g_inv=g_inv, grad=grad, a_inv=a_inv)
    use_kernel(backend, [grad], op)  # validates backend (the GEMMs below are cuBLAS/MKL either way)
    # Two GEMMs through cuBLAS/MKL are already the fastest form; ordering by cost picks the cheaper
    # association ((Ĝ⁻¹∇)Â⁻¹ vs Ĝ⁻¹(∇Â⁻¹) cost the same flops, so keep the PyTorch path's order).
    return torch_path.precondition(g_inv, grad.to(g_inv.dtype), a_inv)
