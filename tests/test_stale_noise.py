"""Noise-aware stale statistics (docs/design.md, "Telling change from sampling noise").

``StalePolicy(rule="noise")`` compares d = √max(0, r² − (1 + c)·ν²) with the threshold, where r is
the paper's relative change and ν the relative sampling noise of the collected statistic X,
measured from the two halves of the batch: ν² = ‖S₁ − S₂‖²_F / (rows² ‖Ê‖²_F) with S₁, S₂ the sums
over the first and second half of the examples, and c = 1 without EMA, (1−b)(1+b^k)/((1+b)(1−b^k))
with an EMA over k refreshes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from steps import train_step
from test_stale import intervals, make_model
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.refresh import RefreshSchedule, StalePolicy

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64_default", "one_thread"),
]

CAP = 8


def stationary(step: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A new batch from one fixed distribution: the statistics change by sampling noise only."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def drifting(step: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose scale grows by 15 % a step and whose mean moves: the first convolution's A
    and G change by far more than 10 % at every step."""
    x, y = stationary(step, n)
    pattern = torch.linspace(-1.0, 1.0, 16).view(1, 1, 4, 4)
    return 1.15**step * (x + 0.5 * step * pattern), y


def _run(data, rule: str, steps: int = 40):
    model = make_model()
    opt = SPNGD(
        model, lr=0.0, fisher="mc", damping=1e-2, seed=0, stale=StalePolicy(threshold=0.1, max_interval=CAP, rule=rule)
    )
    history = []
    for step in range(steps):
        train_step(model, opt, *data(step))
        history.append(intervals(opt))
    return opt, history


def test_rule_is_validated():
    assert StalePolicy(rule="noise").rule == "noise"
    assert StalePolicy().rule == "relative"  # the paper's rule stays the default
    with pytest.raises(ValueError, match="rule"):
        StalePolicy(rule="drift")


def test_noise_only_statistics_lengthen_intervals():
    """Stationary data, frozen weights, sampled labels: every statistic changes by sampling noise
    only. The paper's rule reads that noise as change for some statistics (their intervals stay
    short); the noise-aware rule brings every interval to the cap."""
    paper, paper_history = _run(stationary, "relative")
    noise, noise_history = _run(stationary, "noise")

    def mean_interval(history, stat):  # over steps 10..39 (an occasional halving is a false alarm)
        return sum(h[stat] for h in history[10:]) / len(history[10:])

    for stat in noise_history[0]:
        assert mean_interval(noise_history, stat) >= 0.9 * CAP, stat
    short = [s for s in paper_history[0] if mean_interval(paper_history, s) < CAP / 2]
    assert len(short) >= 2, "the data must make the paper's rule keep some intervals short"
    assert noise.counters["factor_work_skipped"] > paper.counters["factor_work_skipped"] + 0.2


def test_drifting_statistics_keep_short_intervals():
    """The first convolution's statistics drift at every step: the noise-aware rule refreshes them
    at every step, like the paper's rule."""
    noise, history = _run(drifting, "noise")
    for stat in (("0", "A"), ("0", "G")):
        assert [h[stat] for h in history] == [1] * len(history), stat


