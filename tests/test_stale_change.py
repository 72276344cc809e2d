"""The change r that drives stale statistics, checked by hand, with and without an EMA.

r = ‖X − Ê‖_F / ‖Ê‖_F: X is the statistic collected on this step, Ê the current estimate
(bias-corrected under ``ema_decay``) before X enters it. Comparing two successive EMA estimates
would read a change of X as (1−b)·r and keep every interval at its cap whatever the data does.
"""

from __future__ import annotations

import pytest
import torch
from steps import train_step
from test_stale import ALL_STATS, batch, intervals, make_model

from spngd_ext import SPNGD
from spngd_ext.refresh import StalePolicy

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("float64_default", "one_thread"),
]


def _collected_statistics(model, x, y) -> dict:
    """X of every statistic for this batch: a fresh every-step, no-EMA optimizer's estimates after
    one step on a copy of the model (lr=0 leaves the model as it is)."""
    probe = make_model()  # a copy without the hooks of the optimizer under test
    probe.load_state_dict(model.state_dict())
    opt = SPNGD(probe, lr=0.0, fisher="emp", damping=1e-2)
    train_step(probe, opt, x, y)
    return opt.factors()


def _frobenius_change(new: torch.Tensor, old: torch.Tensor, *, unitwise: bool) -> float:
    """‖new − old‖_F / ‖old‖_F of a dense factor, or (``unitwise``) of the 2×2 blocks of a BN
    Fisher stored (C, 3) = (γγ, γβ, ββ)."""
    weight = torch.ones_like(new)
    if unitwise:
        weight = torch.tensor([1.0, 2.0, 1.0], dtype=new.dtype).expand_as(new)  # γβ is two entries of the 2×2 block
    return float(((weight * (new - old) ** 2).sum() / (weight * old**2).sum()).sqrt())


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_measured_change_matches_a_hand_computation(monkeypatch, ema_decay):
    model = make_model()
    opt = SPNGD(
        model, lr=0.0, fisher="emp", damping=1e-2, ema_decay=ema_decay, stale=StalePolicy(threshold=0.1, max_interval=4)
    )
    recorded: list[tuple[int, list[int], list[float]]] = []
    record = opt._schedule.record

    def spy(step, refreshed, changes):
        recorded.append((step, list(refreshed), list(changes)))
        return record(step, refreshed, changes)

    monkeypatch.setattr(opt._schedule, "record", spy)
    checked = 0
    for step in range(12):
        x, y = batch(100 + step, shifted=step % 3 == 2)  # moderate and large changes, some below 0.1
        before = opt.factors()  # the current, bias-corrected estimates
        collected = _collected_statistics(model, x, y)
        recorded.clear()
        train_step(model, opt, x, y)
        if not recorded:
            continue
        ((_, refreshed, changes),) = recorded
        for stat, r in zip(refreshed, changes):
            layer_index, name = opt._state.accumulation.stat_ids[stat]
            layer = opt.layers[layer_index].name
            if layer not in before or name not in before[layer]:
                assert r == float("inf") or r != r, (
                    f"step {step}: first refresh of {layer}.{name} must read as large, got {r}"
                )
                continue
            want = _frobenius_change(collected[layer][name], before[layer][name], unitwise=name == "F")
            assert r == pytest.approx(want, rel=1e-9, abs=1e-12), f"step {step}: {layer}.{name}"
            checked += 1
    assert checked >= 15, checked


def test_ema_does_not_hide_a_change_from_the_stale_policy():
    """With ema_decay=0.95 the intervals reach the cap on a stationary batch; an abrupt change of
    the data halves every statistic's interval at its next refresh (a 50 % change of X reads as
    r ≈ 0.5, not 0.025)."""
    model = make_model()
    opt = SPNGD(
        model, lr=0.0, fisher="emp", damping=1e-2, ema_decay=0.95, stale=StalePolicy(threshold=0.1, max_interval=8)
    )
    old, new = batch(1), batch(2, shifted=True)
    for _ in range(40):
        train_step(model, opt, *old)
    assert set(intervals(opt).values()) == {8}
    seen_short = set()
    for _ in range(9):  # every statistic is due at least once in max_interval + 1 steps
        train_step(model, opt, *new)
        seen_short |= {s for s, k in intervals(opt).items() if k < 8}
    assert seen_short == set(ALL_STATS)
