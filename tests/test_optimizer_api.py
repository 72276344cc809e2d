"""The public API of SPNGD: argument validation, param_groups and LR schedulers, zero_grad,
unsupported layers (plain momentum SGD), refresh counters, the fisher='mc'/'emp' backward
contract, KL clipping and the torch-SGD update convention (docs/design.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from expected_updates import SgdConvention, kl_clip_nu, natural_update
from steps import train_step
from torch import nn

from spngd_ext import SPNGD

pytestmark = pytest.mark.usefixtures("float64_default")


def mlp_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


def batch(kind: str = "mlp", n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) if kind == "mlp" else torch.randn(n, 1, 6, 6, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def clone_model(factory, source: nn.Module) -> nn.Module:
    """A fresh instance with the same weights/buffers (never deepcopy: it would copy the hooks)."""
    fresh = factory()
    fresh.load_state_dict(source.state_dict())
    return fresh


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ============================================================================ validation
@pytest.mark.parametrize(
    "name,value",
    [
        ("lr", -0.1),
        ("lr", float("nan")),
        ("momentum", -0.1),
        ("momentum", 1.0),
        ("momentum", 1.5),
        ("weight_decay", -1e-4),
        ("damping", 0.0),
        ("damping", -1e-3),
        ("fisher", "exact"),
        ("fisher", "EMPIRICAL"),
        ("mc_samples", 0),
        ("mc_samples", -2),
        ("curvature_interval", 0),
        ("inverse_interval", 0),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("ema_decay", 1.5),
        ("kl_clip", 0.0),
        ("kl_clip", -1.0),
        ("backend", "gpu"),
        ("backend", "numpy"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        SPNGD(mlp_bn(), **{name: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.0),
        dict(momentum=0.0),
        dict(momentum=0.99),
        dict(weight_decay=0.0),
        dict(damping=1e-12),
        dict(fisher="emp"),
        dict(fisher="mc", mc_samples=3),
        dict(ema_decay=0.0),
        dict(ema_decay=0.95),
        dict(kl_clip=1e-3),
        dict(backend="torch"),
        dict(backend="auto"),
        dict(curvature_interval=3, inverse_interval=3),
        dict(damping=lambda step: 1e-3 / (1 + step)),
    ],
)
def test_valid_boundary_arguments_are_accepted(kwargs):
    """Two steps with each boundary value, each checked against the update computed by hand from
    opt.inverses()/opt.factors() and the gradients (float64), under the torch-SGD convention:
    lr=0 leaves the weights bit-identical; momentum, weight decay, damping (schedules evaluated at
    the 0-based step), the Fisher type, EMA and intervals only change what the hand computation
    reads from the optimizer; kl_clip scales the step by ν computed here."""
    model = mlp_bn()
    opt = SPNGD(model, **kwargs)
    group = opt.param_groups[0]
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    damping = kwargs.get("damping", 1e-3)
    kl = kwargs.get("kl_clip")
    expected = SgdConvention(model)
    initial = params_of(model)
    for step in range(2):
        x, y = batch(seed=1 + step)
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        lam = damping(step) if callable(damping) else damping
        updates = natural_update(model, opt, grads, lam)
        nu = kl_clip_nu(updates, grads, lr, kl)
        theta = expected.advance(updates, lr, momentum, wd, nu)
        if lr == 0.0:
            for n, p in model.named_parameters():
                assert torch.equal(p.detach(), initial[n]), f"lr=0 moved {n}"
            continue
        if kl is not None:
            assert nu < 1.0, "kl_clip chosen small enough to clip"
            if step > 0:  # with momentum, ν scales the first step's v = d exactly; later steps are not checked here
                break
        # λ = 1e-12 leaves A + λI and G + λI of this 16-example batch with condition numbers near
        # 1e12, so the optimizer's and this test's float64 products of the same inverses round
        # apart by up to κ·ε in the worst case (measured: 1.2e-9 relative on the pure-torch path);
        # 1e-6 still catches any wrong damping, momentum or decay, which change the update by O(1).
        rtol = 1e-6 if lam < 1e-9 else 1e-9
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), theta[n], rtol=rtol, atol=1e-12, msg=lambda m, n=n, s=step: f"{kwargs} step {s} {n}: {m}"
            )


@pytest.mark.parametrize("not_a_module", [[nn.Parameter(torch.zeros(3))], None, "model", (nn.Linear(2, 2),)])
def test_non_module_model_raises_type_error(not_a_module):
    with pytest.raises(TypeError, match="model"):
        SPNGD(not_a_module)


# ============================================================================ param_groups / scheduler
def test_param_groups_cover_every_parameter_once_with_the_hyperparameters():
    model = mlp_bn()
    opt = SPNGD(model, lr=0.3, momentum=0.7, weight_decay=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) >= 1
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    for g in opt.param_groups:
        assert g["lr"] == 0.3 and g["momentum"] == 0.7 and g["weight_decay"] == 1e-3


def _probe_update(factory, model, x, y, damping) -> dict[str, torch.Tensor]:
    """U at the current weights: one step of a fresh SPNGD (lr=1, momentum=0) on a copy.

    With ema_decay=None, intervals 1 and momentum 0 the update of a step depends only on the
    weights and the batch, so the probe gives exactly the U the scheduled optimizer applies.
    """
    probe = clone_model(factory, model)
    opt = SPNGD(probe, lr=1.0, momentum=0.0, fisher="emp", damping=damping, backend="torch")
    before = params_of(probe)
    train_step(probe, opt, x, y)
    return {n: before[n] - p.detach() for n, p in probe.named_parameters()}


@pytest.mark.parametrize("sched", ["step", "lambda"])
def test_lr_scheduler_scales_the_actual_parameter_change(sched):
    model = mlp_bn()
    opt = SPNGD(model, lr=0.2, momentum=0.0, fisher="emp", damping=1e-2, backend="torch")
    if sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        expected_lrs = [0.2, 0.1, 0.05, 0.025]
    else:
        factors = [1.0, 0.3, 2.0, 0.1, 0.1]
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factors[s])
        expected_lrs = [0.2 * f for f in factors[:4]]
    x, y = batch()
    for k, lr in enumerate(expected_lrs):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        U = _probe_update(mlp_bn, model, x, y, 1e-2)
        before = params_of(model)
        train_step(model, opt, x, y)
        for n, p in model.named_parameters():
            delta = before[n] - p.detach()
            torch.testing.assert_close(
                delta, lr * U[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n, k=k: f"step {k} {n}: {m}"
            )
        scheduler.step()


def test_per_group_learning_rates_apply_to_their_parameters():
    model = mlp_bn()
    opt = SPNGD(model, lr=0.1, momentum=0.0, fisher="emp", damping=1e-2, backend="torch")
    x, y = batch()
    U = _probe_update(mlp_bn, model, x, y, 1e-2)
    for g in opt.param_groups:
        g["lr"] = 0.05
    before = params_of(model)
    train_step(model, opt, x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), 0.05 * U[n], rtol=1e-9, atol=1e-12)


# ============================================================================ zero_grad
def test_zero_grad_clears_all_gradients():
    model = small_cnn()
    opt = SPNGD(model, fisher="emp")
    x, y = batch("cnn")
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ============================================================================ unsupported layers
class PlainLookup(nn.Module):
    """A lookup table as a bare parameter: no curvature type covers it (nn.Embedding has one)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim))

    def forward(self, idx):
        return F.embedding(idx, self.weight)


