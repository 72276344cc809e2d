"""Stale statistics (docs/design.md, "Stale statistics"): per-statistic adaptive refresh intervals.

Everything runs on CPU in float64 with tiny models. The optimizer's work is observed from the
outside: the statistic kernels (``ops.accumulate_factor``, ``ops.conv_a_factor``,
``ops.bn_unitwise_fisher`` and, on CPU, ``ops.bn_unitwise_fisher_from_input``) and the inversion kernel (``ops.cholesky_inverse_damped``) are
wrapped with counting spies, and every statistic of the test model has its own size, so each
call can be attributed to exactly one statistic.

The refresh rule checked (a shadow of it is kept here, from public counters only): a statistic is
due at step t when t ≥ (step of its last refresh) + (its interval after that refresh); the first
refresh is at step 0.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from steps import train_step
from torch import nn

from spngd_ext import SPNGD, ops
from spngd_ext.refresh import DEFAULT_MAX_INTERVAL, RefreshSchedule, StalePolicy

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64_default", "one_thread"),
]

N = 32  # examples per batch


# ---------------------------------------------------------------------------------------------
# model, data, spies


def make_model() -> nn.Sequential:
    """Conv (A 9×9, G 3×3) → BN (F, 3 channels) → ReLU → Linear (A 49×49, G 5×5): every statistic
    has a distinct size, so a kernel call tells which statistic it computed."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    ).double()


