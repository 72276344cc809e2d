"""SP-NGD's large-batch recipe, one formula at a time: the damping schedule, momentum correction
after a learning-rate drop, weight rescaling onto √(2·fan_out), and the warm-up + polynomial
learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.recipe import damping_schedule, rescaled_weight_norm_limit
from spngd_ext.train.schedules import build_lr_scheduler, lr_factor_fn

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


# ---------------------------------------------------------------------------------------------
# damping schedule


def test_damping_schedule_warmup_and_decay_values():
    base, factor, final = 1e-3, 10.0, 1e-4
    lam = damping_schedule(base, warmup_steps=10, warmup_factor=factor, decay_steps=20, final=final)
    assert lam(0) == pytest.approx(base * factor, rel=1e-12)  # warm-up start
    assert lam(5) == pytest.approx(math.sqrt(base * factor * base), rel=1e-12)  # geometric midpoint
    assert lam(10) == pytest.approx(base, rel=1e-12)  # warm-up end
    assert lam(20) == pytest.approx(math.sqrt(base * final), rel=1e-12)  # decay midpoint
    assert lam(30) == pytest.approx(final, rel=1e-12)  # decay end
    assert lam(1000) == pytest.approx(final, rel=1e-12)  # constant afterwards
    # geometric: constant ratio between consecutive steps within each phase
    warm = [lam(t) for t in range(11)]
    ratios = [b / a for a, b in zip(warm, warm[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    assert ratios[0] == pytest.approx(factor ** (-1 / 10), rel=1e-12)
    decay = [lam(t) for t in range(10, 31)]
    ratios = [b / a for a, b in zip(decay, decay[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    assert ratios[0] == pytest.approx((final / base) ** (1 / 20), rel=1e-12)
    # monotone: down through warm-up and decay
    values = [lam(t) for t in range(40)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_damping_schedule_defaults_and_degenerate_cases():
    assert damping_schedule(2e-3)(0) == 2e-3  # no warm-up, no decay: constant
    assert damping_schedule(2e-3)(500) == 2e-3
    lam = damping_schedule(1e-3, warmup_steps=4, warmup_factor=1.0)  # factor 1: flat warm-up
    assert [lam(t) for t in range(6)] == pytest.approx([1e-3] * 6, rel=1e-12)
    lam = damping_schedule(1e-3, decay_steps=8, final=1e-3 / 16)  # decay only, halves every 2 steps
    assert [lam(t) for t in (0, 2, 4, 8, 9)] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1e-3 / 16, 1e-3 / 16], rel=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base=0.0),
        dict(base=-1e-3),
        dict(base=float("nan")),
        dict(base=float("inf")),
        dict(base=1e-3, warmup_steps=-1),
        dict(base=1e-3, decay_steps=-1),
        dict(base=1e-3, warmup_factor=0.5),
        dict(base=1e-3, final=0.0),
        dict(base=1e-3, final=float("inf")),
    ],
)
def test_damping_schedule_rejects_bad_arguments(kwargs):
    base = kwargs.pop("base")
    with pytest.raises(ValueError):
        damping_schedule(base, **kwargs)


def test_damping_schedule_drives_the_optimizer():
    """SPNGD takes the schedule as ``damping=`` and evaluates it at the 0-based step index."""
    lam = damping_schedule(1e-3, warmup_steps=10, warmup_factor=10.0)
    opt = SPNGD(nn.Linear(3, 2), damping=lam)
    assert [opt.options.damping_at(t) for t in (0, 5, 10, 50)] == [lam(0), lam(5), lam(10), lam(50)]


# ---------------------------------------------------------------------------------------------
# momentum correction


class PlainParams(nn.Module):
    """No supported layer: SP-NGD applies momentum SGD with U = the gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()  # gradient = c, whatever w is


LRS = [1.0, 1.0, 0.5, 0.5, 0.1, 0.3, 0.03]  # drops at steps 2, 4, 6; a rise at 5
WEIGHT_DECAY = 0.1


