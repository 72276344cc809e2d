"""Fault injection: no NaN reaches the weights, bad input gets a clear error, resume is exact.

Each test injects one fault and checks the documented outcome (FAULTS.md lists them all):

* inversion failures: retried alone with damping ×10, then the last good inverse, then the
  identity (plain gradient for that side); counted in ``opt.counters`` and warned about once;
* non-finite gradients or statistics (inf in a .grad, NaN in the batch, an AMP overflow): the whole
  step is skipped and the optimizer state is left exactly as it was; bf16 autocast keeps fp32 state;
* bad input: every op and the optimizer raise ValueError/TypeError/RuntimeError naming the argument;
* checkpoints: stale statistics + MC + EMA resume bit-identically; broken state_dicts are rejected.

Distributed faults (a rank that raises or stalls) are covered by
``tests/test_distributed.py::test_a_failing_rank_ends_every_rank_with_an_error``.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ext.curvature_state as curvature_state
from spngd_ext import SPNGD, cuda_ops_available, extension_loaded, ops
from spngd_ext.inverse import invert_damped
from spngd_ext.reference import packed_size


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ==================================================================================== helpers
class Net(nn.Module):
    """fc1 (A 5×5, G 6×6) → [BN] → tanh → fc2 (A 7×7, G 3×3), times a plain scalar ``temperature``.

    Every Kronecker factor has its own size, so a fault can target exactly one of them by size.
    """

    def __init__(self, seed: int = 0, bn: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6) if bn else nn.Identity()
        self.fc2 = nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.ones(()))  # outside any supported layer: plain SGD
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))) * self.temperature


def data(n_steps: int, seed: int = 1, n: int = 16, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)) for _ in range(n_steps)]


def forward_backward(model, opt, x, y, scaler=None) -> None:
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    if scaler is not None:
        loss = scaler.scale(loss)
    if opt.options.fisher.value == "mc":
        opt.backward(loss, out)
    else:
        loss.backward()


def train(model, opt, batches) -> None:
    for x, y in batches:
        forward_backward(model, opt, x, y)
        opt.step()


def snapshot(model: nn.Module, opt: SPNGD) -> dict:
    """Everything a skipped step must leave untouched."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "momentum": {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters() if "momentum_buffer" in opt.state[p]},
        "factors": {(layer, k): v.clone() for layer, stats in opt.factors().items() for k, v in stats.items()},
        "inverses": {layer: tuple(None if t is None else t.clone() for t in pair) for layer, pair in opt.inverses().items()},
        # mc_backwards counts sampled backwards that ran (in opt.backward, before the step is judged)
        "counters": {k: v for k, v in opt.counters.items() if k not in ("skipped_steps", "mc_backwards")},
    }


def assert_same_state(before: dict, after: dict) -> None:
    for part in ("params", "momentum", "factors"):
        assert before[part].keys() == after[part].keys(), part
        for key in before[part]:
            assert torch.equal(before[part][key], after[part][key]), f"{part}[{key}] changed by a skipped step"
    assert before["inverses"].keys() == after["inverses"].keys()
    for layer, pair in before["inverses"].items():
        for a, b in zip(pair, after["inverses"][layer]):
            assert (a is None and b is None) or torch.equal(a, b), f"inverse of {layer} changed by a skipped step"
    assert before["counters"] == after["counters"]


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def spngd_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("SPNGD")]


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


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
        self.calls.append({"n": mats.shape[-1], "batch": mats.shape[0], "damping": damping_t.detach().clone(), "mats": mats.detach().clone()})
        if mats.shape[-1] == self.size and self.failures > 0:
            self.failures -= 1
            info = torch.full_like(info, 7)
            inv = torch.full_like(inv, float("nan"))  # a failed attempt's garbage must never be used
        return inv, info

    def calls_of(self, n: int) -> list[dict]:
        return [c for c in self.calls if c["n"] == n]


