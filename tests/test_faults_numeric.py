"""Numerical faults: no NaN reaches the weights.

* inversion failures: retried alone with damping ×10, then the last good inverse, then the
  identity (plain gradient for that side); counted in ``opt.counters`` and warned about once;
* non-finite gradients or statistics (inf in a .grad, NaN in the batch, an AMP overflow): the whole
  step is skipped and the optimizer state is left exactly as it was; bf16 autocast keeps fp32 state.

Distributed faults (a rank that raises or stalls) are covered by
``tests/test_distributed.py::test_a_failing_rank_ends_every_rank_with_an_error``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from expected_updates import SgdConvention, natural_update
from fault_helpers import (
    Net,
    all_finite,
    assert_same_state,
    data,
    forward_backward,
    skip_test_optimizer,
    snapshot,
    spngd_warnings,
    train,
)
from torch import nn

import spngd_ext.state.inverses as inverses_module
from spngd_ext import SPNGD, ops
from spngd_ext.state.inverses import invert_damped

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ============================================================================ inversion failure
class FlakyCholesky:
    """Stands in for ``ops.cholesky_inverse_damped``: the real op runs, then every matrix of size
    ``size`` is reported failed (info≠0, NaN inverse) for the next ``failures`` calls holding one.
    Records every call (matrix size, batch, damping, matrices)."""

    def __init__(self, monkeypatch, size: int, failures: int) -> None:
        self.real = ops.cholesky_inverse_damped
        self.size = size
        self.failures = failures
        self.calls: list[dict] = []
        monkeypatch.setattr(ops, "cholesky_inverse_damped", self)

    def __call__(self, mats, damping, *, backend="auto"):
        inv, info = self.real(mats, damping, backend=backend)
        damping_t = damping if isinstance(damping, torch.Tensor) else torch.full((mats.shape[0],), float(damping))
        self.calls.append(
            {
                "n": mats.shape[-1],
                "batch": mats.shape[0],
                "damping": damping_t.detach().clone(),
                "mats": mats.detach().clone(),
            }
        )
        if mats.shape[-1] == self.size and self.failures > 0:
            self.failures -= 1
            info = torch.full_like(info, 7)
            inv = torch.full_like(inv, float("nan"))  # a failed attempt's garbage must never be used
        return inv, info

    def calls_of(self, n: int) -> list[dict]:
        return [c for c in self.calls if c["n"] == n]


def _pi_shift_a(opt: SPNGD, layer: str, damping: float) -> float:
    """π·√λ for the A side of a layer, from its current factors (docs/design.md damping formula)."""
    f = opt.factors()[layer]
    a, g = f["A"].double(), f["G"].double()
    pi = math.sqrt((a.trace().item() / a.shape[0]) / (g.trace().item() / g.shape[0]))
    return pi * math.sqrt(damping)


def _inv_opt(model, **kw) -> SPNGD:
    base = dict(lr=0.1, momentum=0.0, damping=1e-2, fisher="emp", backend="torch", max_inverse_retries=3)
    base.update(kw)
    return SPNGD(model, **base)


def test_failed_inversion_is_retried_alone_with_ten_times_the_damping(monkeypatch):
    """fc2's A (7×7) fails in the batched call and on two retries; the third retry succeeds."""
    model = Net(bn=False, dtype=torch.float64)
    opt = _inv_opt(model)
    flaky = FlakyCholesky(monkeypatch, size=7, failures=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, opt, data(1, dtype=torch.float64))
    assert spngd_warnings(record) == [], "a retry that succeeds is not a fallback: no warning"

    sevens = flaky.calls_of(7)
    assert len(sevens) == 4, "one batched attempt + exactly three single-matrix retries"
    first, retries = sevens[0], sevens[1:]
    base = float(first["damping"][0])
    assert base == pytest.approx(_pi_shift_a(opt, "fc2", 1e-2), rel=1e-9)
    for k, call in enumerate(retries, start=1):
        assert call["batch"] == 1, "a failed factor is retried alone"
        assert torch.equal(call["mats"][0], first["mats"][0]), "the retry inverts the same factor"
        assert float(call["damping"][0]) == pytest.approx(base * 10.0**k, rel=1e-12), f"retry {k}: damping ×10^{k}"
    # the other factors were inverted once, in the batched call
    for n in (5, 6, 3):
        assert len(flaky.calls_of(n)) == 1, f"factor of size {n} was re-inverted"

    assert opt.counters["inversion_retries"] == 3
    assert opt.counters["inversion_fallbacks"] == 0
    a_inv = opt.inverses()["fc2"][0]
    expected = torch.linalg.inv(first["mats"][0] + base * 1000.0 * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(a_inv, expected, rtol=1e-8, atol=1e-10)
    assert all_finite(model)


def test_inversion_falls_back_to_the_last_good_inverse_and_warns_once(monkeypatch):
    model = Net(bn=False, dtype=torch.float64)
    opt = _inv_opt(model)
    batches = data(3, dtype=torch.float64)
    train(model, opt, batches[:1])  # a good inverse exists
    good_a_inv = opt.inverses()["fc2"][0].clone()

    flaky = FlakyCholesky(monkeypatch, size=7, failures=10**6)  # fc2's A never inverts again
    x, y = batches[1]
    forward_backward(model, opt, x, y)
    grad = torch.cat([model.fc2.weight.grad, model.fc2.bias.grad[:, None]], dim=1).clone()
    w_before = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], dim=1).detach().clone()
    with pytest.warns(UserWarning, match=r"fc2 \(A\).*last good inverse"):
        opt.step()
    assert len(flaky.calls_of(7)) == 1 + 3, "batched attempt + max_inverse_retries retries"
    assert opt.counters["inversion_retries"] == 3
    assert opt.counters["inversion_fallbacks"] == 1
    assert torch.equal(opt.inverses()["fc2"][0], good_a_inv), "the last good inverse is kept"
    # the update really used it: ΔW = −lr · Ĝ⁻¹ ∇ Â⁻¹_old (momentum 0)
    g_inv = opt.inverses()["fc2"][1]
    w_after = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(w_before - w_after, 0.1 * g_inv @ grad @ good_a_inv, rtol=1e-9, atol=1e-12)
    assert all_finite(model)

    # the same failure again: counted, but no second warning
    x, y = batches[2]
    forward_backward(model, opt, x, y)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step()
    assert spngd_warnings(record) == [], "the fallback warning for a layer is given once"
    assert opt.counters["inversion_fallbacks"] == 2
    assert opt.counters["inversion_retries"] == 6
    assert torch.equal(opt.inverses()["fc2"][0], good_a_inv)
    assert all_finite(model)