# (layer name in counters["intervals"], statistic) for make_model()
CONV_A, CONV_G, BN_F, LIN_A, LIN_G = ("0", "A"), ("0", "G"), ("1", "F"), ("4", "A"), ("4", "G")
ALL_STATS = (CONV_A, CONV_G, BN_F, LIN_A, LIN_G)
KRON_STATS = (CONV_A, CONV_G, LIN_A, LIN_G)
PACKED_TO_STAT = {9 * 10 // 2: CONV_A, 3 * 4 // 2: CONV_G, 49 * 50 // 2: LIN_A, 5 * 6 // 2: LIN_G}
DIM_TO_STAT = {9: CONV_A, 3: CONV_G, 49: LIN_A, 5: LIN_G}


def batch(seed: int, *, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch. ``shifted``: another input distribution (scaled, with a spatial pattern)
    and other labels — every statistic of make_model() moves by far more than 10 %."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (N,), generator=g)
    if shifted:
        pattern = torch.linspace(-2.0, 2.0, 16).view(1, 1, 4, 4)
        x = 3.0 * x.abs() + 4.0 * pattern
        y = (y + 1 + torch.randint(0, 3, (N,), generator=g)) % 5
    return x, y


class Spies:
    """Counts the statistic and inversion kernels' calls, by statistic, for the current step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stats: Counter = Counter()
        self.inverted: Counter = Counter()  # statistic -> matrices inverted
        self.batches: list[tuple[int, int]] = []  # (B, n) of each inversion call
        acc, conv, bn, chol = (
            ops.accumulate_factor,
            ops.conv_a_factor,
            ops.bn_unitwise_fisher,
            ops.cholesky_inverse_damped,
        )
        bn_in = ops.bn_unitwise_fisher_from_input

        def accumulate_factor(state, x, **kw):
            self.stats[PACKED_TO_STAT[state.numel()]] += 1
            return acc(state, x, **kw)

        def conv_a_factor(state, x, **kw):
            self.stats[PACKED_TO_STAT[state.numel()]] += 1
            return conv(state, x, **kw)

        def bn_unitwise_fisher(state, grad_out, xhat, **kw):
            self.stats[BN_F] += 1
            return bn(state, grad_out, xhat, **kw)

        def bn_unitwise_fisher_from_input(state, grad_out, x, **kw):  # the CPU path of the BN Fisher
            self.stats[BN_F] += 1
            return bn_in(state, grad_out, x, **kw)

        def cholesky_inverse_damped(mats, damping, **kw):
            self.batches.append((mats.shape[0], mats.shape[1]))
            self.inverted[DIM_TO_STAT[mats.shape[1]]] += mats.shape[0]
            return chol(mats, damping, **kw)

        monkeypatch.setattr(ops, "accumulate_factor", accumulate_factor)
        monkeypatch.setattr(ops, "conv_a_factor", conv_a_factor)
        monkeypatch.setattr(ops, "bn_unitwise_fisher", bn_unitwise_fisher)
        monkeypatch.setattr(ops, "bn_unitwise_fisher_from_input", bn_unitwise_fisher_from_input)
        monkeypatch.setattr(ops, "cholesky_inverse_damped", cholesky_inverse_damped)

    def reset(self) -> None:
        self.stats.clear()
        self.inverted.clear()
        self.batches.clear()


def interval(opt: SPNGD, stat: tuple[str, str]) -> int:
    return opt.counters["intervals"][stat[0]][stat[1]]


def intervals(opt: SPNGD) -> dict[tuple[str, str], int]:
    return {(layer, name): k for layer, d in opt.counters["intervals"].items() for name, k in d.items()}


class Shadow:
    """The due steps implied by the public intervals: next due = refresh step + new interval."""

    def __init__(self, stats=ALL_STATS) -> None:
        self.next_due = {s: 0 for s in stats}

    def due(self, step: int) -> set:
        return {s for s, t in self.next_due.items() if step >= t}

    def record(self, step: int, refreshed: set, opt: SPNGD) -> None:
        for s in refreshed:
            self.next_due[s] = step + interval(opt, s)


# ---------------------------------------------------------------------------------------------
# StalePolicy and RefreshSchedule (pure host-side logic)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, float("nan"), float("inf"), "0.1", None])
def test_policy_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        StalePolicy(threshold=threshold)


@pytest.mark.parametrize("max_interval", [0, -3, 2.0, True, "4"])
def test_policy_rejects_bad_max_interval(max_interval):
    with pytest.raises(ValueError, match="max_interval"):
        StalePolicy(max_interval=max_interval)


def test_policy_accepts_valid_values():
    assert StalePolicy().threshold == 0.1 and StalePolicy().max_interval is None
    p = StalePolicy(threshold=2, max_interval=1)
    assert (p.threshold, p.max_interval) == (2, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threshold = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("stale", ["yes", 1, 0, 0.1, None])
def test_optimizer_rejects_bad_stale(stale):
    with pytest.raises(ValueError, match="stale"):
        SPNGD(make_model(), stale=stale)


def test_schedule_doubles_halves_and_caps():
    s = RefreshSchedule(3, fixed_interval=1, policy=StalePolicy(threshold=0.1, max_interval=8))
    assert s.adaptive and s.max_interval == 8
    assert s.intervals == [1, 1, 1] and s.due(0) == [True, True, True]
    # small change doubles, large (>= threshold) halves, never below 1
    s.record(0, [0, 1, 2], [0.05, 0.1, 0.5])
    assert s.intervals == [2, 1, 1]
    assert s.next_due == [2, 1, 1]
    assert s.due(1) == [False, True, True] and s.due(2) == [True, True, True]
    for step in (2, 6, 14, 22):  # 2 → 4 → 8 → 8 → 8: capped at max_interval
        s.record(step, [0], [0.0])
    assert s.intervals[0] == 8 and s.next_due[0] == 30
    s.record(30, [0], [0.2])
    assert s.intervals[0] == 4 and s.next_due[0] == 34
    s.record(34, [0], [0.3])
    s.record(36, [0], [0.3])
    s.record(37, [0], [0.3])
    assert s.intervals[0] == 1 and s.next_due[0] == 38
    assert s.refreshes == [9, 1, 1]


@pytest.mark.parametrize("change", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_schedule_nonfinite_or_negative_change_counts_as_large(change):
    s = RefreshSchedule(1, fixed_interval=1, policy=StalePolicy(threshold=1e9, max_interval=16))
    s.record(0, [0], [0.0])
    s.record(2, [0], [0.0])
    assert s.intervals == [4]
    s.record(6, [0], [change])
    assert s.intervals == [2] and s.next_due == [8]


def test_schedule_only_touches_refreshed_statistics():
    s = RefreshSchedule(4, fixed_interval=1, policy=StalePolicy(max_interval=4))
    s.record(0, [1, 3], [0.0, 0.0])
    assert s.intervals == [1, 2, 1, 2] and s.next_due == [0, 2, 0, 2] and s.refreshes == [0, 1, 0, 1]
    assert s.due(1) == [True, False, True, False]


def test_schedule_max_interval_resolution():
    assert RefreshSchedule(1, fixed_interval=1, policy=StalePolicy()).max_interval == DEFAULT_MAX_INTERVAL
    assert RefreshSchedule(1, fixed_interval=7, policy=StalePolicy()).max_interval == 7
    assert RefreshSchedule(1, fixed_interval=7, policy=StalePolicy(max_interval=3)).max_interval == 3


def test_schedule_fixed_interval_is_every_kth_step():
    s = RefreshSchedule(2, fixed_interval=3, policy=None)
    assert not s.adaptive
    assert [s.due(t)[0] for t in range(7)] == [True, False, False, True, False, False, True]
    s.record(0, [0, 1], [])
    assert s.intervals == [3, 3] and s.refreshes == [1, 1]


def test_schedule_state_dict_round_trip():
    policy = StalePolicy(threshold=0.2, max_interval=16)
    s = RefreshSchedule(3, fixed_interval=1, policy=policy)
    s.record(0, [0, 1, 2], [0.0, 1.0, 0.1])
    s.record(1, [1, 2], [0.0, 0.0])
    s.record(2, [0], [0.05])
    sd = s.state_dict()
    t = RefreshSchedule(3, fixed_interval=1, policy=policy)
    t.load_state_dict(sd)
    assert t.state_dict() == sd
    assert (t.intervals, t.next_due, t.refreshes) == (s.intervals, s.next_due, s.refreshes)
    assert [t.due(k) for k in range(10)] == [s.due(k) for k in range(10)]
    sd["intervals"][0] = 99  # a copy, not a view into the loaded schedule
    assert t.intervals[0] != 99
    with pytest.raises(ValueError, match="statistics"):
        RefreshSchedule(2, fixed_interval=1, policy=policy).load_state_dict(s.state_dict())


# ---------------------------------------------------------------------------------------------
# the optimizer's intervals


def test_intervals_grow_to_max_on_a_stationary_problem():
    """The same batch, fisher='emp' (no sampling noise), lr=0 (the model does not move): every
    relative change after the first refresh is 0, so every interval doubles to max_interval."""
    model = make_model()
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-2, stale=StalePolicy(threshold=0.1, max_interval=8))
    x, y = batch(1)
    history = []
    for _ in range(20):
        train_step(model, opt, x, y)
        history.append(intervals(opt))
    assert set(history[0]) == set(ALL_STATS)
    # step 0: no previous estimate (large change) → 1; then doubling at steps 1, 3, 7.
    expected = {0: 1, 1: 2, 2: 2, 3: 4, 6: 4, 7: 8, 19: 8}
    for step, k in expected.items():
        assert history[step] == {s: k for s in ALL_STATS}, f"after step {step}: {history[step]}"
    params = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, x, y)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters())), "lr=0 must not move the model"


def test_intervals_halve_after_an_abrupt_change(monkeypatch):
    """After the switch of input distribution (and labels), the first refresh of every statistic
    sees a large change and halves its interval; with the new batch fixed, the next one doubles."""
    spies = Spies(monkeypatch)
    model = make_model()
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-2, stale=StalePolicy(threshold=0.1, max_interval=8))
    old, new = batch(1), batch(2, shifted=True)
    switch = 20
    shadow = Shadow()
    first_after = {}  # statistic -> (step, interval before, interval after)
    second_after = {}
    for step in range(switch + 20):
        before = intervals(opt)
        due = shadow.due(step)
        spies.reset()
        train_step(model, opt, *(old if step < switch else new))
        refreshed = set(spies.stats)
        assert refreshed == due, f"step {step}: computed {sorted(refreshed)}, due {sorted(due)}"
        shadow.record(step, refreshed, opt)
        after = intervals(opt)
        for s in refreshed:
            if step >= switch:
                if s not in first_after:
                    first_after[s] = (step, before[s], after[s])
                elif s not in second_after:
                    second_after[s] = (step, before[s], after[s])
    assert set(first_after) == set(ALL_STATS), "every statistic must refresh after the switch"
    for s, (step, k_before, k_after) in first_after.items():
        assert k_before == 8, f"{s}: interval {k_before} before the switch, expected max_interval 8"
        assert k_after == k_before // 2, (
            f"{s}: first refresh after the switch (step {step}): {k_before} → {k_after}, expected halving"
        )
    for s, (step, k_before, k_after) in second_after.items():
        assert k_after == 2 * k_before, f"{s}: the new data is stationary again, expected doubling at step {step}"


def test_intervals_halve_down_to_one_under_constant_change():
    """Changes that stay large keep every interval at 1 (never 0, never negative)."""
    model = make_model()
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-2, stale=StalePolicy(threshold=0.1, max_interval=8))
    for step in range(6):
        train_step(model, opt, *batch(10 + step, shifted=step % 2 == 1))
        assert set(intervals(opt).values()) == {1}
    assert opt.counters["factor_work_skipped"] == 0.0


def test_only_due_statistics_are_computed_and_inverted(monkeypatch):
    """A label switch changes G and F but not A (lr=0, same inputs): the intervals desynchronise,
    so there are steps on which only some statistics are due. On every step exactly the due
    statistics are computed (once each), both sides of every Kronecker layer with a refreshed
    side are re-inverted (π-damping couples them), and the other layers keep the very same
    inverse tensors."""
    spies = Spies(monkeypatch)
    model = make_model()
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-2, stale=StalePolicy(threshold=0.05, max_interval=8))
    x, y1 = batch(1)
    y2 = (y1 + 2) % 5
    shadow = Shadow()
    prev_inv = None
    partial_steps = idle_steps = one_sided = 0
    for step in range(48):
        due = shadow.due(step)
        spies.reset()
        train_step(model, opt, x, y1 if step < 20 else y2)
        assert dict(spies.stats) == {s: 1 for s in due}, f"step {step}: computed {dict(spies.stats)}, due {sorted(due)}"
        layers_due = {layer for layer, _ in due if (layer, "A") in KRON_STATS}
        kron_due = {(layer, side) for layer in layers_due for side in ("A", "G")}
        assert dict(spies.inverted) == {s: 1 for s in kron_due}, (
            f"step {step}: inverted {dict(spies.inverted)}, due {sorted(due)}"
        )
        # equal sizes are batched: at most one inversion call per matrix size
        assert len({n for _, n in spies.batches}) == len(spies.batches)
        inv = {name: pair for name, pair in opt.inverses().items()}
        if prev_inv is not None:
            for layer, (a_inv, g_inv) in inv.items():
                for side, tensor in (("A", a_inv), ("G", g_inv)):
                    same = tensor is prev_inv[layer][0 if side == "A" else 1]
                    assert same == (layer not in layers_due), f"step {step}: {layer}.{side} inverse identity"
        prev_inv = inv
        shadow.record(step, set(spies.stats), opt)
        partial_steps += 0 < len(due) < len(ALL_STATS)
        idle_steps += not due
        one_sided += any(len({n for lay, n in due if lay == layer}) == 1 for layer in layers_due)
    assert partial_steps >= 3 and idle_steps >= 10, (partial_steps, idle_steps)
    assert one_sided >= 2, one_sided  # steps that refreshed one side of a layer: the coupling was exercised
    # A never changed (lr=0, same inputs): it stays at the cap; G and F were halved at the switch
    assert interval(opt, CONV_A) == interval(opt, LIN_A) == 8
    assert opt.counters["inversion_retries"] == 0


def test_mc_backward_skipped_when_no_output_gradient_statistic_is_due():
    """fisher='mc' on one Linear layer. Moving the inputs inside the null space of W changes A
    but not the logits (so not the sampled-label G): A's interval halves while G's stays at the
    cap. Steps on which only A is due must run no sampled-label backward."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3).double()
    g = torch.Generator().manual_seed(1)
    n = 2048
    x1 = torch.randn(n, 8, generator=g)
    null = torch.linalg.svd(model.weight.detach(), full_matrices=True).Vh[3:]  # W @ null.T ≈ 0
    x2 = x1 + 3.0 * torch.randn(n, 5, generator=g) @ null
    y = torch.randint(0, 3, (n,), generator=g)
    torch.testing.assert_close(model(x1), model(x2), rtol=0, atol=1e-12)
    opt = SPNGD(model, lr=0.0, fisher="mc", damping=1e-2, seed=0, stale=StalePolicy(threshold=0.5, max_interval=8))
    shadow = Shadow([("<root>", "A"), ("<root>", "G")])
    seen = Counter()
    for step in range(40):
        due = shadow.due(step)
        before = opt.counters["mc_backwards"]
        x = x1 if step < 20 else x2
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
        ran = opt.counters["mc_backwards"] - before
        g_due = ("<root>", "G") in due
        assert ran == int(g_due), f"step {step}: {ran} sampled-label backward(s), G due: {g_due}"
        kinds = "A+G" if len(due) == 2 else ("G" if g_due else ("A" if due else "none"))
        seen[kinds] += 1
        shadow.record(step, due, opt)
    assert seen["A"] >= 2 and seen["G"] >= 2 and seen["none"] >= 10, dict(seen)
    assert opt.counters["mc_backwards"] == sum(v for k, v in seen.items() if "G" in k)


# ---------------------------------------------------------------------------------------------
# equivalences and bookkeeping


def _run(steps: int, **kw) -> tuple[list[torch.Tensor], dict]:
    model = make_model()
    opt = SPNGD(model, **kw)
    for step in range(steps):
        train_step(model, opt, *batch(100 + step % 3))
    return [p.detach().clone() for p in model.parameters()], opt.counters


@pytest.mark.parametrize(
    "variant",
    [
        dict(stale=False),
        dict(stale=False, curvature_interval=1, inverse_interval=1),
        dict(stale=StalePolicy(threshold=1e-30)),  # every change is "large": every interval stays 1
        dict(stale=StalePolicy(threshold=1e30, max_interval=1)),  # every change is "small", capped at 1
    ],
)
def test_every_step_refresh_is_bit_identical(variant):
    common = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="mc", seed=5, kl_clip=1e-2)
    ref, ref_counters = _run(7, **common)
    got, counters = _run(7, **common, **variant)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), f"{variant}: max |Δ| = {(a - b).abs().max():.3e}"
    assert counters["factor_work_skipped"] == 0.0 and counters["inverse_work_skipped"] == 0.0
    assert counters["mc_backwards"] == ref_counters["mc_backwards"] == 7
    assert set(intervals_from(counters).values()) == {1}


