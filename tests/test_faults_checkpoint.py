"""Checkpoints: stale statistics + MC + EMA resume bit-identically; broken state_dicts are rejected."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from fault_helpers import (
    Net,
    all_finite,
    data,
    forward_backward,
    roundtrip,
    train,
)

from spngd_ext import SPNGD
from spngd_ext.checkpoint import OPTIONAL_ENTRY_KEYS
from spngd_ext.refresh import StalePolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ============================================================================ checkpoint / resume
def test_resume_with_stale_statistics_mc_and_ema_is_bit_identical():
    """stale=True + fisher='mc' (2 samples) + EMA + momentum/wd/KL clip, with a skipped step before
    the save: the state_dict holds factors, inverses, intervals and the MC RNG, and a fresh model +
    optimizer continue exactly like the uninterrupted run. (Single features: tests/test_checkpoint.py.)"""
    kw = dict(
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
        damping=1e-2,
        fisher="mc",
        mc_samples=2,
        ema_decay=0.8,
        stale=StalePolicy(threshold=0.5),
        kl_clip=1e-2,
        seed=17,
        backend="torch",
    )
    batches = data(12, seed=5)
    k = 7  # saved with some intervals lengthened (asserted below): the resumed run skips refreshes

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
    assert max(k for stats in counters_at_save["intervals"].values() for k in stats.values()) > 1, (
        "the save should happen with lengthened (stale) intervals"
    )

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
        if key in OPTIONAL_ENTRY_KEYS:  # absent from older entries; its check is in test_placement.py
            continue
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
