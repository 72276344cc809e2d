"""``torch.compile(model)`` with SPNGD: compiled and eager training give the same factors, inverses
and parameters, for both Fisher types, on the main job's CNN (CPU, 3 steps, a refresh each step).

The compiler backend is ``aot_eager``: Dynamo and AOTAutograd, which is where the capture hooks
and the compiled backward live (and where ``fisher="mc"`` used to fail), without Inductor's code
generation, which only reorders floating-point sums and takes minutes on a small CPU. With it the
compiled run reproduces eager to float32 rounding (tolerance 1e-5 relative; measured: equal).
"""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F

from spngd_ext import SPNGD
from spngd_ext.train.models import small_bn_cnn

STEPS = 3
RTOL = 1e-5


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch and leaves torch's compiler settings as it found them."""
    donated = torch._functorch.config.donated_buffer
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch._functorch.config.donated_buffer = donated


def _train(fisher: str, compiled: bool) -> list[dict]:
    torch.manual_seed(0)
    model = small_bn_cnn()
    opt = SPNGD(model, lr=0.01, fisher=fisher, seed=1)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    data = torch.Generator().manual_seed(3)
    snapshots = []
    for _ in range(STEPS):
        x = torch.randn(8, 1, 28, 28, generator=data)
        y = torch.randint(0, 10, (8,), generator=data)
        opt.zero_grad()
        out = run(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
        snapshots.append(
            {
                "factors": {
                    f"{layer}.{name}": t.clone() for layer, stats in opt.factors().items() for name, t in stats.items()
                },
                "inverses": {
                    f"{layer}.{k}": t.clone()
                    for layer, sides in opt.inverses().items()
                    for k, t in enumerate(sides)
                    if t is not None
                },
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "counters": {
                    k: opt.counters[k] for k in ("steps", "factor_updates", "inverse_updates", "skipped_steps")
                },
            }
        )
    return snapshots


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fisher", ["mc", "emp"])
def test_compiled_model_matches_eager(fresh_dynamo, fisher):
    eager = _train(fisher, compiled=False)
    compiled = _train(fisher, compiled=True)
    for step, (c, e) in enumerate(zip(compiled, eager)):
        assert c["counters"] == e["counters"], (step, c["counters"], e["counters"])
        assert e["counters"]["factor_updates"] == step + 1  # a refresh every step: every capture path ran
        for kind in ("factors", "inverses", "params"):
            assert c[kind].keys() == e[kind].keys() and e[kind], (step, kind)
            worst = max((_rel(c[kind][k], e[kind][k]), k) for k in e[kind])
            assert worst[0] <= RTOL, f"step {step}: {kind} {worst[1]} differs by {worst[0]:.2e} (relative)"
