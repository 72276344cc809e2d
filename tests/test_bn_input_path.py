"""BN per-example sums from the BN input (CPU path) against the x̂ formula, float64."""

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