class EmbedClassifier(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = PlainLookup(12, 4)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, tokens):
        return self.head(self.emb(tokens).flatten(1))


@pytest.mark.parametrize("lr,momentum,wd", [(0.1, 0.9, 0.0), (0.05, 0.5, 1e-2), (0.2, 0.0, 0.0), (0.2, 0.0, 1e-3)])
def test_embedding_params_get_exactly_torch_sgd_updates(lr, momentum, wd):
    """The lookup table (no curvature) follows torch.optim.SGD bit for bit, while the Linear head gets
    the preconditioned update Ĝ⁻¹[∇W | ∇b]Â⁻¹ built here in float64 from opt.inverses() and the
    head's gradient, through the same momentum/weight-decay convention."""
    lam = 1e-2
    g = torch.Generator().manual_seed(5)
    ours = EmbedClassifier()
    ref = clone_model(EmbedClassifier, ours)
    opt = SPNGD(ours, lr=lr, momentum=momentum, weight_decay=wd, fisher="emp", damping=lam)
    assert [layer.name for layer in opt.layers] == ["head"], "only the Linear has curvature"
    sgd = torch.optim.SGD([ref.emb.weight], lr=lr, momentum=momentum, weight_decay=wd)
    expected = SgdConvention(ours)
    for step in range(3):
        tokens = torch.randint(0, 12, (10, 3), generator=g)
        y = torch.randint(0, 3, (10,), generator=g)
        with torch.no_grad():  # the reference sees the same head, so the embedding grads agree
            ref.head.weight.copy_(ours.head.weight)
            ref.head.bias.copy_(ours.head.bias)
        opt.zero_grad()
        out = ours(tokens)
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.detach().clone() for n, p in ours.named_parameters()}
        opt.step()
        sgd.zero_grad()
        F.cross_entropy(ref(tokens), y).backward()
        sgd.step()
        assert torch.equal(ours.emb.weight, ref.emb.weight), (ours.emb.weight - ref.emb.weight).abs().max()
        a_inv, g_inv = opt.inverses()["head"]
        grad_mat = torch.cat([grads["head.weight"], grads["head.bias"][:, None]], dim=1)
        u_head = g_inv.double() @ grad_mat.double() @ a_inv.double()
        updates = dict(grads, **{"head.weight": u_head[:, :-1], "head.bias": u_head[:, -1]})
        theta = expected.advance(updates, lr, momentum, wd)
        for n in ("head.weight", "head.bias"):
            torch.testing.assert_close(
                dict(ours.named_parameters())[n].detach(),
                theta[n],
                rtol=1e-9,
                atol=1e-12,
                msg=lambda m, n=n, s=step: f"step {s} {n}: {m}",
            )
        # the preconditioning is not a no-op here: the head's update is not the plain gradient step
        assert not torch.allclose(u_head, grad_mat, rtol=1e-2), (
            "Ĝ⁻¹∇Â⁻¹ ≈ ∇: the check would not see a missing preconditioner"
        )