def test_every_step_statistics_are_unchanged_by_the_split():
    """Cutting each call into two halves changes where the rows are summed, not the statistics:
    with intervals capped at 1 the noise-aware run trains like the fixed every-step schedule."""
    common = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="mc", seed=5)
    runs = []
    for stale in (False, StalePolicy(threshold=0.1, max_interval=1, rule="noise")):
        model = make_model()
        opt = SPNGD(model, stale=stale, **common)
        for step in range(6):
            train_step(model, opt, *stationary(step, 32))
        runs.append((opt.factors(), [p.detach().clone() for p in model.parameters()]))
    (f_ref, p_ref), (f_got, p_got) = runs
    for layer in f_ref:
        for name in f_ref[layer]:
            torch.testing.assert_close(f_got[layer][name], f_ref[layer][name], rtol=1e-10, atol=1e-12)
    for a, b in zip(p_ref, p_got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the measured drift against a float64 hand computation


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    x = 2.0**step * torch.randn(n, 6, generator=g) + 1.5 * step
    return x, torch.randint(0, 3, (n,), generator=g)


def _rows(probe: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """Per example, its contribution to each statistic, flattened so that a plain squared norm is
    the (weighted) Frobenius norm: dense a aᵀ, g gᵀ; BN (u_γ², √2·u_γu_β, u_β²) per channel, with
    the empirical Fisher's per-example gradients N·∂L/∂s."""
    n = x.shape[0]
    lin1, bn, _, lin2 = probe
    s1 = lin1(x)
    s1.retain_grad()
    h = bn(s1)
    h.retain_grad()
    t = torch.tanh(h)
    out = lin2(t)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    ones = torch.ones(n, 1)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([t.detach(), ones], 1)
    g1, gh, g2 = n * s1.grad, n * h.grad, n * out.grad
    xhat = F.batch_norm(s1.detach(), None, None, training=True, eps=bn.eps)
    ug, ub = gh * xhat, gh
    outer = lambda v: (v[:, :, None] * v[:, None, :]).reshape(n, -1)  # noqa: E731
    bn_rows = torch.stack([ug * ug, 2**0.5 * ug * ub, ub * ub], dim=2).reshape(n, -1)
    return {
        ("0", "A"): outer(a1),
        ("0", "G"): outer(g1),
        ("1", "F"): bn_rows,
        ("3", "A"): outer(a2),
        ("3", "G"): outer(g2),
    }


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_drift_matches_a_hand_computation(monkeypatch, ema_decay):
    model = _mlp()
    probe = copy.deepcopy(model)  # no hooks; lr=0 keeps both equal
    opt = SPNGD(
        model,
        lr=0.0,
        fisher="emp",
        damping=1e-2,
        ema_decay=ema_decay,
        stale=StalePolicy(threshold=0.1, max_interval=1, rule="noise"),
    )
    recorded = []
    record = opt._schedule.record
    monkeypatch.setattr(
        opt._schedule,
        "record",
        lambda step, ids, changes: (recorded.append((ids, changes)), record(step, ids, changes)),
    )
    b = ema_decay
    ema: dict = {}
    checked = positive = noise_matters = 0
    for step in range(4):
        x, y = _batch(step)
        rows = _rows(probe, x, y)
        recorded.clear()
        train_step(model, opt, x, y)
        ((ids, changes),) = recorded
        got = {opt._state.accumulation.stat_ids[i]: r for i, r in zip(ids, changes)}
        got = {(opt.layers[i].name, name): r for (i, name), r in got.items()}
        for stat, per_example in rows.items():
            n, h = per_example.shape[0], per_example.shape[0] // 2
            new = per_example.mean(0)
            noise_sq = float(((per_example[:h].sum(0) - per_example[h:].sum(0)) / n).square().sum())
            k = step  # refreshes before this one
            if k:
                s = ema[stat]
                old = s if b is None else s / (1 - b**k)
                c = 1.0 if b is None else (1 - b) * (1 + b**k) / ((1 + b) * (1 - b**k))
                r_sq = float((new - old).square().sum())
                want = (max(0.0, r_sq - (1 + c) * noise_sq) / float(old.square().sum())) ** 0.5
                assert got[stat] == pytest.approx(want, rel=1e-9, abs=1e-12), f"step {step}: {stat}"
                checked += 1
                positive += want > 0
                noise_matters += (1 + c) * noise_sq > 0.01 * r_sq
            else:
                assert not got[stat] < float("inf"), f"first refresh of {stat} must read as large"
            ema[stat] = new if b is None or not k else b * ema[stat] + (1 - b) * new
            if b is not None and not k:
                ema[stat] = (1 - b) * new
    assert checked == 15 and positive >= 8 and noise_matters >= 5, (checked, positive, noise_matters)


# ---------------------------------------------------------------------------------------------
# work that is not due costs nothing


class HostReads:
    """Counts device-to-host reads made from Python (Tensor.item/tolist/__bool__/__float__/__int__)
    inside the ``with`` block."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.count = 0
        self._saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

    def __enter__(self) -> HostReads:
        for name, original in self._saved.items():

            def spy(t, *a, _original=original, **kw):
                self.count += 1
                return _original(t, *a, **kw)

            setattr(torch.Tensor, name, spy)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("rule", ["relative", "noise"])
def test_steps_with_nothing_due_do_no_curvature_work(monkeypatch, rule):
    """On a step where no statistic is due: no statistic kernel, no output-gradient hook, no
    sampled-label backward, no inversion, no output-tensor hook registered, no half-batch sum, and exactly one host read in
    ``opt.step()`` (the non-finite flag, which SGD with a finite check would need too)."""
    from test_stale import Spies

    spies = Spies(monkeypatch)
    model = make_model()
    opt = SPNGD(
        model, lr=0.0, fisher="mc", damping=1e-2, seed=0, stale=StalePolicy(threshold=1e9, max_interval=CAP, rule=rule)
    )
    acc = opt._state.accumulation
    hooks = []
    original_backward = acc.accumulate_backward
    monkeypatch.setattr(acc, "accumulate_backward", lambda *a: (hooks.append(a[0]), original_backward(*a)))
    registered = []
    original_register = torch.Tensor.register_hook
    monkeypatch.setattr(
        torch.Tensor, "register_hook", lambda t, fn: (registered.append(t), original_register(t, fn))[1]
    )
    idle = 0
    for step in range(12):
        x, y = stationary(step, 64)
        nothing_due = not any(opt._schedule.due(step))
        spies.reset()
        hooks.clear()
        registered.clear()
        mc_before = opt.counters["mc_backwards"]
        half_before = None if opt._state.buffers.half is None else opt._state.buffers.half.clone()
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        with HostReads() as reads:
            opt.step()
        if nothing_due:
            idle += 1
            assert not spies.stats and not spies.inverted and not hooks and not registered, step
            assert opt.counters["mc_backwards"] == mc_before, step
            assert reads.count == 1, f"step {step}: {reads.count} host reads"
            if half_before is not None:
                assert torch.equal(opt._state.buffers.half, half_before)
        else:
            assert reads.count >= 2, step  # the flag and the changes (and the Cholesky flags)
    assert idle == 12 - 4  # refreshes at steps 0, 1, 3, 7 (every change is below 1e9)


def test_aligned_intervals_fall_due_on_nested_steps():
    """StalePolicy(align=True): a statistic with interval k is next due at the next multiple of k,
    so with power-of-two intervals every step where one is due is a step where all statistics with
    a shorter or equal interval are due too; unaligned, the same intervals cover more steps."""
    due_steps = {}
    for align in (False, True):
        schedule = RefreshSchedule(3, fixed_interval=1, policy=StalePolicy(max_interval=8, align=align))
        seen = []
        pending = {2: 5, 1: 9}  # a statistic changes once at its first refresh from that step on
        for step in range(40):
            due = [s for s, flag in enumerate(schedule.due(step)) if flag]
            if align:  # due at a multiple of the interval it was given (after the first doublings)
                assert all(step % schedule.intervals[s] == 0 for s in due if step >= 8), (step, due)
            changes = [1.0 if step >= pending.get(s, 99) else 0.0 for s in due]
            for s in due:
                if step >= pending.get(s, 99):
                    del pending[s]  # its interval halves once; unaligned, its phase moves
            schedule.record(step, due, changes)
            if due:
                seen.append(step)
        due_steps[align] = seen
        if align:
            assert schedule.next_due == [40, 40, 40]
    assert len(due_steps[True]) < len(due_steps[False]), due_steps