def _trajectory(momentum_correction: bool | None) -> list[torch.Tensor]:
    """θ_0 … θ_T of SP-NGD (momentum 0.9, weight decay) on a model without curvature layers
    (U = ∇ = c) under the LRS schedule; ``None``: torch.optim.SGD instead."""
    model = PlainParams()
    if momentum_correction is None:
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=WEIGHT_DECAY)
    else:
        with pytest.warns(UserWarning, match="no supported layer"):
            opt = SPNGD(model, lr=1.0, momentum=0.9, weight_decay=WEIGHT_DECAY, momentum_correction=momentum_correction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: LRS[min(t, len(LRS) - 1)])
    c = torch.tensor([0.25, -1.0, 2.0])
    thetas = [model.w.detach().clone()]
    for t in range(len(LRS)):
        assert opt.param_groups[0]["lr"] == LRS[t]
        opt.zero_grad()
        model(c).backward()
        opt.step()
        sched.step()
        thetas.append(model.w.detach().clone())
    return thetas


def _paper_trajectory() -> list[torch.Tensor]:
    """The recipe's update, written as Goyal et al. write it: the step u (in parameter units)
    follows u_t = m·(η_t/η_{t−1})·u_{t−1} + η_t·(U_t + wd·θ_{t−1}), θ_t = θ_{t−1} − u_t."""
    theta = PlainParams().w.detach().clone()
    c = torch.tensor([0.25, -1.0, 2.0])
    thetas, u = [theta.clone()], None
    for t, lr in enumerate(LRS):
        d = c + WEIGHT_DECAY * theta
        u = lr * d if u is None else 0.9 * (lr / LRS[t - 1]) * u + lr * d
        theta = theta - u
        thetas.append(theta.clone())
    return thetas


def test_momentum_correction_follows_the_papers_update_on_a_step_schedule():
    """torch's form (v ← m·v + d, θ −= η·v) already rescales the history by η_t/η_{t−1}: the
    recipe's correction must not be applied a second time (that would scale it by (η_t/η_{t−1})²)."""
    want = _paper_trajectory()
    for got_t, want_t in zip(_trajectory(momentum_correction=True), want):
        torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


def test_default_update_is_torch_sgd():
    for got_t, want_t in zip(_trajectory(momentum_correction=False), _trajectory(None)):
        torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# weight rescaling


def test_rescaled_weight_norm_limit_values():
    assert rescaled_weight_norm_limit(nn.Linear(7, 5)) == pytest.approx(math.sqrt(10))
    assert rescaled_weight_norm_limit(nn.Linear(7, 5, bias=False)) == pytest.approx(math.sqrt(10))
    conv = nn.Conv2d(2, 3, kernel_size=(3, 5))  # fan_out = out_channels · kh · kw = 45
    assert rescaled_weight_norm_limit(conv) == pytest.approx(math.sqrt(90))
    assert rescaled_weight_norm_limit(nn.Conv2d(4, 6, 3)) == pytest.approx(math.sqrt(2 * 54))
    with pytest.raises(TypeError):
        rescaled_weight_norm_limit(nn.BatchNorm2d(3))


def _rescale_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 5), padding=(1, 2)),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
    ).double()


def _one_step(model: nn.Module, opt: SPNGD) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 4, 4, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    opt.zero_grad()
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.backward(loss, out)
    opt.step()


def test_weight_rescale_projects_only_weights_above_the_limit():
    """lr=0: the update is zero, so only the rescaling acts. Conv and the first Linear are pushed
    above √(2·fan_out) and come back exactly onto it (same direction); the last Linear is below
    and is untouched bit for bit; biases and BatchNorm parameters are never rescaled."""
    model = _rescale_model()
    conv, bn, lin1, lin2 = model[0], model[1], model[4], model[6]
    limits = {m: rescaled_weight_norm_limit(m) for m in (conv, lin1, lin2)}
    assert limits[conv] == pytest.approx(math.sqrt(2 * 3 * 3 * 5))
    with torch.no_grad():
        conv.weight.mul_(3.0 * limits[conv] / conv.weight.norm())
        lin1.weight.mul_(1.5 * limits[lin1] / lin1.weight.norm())
        lin2.weight.mul_(0.5 * limits[lin2] / lin2.weight.norm())
        bn.weight.fill_(50.0)  # huge, but BN is not a rescaled layer
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = SPNGD(model, lr=0.0, fisher="emp", weight_rescale=True)
    _one_step(model, opt)
    for m, name in ((conv, "0.weight"), (lin1, "4.weight")):
        assert float(m.weight.norm()) == pytest.approx(limits[m], rel=1e-12)
        torch.testing.assert_close(
            m.weight / m.weight.norm(), before[name] / before[name].norm(), rtol=1e-12, atol=1e-14
        )
    for name, p in model.named_parameters():
        if name not in ("0.weight", "4.weight"):
            assert torch.equal(p, before[name]), f"{name} changed"