def test_inversion_failing_from_the_first_step_falls_back_to_the_identity(monkeypatch):
    """No good inverse yet: that side is the identity, so fc2 gets Ĝ⁻¹∇ (plain gradient on the A side)."""
    model = Net(bn=False, dtype=torch.float64)
    opt = _inv_opt(model, max_inverse_retries=2)
    FlakyCholesky(monkeypatch, size=7, failures=10**6)
    x, y = data(1, dtype=torch.float64)[0]
    forward_backward(model, opt, x, y)
    grad = torch.cat([model.fc2.weight.grad, model.fc2.bias.grad[:, None]], dim=1).clone()
    w_before = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], dim=1).detach().clone()
    with pytest.warns(UserWarning, match="fc2"):
        opt.step()
    a_inv, g_inv = opt.inverses()["fc2"]
    assert a_inv is None, "no good inverse ever: identity (None)"
    assert g_inv is not None and bool(torch.isfinite(g_inv).all())
    w_after = torch.cat([model.fc2.weight, model.fc2.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(w_before - w_after, 0.1 * g_inv @ grad, rtol=1e-9, atol=1e-12)
    assert opt.counters["inversion_retries"] == 2
    assert opt.counters["inversion_fallbacks"] == 1
    assert all_finite(model)
    # fc1 is unaffected: both of its inverses exist
    assert all(t is not None for t in opt.inverses()["fc1"])


def test_every_inversion_failing_gives_plain_momentum_sgd(monkeypatch):
    """All factors fail on every attempt: the update is exactly torch SGD's (identity both sides)."""
    model = Net(bn=False, dtype=torch.float64)
    ref = Net(bn=False, dtype=torch.float64)
    ref.load_state_dict(model.state_dict())
    opt = _inv_opt(model, momentum=0.9, weight_decay=1e-3, max_inverse_retries=1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    real = ops.cholesky_inverse_damped

    def always_fails(mats, damping, *, backend="auto"):
        inv, info = real(mats, damping, backend=backend)
        return torch.full_like(inv, float("nan")), torch.ones_like(info)

    monkeypatch.setattr(ops, "cholesky_inverse_damped", always_fails)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for x, y in data(3, dtype=torch.float64):
            forward_backward(model, opt, x, y)
            opt.step()
            sgd.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            sgd.step()
    msgs = spngd_warnings(record)
    assert len(msgs) == 4, f"one warning per failing (layer, side), given once each: {msgs}"
    assert opt.counters["inversion_fallbacks"] == 4 * 3 and opt.counters["inversion_retries"] == 4 * 3
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")


def test_a_really_non_pd_damped_factor_never_reaches_the_weights(monkeypatch):
    """No fake flags: the A-side shift is made negative (a non-PD damped factor), the real Cholesky
    fails on every retry (×10 keeps it negative), and the update falls back without any NaN."""
    real_pi = inverses_module.pi_damping

    def negative_a_shift(*args):
        shift_a, shift_g = real_pi(*args)
        return -1e3 * shift_a, shift_g

    model = Net(bn=True)
    opt = SPNGD(model, lr=0.05, fisher="mc", seed=0, backend="torch", max_inverse_retries=2)
    monkeypatch.setattr(inverses_module, "pi_damping", negative_a_shift)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, opt, data(3))
    msgs = spngd_warnings(record)
    assert len(msgs) == 2 and any("fc1 (A)" in m for m in msgs) and any("fc2 (A)" in m for m in msgs), msgs
    assert all_finite(model)
    assert opt.counters["steps"] == 3 and opt.counters["skipped_steps"] == 0
    assert opt.counters["inversion_fallbacks"] == 2 * 3  # the A side of fc1 and fc2, every step
    assert opt.counters["inversion_retries"] == 2 * 2 * 3
    for layer, (a_inv, g_inv) in opt.inverses().items():
        assert a_inv is None, f"{layer}: A side must be the identity"
        assert g_inv is not None and bool(torch.isfinite(g_inv).all())


def test_invert_damped_with_nan_and_non_pd_factors():
    """The inversion layer itself: a NaN factor and a non-PD one never raise; the non-PD one is
    rescued by the first ×10 retry, the NaN one reports no inverse; the good one is untouched."""
    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    non_pd = torch.diag(torch.tensor([-5.0, 1.0], dtype=torch.float64))  # + 1·I: not PD; + 10·I: PD
    nan = torch.full((2, 2), float("nan"), dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    items = [("good", good, one), ("non_pd", non_pd, one), ("nan", nan, one)]
    res = invert_damped(items, backend="torch", max_retries=3)
    assert res["good"].retries == 0
    torch.testing.assert_close(res["good"].inverse, torch.linalg.inv(good + torch.eye(2, dtype=torch.float64)))
    assert res["non_pd"].retries == 1
    torch.testing.assert_close(res["non_pd"].inverse, torch.linalg.inv(non_pd + 10 * torch.eye(2, dtype=torch.float64)))
    assert res["nan"].inverse is None and res["nan"].retries == 3
    none = invert_damped(items, backend="torch", max_retries=0)
    assert none["non_pd"].inverse is None and none["non_pd"].retries == 0
    assert invert_damped([], backend="torch", max_retries=3) == {}


# ============================================================================ non-finite → skip
@pytest.mark.parametrize(
    "where,expected_name",
    [
        pytest.param(lambda m: m.fc1.weight, "fc1", id="linear-weight"),
        pytest.param(lambda m: m.fc2.bias, "fc2", id="linear-bias"),
        pytest.param(lambda m: m.bn.weight, "bn", id="batchnorm"),
        pytest.param(lambda m: m.temperature, "outside supported layers", id="plain-parameter"),
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_gradient_skips_the_whole_step(where, expected_name, value):
    model = Net()
    opt = skip_test_optimizer(model)
    batches = data(4)
    train(model, opt, batches[:2])
    before = snapshot(model, opt)
    x, y = batches[2]
    forward_backward(model, opt, x, y)
    where(model).grad.view(-1)[0] = value
    with pytest.warns(UserWarning, match=rf"non-finite.*{expected_name}.*step skipped"):
        opt.step()
    assert opt.counters["skipped_steps"] == 1
    assert_same_state(before, snapshot(model, opt))
    train(model, opt, batches[3:])  # training goes on
    assert opt.counters["steps"] == 3 and all_finite(model)


def test_nan_in_the_batch_skips_the_step_and_leaves_no_trace():
    """NaN inputs poison activations, factors and gradients: the step is skipped, and with
    fisher='emp' the run then continues exactly as if the bad batch had never been seen."""
    kw = dict(fisher="emp", seed=None, stale=False, curvature_interval=2, inverse_interval=2)
    batches = data(4)
    bad_x = batches[0][0].clone()
    bad_x[3, 1] = float("nan")
    bad = (bad_x, batches[0][1])

    model, clean = Net(bn=False), Net(bn=False)
    opt, clean_opt = skip_test_optimizer(model, **kw), skip_test_optimizer(clean, **kw)
    train(model, opt, batches[:2])
    train(clean, clean_opt, batches[:2])
    before = snapshot(model, opt)
    forward_backward(model, opt, *bad)
    with pytest.warns(UserWarning, match=r"non-finite.*fc1.*fc2.*step skipped"):
        opt.step()
    assert_same_state(before, snapshot(model, opt))
    train(model, opt, batches[2:])
    train(clean, clean_opt, batches[2:])
    for (n, p), q in zip(model.named_parameters(), clean.parameters()):
        assert torch.equal(p, q), f"{n}: the skipped batch left a trace"
    assert all(opt.counters[k] == clean_opt.counters[k] for k in ("steps", "factor_updates", "inverse_updates"))


def test_overflowing_factor_with_finite_gradients_skips_the_step():
    """An input of 1e25 (saturating tanh) keeps every gradient finite but overflows fc1's A
    (1e50 > fp32 max): the statistics check alone must skip the step and name only fc1."""
    model = Net(bn=False)
    opt = skip_test_optimizer(model)
    batches = data(3)
    train(model, opt, batches[:1])
    before = snapshot(model, opt)
    x, y = batches[1]
    x = x.clone()
    x[0, 0] = 1e25
    forward_backward(model, opt, x, y)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()), "precondition: finite gradients"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step()
    msgs = spngd_warnings(record)
    assert len(msgs) == 1 and "fc1" in msgs[0] and "fc2" not in msgs[0], msgs
    assert opt.counters["skipped_steps"] == 1
    assert_same_state(before, snapshot(model, opt))
    train(model, opt, batches[2:])
    assert all_finite(model) and opt.counters["steps"] == 2


@pytest.mark.parametrize("check_finite", [True, False], ids=["check_finite", "found_inf_only"])
def test_amp_overflow_with_grad_scaler_skips_the_step(check_finite):
    """scaler.step(opt) hands SPNGD the scale and the found-inf flag; an overflow skips the step
    (even with check_finite=False, from the scaler's flag alone) and the scaler backs off."""
    model = Net()
    opt = skip_test_optimizer(model, check_finite=check_finite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    batches = data(5)
    for x, y in batches[:2]:
        forward_backward(model, opt, x, y, scaler)
        scaler.step(opt)
        scaler.update()
    assert opt.counters["skipped_steps"] == 0 and scaler.get_scale() == 2.0**10
    before = snapshot(model, opt)
    x, y = batches[2]
    forward_backward(model, opt, x, y, scaler)
    model.fc2.weight.grad[0, 0] = float("inf")  # the overflow
    expected = r"fc2" if check_finite else r"GradScaler"
    with pytest.warns(UserWarning, match=rf"non-finite.*{expected}.*step skipped"):
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9, "the scaler saw the inf and backed off"
    assert opt.counters["skipped_steps"] == 1
    assert_same_state(before, snapshot(model, opt))
    for x, y in batches[3:]:
        forward_backward(model, opt, x, y, scaler)
        scaler.step(opt)
        scaler.update()
    assert opt.counters["steps"] == 4 and opt.counters["skipped_steps"] == 1 and all_finite(model)


def test_grad_scaler_steps_equal_unscaled_steps():
    """Without an overflow, a power-of-two loss scale changes nothing (fisher='emp' rescales its
    output-gradient statistics by 1/scale² itself)."""
    batches = data(3)
    scaled, plain = Net(), Net()
    kw = dict(fisher="emp", seed=None, stale=False)
    opt_s, opt_p = skip_test_optimizer(scaled, **kw), skip_test_optimizer(plain, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches:
        forward_backward(scaled, opt_s, x, y, scaler)
        scaler.step(opt_s)
        scaler.update()
        forward_backward(plain, opt_p, x, y)
        opt_p.step()
    for (n, p), q in zip(scaled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_autocast_keeps_statistics_in_fp32():
    """Under bf16 autocast the statistics, inverses and weights stay fp32, and every step is the
    update built here in float64 from opt.inverses()/opt.factors() and the fp32 gradients (momentum
    0.9, four steps). Tolerance: the optimizer forms Ĝ⁻¹∇Â⁻¹ (sizes ≤ 76) and the momentum sum in
    fp32; the accumulated displacement is within 2.0e-5 of its largest entry (measured, fc.bias);
    1e-4 leaves a margin of five and rejects an update 1% off."""
    lr, momentum, lam = 0.05, 0.9, 1e-3
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 3, 3, padding=1),
            bn=nn.BatchNorm2d(3),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(3 * 5 * 5, 4),
        )
    )
    opt = SPNGD(model, lr=lr, momentum=momentum, damping=lam, fisher="mc", seed=0, backend="torch")
    g = torch.Generator().manual_seed(0)
    expected = SgdConvention(model)
    start = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    losses = []
    for step in range(4):
        x, y = torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        opt.backward(loss, out)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        assert all(t.dtype == torch.float32 for t in grads.values())
        opt.step()
        losses.append(loss.item())
        theta = expected.advance(natural_update(model, opt, grads, lam), lr, momentum, 0.0)
        for n, p in model.named_parameters():
            moved, expect = start[n] - p.detach().double(), start[n] - theta[n]
            err = (moved - expect).abs().max().item()
            assert err <= 1e-4 * expect.abs().max().item(), (
                f"step {step} {n}: max error {err:.3e} of {expect.abs().max().item():.3e}"
            )
    assert opt.counters["skipped_steps"] == 0 and opt.counters["steps"] == 4
    factors = opt.factors()
    assert set(factors) == {"conv", "bn", "fc"}
    for layer, stats in factors.items():
        for k, v in stats.items():
            assert v.dtype == torch.float32, f"{layer}.{k} is {v.dtype}"
            assert bool(torch.isfinite(v).all())
    for layer, pair in opt.inverses().items():
        assert all(t.dtype == torch.float32 for t in pair), layer
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses)


def test_nan_learning_rate_set_mid_run_never_reaches_the_weights():
    """An LR scheduler (or user code) writing a NaN lr into param_groups: either a clear
    ValueError naming lr, or the step is refused — the weights must stay finite."""
    model = Net()
    opt = skip_test_optimizer(model)
    batches = data(2)
    train(model, opt, batches[:1])
    opt.param_groups[0]["lr"] = float("nan")
    x, y = batches[1]
    forward_backward(model, opt, x, y)
    try:
        opt.step()
    except ValueError as exc:
        assert "lr" in str(exc)
    assert all_finite(model), "a NaN learning rate reached the weights"
