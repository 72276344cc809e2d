"""Grouped and depthwise Conv2d and Conv1d: per-group Kronecker factors (KFC convention per group)
and the block-diagonal update, against brute force from per-example output gradients in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def _per_example(model: nn.Module, conv: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per example: the conv's input and the output gradient of the loss on that example alone."""
    inputs, grads = [], []
    for n in range(x.shape[0]):
        store = {}

        def hook(mod, inp, out):
            store["a"] = inp[0].detach().clone()
            out.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

        h = conv.register_forward_hook(hook)
        F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]).backward()
        h.remove()
        model.zero_grad()
        inputs.append(store["a"][0])
        grads.append(store["g"][0])
    return inputs, grads


def _reference_factors(conv: nn.Module, inputs, grads):
    """Per group (A_k, G_k) from explicit patches; Conv1d as the height-1 Conv2d."""
    one_d = isinstance(conv, nn.Conv1d)
    k2 = (1, conv.kernel_size[0]) if one_d else conv.kernel_size
    st = (1, conv.stride[0]) if one_d else conv.stride
    dil = (1, conv.dilation[0]) if one_d else conv.dilation
    pad = (0, conv.padding[0]) if one_d else conv.padding
    groups, cin_g, cout_g = conv.groups, conv.in_channels // conv.groups, conv.out_channels // conv.groups
    bias = conv.bias is not None
    n = len(inputs)
    a_refs, g_refs = [], []
    for k in range(groups):
        a_sum, g_sum, rows = 0.0, 0.0, 0
        for a_in, g_out in zip(inputs, grads):
            a4 = a_in[k * cin_g : (k + 1) * cin_g][None]
            a4 = a4.unsqueeze(2) if one_d else a4
            patches = F.unfold(a4, k2, dilation=dil, padding=pad, stride=st)[0].T
            if bias:
                patches = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
            a_sum = a_sum + patches.T @ patches
            gt = g_out[k * cout_g : (k + 1) * cout_g].reshape(cout_g, -1).T
            g_sum = g_sum + gt.T @ gt
            rows += gt.shape[0]
        a_refs.append(a_sum / n)
        g_refs.append(g_sum / rows)
    return a_refs, g_refs


def _damped_group_update(a, g, grad, lam):
    """Ĝ⁻¹ ∇ Â⁻¹ of one group through the explicit Kronecker product, π-damped."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    big = torch.kron(g + math.sqrt(lam) / pi * torch.eye(g.shape[0]), a + pi * math.sqrt(lam) * torch.eye(a.shape[0]))
    return torch.linalg.solve(big, grad.reshape(-1)).reshape(grad.shape)


CASES = [
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2), (5, 4, 5, 5)),
    (nn.Conv2d, dict(in_channels=3, out_channels=3, kernel_size=3, stride=2, groups=3, bias=False), (5, 3, 6, 6)),
    (nn.Conv2d, dict(in_channels=2, out_channels=4, kernel_size=2, dilation=2, padding=1, groups=2), (4, 2, 5, 5)),
    (nn.Conv1d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (5, 3, 7)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=2, stride=2, groups=4), (5, 4, 8)),
]


@pytest.mark.parametrize("cls,kw,shape", CASES)
def test_grouped_conv_factors_and_update_match_bruteforce(cls, kw, shape):
    torch.manual_seed(0)
    conv = cls(**kw)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    model(x)
    lam = 1e-2
    inputs, grads = _per_example(model, conv, x, y)
    a_refs, g_refs = _reference_factors(conv, inputs, grads)
    opt, param_grads, deltas = one_step_update(model, x, y, damping=lam)
    est = opt.factors()["0"]
    for k in range(conv.groups):
        torch.testing.assert_close(est[f"A{k}"], a_refs[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(est[f"G{k}"], g_refs[k], rtol=1e-10, atol=1e-12)
    cout_g = conv.out_channels // conv.groups
    for k in range(conv.groups):
        rows = slice(k * cout_g, (k + 1) * cout_g)
        grad = param_grads["0.weight"][rows].reshape(cout_g, -1)
        got = deltas["0.weight"][rows].reshape(cout_g, -1)
        if conv.bias is not None:
            grad = torch.cat([grad, param_grads["0.bias"][rows, None]], dim=1)
            got = torch.cat([got, deltas["0.bias"][rows, None]], dim=1)
        torch.testing.assert_close(got, _damped_group_update(a_refs[k], g_refs[k], grad, lam), rtol=1e-8, atol=1e-10)


def test_depthwise_one_position_fisher_block_per_group_is_kronecker():
    """Depthwise conv with a 1×1 output and one example: each channel's exact Fisher block is G_k ⊗ A_k,
    and blocks of different channels are what the factorisation drops."""
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 3, kernel_size=3, groups=3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(1, 3, 3, 3), torch.randint(0, 2, (1,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    per_ex = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1)
    opt, _, _ = one_step_update(model, x, y)
    est = opt.factors()["0"]
    for k in range(3):
        torch.testing.assert_close(
            torch.kron(est[f"G{k}"], est[f"A{k}"]), torch.outer(per_ex[k], per_ex[k]), rtol=1e-9, atol=1e-12
        )


def test_same_padding_warns_naming_the_parameters():
    from spngd_ext import SPNGD

    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding="same"), nn.Flatten(), nn.Linear(10, 2))
    with pytest.warns(UserWarning, match=r"SPNGD: 0 \(Conv1d; parameters weight, bias\).*padding='same'"):
        opt = SPNGD(model, lr=0.1, backend="torch")
    cov = {p.name: p for p in opt.coverage().parameters}
    assert cov["0.weight"].curvature == "first-order" and "padding" in cov["0.weight"].reason
    assert cov["2.weight"].curvature == "linear"
