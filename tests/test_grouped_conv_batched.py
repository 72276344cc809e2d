"""Grouped convolutions' batched statistics (all groups in one product, one write per side) and
their one-gather unpacking, against the per-group formula (F.unfold of each group's channels, one
Gram per example) in float64, on odd geometries; and that the optimizer takes the batched paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from steps import one_step_update
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.layers import GroupedConvCurvature
from spngd_ext.layers.base import CurvatureLayer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]

# (module class, its positional and keyword arguments, input shape): groups 1, 2, 3 and C
# (depthwise), Conv1d, stride/padding/dilation, with and without bias, 1×1 kernels, a batch that
# spans several chunks of the batched product
CASES = [
    (nn.Conv2d, (3, 5, 3), dict(padding=1), (4, 3, 6, 5)),
    (nn.Conv2d, (4, 6, (3, 2)), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2), (3, 4, 7, 6)),
    (nn.Conv2d, (6, 3, 2), dict(stride=2, padding=1, groups=3, bias=False), (5, 6, 5, 7)),
    (nn.Conv2d, (5, 5, 3), dict(padding=2, dilation=2, groups=5), (3, 5, 6, 6)),
    (nn.Conv2d, (4, 8, 1), dict(groups=4, bias=False), (2, 4, 3, 3)),
    (nn.Conv2d, (6, 6, 1), dict(stride=2, groups=2), (3, 6, 5, 4)),
    (nn.Conv2d, (8, 8, 3), dict(stride=2, padding=1, groups=8, bias=False), (300, 8, 9, 9)),
    (nn.Conv1d, (3, 4, 3), dict(padding=1), (4, 3, 7)),
    (nn.Conv1d, (6, 6, 3), dict(stride=2, padding=2, dilation=2, groups=6), (3, 6, 11)),
    (nn.Conv1d, (4, 2, 1), dict(groups=2, bias=False), (3, 4, 5)),
]


def _per_group_reference(layer: GroupedConvCurvature, x: torch.Tensor, grad: torch.Tensor):
    """Per group (Σ a aᵀ, Σ g gᵀ): F.unfold of the group's input channels, one Gram per example."""
    conv, one_d = layer.module, layer.one_d
    x4, g4 = (x.unsqueeze(2), grad.unsqueeze(2)) if one_d else (x, grad)
    cin, cout = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    geometry = dict(dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    a_refs, g_refs = [], []
    for k in range(conv.groups):
        a_sum = g_sum = 0.0
        for n in range(x.shape[0]):
            rows = F.unfold(x4[n : n + 1, k * cin : (k + 1) * cin], layer.kernel_size, **geometry)[0].T
            if conv.bias is not None:
                rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
            a_sum = a_sum + rows.T @ rows
            g_rows = g4[n, k * cout : (k + 1) * cout].reshape(cout, -1).T
            g_sum = g_sum + g_rows.T @ g_rows
        a_refs.append(a_sum)
        g_refs.append(g_sum)
    return a_refs, g_refs


def _packed(m: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(m.shape[0], m.shape[0])
    return m[i, j]


def _flat_views(layer: CurvatureLayer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat buffer with every statistic's view back to back, as the optimizer's accumulator."""
    specs = layer.stat_specs()
    flat = torch.full((sum(s.numel for s in specs),), float("nan"))
    views, pos = {}, 0
    for s in specs:
        views[s.name] = flat[pos : pos + s.numel]
        pos += s.numel
    return flat, views


@pytest.mark.parametrize("adjacent", [True, False], ids=["one-buffer", "separate"])
@pytest.mark.parametrize("cls,args,kw,shape", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_batched_statistics_equal_the_per_group_formula(cls, args, kw, shape, adjacent):
    torch.manual_seed(0)
    conv = cls(*args, **kw)
    layer = GroupedConvCurvature("conv", conv)
    x = torch.randn(*shape)
    grad = torch.randn_like(conv(x))
    a_refs, g_refs = _per_group_reference(layer, x, grad)
    if adjacent:
        _, stats = _flat_views(layer)
    else:
        stats = {s.name: torch.full((s.numel,), float("nan")) for s in layer.stat_specs()}
    for first in (True, False):  # overwrite (NaN is ignored), then add a second call
        context, count = layer.accumulate_forward(x, stats, first, "torch")
        rows = layer.accumulate_backward(grad, context, stats, first, "torch")
    assert count == shape[0] and rows == grad.shape[0] * grad[0, 0].numel()
    for k in range(conv.groups):
        torch.testing.assert_close(stats[f"A{k}"], 2 * _packed(a_refs[k]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[f"G{k}"], 2 * _packed(g_refs[k]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,args,kw,shape", CASES[:6], ids=[f"case{i}" for i in range(6)])
def test_estimates_from_run_equal_per_statistic_unpacking(cls, args, kw, shape):
    torch.manual_seed(1)
    conv = cls(*args, **kw)
    layer = GroupedConvCurvature("conv", conv)
    flat, stats = _flat_views(layer)
    flat.copy_(torch.randn_like(flat))
    scale = torch.rand(len(stats)) + 0.5  # one bias correction per statistic
    for s in (1.0, scale):
        got = layer.estimates_from_run(flat, s)
        for k in range(conv.groups):
            for side, offset in (("A", 0), ("G", conv.groups)):
                name = f"{side}{k}"
                part = s if isinstance(s, float) else s[offset + k]
                want = layer.estimate_from_packed(name, stats[name], part)
                torch.testing.assert_close(got[side][k], want, rtol=0, atol=0)
                torch.testing.assert_close(want, want.T)  # symmetric, from the upper triangle
                assert want[0, -1] == stats[name][want.shape[0] - 1] * part


@pytest.mark.parametrize("ema", [None, 0.9])
def test_optimizer_writes_once_per_side_and_unpacks_once_per_layer(ema, monkeypatch):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3))
    x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,))
    import spngd_ext.layers.grouped_conv as grouped

    writes, unpacks, per_statistic = [], [], []
    write_packed, from_run = grouped.write_packed, GroupedConvCurvature.estimates_from_run

    def counting_write(states, grams, first):
        head = states[0]
        writes.append(all(s.data_ptr() == head.data_ptr() + k * s.numel() * 8 for k, s in enumerate(states)))
        write_packed(states, grams, first)

    def counting_unpack(self, run, scale):
        unpacks.append(run.numel())
        return from_run(self, run, scale)

    monkeypatch.setattr(grouped, "write_packed", counting_write)
    monkeypatch.setattr(GroupedConvCurvature, "estimates_from_run", counting_unpack)
    monkeypatch.setattr(GroupedConvCurvature, "estimate_from_packed", lambda *a: per_statistic.append(a))
    one_step_update(model, x, y, ema_decay=ema)
    assert writes == [True, True]  # A and G side, each one run of the accumulator
    layer = GroupedConvCurvature("0", conv)
    assert unpacks == [sum(s.numel for s in layer.stat_specs())] and per_statistic == []


def test_compiled_model_gives_the_eager_statistics():
    """Under torch.compile the hooks write group by group (multi-tensor); same factors as eager."""
    factors = []
    for compiled in (False, True):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Tanh(), nn.Flatten(), nn.Linear(100, 3))
        opt = SPNGD(model, lr=0.1, backend="torch")
        run = torch.compile(model, backend="aot_eager") if compiled else model
        x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,))
        for _ in range(2):
            opt.zero_grad()
            out = run(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
        factors.append(opt.factors()["0"])
    for name, value in factors[0].items():
        torch.testing.assert_close(factors[1][name], value, rtol=1e-12, atol=1e-14)
