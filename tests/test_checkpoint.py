"""Checkpointing: an SPNGD state_dict saved mid-training and loaded into a fresh model + optimizer
continues bit-identically (CPU) to an uninterrupted run; foreign state_dicts are rejected."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.refresh import StalePolicy

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def cnn(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 3, stride=2, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
    )


def batches(n_steps: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 1, 6, 6, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(n_steps)]


def run_steps(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


CONFIGS = {
    "mc": dict(fisher="mc", seed=11),
    "mc_multi_sample_ema": dict(fisher="mc", mc_samples=3, ema_decay=0.9, seed=5),
    "emp_ema": dict(fisher="emp", ema_decay=0.8),
    "stale_intervals": dict(fisher="mc", curvature_interval=2, inverse_interval=4, seed=3),
    "stale_intervals_emp_ema": dict(fisher="emp", curvature_interval=2, inverse_interval=4, ema_decay=0.5),
    "momentum_wd_kl": dict(fisher="mc", momentum=0.9, weight_decay=1e-3, kl_clip=1e-3, seed=9),
    # adaptive per-statistic intervals (threshold large enough that intervals grow within 3 steps)
    "stale_adaptive": dict(fisher="mc", stale=StalePolicy(threshold=10.0, max_interval=4), seed=4),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(config):
    kw = dict(lr=0.05, momentum=0.5, damping=1e-2, backend="torch")
    kw.update(CONFIGS[config])
    data = batches(6)

    full_model = cnn()
    full_opt = SPNGD(full_model, **kw)
    run_steps(full_model, full_opt, data)

    model = cnn()
    opt = SPNGD(model, **kw)
    run_steps(model, opt, data[:3])
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    counters_at_save = opt.counters
    del model, opt

    torch.manual_seed(999)  # global RNG state differs after the restart
    torch.rand(17)
    fresh_model = cnn(seed=42)  # different initial weights: everything must come from the checkpoint
    fresh_model.load_state_dict(saved["model"])
    fresh_kw = dict(kw)
    if "seed" in fresh_kw:
        fresh_kw["seed"] = fresh_kw["seed"] + 1000  # the sampling RNG must come from the checkpoint too
    fresh_opt = SPNGD(fresh_model, **fresh_kw)
    fresh_opt.load_state_dict(saved["opt"])
    for key in ("steps", "factor_updates", "inverse_updates"):
        assert fresh_opt.counters[key] == counters_at_save[key], key
    run_steps(fresh_model, fresh_opt, data[3:])

    for (name, p), q in zip(full_model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(p, q), f"{config}: {name} differs by {(p - q).abs().max().item():.3e} after resuming"
    for key in ("steps", "factor_updates", "inverse_updates", "mc_backwards"):
        assert fresh_opt.counters[key] == full_opt.counters[key], key


def test_resume_at_a_stale_step_reuses_the_saved_factors_and_inverses():
    """curvature_interval=2, inverse_interval=4: step index 3 (the first after resuming from 3 steps)
    refreshes nothing, so its update is built entirely from restored state."""
    kw = dict(
        lr=0.05, momentum=0.0, damping=1e-2, backend="torch", fisher="emp", curvature_interval=2, inverse_interval=4
    )
    data = batches(4, seed=7)
    model = cnn()
    opt = SPNGD(model, **kw)
    run_steps(model, opt, data[:3])
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    expected_factors = opt.factors()
    expected_inverses = opt.inverses()

    fresh_model = cnn(seed=1)
    fresh_model.load_state_dict(saved["model"])
    fresh_opt = SPNGD(fresh_model, **kw)
    fresh_opt.load_state_dict(saved["opt"])
    before = fresh_opt.counters
    run_steps(fresh_model, fresh_opt, data[3:])
    after = fresh_opt.counters
    assert after["factor_updates"] == before["factor_updates"], "step 3 must not refresh factors"
    assert after["inverse_updates"] == before["inverse_updates"], "step 3 must not re-invert"
    got = fresh_opt.factors()
    for name, stats in expected_factors.items():
        for key, value in stats.items():
            assert torch.equal(got[name][key], value), f"{name}.{key}"
    got_inv = fresh_opt.inverses()
    assert set(got_inv) == set(expected_inverses)
    for name, pair in expected_inverses.items():
        for a, b in zip(got_inv[name], pair):
            assert (a is None and b is None) or torch.equal(a, b), name

    # and the step really used them: same parameters as continuing the original optimizer
    run_steps(model, opt, data[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def test_state_dict_survives_torch_save_of_the_optimizer_alone():
    model = cnn()
    opt = SPNGD(model, fisher="mc", seed=1, backend="torch")
    run_steps(model, opt, batches(2))
    sd = roundtrip(opt.state_dict())
    other = SPNGD(model, fisher="mc", seed=2, backend="torch")
    other.load_state_dict(sd)
    assert other.counters["steps"] == 2
    assert other.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


# ------------------------------------------------------------------------------- rejection
def _trained_state_dict(model) -> dict:
    opt = SPNGD(model, fisher="emp", backend="torch")
    run_steps(model, opt, batches(2))
    return roundtrip(opt.state_dict())


@pytest.mark.parametrize(
    "other_factory",
    [
        pytest.param(lambda: cnn(width=6), id="different-layer-size"),
        pytest.param(
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5)),
            id="different-layers",
        ),
        pytest.param(
            lambda: nn.Sequential(*list(cnn().children())[:-1], nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 5)),
            id="extra-layer",
        ),
    ],
)
def test_state_dict_from_another_model_is_rejected_with_a_clear_message(other_factory):
    sd = _trained_state_dict(cnn())
    other = other_factory()
    opt = SPNGD(other, fisher="emp", backend="torch")
    snapshot = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(sd)
    # the failed load left the optimizer usable and untouched
    assert opt.counters["steps"] == 0
    run_steps(other, opt, [(torch.randn(12, 1, 6, 6), torch.randint(0, 5, (12,)))])
    assert any(not torch.equal(snapshot[n], p) for n, p in other.named_parameters())


def test_plain_sgd_state_dict_is_rejected():
    model = cnn()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    sgd.step()
    opt = SPNGD(model, fisher="emp", backend="torch")
    with pytest.raises(ValueError, match="SPNGD"):
        opt.load_state_dict(roundtrip(sgd.state_dict()))


@pytest.mark.parametrize("bad", [None, [], {"state": {}, "param_groups": []}, "checkpoint.pt"])
def test_garbage_is_rejected_with_value_error(bad):
    opt = SPNGD(cnn(), fisher="emp", backend="torch")
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)


class EmbedNet(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Parameter(torch.randn(vocab, 4))  # a bare table: no curvature, plain momentum SGD
        self.head = nn.Linear(12, 3)

    def forward(self, tokens):
        return self.head(F.embedding(tokens, self.emb).flatten(1))


def _embed_step(model, opt):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 12, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    out = model(tokens)
    opt.backward(F.cross_entropy(out, y), out)
    opt.step()


def test_state_dict_from_a_model_differing_only_in_an_unsupported_layer_is_rejected():
    """Same curvature layers, but the Embedding (plain-SGD parameters, with momentum buffers) has
    another size: loading must fail with a ValueError, not load silently and crash at the next step."""
    src = EmbedNet(vocab=12)
    src_opt = SPNGD(src, fisher="emp", backend="torch")
    _embed_step(src, src_opt)
    sd = roundtrip(src_opt.state_dict())
    dst = EmbedNet(vocab=20)
    opt = SPNGD(dst, fisher="emp", backend="torch")
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
        _embed_step(dst, opt)  # reached only if loading wrongly succeeded: must not crash either