def intervals_from(counters: dict) -> dict:
    return {(layer, name): k for layer, d in counters["intervals"].items() for name, k in d.items()}


def test_skipped_fractions_match_a_hand_count_stale(monkeypatch):
    spies = Spies(monkeypatch)
    model = make_model()
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=1e-2, stale=StalePolicy(threshold=0.05, max_interval=8))
    x, y1 = batch(1)
    computed = inverted = 0
    steps = 37
    for step in range(steps):
        spies.reset()
        train_step(model, opt, x, y1 if step < 15 else (y1 + 1) % 5)
        computed += sum(spies.stats.values())
        inverted += sum(spies.inverted.values())
    c = opt.counters
    assert c["steps"] == steps
    assert c["factor_work_skipped"] == pytest.approx(1 - computed / (len(ALL_STATS) * steps), abs=1e-12)
    assert c["inverse_work_skipped"] == pytest.approx(1 - inverted / (len(KRON_STATS) * steps), abs=1e-12)
    assert 0.5 < c["factor_work_skipped"] < 1 and 0.5 < c["inverse_work_skipped"] < 1


def _damped_inverses_from_factors(factors: dict, damping: float) -> dict:
    """(Â⁻¹, Ĝ⁻¹) from the current estimates with π-damping, in float64 by dense inversion."""
    out = {}
    for name, f in factors.items():
        if "A" not in f:
            continue
        a, g = f["A"].double(), f["G"].double()
        pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
        eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype), torch.eye(g.shape[0], dtype=g.dtype)
        out[name] = (
            torch.linalg.inv(a + pi * math.sqrt(damping) * eye_a),
            torch.linalg.inv(g + math.sqrt(damping) / pi * eye_g),
        )
    return out