def _pi_shift_a(opt: SPNGD, layer: str, damping: float) -> float:
    """π·√λ for the A side of a layer, from its current factors (DESIGN.md damping formula)."""
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
    real_pi = curvature_state.pi_damping

    def negative_a_shift(*args):
        shift_a, shift_g = real_pi(*args)
        return -1e3 * shift_a, shift_g

    model = Net(bn=True)
    opt = SPNGD(model, lr=0.05, fisher="mc", seed=0, backend="torch", max_inverse_retries=2)
    monkeypatch.setattr(curvature_state, "pi_damping", negative_a_shift)
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
def _skip_opt(model, **kw) -> SPNGD:
    base = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, damping=1e-2, fisher="mc", seed=3, ema_decay=0.5,
                stale=True, backend="torch")
    base.update(kw)
    return SPNGD(model, **base)


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
    opt = _skip_opt(model)
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
    opt, clean_opt = _skip_opt(model, **kw), _skip_opt(clean, **kw)
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
    opt = _skip_opt(model)
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
    opt = _skip_opt(model, check_finite=check_finite)
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
    opt_s, opt_p = _skip_opt(scaled, **kw), _skip_opt(plain, **kw)
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
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 3, 3, padding=1), bn=nn.BatchNorm2d(3), act=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(3 * 5 * 5, 4),
    ))
    opt = SPNGD(model, lr=0.05, fisher="mc", seed=0, backend="torch")
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        x, y = torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        opt.backward(loss, out)
        opt.step()
        losses.append(loss.item())
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
    assert all_finite(model) and all(math.isfinite(v) for v in losses)


def test_nan_learning_rate_set_mid_run_never_reaches_the_weights():
    """An LR scheduler (or user code) writing a NaN lr into param_groups: either a clear
    ValueError naming lr, or the step is refused — the weights must stay finite."""
    model = Net()
    opt = _skip_opt(model)
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


# ============================================================================ bad input: ops
def _s(n: int, **kw) -> torch.Tensor:
    return torch.zeros(packed_size(n), **kw)


def _x(*shape, **kw) -> torch.Tensor:
    return torch.randn(*shape, **kw)


_ACC = dict(scale=1.0, decay=0.0)
_CONV = dict(kernel_size=3, has_bias=False, scale=1.0, decay=0.0)
_BN = dict(scale=1.0, decay=0.0)
_MOM = dict(lr=0.1, momentum=0.9, weight_decay=0.0)