class NoSupportedLayers(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.zeros(3))
        self.emb = PlainLookup(5, 3)

    def forward(self, x, idx):
        return torch.tanh(x @ self.w) + self.b + self.emb(idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fisher", ["mc", "emp"])
def test_model_without_supported_layers_warns_and_is_plain_sgd(dtype, fisher):
    ours = NoSupportedLayers().to(dtype)
    ref = NoSupportedLayers().to(dtype)
    ref.load_state_dict(ours.state_dict())
    with pytest.warns(UserWarning, match="no supported layer"):
        opt = SPNGD(ours, lr=0.1, momentum=0.9, weight_decay=1e-3, fisher=fisher)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(8, 4, generator=g).to(dtype)
        idx = torch.randint(0, 5, (8,), generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        out = ours(x, idx)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
        sgd.zero_grad()
        F.cross_entropy(ref(x, idx), y).backward()
        sgd.step()
        for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"{n} ({dtype}): max diff {(p - q).abs().max().item():.3e}"


# ============================================================================ intervals / counters
@pytest.mark.parametrize("k,m", [(1, 1), (2, 1), (1, 3), (3, 3), (3, 6), (2, 4), (4, 8), (5, 5)])
def test_refresh_counters_follow_the_intervals(k, m):
    model = mlp_bn()
    opt = SPNGD(model, lr=0.05, fisher="mc", mc_samples=2, curvature_interval=k, inverse_interval=m, seed=0)
    x, y = batch()
    factor_steps, inverse_steps = [], []
    prev_f = prev_inv = None
    for step in range(12):
        before = opt.counters
        train_step(model, opt, x + 0.01 * step, y)  # a new batch each step: stale factors are visible
        after = opt.counters
        f = {n: {k2: v.clone() for k2, v in d.items()} for n, d in opt.factors().items()}
        inv = {n: tuple(t.clone() for t in pair) for n, pair in opt.inverses().items()}
        refreshed = after["factor_updates"] - before["factor_updates"]
        inverted = after["inverse_updates"] - before["inverse_updates"]
        assert refreshed in (0, 1) and inverted in (0, 1)
        if refreshed:
            factor_steps.append(step)
        if inverted:
            inverse_steps.append(step)
        if prev_f is not None:
            same_f = all(torch.equal(f[n][s], prev_f[n][s]) for n in f for s in f[n])
            assert same_f == (not refreshed), f"step {step}: factors changed={not same_f}, refresh counted={refreshed}"
            same_inv = all(torch.equal(a, b) for n in inv for a, b in zip(inv[n], prev_inv[n]))
            if not inverted:
                assert same_inv, f"step {step}: inverses changed without an inverse update"
            elif refreshed:
                assert not same_inv, f"step {step}: inverse update counted but inverses unchanged"
        prev_f, prev_inv = f, inv
    assert factor_steps == list(range(0, 12, k))
    assert inverse_steps == list(range(0, 12, m))
    c = opt.counters
    assert c["steps"] == 12
    assert c["factor_updates"] == math.ceil(12 / k)
    assert c["inverse_updates"] == math.ceil(12 / m)
    assert c["mc_backwards"] == 2 * math.ceil(12 / k)


def test_inverse_interval_not_multiple_of_curvature_interval_is_rejected():
    with pytest.raises(ValueError, match="inverse_interval"):
        SPNGD(mlp_bn(), curvature_interval=2, inverse_interval=3)


# ============================================================================ backward contract
def test_mc_with_plain_backward_raises_a_clear_error():
    model = mlp_bn()
    opt = SPNGD(model, fisher="mc")
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"opt\.backward\(loss, out\)"):
        opt.step()


def test_mc_opt_backward_without_output_raises():
    model = mlp_bn()
    opt = SPNGD(model, fisher="mc")
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="out"):
        opt.backward(loss)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_emp_plain_backward_equals_opt_backward(kind):
    factory = mlp_bn if kind == "mlp" else small_cnn
    a = factory()
    b = clone_model(factory, a)
    oa = SPNGD(a, lr=0.1, momentum=0.9, weight_decay=1e-3, fisher="emp", damping=1e-2, backend="torch")
    ob = SPNGD(b, lr=0.1, momentum=0.9, weight_decay=1e-3, fisher="emp", damping=1e-2, backend="torch")
    for step in range(3):
        x, y = batch(kind, seed=10 + step)
        train_step(a, oa, x, y, use_opt_backward=True)
        train_step(b, ob, x, y, use_opt_backward=False)
        fa, fb = oa.factors(), ob.factors()
        for n in fa:
            for s in fa[n]:
                assert torch.equal(fa[n][s], fb[n][s]), f"step {step} {n}.{s}"
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"step {step} {n}"


