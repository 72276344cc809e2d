"""Training-step helpers shared by the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, use_opt_backward: bool = True) -> torch.Tensor:
    """zero_grad, forward, cross-entropy, backward (``opt.backward`` or plain), step; returns the loss."""
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    if use_opt_backward:
        opt.backward(loss, out)
    else:
        loss.backward()
    opt.step()
    return loss.detach()


def one_step_update(model: nn.Module, x, y, fisher: str = "emp", **kw):
    """One SP-NGD step with lr=1, momentum=0 on the torch backend: (opt, grads, θ_before − θ_after)."""
    opt = SPNGD(model, lr=1.0, momentum=0.0, fisher=fisher, backend="torch", **kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    update = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return opt, grads, update
