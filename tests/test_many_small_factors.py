"""Layers with a factor pair per channel (depthwise convolutions): the estimates, the unpacking and
the π traces handle many small statistics in a few whole-buffer operations. Each batched path
must give exactly what the per-statistic path gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.ops import torch_path
from spngd_ext.state import estimates, inverses


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 small pairs
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),  # A: 289 x 289, packed above the batching threshold
    ).double()


def _train(ema: float | None) -> dict[str, torch.Tensor]:
    model = _model()
    opt = SPNGD(model, lr=0.05, fisher="emp", ema_decay=ema, backend="torch")
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, generator=data, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=data)
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    state = {f"factor {k}.{n}": t.clone() for k, v in opt.factors().items() for n, t in v.items()}
    state.update({f"param {n}": p.detach().clone() for n, p in model.named_parameters()})
    return state


@pytest.mark.parametrize("ema", [None, 0.9])
def test_batched_and_per_statistic_finalize_agree_bit_for_bit(monkeypatch, ema):
    runs = []
    for threshold in (0, 1 << 30):  # every statistic alone / every statistic batched
        monkeypatch.setattr(estimates, "_BATCHED_BELOW", threshold)
        runs.append(_train(ema))
    monkeypatch.undo()
    runs.append(_train(ema))  # the default split: both paths in one step
    assert any(k.startswith("factor 1.") for k in runs[0])
    assert 289 * 290 // 2 >= estimates._BATCHED_BELOW > 10 * 11 // 2
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for key, value in runs[0].items():
            assert torch.equal(other[key], value), key


def _reference_unpack(buffer: torch.Tensor, sizes: list[int], scale: torch.Tensor, offset: int) -> list[torch.Tensor]:
    out, pos = [], offset
    for k, n in enumerate(sizes):
        full = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                full[i, j] = full[j, i] = buffer[pos].double() * scale[k].double()
                pos += 1
        out.append(full)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_unpack_upper_by_size_matches_the_written_out_unpacking(seed):
    g = torch.Generator().manual_seed(seed)
    # many of a few small sizes (the gather), repeated large ones (slices), sizes seen once, 1x1
    sizes = [int(s) for s in torch.randint(1, 5, (40,), generator=g)] + [11, 1, 13, 11, 3, 12, 13]
    order = torch.randperm(len(sizes), generator=g).tolist()
    sizes = [sizes[i] for i in order]
    offset = int(torch.randint(0, 7, (1,), generator=g))
    total = offset + sum(n * (n + 1) // 2 for n in sizes)
    buffer = torch.randn(total + 3, generator=g)
    scale = torch.rand(len(sizes), generator=g, dtype=torch.float64) + 0.5
    got = torch_path.unpack_upper(buffer, sizes, scale=scale, dtype=torch.float64, offset=offset)
    want = _reference_unpack(buffer, sizes, scale, offset)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == torch.float64, k
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0, msg=f"matrix {k} (n = {sizes[k]})")
    plain = torch_path.unpack_upper(buffer, sizes, scale=2.0, dtype=torch.float32, offset=offset)
    for k, (a, b) in enumerate(zip(plain, want)):
        torch.testing.assert_close(a, (b / scale[k] * 2.0).float(), msg=f"matrix {k}")


def test_diagonal_means_match_per_matrix_traces():
    g = torch.Generator().manual_seed(5)
    mats = {(i, "A"): torch.randn(n, n, generator=g, dtype=torch.float64) for i, n in enumerate([3, 3, 1, 70, 3, 5])}
    means = inverses._diagonal_means(mats)
    assert means.keys() == mats.keys()
    for key, m in mats.items():
        torch.testing.assert_close(means[key], m.diagonal().sum() / m.shape[0], rtol=1e-15, atol=0)


def test_small_statistics_indices_are_built_once_per_pattern(monkeypatch):
    """Every-step refreshes repeat one pattern of fresh statistics: its gather indices are built
    (and sent to the device) once, in the first refresh, not at every refresh."""
    built = []
    original = torch.repeat_interleave

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(estimates.torch, "repeat_interleave", counting)
    _train(None)
    assert len(built) == 2  # slots and their count slots, once over three refreshes


def test_small_statistics_index_cache_is_bounded_and_exact(monkeypatch):
    """Past its bound the cache starts over; every pattern's indices are the elements' slots."""
    from types import SimpleNamespace

    monkeypatch.setattr(estimates, "_SMALL_PATTERNS", 2)
    holder = SimpleNamespace(buffers=SimpleNamespace(device=torch.device("cpu")), _small_index={})
    patterns = [[(0, 3, 10), (5, 6, 11)], [(7, 9, 12)], [(0, 3, 10)], [(0, 3, 10), (5, 6, 11)]]
    for small in patterns:
        slots, count_of_slot, counts = estimates.Estimates._small_indices(holder, small)
        assert slots.tolist() == [k for o, e, _ in small for k in range(o, e)]
        assert count_of_slot.tolist() == [c for o, e, c in small for _ in range(o, e)]
        assert counts.tolist() == [c for _, _, c in small]
        assert len(holder._small_index) <= 2
    assert estimates.Estimates._small_indices(holder, patterns[-1])[0] is slots  # a hit: the same tensors