class UnbatchedConvNet(nn.Module):
    """A Conv2d fed one unbatched (C, H, W) image: a single example, C_in = 3 input planes."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten())[None]


def test_emp_plain_backward_equals_opt_backward_for_unbatched_conv_input():
    a = UnbatchedConvNet()
    b = clone_model(UnbatchedConvNet, a)
    oa = SPNGD(a, lr=0.1, momentum=0.0, fisher="emp", damping=1e-2, backend="torch")
    ob = SPNGD(b, lr=0.1, momentum=0.0, fisher="emp", damping=1e-2, backend="torch")
    x, y = torch.randn(3, 5, 5), torch.tensor([1])
    train_step(a, oa, x, y, use_opt_backward=True)
    train_step(b, ob, x, y, use_opt_backward=False)
    fa, fb = oa.factors(), ob.factors()
    for n in fa:
        for s in fa[n]:
            torch.testing.assert_close(
                fb[n][s], fa[n][s], rtol=1e-12, atol=1e-14, msg=lambda m, n=n, s=s: f"{n}.{s}: {m}"
            )


# ============================================================================ KL clip
def test_kl_clip_scales_the_update_by_nu():
    """ν = min(1, sqrt(kl_clip / Σ lr²⟨U, ∇⟩)) with U and the sum computed here in float64 from the
    clipped optimizer's inverses/factors and the gradients; the step must be θ − lr·ν·U."""
    lr, kl, lam = 0.1, 1e-6, 1e-2
    x, y = batch()
    model = mlp_bn()
    clip = SPNGD(model, lr=lr, momentum=0.0, fisher="emp", damping=lam, backend="torch", kl_clip=kl)
    before = params_of(model)
    clip.zero_grad()
    out = model(x)
    clip.backward(F.cross_entropy(out, y), out)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    clip.step()
    updates = natural_update(model, clip, grads, lam)
    quad = sum(float((updates[n] * grads[n]).sum()) for n in grads)  # Σ ⟨U, ∇⟩
    assert quad > 0
    nu = min(1.0, math.sqrt(kl / (lr**2 * quad)))
    assert nu < 0.5, "kl_clip chosen tiny enough to clip"
    for n, p in model.named_parameters():
        torch.testing.assert_close(
            before[n] - p.detach(), lr * nu * updates[n], rtol=1e-9, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}"
        )