def test_stale_inverses_use_the_current_pi_and_damping(monkeypatch):
    """On every step that refreshes a side of a layer, both of its inverses equal those built
    from the current A and G with the current π and λ — also when only one side was refreshed,
    and under a damping schedule. A side kept from an older refresh would carry the old π and λ."""
    spies = Spies(monkeypatch)
    model = make_model()
    damping = lambda step: 1e-2 * (0.8**step)  # noqa: E731 — the schedule moves every step
    opt = SPNGD(model, lr=0.0, fisher="emp", damping=damping, stale=StalePolicy(threshold=0.05, max_interval=8))
    x, y1 = batch(1)
    one_sided = compared = 0
    for step in range(30):
        spies.reset()
        train_step(model, opt, x, y1 if step < 12 else (y1 + 2) % 5)
        want = _damped_inverses_from_factors(opt.factors(), damping(step))
        for layer, (a_inv, g_inv) in opt.inverses().items():
            fresh = {n for lay, n in spies.stats if lay == layer}
            if not fresh:
                continue
            one_sided += len(fresh) == 1
            compared += 1
            torch.testing.assert_close(a_inv, want[layer][0], rtol=1e-9, atol=1e-12, msg=f"step {step}, {layer} A")
            torch.testing.assert_close(g_inv, want[layer][1], rtol=1e-9, atol=1e-12, msg=f"step {step}, {layer} G")
    assert one_sided >= 2 and compared >= 6, (one_sided, compared)


