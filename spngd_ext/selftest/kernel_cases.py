"""The GPU self-test's cases and shared helpers: shape tables, launch plans, inputs and comparison.

:mod:`spngd_ext.selftest.kernel_checks` (the per-op runners) and :mod:`spngd_ext.selftest.seam_checks`
(the Python seam, host synchronisation, the first-use guard) both draw on these. :data:`DEV` is the
device every input is made on (the CPU tests point it at the CPU). The launch plans mirror
``plan_syrk`` in syrk_tiles.cuh and ``plan_bn_fisher`` in batchnorm_kernels.cuh, so the tables can be
shown to reach every tiling, row-split and block path.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable

import torch

__all__ = [
    "BN_SHAPES",
    "CHOLESKY_SIZES",
    "CONV_CASES",
    "DEV",
    "DTYPES",
    "FACTOR_CASES",
    "SIZES",
    "TOL",
    "bn_plan",
    "expect_close",
    "poison_allocator",
    "ref_state",
    "seeded",
    "sm_count",
    "spd",
    "syrk_plan",
]

DEV = "cuda"
SIZES = [1, 2, 3, 17, 31, 32, 33, 64, 65, 127, 130, 257]
CHOLESKY_SIZES = SIZES  # panel width 32: below, at, above, several panels; 257 > the default kernel limit
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FACTOR_CASES = [(rows, d) for rows, d in itertools.product([1, 7, 300], SIZES)] + [
    (1000, 513),
    (257, 600),
    (20000, 65),
    (40000, 520),
    (0, 17),
]
CONV_CASES = [  # N, C, H, W, kernel, stride, padding, dilation, bias
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), False),
    (2, 3, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), True),
    (3, 5, 11, 7, (3, 2), (2, 1), (1, 0), (1, 2), True),
    (2, 4, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), True),
    (2, 16, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1), False),
    (1, 3, 32, 32, (7, 7), (2, 2), (3, 3), (1, 1), False),
    (2, 6, 10, 12, (3, 3), (1, 1), (2, 2), (2, 2), True),
    (4, 2, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), True),  # few tiles, many rows: split path
    (2, 70, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), True),  # d = 631: 128-wide tiles
]
BN_SHAPES = [
    (1, 1, 1, 1),
    (2, 3),
    (4, 5, 7, 7),
    (3, 8, 1, 1),
    (32, 64, 16, 16),
    (5, 3, 3, 5),
    (2, 2, 2),
    (256, 4, 8, 8),
    (7, 33, 40),
    (1, 2048),
]


# ------------------------------------------------------------------------------------------------
# launch plans (mirrors of plan_syrk in syrk_tiles.cuh and plan_bn_fisher in batchnorm_kernels.cuh)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def syrk_plan(d: int, rows: int, sm_count: int, max_ws: int) -> tuple[bool, int]:
    """(128-wide tiles?, row splits) of one SYRK launch."""
    np_ = d * (d + 1) // 2
    large = d >= 512
    nt = _cdiv(d, 128 if large else 64)
    tiles = nt * (nt + 1) // 2
    target = (2 if large else 4) * sm_count
    splits = 1
    if tiles < target and rows > 0:
        splits = max(1, min(_cdiv(target, tiles), _cdiv(rows, 128), max_ws // np_ if np_ > 0 else 1))
    if splits > 1:
        splits = _cdiv(rows, _cdiv(_cdiv(rows, splits), 8) * 8)
    return large, splits


def bn_plan(n: int, c: int, hw: int, sm_count: int) -> tuple[int, int]:
    """(lanes per plane, blocks per channel) of one bn_unitwise_fisher launch."""
    sub = 32
    while sub > hw:
        sub >>= 1
    g = min(_cdiv(n, 256 // sub), max(1, _cdiv(4 * sm_count, c)))
    return sub, _cdiv(n, _cdiv(n, g))


# ------------------------------------------------------------------------------------------------
# helpers


def seeded(*key) -> None:
    """Seed the global generator from ``key``: a fresh, reproducible seed per case (unlike hash())."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def expect_close(out: torch.Tensor, expect: torch.Tensor, tol: float, what: str) -> None:
    """Raise AssertionError (naming ``what``) unless ``out`` is finite, has ``expect``'s shape and
    ‖out − expect‖ / ‖expect‖ <= ``tol``.

    Args:
        out: the kernel's result.
        expect: the float64 reference.
        tol: the largest relative error accepted.
        what: the case, for the message.
    """
    if out.shape != expect.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)}, expected {tuple(expect.shape)}")
    out, expect = out.double(), expect.double()
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite entries (unwritten or poisoned)")
    den = expect.norm().item()
    err = (out - expect).norm().item() / (den if den > 0 else 1.0)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}")


def poison_allocator(*shapes_dtypes) -> None:
    """Leave NaN-filled free blocks for the next allocations to reuse."""
    blocks = [
        torch.full(shape, float("nan") if dt.is_floating_point else -(2**31), dtype=dt, device=DEV)
        for shape, dt in shapes_dtypes
    ]
    del blocks


def spd(batch: int, n: int, dtype: torch.dtype, shift: float = 0.05) -> torch.Tensor:
    """``batch`` random symmetric positive definite n×n matrices (Gram matrices + ``shift``·I) on DEV.

    Args:
        batch: how many matrices.
        n: their size.
        dtype: their dtype (built in float64, then cast).
        shift: added to the diagonal, bounds the condition number.
    """
    x = torch.randn(batch, 2 * n + 2, n, dtype=torch.float64, device=DEV)
    m = x.mT @ x / (2 * n + 2) + shift * torch.eye(n, dtype=torch.float64, device=DEV)
    return m.to(dtype).contiguous()


def ref_state(fn: Callable, state: torch.Tensor, *args) -> torch.Tensor:
    """The float64 PyTorch path's result on a copy of ``state``: ``fn(state.double(), *args)``."""
    s = state.double().clone()
    fn(s, *args)
    return s


def sm_count() -> int:
    """The multiprocessor count of GPU 0 (the launch plans depend on it)."""
    return torch.cuda.get_device_properties(0).multi_processor_count