def test_large_kl_clip_changes_nothing():
    x, y = batch()
    a = mlp_bn()
    b = clone_model(mlp_bn, a)
    oa = SPNGD(a, lr=0.1, momentum=0.0, fisher="emp", backend="torch")
    ob = SPNGD(b, lr=0.1, momentum=0.0, fisher="emp", backend="torch", kl_clip=1e6)
    train_step(a, oa, x, y)
    train_step(b, ob, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


# ============================================================================ update convention
def test_inverses_are_the_pi_damped_factor_inverses():
    lam = 1e-2
    model = mlp_bn()
    opt = SPNGD(model, lr=0.1, fisher="emp", damping=lam, backend="torch")
    x, y = batch()
    train_step(model, opt, x, y)
    for name, (a_inv, g_inv) in opt.inverses().items():
        A, G = opt.factors()[name]["A"], opt.factors()[name]["G"]
        pi = math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))
        torch.testing.assert_close(
            a_inv, torch.linalg.inv(A + pi * math.sqrt(lam) * torch.eye(A.shape[0])), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(
            g_inv, torch.linalg.inv(G + math.sqrt(lam) / pi * torch.eye(G.shape[0])), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("momentum,wd", [(0.9, 0.0), (0.0, 1e-2), (0.9, 5e-2)])
def test_weight_decay_and_momentum_follow_torch_sgd_convention(momentum, wd):
    """d = U + wd·θ; v ← m·v + d (v = d at the first step); θ ← θ − lr·v, over 3 steps."""
    lr, lam = 0.1, 1e-2
    model = mlp_bn()
    opt = SPNGD(model, lr=lr, momentum=momentum, weight_decay=wd, fisher="emp", damping=lam, backend="torch")
    theta = params_of(model)
    v = {}
    for step in range(3):
        x, y = batch(seed=20 + step)
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        U = natural_update(model, opt, grads, lam)
        assert set(U) == set(theta)
        for n in theta:
            d = U[n] + wd * theta[n]
            v[n] = d if step == 0 else momentum * v[n] + d
            theta[n] = theta[n] - lr * v[n]
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), theta[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n, s=step: f"step {s} {n}: {m}"
            )