def test_skipped_fractions_match_a_hand_count_fixed(monkeypatch):
    spies = Spies(monkeypatch)
    model = make_model()
    opt = SPNGD(model, lr=0.05, fisher="mc", damping=1e-2, seed=1, curvature_interval=3, inverse_interval=6)
    computed = inverted = 0
    steps = 10
    for step in range(steps):
        spies.reset()
        train_step(model, opt, *batch(100 + step))
        computed += sum(spies.stats.values())
        inverted += sum(spies.inverted.values())
    # factors at steps 0, 3, 6, 9; inverses at 0, 6
    assert computed == 4 * len(ALL_STATS) and inverted == 2 * len(KRON_STATS)
    c = opt.counters
    assert c["factor_work_skipped"] == pytest.approx(1 - 4 / 10, abs=1e-12)
    assert c["inverse_work_skipped"] == pytest.approx(1 - 2 / 10, abs=1e-12)
    assert c["mc_backwards"] == 4
    assert set(intervals(opt).values()) == {3}


# ---------------------------------------------------------------------------------------------
# checkpointing

STALE_KW = dict(
    lr=0.05,
    momentum=0.9,
    weight_decay=1e-3,
    damping=1e-2,
    fisher="mc",
    seed=3,
    stale=StalePolicy(threshold=0.3, max_interval=8),
)


