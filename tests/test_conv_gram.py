"""The shifted-correlation conv A factor against the im2col Gram (float64, many geometries)."""

from __future__ import annotations

import pytest
import torch

from spngd_ext import ops
from spngd_ext.ops import torch_path
from spngd_ext.ops.conv_gram import conv_a_factor_shifted, patch_gram_shifted, patch_sums, supports_shifted_gram

# (N, C, H, W), kernel, padding: odd sizes, 1x1 images and kernels, kernels larger than the
# image with enough padding, padding larger than kernel-1 (outputs that see only zeros),
# non-square kernels and unequal paddings.
GEOMETRIES = [
    ((2, 3, 5, 5), (3, 3), (1, 1)),
    ((1, 1, 1, 1), (1, 1), (0, 0)),
    ((1, 1, 1, 1), (3, 3), (1, 1)),
    ((3, 2, 4, 7), (2, 3), (2, 0)),
    ((2, 4, 6, 3), (5, 5), (2, 2)),
    ((2, 2, 3, 3), (1, 1), (3, 3)),
    ((1, 5, 9, 2), (3, 1), (0, 1)),
    ((2, 3, 7, 7), (5, 5), (0, 0)),
    ((4, 1, 28, 28), (3, 3), (1, 1)),
    ((2, 3, 8, 5), (4, 2), (3, 1)),
]


def _im2col_gram(x, kernel, padding):
    cols = torch_path.conv_patches(x, kernel, (1, 1), padding, (1, 1))
    return cols.T @ cols, cols.sum(0)


@pytest.mark.parametrize("shape,kernel,padding", GEOMETRIES)
def test_gram_and_sums_match_im2col(shape, kernel, padding) -> None:
    torch.manual_seed(hash((shape, kernel, padding)) % 2**31)
    x = torch.randn(shape, dtype=torch.float64)
    gram, sums = _im2col_gram(x, kernel, padding)
    torch.testing.assert_close(patch_gram_shifted(x, kernel, padding), gram, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(patch_sums(x, kernel, padding), sums, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("shape,kernel,padding", GEOMETRIES[:6])
def test_accumulate_matches_reference_op(shape, kernel, padding, has_bias) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    d = shape[1] * kernel[0] * kernel[1] + int(has_bias)
    start = torch.randn(torch_path.packed_size(d), dtype=torch.float64)
    for decay in (0.0, 0.7):
        want = torch_path.conv_a_factor(start.clone(), x, kernel, (1, 1), padding, (1, 1), has_bias, 0.3, decay)
        got = start.clone()
        if decay == 0.0:
            got.fill_(float("nan"))  # poisoned: decay 0 must overwrite, not scale, the old state
        conv_a_factor_shifted(got, x, kernel, padding, has_bias, 0.3, decay)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


def test_float32_channels_last_and_bf16_inputs() -> None:
    x = torch.randn(8, 6, 9, 9)
    gram64, _ = _im2col_gram(x.double(), (3, 3), (1, 1))
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        got = patch_gram_shifted(inp, (3, 3), (1, 1))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), gram64, rtol=1e-5, atol=1e-3)
    xb = x.to(torch.bfloat16)
    got = patch_gram_shifted(xb, (3, 3), (1, 1))
    assert got.dtype == torch.float32  # accumulated in fp32
    torch.testing.assert_close(got.double(), _im2col_gram(xb.double(), (3, 3), (1, 1))[0], rtol=1e-5, atol=1e-3)


def test_ops_torch_path_uses_it_only_for_stride_1_dilation_1() -> None:
    assert supports_shifted_gram((1, 1), (1, 1))
    assert not supports_shifted_gram((2, 1), (1, 1)) and not supports_shifted_gram((1, 1), (1, 2))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for stride, dilation in [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2))]:
        d = 2 * 9 + 1
        want = torch_path.conv_a_factor(
            torch.zeros(torch_path.packed_size(d), dtype=torch.float64),
            x,
            (3, 3),
            stride,
            (1, 1),
            dilation,
            True,
            1.0,
            0.0,
        )
        got = ops.conv_a_factor(
            torch.zeros_like(want),
            x,
            kernel_size=3,
            stride=stride,
            padding=1,
            dilation=dilation,
            has_bias=True,
            scale=1.0,
            decay=0.0,
            backend="torch",
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-11)


def test_empty_batch_gives_zero_gram_and_sums() -> None:
    x = torch.randn(0, 3, 5, 5)
    assert torch.equal(patch_gram_shifted(x, (3, 3), (1, 1)), torch.zeros(27, 27))
    assert torch.equal(patch_sums(x, (3, 3), (1, 1)), torch.zeros(27))


def test_kernel_that_does_not_fit_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        patch_gram_shifted(torch.randn(1, 1, 2, 2), (5, 5), (0, 0))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        patch_gram_shifted(torch.randn(1, 2, 2), (1, 1), (0, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,kernel,padding", GEOMETRIES)
def test_cuda_matches_float64_im2col(shape, kernel, padding) -> None:
    """The same algorithm through cuDNN (what the torch backend runs on a GPU), float32."""
    x = torch.randn(shape, dtype=torch.float64)
    gram, _ = _im2col_gram(x, kernel, padding)
    got = patch_gram_shifted(x.float().cuda(), kernel, padding).double().cpu()
    assert float((got - gram).norm() / gram.norm()) < 1e-5
