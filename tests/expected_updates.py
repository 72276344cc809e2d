"""The SP-NGD update computed by hand in float64 from the optimizer's public state (not collected).

``natural_update`` rebuilds U for every parameter from ``opt.inverses()`` (Kronecker layers:
U = Ĝ⁻¹ [∇W | ∇b] Â⁻¹, a missing side being the identity), ``opt.factors()`` (BatchNorm: the unit-wise
2×2 solve (F_c + λI)⁻¹ [∇γ_c, ∇β_c], the plain gradient before the first estimate) and the plain
gradient for every other parameter, as docs/design.md states the update. ``kl_clip_nu`` is
ν = min(1, sqrt(kl_clip / Σ lr²⟨U, ∇⟩)). ``sgd_convention`` applies d = U + wd·θ, v ← m·v + d
(v = d at the first step), θ ← θ − lr·ν·v, the torch.optim.SGD convention the optimizer follows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

F64 = torch.float64


def _kronecker_update(grad_mat: torch.Tensor, inverse_pair) -> torch.Tensor:
    a_inv, g_inv = (None if t is None else t.to(F64) for t in inverse_pair)
    u = grad_mat
    if g_inv is not None:
        u = g_inv @ u
    if a_inv is not None:
        u = u @ a_inv
    return u


def natural_update(model: nn.Module, opt, grads: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
    """U (float64) for every parameter name in ``grads``; ``damping`` is λ of the step."""
    inverses, factors = opt.inverses(), opt.factors()
    grads = {n: g.to(F64) for n, g in grads.items()}
    updates: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        w, b = f"{prefix}weight", f"{prefix}bias"
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name in inverses:
            gw = grads[w].reshape(grads[w].shape[0], -1)
            has_bias = module.bias is not None
            mat = torch.cat([gw, grads[b][:, None]], dim=1) if has_bias else gw
            u = _kronecker_update(mat, inverses[name])
            updates[w] = u[:, : gw.shape[1]].reshape(grads[w].shape)
            if has_bias:
                updates[b] = u[:, -1]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            fisher = factors.get(name, {}).get("F")
            if fisher is None:  # no estimate yet: the plain gradient
                continue
            fisher = fisher.to(F64)
            blocks = torch.stack(
                [torch.stack([fisher[:, 0], fisher[:, 1]], -1), torch.stack([fisher[:, 1], fisher[:, 2]], -1)], -2
            ) + damping * torch.eye(2, dtype=F64)
            rhs = torch.stack([grads[w], grads[b]], 1).unsqueeze(-1)
            u = torch.linalg.solve(blocks, rhs).squeeze(-1)
            updates[w], updates[b] = u[:, 0], u[:, 1]
    for n, g in grads.items():
        updates.setdefault(n, g)  # parameters outside curvature layers: momentum SGD on ∇
    return updates


def kl_clip_nu(updates: dict, grads: dict, lrs: dict | float, kl_clip: float | None) -> float:
    """ν = min(1, sqrt(kl_clip / Σ lr²⟨U, ∇⟩)); 1 without clipping or for a non-positive sum."""
    if kl_clip is None:
        return 1.0
    total = 0.0
    for n, u in updates.items():
        lr = lrs if isinstance(lrs, float) else lrs[n]
        total += lr * lr * float((u.to(F64) * grads[n].to(F64)).sum())
    return min(1.0, math.sqrt(kl_clip / total)) if total > 0 else 1.0


class SgdConvention:
    """θ (float64) advanced step by step: d = U + wd·θ, v ← m·v + d (v = d at the first step),
    θ ← θ − lr·ν·v. The tests pass ν ≠ 1 only with momentum 0 and weight decay 0, the case whose
    clipped step (θ ← θ − lr·ν·U) docs/design.md states without ambiguity."""

    def __init__(self, model: nn.Module) -> None:
        self.theta = {n: p.detach().to(F64).clone() for n, p in model.named_parameters()}
        self.velocity: dict[str, torch.Tensor] = {}

    def advance(self, updates: dict, lr: float, momentum: float, weight_decay: float, nu: float = 1.0) -> dict:
        for n, theta in self.theta.items():
            d = updates[n].to(F64) + weight_decay * theta
            v = d if n not in self.velocity else momentum * self.velocity[n] + d
            self.velocity[n] = v
            self.theta[n] = theta - lr * nu * v
        return self.theta