# (id, call, exception type, message regex): the message names the op and the argument.
BAD_OP_INPUTS = [
    # ---- pack_upper
    ("pack_upper-dtype", lambda: ops.pack_upper([torch.ones(2, 2, dtype=torch.int64)]), TypeError, r"pack_upper: mats\[0\] must be a floating"),
    ("pack_upper-not-tensor", lambda: ops.pack_upper([[1.0, 2.0]]), TypeError, r"pack_upper: mats\[0\] must be a torch.Tensor"),
    ("pack_upper-1d", lambda: ops.pack_upper([torch.ones(4)]), ValueError, r"pack_upper: mats\[0\] must be 2-D"),
    ("pack_upper-not-square", lambda: ops.pack_upper([torch.ones(2, 2), torch.ones(2, 3)]), ValueError, r"pack_upper: mats\[1\] must be square"),
    ("pack_upper-devices", lambda: ops.pack_upper([torch.ones(2, 2), torch.ones(2, 2, device="meta")]), ValueError, r"pack_upper: all tensors must be on one device.*mats\[1\] on meta"),
    ("pack_upper-out-dtype", lambda: ops.pack_upper([torch.ones(2, 2)], dtype=torch.int32), TypeError, r"pack_upper: dtype"),
    ("pack_upper-backend", lambda: ops.pack_upper([torch.ones(2, 2)], backend="gpu"), ValueError, r"pack_upper: backend must be one of"),
    # ---- unpack_upper
    ("unpack_upper-dtype", lambda: ops.unpack_upper(torch.ones(3, dtype=torch.int64), [2]), TypeError, r"unpack_upper: buffer must be a floating"),
    ("unpack_upper-2d", lambda: ops.unpack_upper(torch.ones(3, 1), [2]), ValueError, r"unpack_upper: buffer must be 1-D"),
    ("unpack_upper-too-short", lambda: ops.unpack_upper(torch.ones(5), [3]), ValueError, r"unpack_upper: buffer has 5 elements.*need 6"),
    ("unpack_upper-offset", lambda: ops.unpack_upper(torch.ones(6), [3], offset=1), ValueError, r"unpack_upper: buffer has 6 elements.*offset 1 need 7"),
    ("unpack_upper-negative-offset", lambda: ops.unpack_upper(torch.ones(6), [1], offset=-1), ValueError, r"unpack_upper: .*offset -1"),
    ("unpack_upper-size", lambda: ops.unpack_upper(torch.ones(6), [0]), ValueError, r"unpack_upper: sizes must be positive"),
    ("unpack_upper-scale-shape", lambda: ops.unpack_upper(torch.ones(6), [2, 1], scale=torch.ones(3)), ValueError, r"unpack_upper: scale must be"),
    ("unpack_upper-devices", lambda: ops.unpack_upper(torch.ones(6), [2, 1], scale=torch.ones(2, device="meta")), ValueError, r"unpack_upper: all tensors must be on one device.*scale on meta"),
    ("unpack_upper-out-dtype", lambda: ops.unpack_upper(torch.ones(3), [2], dtype=torch.int64), TypeError, r"unpack_upper: dtype"),
    ("unpack_upper-backend", lambda: ops.unpack_upper(torch.ones(3), [2], backend="tpu"), ValueError, r"unpack_upper: backend must be one of"),
    # ---- accumulate_factor
    ("accumulate_factor-x-dtype", lambda: ops.accumulate_factor(_s(2), torch.ones(4, 2, dtype=torch.int64), **_ACC), TypeError, r"accumulate_factor: x must be a floating"),
    ("accumulate_factor-state-dtype", lambda: ops.accumulate_factor(_s(2, dtype=torch.bfloat16), _x(4, 2), **_ACC), TypeError, r"accumulate_factor: state must be float32 or float64"),
    ("accumulate_factor-x-shape", lambda: ops.accumulate_factor(_s(2), _x(4, 2, 1), **_ACC), ValueError, r"accumulate_factor: x must be 2-D"),
    ("accumulate_factor-state-size", lambda: ops.accumulate_factor(_s(3), _x(4, 2), **_ACC), ValueError, r"accumulate_factor: state must have 3 elements, got 6"),
    ("accumulate_factor-state-layout", lambda: ops.accumulate_factor(torch.zeros(6)[::2], _x(4, 2), **_ACC), ValueError, r"accumulate_factor: state must be contiguous"),
    ("accumulate_factor-state-none", lambda: ops.accumulate_factor(None, _x(4, 2), **_ACC), TypeError, r"accumulate_factor: state must be a torch.Tensor"),
    ("accumulate_factor-devices", lambda: ops.accumulate_factor(_s(2), _x(4, 2, device="meta"), **_ACC), ValueError, r"accumulate_factor: all tensors must be on one device.*x on meta"),
    ("accumulate_factor-backend", lambda: ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend="numpy"), ValueError, r"accumulate_factor: backend must be one of"),
    # ---- conv_a_factor
    ("conv_a_factor-x-dtype", lambda: ops.conv_a_factor(_s(9), torch.ones(1, 1, 4, 4, dtype=torch.int64), **_CONV), TypeError, r"conv_a_factor: x must be a floating"),
    ("conv_a_factor-state-dtype", lambda: ops.conv_a_factor(_s(9, dtype=torch.float16), _x(1, 1, 4, 4), **_CONV), TypeError, r"conv_a_factor: state must be float32 or float64"),
    ("conv_a_factor-x-shape", lambda: ops.conv_a_factor(_s(9), _x(1, 4, 4), **_CONV), ValueError, r"conv_a_factor: x must be 4-D"),
    ("conv_a_factor-state-size", lambda: ops.conv_a_factor(_s(10), _x(1, 1, 4, 4), **_CONV), ValueError, r"conv_a_factor: state must have 45 elements"),
    ("conv_a_factor-state-layout", lambda: ops.conv_a_factor(torch.zeros(90)[::2], _x(1, 1, 4, 4), **_CONV), ValueError, r"conv_a_factor: state must be contiguous"),
    ("conv_a_factor-stride", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, stride=0), ValueError, r"conv_a_factor: need kernel_size, stride"),
    ("conv_a_factor-padding", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, padding=-1), ValueError, r"conv_a_factor: need kernel_size.*padding >= 0"),
    ("conv_a_factor-kernel-triple", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), kernel_size=(3, 3, 3), has_bias=False, scale=1.0, decay=0.0), ValueError, r"conv_a_factor: kernel_size must be an int or a pair"),
    ("conv_a_factor-kernel-too-big", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 2, 2), **_CONV), ValueError, r"conv_a_factor: .*kernel"),
    ("conv_a_factor-devices", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4, device="meta"), **_CONV), ValueError, r"conv_a_factor: all tensors must be on one device.*x on meta"),
    ("conv_a_factor-backend", lambda: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, backend="x"), ValueError, r"conv_a_factor: backend must be one of"),
    # ---- cholesky_inverse_damped
    ("cholesky_inverse_damped-dtype", lambda: ops.cholesky_inverse_damped(torch.eye(2, dtype=torch.bfloat16)[None], 1.0), TypeError, r"cholesky_inverse_damped: mats must be float32 or float64"),
    ("cholesky_inverse_damped-int", lambda: ops.cholesky_inverse_damped(torch.ones(1, 2, 2, dtype=torch.int32), 1.0), TypeError, r"cholesky_inverse_damped: mats must be a floating"),
    ("cholesky_inverse_damped-2d", lambda: ops.cholesky_inverse_damped(torch.eye(2), 1.0), ValueError, r"cholesky_inverse_damped: mats must be 3-D"),
    ("cholesky_inverse_damped-not-square", lambda: ops.cholesky_inverse_damped(torch.ones(1, 2, 3), 1.0), ValueError, r"cholesky_inverse_damped: mats must be \(B, n, n\)"),
    ("cholesky_inverse_damped-damping-shape", lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), torch.ones(3)), ValueError, r"cholesky_inverse_damped: damping must be a float or a \(2,\) tensor"),
    ("cholesky_inverse_damped-devices", lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), torch.ones(2, device="meta")), ValueError, r"cholesky_inverse_damped: all tensors must be on one device.*damping on meta"),
    ("cholesky_inverse_damped-backend", lambda: ops.cholesky_inverse_damped(torch.ones(2, 2, 2), 1.0, backend="cpu"), ValueError, r"cholesky_inverse_damped: backend must be one of"),
    # ---- bn_unitwise_fisher
    ("bn_unitwise_fisher-dtype", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), torch.ones(4, 3, dtype=torch.int64), _x(4, 3), **_BN), TypeError, r"bn_unitwise_fisher: grad_out must be a floating"),
    ("bn_unitwise_fisher-state-dtype", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3, dtype=torch.bfloat16), _x(4, 3), _x(4, 3), **_BN), TypeError, r"bn_unitwise_fisher: state must be a contiguous float32/float64"),
    ("bn_unitwise_fisher-shapes", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 2), **_BN), ValueError, r"bn_unitwise_fisher: grad_out and xhat must share one"),
    ("bn_unitwise_fisher-1d", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4), _x(4), **_BN), ValueError, r"bn_unitwise_fisher: grad_out and xhat must share one \(N, C, \*\) shape"),
    ("bn_unitwise_fisher-state-shape", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 2), _x(4, 3), _x(4, 3), **_BN), ValueError, r"bn_unitwise_fisher: state must be \(3, 3\)"),
    ("bn_unitwise_fisher-state-layout", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3).t(), _x(4, 3), _x(4, 3), **_BN), (TypeError, ValueError), r"bn_unitwise_fisher: state must be .*contiguous"),
    ("bn_unitwise_fisher-state-none", lambda: ops.bn_unitwise_fisher(None, _x(4, 3), _x(4, 3), **_BN), TypeError, r"bn_unitwise_fisher: state must be a torch.Tensor"),
    ("bn_unitwise_fisher-devices", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3, device="meta"), **_BN), ValueError, r"bn_unitwise_fisher: all tensors must be on one device.*xhat on meta"),
    ("bn_unitwise_fisher-backend", lambda: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3), **_BN, backend="CUDA"), ValueError, r"bn_unitwise_fisher: backend must be one of"),
    # ---- bn_unitwise_solve
    ("bn_unitwise_solve-dtype", lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), torch.ones(3, dtype=torch.int64), _x(3), damping=1.0), TypeError, r"bn_unitwise_solve: grad_gamma must be a floating"),
    ("bn_unitwise_solve-fisher-shape", lambda: ops.bn_unitwise_solve(torch.zeros(3, 2), _x(3), _x(3), damping=1.0), ValueError, r"bn_unitwise_solve: fisher must be \(C, 3\)"),
    ("bn_unitwise_solve-grad-shape", lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(2), damping=1.0), ValueError, r"bn_unitwise_solve: grad_beta must have 3 entries"),
    ("bn_unitwise_solve-grad-2d", lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3, 1), _x(3), damping=1.0), ValueError, r"bn_unitwise_solve: grad_gamma must be 1-D"),
    ("bn_unitwise_solve-devices", lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3, device="meta"), _x(3), damping=1.0), ValueError, r"bn_unitwise_solve: all tensors must be on one device.*grad_gamma on meta"),
    ("bn_unitwise_solve-backend", lambda: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(3), damping=1.0, backend=""), ValueError, r"bn_unitwise_solve: backend must be one of"),
    # ---- precondition
    ("precondition-dtype", lambda: ops.precondition(torch.eye(2), torch.ones(2, 3, dtype=torch.int64), torch.eye(3)), TypeError, r"precondition: grad must be a floating"),
    ("precondition-dims", lambda: ops.precondition(torch.eye(2), torch.ones(2, 3), torch.eye(3)[None]), ValueError, r"precondition: g_inv, grad, a_inv must all be 2-D or all 3-D"),
    ("precondition-chain", lambda: ops.precondition(torch.eye(2), torch.ones(3, 3), torch.eye(3)), ValueError, r"precondition: shapes do not chain"),
    ("precondition-g_inv-not-square", lambda: ops.precondition(torch.ones(4, 2), torch.ones(2, 3), torch.eye(3)), ValueError, r"precondition: .*g_inv"),
    ("precondition-batch", lambda: ops.precondition(torch.eye(2).expand(2, 2, 2), torch.ones(3, 2, 3), torch.eye(3).expand(3, 3, 3)), ValueError, r"precondition: .*batch|precondition: shapes"),
    ("precondition-devices", lambda: ops.precondition(torch.eye(2), torch.ones(2, 3, device="meta"), torch.eye(3)), ValueError, r"precondition: all tensors must be on one device.*grad on meta"),
    # ---- kl_clip_coefficient / kl_clip_from_total (no backend argument)
    ("kl_clip_coefficient-kl_clip", lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)], [0.1], 0.0), ValueError, r"kl_clip_coefficient: kl_clip must be > 0"),
    ("kl_clip_coefficient-kl_clip-nan", lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)], [0.1], float("nan")), ValueError, r"kl_clip_coefficient: kl_clip must be > 0"),
    ("kl_clip_coefficient-lengths", lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(2)] * 2, [0.1], 1.0), ValueError, r"kl_clip_coefficient: updates, grads and lrs must have one entry per layer"),
    ("kl_clip_coefficient-shape", lambda: ops.kl_clip_coefficient([torch.ones(2)], [torch.ones(3)], [0.1], 1.0), ValueError, r"kl_clip_coefficient: .*(shape|grads\[0\])"),
    ("kl_clip_coefficient-devices", lambda: ops.kl_clip_coefficient([torch.ones(2, device="meta")], [torch.ones(2)], [0.1], 1.0), ValueError, r"kl_clip_coefficient: all tensors must be on one device"),
    ("kl_clip_from_total-kl_clip", lambda: ops.kl_clip_from_total(torch.tensor(1.0), -1.0), ValueError, r"kl_clip_from_total: kl_clip must be > 0"),
    # ---- momentum_update (no backend argument)
    ("momentum_update-lengths", lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2)] * 2, [torch.zeros(2)], **_MOM), ValueError, r"momentum_update: .*same (length|number)"),
    ("momentum_update-shape", lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(3)], [torch.zeros(2)], **_MOM), ValueError, r"momentum_update: updates\[0\]"),
    ("momentum_update-devices", lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2, device="meta")], [torch.zeros(2)], **_MOM), ValueError, r"momentum_update: all tensors must be on one device"),
    ("momentum_update-buffer-device", lambda: ops.momentum_update([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2, device="meta")], **_MOM), ValueError, r"momentum_update: all tensors must be on one device"),
]