def test_weight_rescale_after_a_real_update():
    """With lr > 0 the rescaling applies to the updated weight: the result equals the run
    without rescaling, projected onto the norm ball by hand."""
    model_a, model_b = _rescale_model(), _rescale_model()
    for model in (model_a, model_b):
        with torch.no_grad():
            model[4].weight.mul_(1.2 * rescaled_weight_norm_limit(model[4]) / model[4].weight.norm())
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="emp")
    _one_step(model_a, SPNGD(model_a, weight_rescale=True, **kw))
    _one_step(model_b, SPNGD(model_b, weight_rescale=False, **kw))
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        module = model_b[int(name.split(".")[0])]
        if name.endswith("weight") and isinstance(module, (nn.Linear, nn.Conv2d)):
            limit = rescaled_weight_norm_limit(module)
            expected = pb * min(1.0, limit / float(pb.norm()))
            torch.testing.assert_close(pa, expected, rtol=1e-12, atol=1e-14)
        else:
            assert torch.equal(pa, pb), name
    assert float(model_b[4].weight.norm()) > rescaled_weight_norm_limit(model_b[4])  # the case was exercised
    assert float(model_a[4].weight.norm()) == pytest.approx(rescaled_weight_norm_limit(model_a[4]), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# learning-rate schedule


def test_lr_factor_warmup_then_polynomial_decay():
    f = lr_factor_fn(total_steps=100, warmup_steps=10, schedule="poly", poly_power=2.0)
    assert f(0) == pytest.approx(1 / 11)  # linear warm-up from 1/(w+1), never zero
    assert f(4) == pytest.approx(5 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)  # decay starts at 1
    assert f(55) == pytest.approx((1 - 45 / 90) ** 2)  # = 0.25
    assert f(82) == pytest.approx((1 - 72 / 90) ** 2)
    assert f(100) == pytest.approx(0.0)
    assert f(150) == pytest.approx(0.0)  # clamped after the end
    values = [f(t) for t in range(10, 101)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_lr_factor_variants():
    lin = lr_factor_fn(total_steps=20, poly_power=1.0)
    assert [lin(t) for t in (0, 5, 10, 20)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    floor = lr_factor_fn(total_steps=100, warmup_steps=10, final_factor=0.1)
    assert floor(55) == pytest.approx(0.1 + 0.9 * 0.25)
    assert floor(100) == pytest.approx(0.1)
    cos = lr_factor_fn(total_steps=110, warmup_steps=10, schedule="cosine")
    assert [cos(10), cos(60), cos(110)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    const = lr_factor_fn(total_steps=50, warmup_steps=4, schedule="constant")
    assert [const(0), const(3), const(4), const(49)] == pytest.approx([0.2, 0.8, 1.0, 1.0])
    short = lr_factor_fn(total_steps=5, warmup_steps=50)  # warm-up longer than the run: clipped
    assert [short(t) for t in range(5)] == pytest.approx([(t + 1) / 6 for t in range(5)])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=0),
        dict(total_steps=-5),
        dict(total_steps=10, warmup_steps=-1),
        dict(total_steps=10, schedule="step"),
    ],
)
def test_lr_factor_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        lr_factor_fn(**kwargs)


def test_build_lr_scheduler_sets_the_optimizer_lr_per_step():
    model = nn.Linear(3, 2)
    opt = SPNGD(model, lr=0.2)
    sched = build_lr_scheduler(opt, total_steps=30, warmup_steps=5)
    f = lr_factor_fn(30, 5)
    seen = []
    for _ in range(31):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([0.2 * f(t) for t in range(31)], rel=1e-12)
