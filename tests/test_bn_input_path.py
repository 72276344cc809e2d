"""The unit-wise Fisher's per-example sums on the CPU path: BatchNorm and GroupNorm from their
input, and the x̂ path itself, against explicit float64 formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spngd_ext.ops import torch_path


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3), (1, 4, 5, 1), (7, 1, 2), (3, 5, 1, 1)])
def test_unit_gradients_from_input_match_xhat(shape) -> None:
    torch.manual_seed(len(shape) * 10 + shape[0])
    x = torch.randn(shape, dtype=torch.float64) * 3.0 + 5.0  # far-from-zero mean: the subtraction path
    g = torch.randn(shape, dtype=torch.float64)
    eps = 1e-5
    xhat = F.batch_norm(x, None, None, None, None, True, 0.0, eps)
    want = torch.zeros(shape[1], 3, dtype=torch.float64)
    torch_path.bn_unitwise_fisher(want, g, xhat, 0.5, 0.0)
    ug, ub = torch_path.bn_unit_gradients_from_input(g, x, eps)
    torch.testing.assert_close(ug, (g * xhat).flatten(2).sum(-1) if g.dim() > 2 else g * xhat)
    got = torch.full((shape[1], 3), float("nan"), dtype=torch.float64)  # poisoned: decay 0 overwrites
    torch_path.bn_unitwise_fisher_from_sums(got, ug, ub, 0.5, 0.0)
    torch.testing.assert_close(got, want)


def test_optimizer_bn_statistics_equal_on_both_paths() -> None:
    """The CPU optimizer (input path) and the x̂ path give the same BN Fisher for a real BN layer."""
    from spngd_ext.layers.batchnorm import BatchNormCurvature, _BatchInput

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double().train()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) + 2.0
    g = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    layer = BatchNormCurvature("bn", bn)
    ctx, _ = layer.accumulate_forward(x, {}, True, "torch")
    assert isinstance(ctx, _BatchInput)
    via_input = {"F": torch.zeros(3, 3, dtype=torch.float64)}
    layer.accumulate_backward(g, ctx, via_input, True, "torch")
    via_xhat = {"F": torch.zeros(3, 3, dtype=torch.float64)}
    layer.accumulate_backward(g, layer.normalized_input(x), via_xhat, True, "torch")
    torch.testing.assert_close(via_input["F"], via_xhat["F"])


def test_op_rejects_bad_input_with_the_argument_named() -> None:
    from spngd_ext import ops

    g = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="grad_out and x must share"):
        ops.bn_unitwise_fisher_from_input(torch.zeros(3, 3), g, torch.randn(4, 3, 2, 1), eps=1e-5, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match=r"state must be \(3, 3\)"):
        ops.bn_unitwise_fisher_from_input(torch.zeros(3, 2), g, g, eps=1e-5, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="eps must be"):
        ops.bn_unitwise_fisher_from_input(torch.zeros(3, 3), g, g, eps=-1.0, scale=1.0, decay=0.0)
    with pytest.raises(TypeError, match="state must be a contiguous float32/float64"):
        ops.bn_unitwise_fisher_from_input(torch.zeros(3, 3, dtype=torch.float16), g, g, eps=1e-5, scale=1.0, decay=0.0)


def _brute_unitwise(g: torch.Tensor, xhat: torch.Tensor, scale: float) -> torch.Tensor:
    """(C, 3) = scale · Σ_n (u_γ², u_γ u_β, u_β²) with u = [Σ_hw g·x̂, Σ_hw g], by explicit loops."""
    n, c = g.shape[:2]
    out = torch.zeros(c, 3, dtype=torch.float64)
    for i in range(n):
        for ch in range(c):
            ug = float((g[i, ch] * xhat[i, ch]).sum())
            ub = float(g[i, ch].sum())
            out[ch] += scale * torch.tensor([ug * ug, ug * ub, ub * ub], dtype=torch.float64)
    return out


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3), (1, 4, 5, 1), (7, 1, 2), (3, 5, 1, 1), (2, 3, 1)])
@pytest.mark.parametrize("decay", [0.0, 0.25])
def test_xhat_path_matches_explicit_sums(shape, decay) -> None:
    """torch_path.bn_unitwise_fisher (the kernels' oracle) against per-example loops, with decay."""
    torch.manual_seed(sum(shape) + int(decay * 4))
    g = torch.randn(shape, dtype=torch.float64)
    xhat = torch.randn(shape, dtype=torch.float64)
    old = torch.randn(shape[1], 3, dtype=torch.float64)
    got = old.clone() if decay else torch.full((shape[1], 3), float("nan"), dtype=torch.float64)
    torch_path.bn_unitwise_fisher(got, g, xhat, 0.5, decay)
    want = _brute_unitwise(g, xhat, 0.5) + (decay * old if decay else 0.0)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [((4, 6, 3, 3), 1), ((4, 6, 3, 3), 2), ((4, 6, 3, 3), 3), ((4, 6, 3, 3), 6), ((1, 4, 5, 1), 2),
     ((7, 3, 2), 3), ((3, 5, 1, 1), 5), ((2, 4, 7, 9), 1), ((5, 9, 4), 3)],
)  # fmt: skip
def test_groupnorm_gradients_from_input_match_xhat(shape, groups) -> None:
    torch.manual_seed(shape[0] * 7 + groups)
    x = torch.randn(shape, dtype=torch.float64) * 3.0 + 5.0  # far-from-zero mean: the subtraction path
    g = torch.randn(shape, dtype=torch.float64)
    eps = 1e-5
    xhat = F.group_norm(x, groups, None, None, eps)
    ug, ub = torch_path.gn_unit_gradients_from_input(g, x, groups, eps)
    n, c = shape[:2]
    torch.testing.assert_close(ug, (g * xhat).reshape(n, c, -1).sum(-1))
    torch.testing.assert_close(ub, g.reshape(n, c, -1).sum(-1))
    got = torch.full((c, 3), float("nan"), dtype=torch.float64)  # poisoned: decay 0 overwrites
    from spngd_ext import ops

    ops.gn_unitwise_fisher_from_input(got, g, x, groups=groups, eps=eps, scale=0.5, decay=0.0)
    torch.testing.assert_close(got, _brute_unitwise(g, xhat, 0.5))