@pytest.mark.parametrize("call,exc,pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in BAD_OP_INPUTS])
def test_ops_reject_bad_input_with_a_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# every op that takes a backend: (name, valid CPU call taking backend=...)
BACKEND_OPS = {
    "pack_upper": lambda b: ops.pack_upper([torch.eye(2)], backend=b),
    "unpack_upper": lambda b: ops.unpack_upper(torch.ones(3), [2], backend=b),
    "accumulate_factor": lambda b: ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend=b),
    "conv_a_factor": lambda b: ops.conv_a_factor(_s(9), _x(1, 1, 4, 4), **_CONV, backend=b),
    "cholesky_inverse_damped": lambda b: ops.cholesky_inverse_damped(torch.eye(2)[None], 1.0, backend=b),
    "bn_unitwise_fisher": lambda b: ops.bn_unitwise_fisher(torch.zeros(3, 3), _x(4, 3), _x(4, 3), **_BN, backend=b),
    "bn_unitwise_solve": lambda b: ops.bn_unitwise_solve(torch.zeros(3, 3), _x(3), _x(3), damping=1.0, backend=b),
    "precondition": lambda b: ops.precondition(torch.eye(2), torch.ones(2, 3), torch.eye(3), backend=b),
}


@pytest.mark.parametrize("name", sorted(BACKEND_OPS))
def test_ops_reject_an_unknown_backend_string(name):
    for bad in ("gpu", "CUDA", "", None):
        with pytest.raises(ValueError, match=rf"{name}: backend must be one of"):
            BACKEND_OPS[name](bad)
    BACKEND_OPS[name]("torch")
    BACKEND_OPS[name]("auto")


