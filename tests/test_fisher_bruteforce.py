"""The optimizer's factors and updates against a brute-force Fisher built from per-example gradients.

All in float64 on tiny models, with the pure-PyTorch backend, so any disagreement is a bug in the
math, not rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn

from spngd_ext import SPNGD

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def _per_example_output_grads(model, layer, x, y):
    """g_n = ∂ℓ_n/∂s_n for one layer (per example, by separate backward passes) and its inputs."""
    grads, inputs = [], []
    for n in range(x.shape[0]):
        store = {}

        def fwd(mod, inp, out):
            store["a"] = inp[0].detach().clone()
            out.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

        h = layer.register_forward_hook(fwd)
        out = model(x[n : n + 1])
        F.cross_entropy(out, y[n : n + 1]).backward()
        h.remove()
        model.zero_grad()
        grads.append(store["g"][0])
        inputs.append(store["a"][0])
    return grads, inputs


def _damped_update(A, G, grad, lam):
    """U = Ĝ⁻¹ ∇ Â⁻¹ computed through the explicit Kronecker product (brute force)."""
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0])
    Gd = G + math.sqrt(lam) / pi * torch.eye(G.shape[0])
    big = torch.kron(Gd, Ad)  # row-major vec: vec(X)[o*d_in+i]
    return torch.linalg.solve(big, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_and_update_match_bruteforce(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    lam = 1e-2
    g_list, a_list = _per_example_output_grads(model, model[0], x, y)
    opt, grads, deltas = one_step_update(model, x, y, damping=lam)
    a = torch.stack([torch.cat([v, torch.ones(1)]) if bias else v for v in a_list])
    g = torch.stack(g_list)
    A_ref = a.T @ a / 7
    G_ref = g.T @ g / 7
    est = opt.factors()["0"]
    torch.testing.assert_close(est["A"], A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est["G"], G_ref, rtol=1e-10, atol=1e-12)
    grad = grads["0.weight"]
    if bias:
        grad = torch.cat([grad, grads["0.bias"][:, None]], dim=1)
    U = _damped_update(A_ref, G_ref, grad, lam)
    got = deltas["0.weight"]
    if bias:
        got = torch.cat([got, deltas["0.bias"][:, None]], dim=1)
    torch.testing.assert_close(got, U, rtol=1e-8, atol=1e-10)


def test_one_example_fisher_block_is_kronecker_product():
    """With one example, the exact Fisher block of [W|b] equals G ⊗ A (row-major vectorisation)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(1, 4), torch.randint(0, 2, (1,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    per_ex = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1).reshape(-1)
    fisher_block = torch.outer(per_ex, per_ex)
    opt, _, _ = one_step_update(model, x, y)
    est = opt.factors()["0"]
    torch.testing.assert_close(torch.kron(est["G"], est["A"]), fisher_block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=2, stride=2),
        dict(kernel_size=3, dilation=2, padding=2, bias=False),
    ],
)
def test_conv_factors_follow_kfc_convention(conv_kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, **conv_kw)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 4, (5,))
    model(x)  # materialise the lazy layer
    g_list, a_list = _per_example_output_grads(model, conv, x, y)
    opt, _, _ = one_step_update(model, x, y)
    k = conv.kernel_size
    A_ref = torch.zeros(2 * k[0] * k[1] + int(conv.bias is not None), 2 * k[0] * k[1] + int(conv.bias is not None))
    G_ref = torch.zeros(3, 3)
    T = g_list[0].shape[1] * g_list[0].shape[2]
    for a_in, g_out in zip(a_list, g_list):
        patches = F.unfold(a_in[None], k, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)[0].T
        if conv.bias is not None:
            patches = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
        A_ref += patches.T @ patches
        gt = g_out.reshape(3, -1).T
        G_ref += gt.T @ gt
    A_ref /= 5
    G_ref /= 5 * T
    est = opt.factors()["0"]
    torch.testing.assert_close(est["A"], A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est["G"], G_ref, rtol=1e-10, atol=1e-12)


