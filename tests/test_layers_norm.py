"""LayerNorm and GroupNorm unit-wise Fisher and update against per-sample parameter gradients.

Float64, pure-PyTorch backend. A normalisation layer mixes nothing across examples, so for
GroupNorm and a channels-first LayerNorm (samples are examples) the gradient of (γ_c, β_c) from a
one-example backward is exactly the unit vector u_{n,c} = [Σ_p g·x̂, Σ_p g]. A channels-last
LayerNorm counts every row of its leading dimensions as a sample (as a Linear does): its reference
u_{r,c} is the gradient through row r's own copy of (γ, β). The reference Fisher is (1/R) Σ_r u uᵀ
from those gradients, which checks the layer's x̂, its grouping of positions into units, and the
solve. Per-token losses under both Fisher types: tests/test_fisher_sequence.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn
from torchvision.models.convnext import LayerNorm2d

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def _per_example_unit_grads(model: nn.Module, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, C, 2) per-example [∇γ_c, ∇β_c] of the loss on each example alone."""
    rows = []
    for n in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        rows.append(torch.stack([norm.weight.grad.reshape(-1), norm.bias.grad.reshape(-1)], dim=1))
    model.zero_grad()
    return torch.stack(rows)


def _per_row_unit_grads(model: nn.Sequential, norm: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R, C, 2): per row (one position of the leading dimensions of one example) the gradient of
    that example's loss through that row's use of (γ, β), from a forward with one copy of γ and β
    per row (the copies' gradients sum to ∇γ, ∇β)."""
    shape, units = tuple(norm.normalized_shape), norm.weight.numel()
    rows = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1]
        full = xn.shape
        w = norm.weight.detach().expand(full).clone().requires_grad_()
        b = norm.bias.detach().expand(full).clone().requires_grad_()
        out = F.layer_norm(xn, shape, None, None, norm.eps) * w + b
        gw, gb = torch.autograd.grad(F.cross_entropy(model[1:](out), y[n : n + 1]), (w, b))
        rows.append(torch.stack([gw.reshape(-1, units), gb.reshape(-1, units)], dim=-1))
    return torch.cat(rows)


def _check(model: nn.Module, norm: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, per_row=False) -> None:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    u = _per_row_unit_grads(model, norm, x, y) if per_row else _per_example_unit_grads(model, norm, x, y)
    fisher = torch.einsum("nci,ncj->cij", u, u) / u.shape[0]
    opt, grads, deltas = one_step_update(model, x, y, damping=lam)
    est = opt.factors()["0"]["F"]
    expected = torch.stack([fisher[:, 0, 0], fisher[:, 0, 1], fisher[:, 1, 1]], dim=1)
    torch.testing.assert_close(est, expected, rtol=1e-10, atol=1e-12)
    rhs = torch.stack([grads["0.weight"].reshape(-1), grads["0.bias"].reshape(-1)], dim=1)
    update = torch.linalg.solve(fisher + lam * torch.eye(2), rhs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(deltas["0.weight"].reshape(-1), update[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(deltas["0.bias"].reshape(-1), update[:, 1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(5, 3, 4), (5, 4), (5, 2, 3, 4)])
def test_layernorm_unitwise_fisher_and_update(shape):
    """Units are the normalised elements; every row of the leading dimensions is a sample."""
    torch.manual_seed(0)
    normalized = shape[-1:] if len(shape) < 4 else shape[-2:]
    norm = nn.LayerNorm(normalized)
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    model(x)
    _check(model, norm, x, y, lam=1e-3, per_row=True)


def test_channels_first_layernorm_of_convnext():
    """torchvision's LayerNorm2d normalises over channels of an (N, C, H, W) input."""
    torch.manual_seed(1)
    norm = LayerNorm2d(3)
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4))
    x, y = torch.randn(6, 3, 2, 3), torch.randint(0, 4, (6,))
    _check(model, norm, x, y, lam=1e-2)


@pytest.mark.parametrize("groups,shape", [(2, (6, 4, 3, 3)), (4, (6, 4, 5)), (1, (6, 4, 2, 2))])
def test_groupnorm_unitwise_fisher_and_update(groups, shape):
    torch.manual_seed(2)
    norm = nn.GroupNorm(groups, shape[1])
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    model(x)
    _check(model, norm, x, y, lam=1e-3)


def test_layernorm_without_bias_solves_the_gamma_block():
    torch.manual_seed(3)
    norm = nn.LayerNorm(4, bias=False)
    model = nn.Sequential(norm, nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    grads = []
    for n in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        grads.append(norm.weight.grad.clone())
    f_gg = (torch.stack(grads) ** 2).mean(0)
    opt, g, deltas = one_step_update(model, x, y, damping=1e-3)
    torch.testing.assert_close(opt.factors()["0"]["F"][:, 0], f_gg, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(deltas["0.weight"], g["0.weight"] / (f_gg + 1e-3), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("norm", [nn.LayerNorm(4, elementwise_affine=False), nn.GroupNorm(2, 4, affine=False)])
def test_normalisation_without_affine_warns_naming_it(norm):
    from spngd_ext import SPNGD

    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"SPNGD: 1 .*without affine"):
        opt = SPNGD(model, lr=0.1, backend="torch")
    assert [layer.name for layer in opt.layers] == ["0", "2"]