@pytest.mark.skipif(cuda_ops_available(), reason="the CUDA kernels are usable here")
@pytest.mark.parametrize("name", sorted(BACKEND_OPS))
def test_ops_backend_cuda_without_kernels_raises_runtime_error(name):
    """backend='cuda' insists on the kernel: without the extension or a GPU, a RuntimeError naming the op."""
    with pytest.raises(RuntimeError, match=rf"{name}: backend='cuda'"):
        BACKEND_OPS[name]("cuda")


@pytest.mark.skipif(cuda_ops_available() or not extension_loaded(), reason="needs the extension built and no GPU")
def test_backend_cuda_error_says_the_gpu_is_missing_when_the_extension_is_built():
    """The extension is built and loaded here; only a GPU is missing. The error must say so rather
    than send the user to rebuild the extension."""
    with pytest.raises(RuntimeError) as info:
        ops.accumulate_factor(_s(2), _x(4, 2), **_ACC, backend="cuda")
    message = str(info.value)
    assert "not built" not in message and ("GPU" in message or "CUDA device" in message), message


# ============================================================================ bad input: optimizer
def test_model_without_supported_layers_warns_exactly_once():
    """(That it is then exactly momentum SGD: tests/test_optimizer_api.py::test_model_without_supported_layers_warns_and_is_plain_sgd.)"""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    model = Plain()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = SPNGD(model, lr=0.1, fisher="mc", seed=0)
        for x, y in data(3):
            forward_backward(model, opt, x, y)
            opt.step()
    msgs = spngd_warnings(record)
    assert len(msgs) == 1 and "no supported layer" in msgs[0], msgs
    assert opt.counters["steps"] == 3 and all_finite(model)


