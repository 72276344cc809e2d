"""``torch.compile(model)`` with SPNGD: compiled and eager training give the same factors, inverses
and parameters, for both Fisher types, on the main job's CNN, a small transformer (Embedding,
attention projections, LayerNorm) and torchvision's ResNet-18 (CPU, 3 steps, a refresh each step).
``spngd_ext.compile_model`` (eager on refresh steps, compiled otherwise)
matches eager on the CNN and the transformer with no graph break and one compiled graph.

The compiler backend is ``aot_eager``: Dynamo and AOTAutograd, which is where the capture hooks
and the compiled backward live (and where ``fisher="mc"`` used to fail), without Inductor's code
generation, which only reorders floating-point sums and takes minutes on a small CPU. With it the
compiled run reproduces eager to float32 rounding (tolerance 1e-5 relative; measured: equal).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F
from torch._dynamo.utils import counters

from spngd_ext import SPNGD, compile_model
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


def _cnn_inputs(data: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 1, 28, 28, generator=data), torch.randint(0, 10, (8,), generator=data)


def _resnet18() -> torch.nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=5)


def _transformer() -> torch.nn.Module:
    from test_compile_step import _TinyTokenModel

    return _TinyTokenModel()


MODELS = {  # name -> (model, a batch from a generator)
    "cnn": (small_bn_cnn, _cnn_inputs),
    "small-transformer": (
        _transformer,
        lambda g: (torch.randint(0, 20, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)),
    ),
    "resnet18": (
        _resnet18,
        lambda g: (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)),
    ),
}


def _train(
    fisher: str, compiled: bool, arch: str = "cnn", helper: bool = False, steps: int = STEPS, **options
) -> list[dict]:
    """Per step: factors, inverses, parameters and counters. ``helper``: spngd_ext.compile_model
    instead of torch.compile."""
    build, inputs = MODELS[arch]
    torch.manual_seed(0)
    model = build()
    opt = SPNGD(model, lr=0.01, fisher=fisher, seed=1, **options)
    if compiled:
        run = compile_model(model, opt, backend="aot_eager") if helper else torch.compile(model, backend="aot_eager")
    else:
        run = model
    data = torch.Generator().manual_seed(3)
    snapshots = []
    for _ in range(steps):
        x, y = inputs(data)
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


@pytest.mark.parametrize(
    "arch",
    [
        "cnn",
        pytest.param("small-transformer", marks=pytest.mark.slow),
        pytest.param("resnet18", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("fisher", ["mc", "emp"])
def test_compiled_model_matches_eager(fresh_dynamo, fisher, arch):
    eager = _train(fisher, compiled=False, arch=arch)
    compiled = _train(fisher, compiled=True, arch=arch)
    for step, (c, e) in enumerate(zip(compiled, eager)):
        assert c["counters"] == e["counters"], (step, c["counters"], e["counters"])
        assert e["counters"]["factor_updates"] == step + 1  # a refresh every step: every capture path ran
        for kind in ("factors", "inverses", "params"):
            assert c[kind].keys() == e[kind].keys() and e[kind], (step, kind)
            worst = max((_rel(c[kind][k], e[kind][k]), k) for k in e[kind])
            assert worst[0] <= RTOL, f"step {step}: {kind} {worst[1]} differs by {worst[0]:.2e} (relative)"


@pytest.mark.parametrize("arch", ["cnn", "small-transformer"])
@pytest.mark.parametrize("fisher", ["mc", "emp"])
def test_compile_model_matches_eager_in_one_graph(fresh_dynamo, fisher, arch):
    """spngd_ext.compile_model: eager on refresh steps, compiled otherwise. Factors, inverses and
    parameters equal eager training (refresh steps 0, 2, 4 of 6, plain steps between), the compiled
    model never breaks its graph, and an identical SGD model compiled in the same process still
    runs as one graph (a break in Sequential.forward's loop would make Dynamo skip that code for
    every model)."""
    schedule = dict(steps=6, curvature_interval=2, inverse_interval=2)
    eager = _train(fisher, compiled=False, arch=arch, **schedule)
    counters.clear()
    compiled = _train(fisher, compiled=True, arch=arch, helper=True, **schedule)
    assert [e["counters"]["factor_updates"] for e in eager] == [1, 1, 2, 2, 3, 3]
    for step, (c, e) in enumerate(zip(compiled, eager)):
        assert c["counters"] == e["counters"], step
        for kind in ("factors", "inverses", "params"):
            worst = max((_rel(c[kind][k], e[kind][k]), k) for k in e[kind])
            assert worst[0] <= RTOL, f"step {step}: {kind} {worst[1]} differs by {worst[0]:.2e} (relative)"
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, graphs  # the plain steps' graph, compiled once
    if arch != "cnn":
        return
    torch.manual_seed(0)
    sgd_model = small_bn_cnn()
    sgd, sgd_run = torch.optim.SGD(sgd_model.parameters(), lr=0.01), torch.compile(sgd_model, backend="aot_eager")
    x, y = _cnn_inputs(torch.Generator().manual_seed(3))
    F.cross_entropy(sgd_run(x), y).backward()
    sgd.step()
    assert counters["stats"]["unique_graphs"] == graphs + 1 and not counters["graph_break"]


def test_compile_model_checks_its_arguments():
    model = torch.nn.Linear(3, 2)
    opt = SPNGD(model)
    with pytest.raises(TypeError, match="optimizer"):
        compile_model(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="model"):
        compile_model(lambda x: x, opt)
    with pytest.raises(ValueError, match="model"):
        compile_model(torch.nn.Linear(3, 2), opt)


class _Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def test_attention_under_torch_compile_collects_on_refresh_steps_and_traces_plain_ones(fresh_dynamo):
    """Inside a torch.compile'd model (AOT autograd) nn.MultiheadAttention's projections collect
    their statistics on refresh steps (the routed forward runs eagerly there, with no warning)
    and the plain steps in between run as one graph without a break."""
    torch.manual_seed(0)
    model = _Encoder()
    opt = SPNGD(model, lr=0.01, fisher="mc", curvature_interval=2, inverse_interval=2)
    compiled = torch.compile(model, backend="aot_eager")
    data = torch.Generator().manual_seed(1)
    breaks_after_step = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            x, y = torch.randn(5, 4, 8, generator=data), torch.randint(0, 3, (5,), generator=data)
            opt.zero_grad()
            out = compiled(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
            breaks_after_step.append(sum(counters["graph_break"].values()))
    assert not [str(w.message) for w in record if "SPNGD" in str(w.message)]  # no "did not run"
    assert opt.counters["factor_updates"] == 3  # steps 0, 2, 4
    for layer in ("enc.self_attn.in_proj", "enc.self_attn.out_proj"):
        assert {"A", "G"} <= opt.factors()[layer].keys() and opt.factors()[layer]["A"].abs().sum() > 0, layer
    # steps 1 and 3 (plain) add no break; the refresh steps' breaks are the same each time
    assert breaks_after_step[1] == breaks_after_step[0] and breaks_after_step[3] == breaks_after_step[2]


def test_stale_schedule_under_torch_compile_compiles_only_in_the_first_step(fresh_dynamo):
    """torch.compile(model) with stale statistics whose due pattern changes from step to step (≥ 10
    distinct patterns in 30 steps): every graph is compiled in the first step (the compiled forward
    reads only whether anything is due), and the factors equal eager training's."""
    from spngd_ext import StalePolicy

    def run(compiled: bool) -> tuple[set, list[int], dict]:
        torch.manual_seed(0)
        model = small_bn_cnn()
        opt = SPNGD(model, lr=0.01, fisher="emp", stale=StalePolicy(threshold=1.0))
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        data = torch.Generator().manual_seed(3)
        patterns, compiled_per_step = set(), []
        for _ in range(30):
            patterns.add(tuple(opt._runner.schedule.due(opt._runner.step_index)))
            before = counters["stats"]["unique_graphs"]
            x, y = torch.randn(16, 1, 28, 28, generator=data), torch.randint(0, 10, (16,), generator=data)
            opt.zero_grad()
            out = forward(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
            compiled_per_step.append(counters["stats"]["unique_graphs"] - before)
        factors = {f"{k}.{n}": t.clone() for k, v in opt.factors().items() for n, t in v.items()}
        return patterns, compiled_per_step, factors

    patterns, per_step, factors = run(compiled=True)
    assert len(patterns) >= 10, len(patterns)
    assert per_step[0] > 0 and not any(per_step[1:]), per_step
    _, _, eager = run(compiled=False)
    assert factors.keys() == eager.keys()
    worst = max((_rel(factors[k], eager[k]), k) for k in eager)
    assert worst[0] <= RTOL, worst
