"""The update: KL-clip coefficient and the multi-tensor momentum step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import check_same_device

__all__ = ["kl_clip_coefficient", "kl_clip_from_total", "momentum_update"]


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
            raise ValueError(
                f"kl_clip_coefficient: updates[{i}] has shape {tuple(u.shape)} but grads[{i}] has {tuple(g.shape)}"
            )
    check_same_device(
        "kl_clip_coefficient",
        **{f"updates[{i}]": u for i, u in enumerate(updates)},
        **{f"grads[{i}]": g for i, g in enumerate(grads)},
    )
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
        raise ValueError(
            f"{op}: params, updates and momentum_buffers must have the same length, got "
            f"{len(params)}, {len(updates)}, {len(momentum_buffers)}"
        )
    if not params:
        return
    for i, (p, u, b) in enumerate(zip(params, updates, momentum_buffers)):
        if u.shape != p.shape or b.shape != p.shape:
            raise ValueError(
                f"{op}: updates[{i}] {tuple(u.shape)} and momentum_buffers[{i}] {tuple(b.shape)} must match params[{i}] {tuple(p.shape)}"
            )
        if not (p.device == u.device == b.device):
            raise ValueError(
                f"{op}: all tensors must be on one device, got params[{i}] on {p.device}, "
                f"updates[{i}] on {u.device}, momentum_buffers[{i}] on {b.device}"
            )
    d = list(updates)
    if weight_decay != 0:
        d = list(torch._foreach_add(d, list(params), alpha=weight_decay))
    if momentum != 0:
        torch._foreach_mul_(list(momentum_buffers), momentum)
        torch._foreach_add_(list(momentum_buffers), d)
        d = list(momentum_buffers)
    torch._foreach_add_(list(params), d, alpha=-lr)