def test_conv_with_one_output_position_fisher_is_kronecker():
    """A conv whose output is 1×1 is a linear layer on the patch: its one-example Fisher is G ⊗ A."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel_size=3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(1, 2, 3, 3), torch.randint(0, 2, (1,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    per_ex = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad[:, None]], dim=1).reshape(-1)
    opt, grads, deltas = one_step_update(model, x, y, damping=1e-1)
    est = opt.factors()["0"]
    torch.testing.assert_close(torch.kron(est["G"], est["A"]), torch.outer(per_ex, per_ex), rtol=1e-9, atol=1e-12)
    grad = torch.cat([grads["0.weight"].reshape(3, -1), grads["0.bias"][:, None]], dim=1)
    U = _damped_update(est["A"], est["G"], grad, 1e-1)
    got = torch.cat([deltas["0.weight"].reshape(3, -1), deltas["0.bias"][:, None]], dim=1)
    torch.testing.assert_close(got, U, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bn_cls,shape", [(nn.BatchNorm2d, (6, 3, 4, 4)), (nn.BatchNorm1d, (6, 3))])
def test_batchnorm_unitwise_fisher_and_update(bn_cls, shape):
    torch.manual_seed(4)
    bn = bn_cls(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    head = nn.Linear(3 * (shape[2] * shape[3] if len(shape) == 4 else 1), 4)
    model = nn.Sequential(bn, nn.Flatten(), head)
    x, y = torch.randn(*shape), torch.randint(0, 4, (shape[0],))
    lam = 1e-3
    # Per-example output grads need the batch statistics of the whole batch: take them from one
    # batch forward (g_n = N ∂loss/∂y_n), which is what the unit-wise Fisher is defined with.
    store = {}

    def fwd(mod, inp, out):
        store["x"] = inp[0].detach().clone()
        out.register_hook(lambda g: store.__setitem__("g", g.detach().clone()))

    h = bn.register_forward_hook(fwd)
    F.cross_entropy(model(x), y).backward()
    h.remove()
    model.zero_grad()
    xs = store["x"]
    dims = [0] + list(range(2, xs.dim()))
    view = [1, -1] + [1] * (xs.dim() - 2)
    xhat = (xs - xs.mean(dims).view(view)) / torch.sqrt(xs.var(dims, unbiased=False).view(view) + bn.eps)
    g = store["g"] * shape[0]
    ug = (g * xhat).reshape(shape[0], 3, -1).sum(-1)
    ub = g.reshape(shape[0], 3, -1).sum(-1)
    Fc = torch.stack(
        [
            torch.stack([(ug * ug).mean(0), (ug * ub).mean(0)], -1),
            torch.stack([(ug * ub).mean(0), (ub * ub).mean(0)], -1),
        ],
        -2,
    )

    opt, grads, deltas = one_step_update(model, x, y, damping=lam)
    est = opt.factors()["0"]["F"]
    torch.testing.assert_close(est, torch.stack([Fc[:, 0, 0], Fc[:, 0, 1], Fc[:, 1, 1]], dim=1), rtol=1e-10, atol=1e-12)
    rhs = torch.stack([grads["0.weight"], grads["0.bias"]], dim=1)
    U = torch.linalg.solve(Fc + lam * torch.eye(2), rhs.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(deltas["0.weight"], U[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(deltas["0.bias"], U[:, 1], rtol=1e-8, atol=1e-10)


def test_mc_fisher_is_unbiased():
    """Averaged over many draws, MC factors converge to the exact Fisher (classes weighted by softmax)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(4, 3)
    # exact G of the last layer: (1/N) Σ_n Σ_c p_nc (p_n − e_c)(p_n − e_c)ᵀ
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    G_exact = torch.zeros(3, 3)
    for n in range(4):
        for c in range(3):
            d = p[n] - F.one_hot(torch.tensor(c), 3).double()
            G_exact += p[n, c] * torch.outer(d, d)
    G_exact /= 4
    opt = SPNGD(model, lr=0.0, momentum=0.0, fisher="mc", mc_samples=4000, backend="torch", seed=123)
    out = model(x)
    opt.backward(F.cross_entropy(out, torch.zeros(4, dtype=torch.long)), out)
    opt.step()
    G_mc = opt.factors()["2"]["G"]
    err = (G_mc - G_exact).norm() / G_exact.norm()
    assert err < 0.05, f"MC Fisher off by {err:.3f} relative"
    # and it is not the empirical Fisher of a fixed label
    emp = SPNGD(model, lr=0.0, momentum=0.0, fisher="emp", backend="torch")
    out = model(x)
    emp.backward(F.cross_entropy(out, torch.zeros(4, dtype=torch.long)), out)
    emp.step()
    assert (emp.factors()["2"]["G"] - G_exact).norm() / G_exact.norm() > 0.2


def test_micro_batches_accumulate_to_the_whole_batch():
    torch.manual_seed(6)

    def make():
        torch.manual_seed(7)
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))

    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 5, (16,))
    whole, parts = make(), make()
    o1 = SPNGD(whole, lr=0.5, momentum=0.9, fisher="emp", backend="torch", damping=1e-2)
    o2 = SPNGD(parts, lr=0.5, momentum=0.9, fisher="emp", backend="torch", damping=1e-2)
    # BatchNorm uses batch statistics, so freeze them (eval mode) to make micro-batches equivalent.
    whole[1].eval()
    parts[1].eval()
    for _ in range(2):
        o1.zero_grad()
        out = whole(x)
        o1.backward(F.cross_entropy(out, y), out)
        o1.step()
        o2.zero_grad()
        for k in range(4):
            xs, ys = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
            out = parts(xs)
            o2.backward(F.cross_entropy(out, ys) / 4, out)
        o2.step()
    f1, f2 = o1.factors(), o2.factors()
    for name in f1:
        for key in f1[name]:
            torch.testing.assert_close(f1[name][key], f2[name][key], rtol=1e-9, atol=1e-12)
    for p1, p2 in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-9, atol=1e-12)


def test_ema_is_bias_corrected():
    torch.manual_seed(8)
    model = nn.Linear(3, 2)
    b = 0.9
    opt = SPNGD(model, lr=0.0, momentum=0.0, fisher="emp", ema_decay=b, backend="torch")
    xs = [torch.randn(5, 3) for _ in range(3)]
    A_raw = []
    for x in xs:
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, torch.zeros(5, dtype=torch.long)), out)
        opt.step()
        a = torch.cat([x, torch.ones(5, 1)], dim=1)
        A_raw.append(a.T @ a / 5)
    S = torch.zeros(4, 4)
    for X in A_raw:
        S = b * S + (1 - b) * X
    torch.testing.assert_close(
        opt.factors()[""]["A"] if "" in opt.factors() else opt.factors()["<root>"]["A"], S / (1 - b**3)
    )
