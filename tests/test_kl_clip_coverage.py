"""KL clipping covers every parameter the optimizer updates.

ν = min(1, sqrt(kl_clip / Σ lr²·⟨U, ∇⟩)) with the sum over all parameters: Kronecker layers
(U = Ĝ⁻¹∇Â⁻¹), BatchNorm (unit-wise 2×2 solve; U = ∇ before its first estimate) and parameters
outside curvature layers (U = ∇). Every update, first-order ones included, is scaled by ν. The
expected values are computed here from the optimizer's public estimates and inverses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64_default", "one_thread"),
]

DAMPING = 1e-2


class WithUnsupported(nn.Module):
    """Linear → BN → a per-feature scale (a bare parameter: no curvature) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))) * self.scale)


def _expected_updates(model, opt, grads, lrs):
    """U per parameter from the optimizer's inverses/estimates, and Σ lr²⟨U, ∇⟩."""
    inv = opt.inverses()
    est = opt.factors()
    updates, total = {}, 0.0
    for name in ("fc1", "fc2"):
        gw, gb = grads[f"{name}.weight"], grads[f"{name}.bias"]
        mat = torch.cat([gw, gb[:, None]], dim=1)
        a_inv, g_inv = inv[name]
        u = g_inv @ mat @ a_inv
        updates[f"{name}.weight"], updates[f"{name}.bias"] = u[:, :-1], u[:, -1]
    f = est["bn"]["F"]
    gg, gb = grads["bn.weight"], grads["bn.bias"]
    ug, ub = [], []
    for c in range(f.shape[0]):
        block = torch.tensor([[f[c, 0], f[c, 1]], [f[c, 1], f[c, 2]]]) + DAMPING * torch.eye(2)
        sol = torch.linalg.solve(block, torch.stack([gg[c], gb[c]]))
        ug.append(sol[0])
        ub.append(sol[1])
    updates["bn.weight"], updates["bn.bias"] = torch.stack(ug), torch.stack(ub)
    updates["scale"] = grads["scale"]
    for n, u in updates.items():
        total += lrs[n] ** 2 * float((u * grads[n]).sum())
    return updates, total


@pytest.mark.parametrize("scale_lr", [0.1, 0.02])
def test_kl_clip_counts_and_scales_every_parameter(scale_lr):
    torch.manual_seed(0)
    model = WithUnsupported()
    lr = 0.1
    groups = [{"params": [model.scale], "lr": scale_lr}]
    opt = SPNGD(model, lr=lr, momentum=0.0, fisher="emp", damping=DAMPING, backend="torch", kl_clip=1e-4)
    # a second param group for the bare parameter, with its own lr (the sum weighs each by lr²)
    opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not model.scale]
    opt.add_param_group(groups[0])
    lrs = {n: (scale_lr if n == "scale" else lr) for n, _ in model.named_parameters()}
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for _ in range(2):  # the second step has estimates for every layer
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    updates, total = _expected_updates(model, opt, grads, lrs)
    nu = min(1.0, math.sqrt(1e-4 / total))
    assert nu < 0.5, nu  # the test clips for real
    for n, p in model.named_parameters():
        got = before[n] - p.detach()
        torch.testing.assert_close(got, lrs[n] * nu * updates[n], rtol=1e-8, atol=1e-12, msg=n)


class OptionalNorm(nn.Module):
    """Linear → (BN only when ``use_bn``) → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4)
        self.use_bn = False

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(self.bn(h) if self.use_bn else h))


def test_batchnorm_without_an_estimate_counts_its_plain_gradient():
    """A BatchNorm that first runs on a step without a refresh has no Fisher estimate yet: its
    U = ∇ enters the sum as lr²‖∇‖², like any first-order parameter, and its update is scaled
    by the same ν."""
    torch.manual_seed(1)
    model = OptionalNorm()
    opt = SPNGD(
        model, lr=0.1, momentum=0.0, fisher="emp", damping=DAMPING, backend="torch", kl_clip=1e-4, curvature_interval=2
    )
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for step in range(2):  # step 0 refreshes without the BN; step 1 uses the BN, no refresh
        model.use_bn = step == 1
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    assert not opt.factors()["bn"]  # no estimate yet
    inv = opt.inverses()
    updates = {}
    for name in ("fc1", "fc2"):
        mat = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], dim=1)
        u = inv[name][1] @ mat @ inv[name][0]
        updates[f"{name}.weight"], updates[f"{name}.bias"] = u[:, :-1], u[:, -1]
    updates["bn.weight"], updates["bn.bias"] = grads["bn.weight"], grads["bn.bias"]
    total = sum(0.1**2 * float((updates[n] * grads[n]).sum()) for n in updates)
    nu = min(1.0, math.sqrt(1e-4 / total))
    assert nu < 0.9, nu
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), 0.1 * nu * updates[n], rtol=1e-8, atol=1e-12, msg=n)
