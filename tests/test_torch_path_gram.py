"""The pure-PyTorch factor accumulation (block-row upper-triangle Gram) against float64 xᵀx."""

from __future__ import annotations

import pytest
import torch

from spngd_ext.ops import torch_path


def _packed_reference(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    full = x.double().T @ x.double()
    rows, cols = torch.triu_indices(d, d)
    return full[rows, cols]


@pytest.mark.parametrize("d", [1, 2, 127, 128, 129, 257, 511, 512, 577])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulate_factor_matches_float64_gram(d: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(d)
    rows = 3 + d % 7
    x = torch.randn(rows, d, generator=g, dtype=dtype)
    old = torch.randn(d * (d + 1) // 2, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    state = torch.full_like(old, float("nan"))  # decay 0 overwrites: the poison must not survive
    torch_path.accumulate_factor(state, x, 0.5, 0.0)
    torch.testing.assert_close(state.double(), 0.5 * _packed_reference(x), **tol)

    state = old.clone()
    torch_path.accumulate_factor(state, x, 2.0, 0.9)
    torch.testing.assert_close(state.double(), 0.9 * old.double() + 2.0 * _packed_reference(x), **tol)