def _data(step: int):
    return batch(200 + step % 4)


def test_checkpoint_resume_with_stale_is_bit_identical(monkeypatch):
    """Save at a step on which only some statistics are due, reload into a fresh model and
    optimizer (through torch.save/torch.load), continue: parameters, intervals and counters
    equal the uninterrupted run's, bit for bit."""
    spies = Spies(monkeypatch)
    total = 30
    model = make_model()
    opt = SPNGD(model, **STALE_KW)
    due_sets = []
    for step in range(total):
        spies.reset()
        train_step(model, opt, *_data(step))
        due_sets.append(set(spies.stats))
    ref_params = [p.detach().clone() for p in model.parameters()]
    ref_counters = opt.counters
    k = next(t for t in range(5, total - 5) if 0 < len(due_sets[t]) < len(ALL_STATS))

    model = make_model()
    opt = SPNGD(model, **STALE_KW)
    for step in range(k):
        train_step(model, opt, *_data(step))
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    blob.seek(0)
    ckpt = torch.load(blob)

    model2 = make_model()
    opt2 = SPNGD(model2, **STALE_KW)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    resumed_due = []
    for step in range(k, total):
        spies.reset()
        train_step(model2, opt2, *_data(step))
        resumed_due.append(set(spies.stats))
    assert resumed_due[0] == due_sets[k], (
        f"first step after resuming (step {k}) computed {sorted(resumed_due[0])}, "
        f"the uninterrupted run computed {sorted(due_sets[k])}"
    )
    assert resumed_due == due_sets[k:]
    for a, b in zip(ref_params, model2.parameters()):
        assert torch.equal(a, b), f"max |Δ| = {(a - b).abs().max():.3e}"
    assert opt2.counters == ref_counters


def test_checkpoint_resume_fixed_interval_is_bit_identical():
    kw = dict(STALE_KW, stale=False, curvature_interval=2, inverse_interval=4)
    model = make_model()
    opt = SPNGD(model, **kw)
    for step in range(11):
        train_step(model, opt, *_data(step))
    ref = [p.detach().clone() for p in model.parameters()]
    model = make_model()
    opt = SPNGD(model, **kw)
    for step in range(5):
        train_step(model, opt, *_data(step))
    model2 = make_model()
    opt2 = SPNGD(model2, **kw)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    for step in range(5, 11):
        train_step(model2, opt2, *_data(step))
    for a, b in zip(ref, model2.parameters()):
        assert torch.equal(a, b)
