"""Shared pieces of the fault-injection tests (tests/test_faults_*.py; not collected)."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD


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
        "momentum": {
            n: opt.state[p]["momentum_buffer"].clone()
            for n, p in model.named_parameters()
            if "momentum_buffer" in opt.state[p]
        },
        "factors": {(layer, k): v.clone() for layer, stats in opt.factors().items() for k, v in stats.items()},
        "inverses": {
            layer: tuple(None if t is None else t.clone() for t in pair) for layer, pair in opt.inverses().items()
        },
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


def skip_test_optimizer(model, **kw) -> SPNGD:
    """SP-NGD with MC Fisher, EMA and stale statistics: the most state a skipped step could touch."""
    base = dict(
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        damping=1e-2,
        fisher="mc",
        seed=3,
        ema_decay=0.5,
        stale=True,
        backend="torch",
    )
    base.update(kw)
    return SPNGD(model, **base)