def test_layer_on_a_second_device_raises_value_error_naming_the_layer():
    model = Net(bn=False)
    model.fc2.to("meta")
    # Caught at construction, before any hook or buffer exists.
    with pytest.raises(ValueError, match=r"one device.*fc2.*meta"):
        SPNGD(model, fisher="emp", backend="torch")


def test_plain_parameter_on_a_second_device_raises_value_error_naming_it():
    """A parameter outside the supported layers on another device (meta) than the rest (cpu): a
    ValueError that names the parameter — not a message claiming the model was moved."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.stray_scale = nn.Parameter(torch.ones(3, device="meta"))

        def forward(self, x):
            return self.fc(x)

    model = Mixed()
    x, y = data(1)[0]
    with pytest.raises(ValueError, match=r"stray_scale") as info:
        opt = SPNGD(model, fisher="emp", backend="torch")
        forward_backward(model, opt, x, y)
        opt.step()
    assert "moved" not in str(info.value), str(info.value)


def test_parameter_frozen_mid_run_is_untouched_then_trains_again():
    model = Net()
    opt = _skip_opt(model)
    batches = data(6)
    train(model, opt, batches[:2])
    frozen = [model.fc1.weight, model.bn.bias]
    for p in frozen:
        p.requires_grad_(False)
    kept = [p.detach().clone() for p in frozen]
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, opt, batches[2:4])
    for p, k in zip(frozen, kept):
        assert p.grad is None and torch.equal(p, k), "a frozen parameter moved"
    assert all(not torch.equal(others[n], p) for n, p in model.named_parameters() if n in others), "the rest must train"
    for p in frozen:
        p.requires_grad_(True)
    train(model, opt, batches[4:])
    for p, k in zip(frozen, kept):
        assert not torch.equal(p, k), "an unfrozen parameter must train again"
    assert opt.counters["steps"] == 6 and opt.counters["skipped_steps"] == 0 and all_finite(model)


@pytest.mark.parametrize(
    "name,value",
    [
        # complements tests/test_optimizer_api.py::test_invalid_arguments_raise_value_error_naming_the_argument
        ("lr", float("inf")), ("lr", "0.1"), ("lr", True), ("momentum", float("nan")), ("weight_decay", float("inf")),
        ("damping", float("inf")), ("damping", float("nan")), ("damping", True), ("damping", "1e-3"),
        ("fisher", None), ("mc_samples", 1.5), ("mc_samples", True),
        ("curvature_interval", 2.0), ("inverse_interval", -1), ("inverse_interval", None),
        ("ema_decay", float("nan")), ("ema_decay", "0.9"), ("kl_clip", float("inf")), ("kl_clip", float("nan")),
        ("backend", None), ("backend", "CUDA"),
        ("stale", "yes"), ("stale", 1), ("stale", None),
        ("comm_dtype", torch.int8), ("comm_dtype", torch.float64), ("comm_dtype", "bf16"),
        ("max_inverse_retries", -1), ("max_inverse_retries", 1.5),
    ],
)
def test_out_of_range_hyperparameters_raise_value_error_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        SPNGD(Net(), **{name: value})


def test_rejected_construction_leaves_the_model_usable():
    """A constructor that raises must not leave hooks behind on the model (they would call into
    a half-built optimizer at the next forward)."""
    model = Net()
    with pytest.raises(ValueError, match="stale"):
        SPNGD(model, stale="yes")
    x, _ = data(1)[0]
    model(x)  # must not raise
    assert all(len(m._forward_hooks) == 0 for m in model.modules()), "hooks left on the model"


@pytest.mark.parametrize(
    "schedule,bad_step",
    [
        pytest.param(lambda s: 1e-3 if s < 2 else float("nan"), 2, id="nan"),
        pytest.param(lambda s: 1e-3 if s < 1 else 0.0, 1, id="zero"),
        pytest.param(lambda s: -1e-3, 0, id="negative"),
        pytest.param(lambda s: 1e-3 if s < 2 else float("inf"), 2, id="inf"),
        pytest.param(lambda s: None, 0, id="none"),
        pytest.param(lambda s: "1e-3", 0, id="string"),
    ],
)
def test_bad_damping_schedule_value_raises_value_error_naming_the_step(schedule, bad_step):
    model = Net()
    opt = SPNGD(model, damping=schedule, fisher="mc", seed=0, backend="torch")
    batches = data(bad_step + 1)
    train(model, opt, batches[:bad_step])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forward_backward(model, opt, *batches[bad_step])
    with pytest.raises(ValueError, match=rf"damping schedule returned .* at step {bad_step}"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "a rejected step moved the weights"


def test_backend_cuda_without_kernels_fails_at_construction():
    if cuda_ops_available():
        pytest.skip("the CUDA kernels are usable here")
    model = Net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="SPNGD: backend='cuda' but .*(not built|no CUDA GPU)"):
        SPNGD(model, backend="cuda", fisher="mc", seed=0)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules()), "a failed construction left hooks"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.gpu
def test_backend_cuda_with_a_cpu_model_fails_at_construction():
    if not cuda_ops_available():
        pytest.skip("needs the CUDA kernels")
    with pytest.raises(ValueError, match="backend='cuda' needs the model on a CUDA device, but its parameters are on cpu"):
        SPNGD(Net(), backend="cuda")


# ============================================================================ checkpoint / resume
def test_resume_with_stale_statistics_mc_and_ema_is_bit_identical():
    """stale=True + fisher='mc' (2 samples) + EMA + momentum/wd/KL clip, with a skipped step before
    the save: the state_dict holds factors, inverses, intervals and the MC RNG, and a fresh model +
    optimizer continue exactly like the uninterrupted run. (Single features: tests/test_checkpoint.py.)"""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="mc", mc_samples=2, ema_decay=0.8,
              stale=True, kl_clip=1e-2, seed=17, backend="torch")
    batches = data(12, seed=5)
    k = 7  # the intervals of fc2's G and bn's F have just doubled: the next step skips their refresh

    def run(model, opt, part, inject_at=None):
        for i, (x, y) in enumerate(part):
            forward_backward(model, opt, x, y)
            if i == inject_at:  # the same overflow in both runs: a skipped step before the save
                model.fc1.weight.grad[0, 0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()

    full = Net()
    full_opt = SPNGD(full, **kw)
    run(full, full_opt, batches, inject_at=2)

    model = Net()
    opt = SPNGD(model, **kw)
    run(model, opt, batches[:k], inject_at=2)
    assert opt.counters["skipped_steps"] == 1
    sd = opt.state_dict()
    extra = sd["spngd"]
    assert extra["mc_rng"] is not None, "the MC sampler state is saved"
    assert extra["curvature"]["est"] is not None and torch.isfinite(extra["curvature"]["est"]).all()
    assert set(extra["curvature"]["inverses"]) == {"fc1", "fc2"}
    assert len(extra["schedule"]["intervals"]) == 5, "A, G of fc1 and fc2, F of bn"
    saved = roundtrip({"model": model.state_dict(), "opt": sd})
    counters_at_save = opt.counters
    assert max(k for stats in counters_at_save["intervals"].values() for k in stats.values()) > 1, \
        "the save should happen with lengthened (stale) intervals"

    torch.manual_seed(1234)
    fresh = Net(seed=99)
    fresh.load_state_dict(saved["model"])
    fresh_opt = SPNGD(fresh, **{**kw, "seed": 4321})
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.counters["intervals"] == counters_at_save["intervals"]
    for key in ("steps", "skipped_steps", "factor_updates", "inverse_updates", "mc_backwards"):
        assert fresh_opt.counters[key] == counters_at_save[key], key
    run(fresh, fresh_opt, batches[k:])

    for (n, p), q in zip(full.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{n} differs by {(p - q).abs().max().item():.3e} after resuming"
    assert fresh_opt.counters["intervals"] == full_opt.counters["intervals"]
    for key in ("steps", "skipped_steps", "factor_updates", "inverse_updates", "mc_backwards"):
        assert fresh_opt.counters[key] == full_opt.counters[key], key


def _saved(n_steps: int = 2, **kw) -> dict:
    model = Net()
    opt = SPNGD(model, fisher="emp", backend="torch", **kw)
    train(model, opt, data(n_steps))
    return roundtrip(opt.state_dict())


def _assert_rejected_and_untouched(sd, pattern: str, **kw) -> None:
    model = Net()
    opt = SPNGD(model, fisher="emp", backend="torch", **kw)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    assert opt.counters["steps"] == 0 and opt.state_dict()["state"] == {}, "a rejected load changed the optimizer"
    train(model, opt, data(1))
    assert opt.counters["steps"] == 1 and all_finite(model)


def test_state_dict_with_another_world_size_is_rejected():
    sd = _saved()
    sd["spngd"]["world_size"] = 4
    _assert_rejected_and_untouched(sd, r"world_size=4")


def _rejection_problems(sd, pattern: str) -> str | None:
    """None when loading ``sd`` raises a ValueError matching ``pattern`` and leaves a fresh
    optimizer untouched; else what went wrong (so one test can report every broken variant)."""
    model = Net()
    opt = SPNGD(model, fisher="emp", backend="torch")
    try:
        opt.load_state_dict(sd)
    except ValueError as exc:
        if not re.search(pattern, str(exc)):
            return f"ValueError without {pattern!r}: {exc}"
    except Exception as exc:  # noqa: BLE001 - the point is which exception escapes
        return f"{type(exc).__name__}: {exc}"
    else:
        return "loaded without an error"
    if opt.counters["steps"] != 0 or opt.state_dict()["state"] != {}:
        return "the rejected load changed the optimizer"
    return None


def test_truncated_spngd_entry_is_rejected_with_value_error():
    """A state_dict whose 'spngd' entry lacks one of its keys (a truncated or hand-edited file)."""
    sd = _saved()
    problems = {}
    for key in list(sd["spngd"]):
        broken = dict(sd)
        broken["spngd"] = {k: v for k, v in sd["spngd"].items() if k != key}
        problem = _rejection_problems(broken, rf"SPNGD.load_state_dict: .*{key}")
        if problem:
            problems[key] = problem
    assert not problems, f"missing keys not rejected with a clear ValueError: {problems}"


def test_garbled_spngd_entry_is_rejected_with_value_error():
    sd = _saved()
    problems = {}
    for garbage in (None, "checkpoint.pt", [1, 2], 3):
        broken = dict(sd)
        broken["spngd"] = garbage
        problem = _rejection_problems(broken, r"SPNGD.load_state_dict")
        if problem:
            problems[repr(garbage)] = problem
    assert not problems, f"garbled 'spngd' entries not rejected with a clear ValueError: {problems}"


def test_truncated_curvature_estimate_is_rejected_before_anything_is_loaded():
    sd = _saved()
    sd["spngd"]["curvature"]["est"] = sd["spngd"]["curvature"]["est"][:-3]
    _assert_rejected_and_untouched(sd, r"curvature estimate")


def test_schedule_of_the_wrong_length_is_rejected_before_anything_is_loaded():
    sd = _saved()
    sd["spngd"]["schedule"]["intervals"] = sd["spngd"]["schedule"]["intervals"][:1]
    _assert_rejected_and_untouched(sd, r"statistics saved")


def test_inverse_of_the_wrong_shape_is_rejected_at_load():
    """With inverse_interval > 1 a resumed step uses the saved inverses as they are: a wrong shape
    must be caught by load_state_dict, not by a matmul error steps later."""
    kw = dict(curvature_interval=2, inverse_interval=2)
    sd = _saved(3, **kw)  # the next step (index 3) refreshes nothing and uses the saved inverses
    sd["spngd"]["curvature"]["inverses"]["fc2"][0] = torch.eye(3)
    _assert_rejected_and_untouched(sd, r"fc2", **kw)


def test_inverse_for_an_unknown_layer_is_rejected_with_value_error():
    sd = _saved()
    sd["spngd"]["curvature"]["inverses"]["not_a_layer"] = [None, None]
    _assert_rejected_and_untouched(sd, r"not_a_layer")