def test_groupnorm_float32_input_path_is_close_to_float64() -> None:
    torch.manual_seed(3)
    x = torch.randn(16, 8, 9, 9) * 2.0 + 1.0
    g = torch.randn(16, 8, 9, 9)
    from spngd_ext import ops

    got = torch.zeros(8, 3)
    ops.gn_unitwise_fisher_from_input(got, g, x, groups=4, eps=1e-5, scale=1.0, decay=0.0)
    want = _brute_unitwise(g.double(), F.group_norm(x.double(), 4, None, None, 1e-5), 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_optimizer_groupnorm_statistics_equal_on_both_paths() -> None:
    """The CPU optimizer (input path) and the x̂ path give the same GroupNorm Fisher."""
    from spngd_ext.layers.norm import GroupNormCurvature, _GroupInput

    torch.manual_seed(1)
    gn = torch.nn.GroupNorm(2, 4).double()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64) + 2.0
    g = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    layer = GroupNormCurvature("gn", gn)
    ctx, count = layer.accumulate_forward(x, {}, True, "torch")
    assert isinstance(ctx, _GroupInput) and count == 5
    via_input = {"F": torch.zeros(4, 3, dtype=torch.float64)}
    layer.accumulate_backward(g, ctx, via_input, True, "torch")
    via_xhat = {"F": torch.zeros(4, 3, dtype=torch.float64)}
    layer.accumulate_backward(g, layer.normalized_input(x), via_xhat, True, "torch")
    torch.testing.assert_close(via_input["F"], via_xhat["F"])
    layer.accumulate_backward(g, ctx, via_input, False, "torch")  # decay 1 adds
    torch.testing.assert_close(via_input["F"], 2 * via_xhat["F"])


def test_groupnorm_op_rejects_bad_input_with_the_argument_named() -> None:
    from spngd_ext import ops

    g = torch.randn(4, 6, 2, 2)
    with pytest.raises(ValueError, match="groups must be a positive int dividing the 6 channels, got 4"):
        ops.gn_unitwise_fisher_from_input(torch.zeros(6, 3), g, g, groups=4, eps=1e-5, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="groups must be"):
        ops.gn_unitwise_fisher_from_input(torch.zeros(6, 3), g, g, groups=True, eps=1e-5, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="eps must be"):
        ops.gn_unitwise_fisher_from_input(torch.zeros(6, 3), g, g, groups=2, eps=-1.0, scale=1.0, decay=0.0)
    with pytest.raises(ValueError, match="grad_out and x must share"):
        ops.gn_unitwise_fisher_from_input(torch.zeros(6, 3), g, g[:, :, :1], groups=2, eps=1e-5, scale=1.0, decay=0.0)


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0), (0, 4)])
def test_sums_over_nothing_are_zero(shape) -> None:
    """No examples (or no positions) contribute nothing: decay 0 leaves zeros, never NaN."""
    from spngd_ext import ops

    x, g = torch.randn(shape), torch.randn(shape)
    calls = {
        "xhat": lambda st: ops.bn_unitwise_fisher(st, g, x, scale=1.0, decay=0.0),
        "bn": lambda st: ops.bn_unitwise_fisher_from_input(st, g, x, eps=1e-5, scale=1.0, decay=0.0),
        "gn": lambda st: ops.gn_unitwise_fisher_from_input(st, g, x, groups=2, eps=1e-5, scale=1.0, decay=0.0),
    }
    for name, call in calls.items():
        state = torch.full((4, 3), float("nan"))
        call(state)
        assert torch.equal(state, torch.zeros(4, 3)), name


@pytest.mark.parametrize("layout", ["channels_last", "every_other_example", "cropped_width"])
def test_sums_do_not_depend_on_the_memory_layout(layout) -> None:
    """Inputs as a model hands them over (channels-last, strided views) give the contiguous result."""
    from spngd_ext import ops

    torch.manual_seed(11)
    x = torch.randn(8, 6, 5, 7, dtype=torch.float64) + 1.5
    g = torch.randn(8, 6, 5, 7, dtype=torch.float64)
    strided = {
        "channels_last": lambda t: t.to(memory_format=torch.channels_last),
        "every_other_example": lambda t: t[::2],
        "cropped_width": lambda t: t[..., 1:6],
    }[layout]
    xs, gs = strided(x), strided(g)
    xc, gc = xs.contiguous(), gs.contiguous()
    calls = {
        "xhat": lambda st, a, b: ops.bn_unitwise_fisher(st, a, b, scale=1.0, decay=0.0),
        "bn": lambda st, a, b: ops.bn_unitwise_fisher_from_input(st, a, b, eps=1e-5, scale=1.0, decay=0.0),
        "gn": lambda st, a, b: ops.gn_unitwise_fisher_from_input(st, a, b, groups=3, eps=1e-5, scale=1.0, decay=0.0),
    }
    for name, call in calls.items():
        got, want = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64)
        call(got, gs, xs)
        call(want, gc, xc)
        torch.testing.assert_close(got, want, msg=name)
