"""The compiled kernels (``torch.ops.spngd_ext.*``) against the float64 PyTorch path, on a GPU.

Inputs are random tensors of many shapes (odd sizes, 1x1, single rows, sizes off the tile grids),
chosen with the launch plans of csrc/cuda (mirrored in :mod:`.kernel_cases` and asserted for this card) so that every
tiling, row-split and panel path runs: 64- and 128-wide SYRK tiles with and without row splits, the
conv loader in NCHW and channels-last, the shared-memory Cholesky below, at and above its 32-column
panel width and the ATen path, BatchNorm with one and several blocks per channel. Outputs are
compared as ‖out − ref‖ / ‖ref‖ after checking they are finite: in-place states are poisoned with
NaN when decay = 0, fresh outputs by leaving NaN blocks in the caching allocator, so an unwritten
element fails. The shape tables and shared helpers are in :mod:`spngd_ext.selftest.kernel_cases`.
"""

from __future__ import annotations

import functools
import itertools

import torch

from ..ops import torch_path as ref
from . import kernel_cases as cases
from . import seam_checks
from .kernel_cases import (
    BN_SHAPES,
    CHOLESKY_SIZES,
    CONV_CASES,
    DTYPES,
    FACTOR_CASES,
    SIZES,
    TOL,
    bn_plan,
    expect_close,
    poison_allocator,
    ref_state,
    seeded,
    spd,
    syrk_plan,
)
from .runner import Check

__all__ = [
    "BN_SHAPES",
    "CHOLESKY_SIZES",
    "CONV_CASES",
    "DTYPES",
    "FACTOR_CASES",
    "SIZES",
    "TOL",
    "bn_plan",
    "expect_close",
    "kernel_checks",
    "seeded",
    "spd",
    "syrk_plan",
]

# ------------------------------------------------------------------------------------------------
# pack / unpack


def _cast_tol(src: torch.dtype, out: torch.dtype) -> float:
    if out in (src, torch.float64) or (out == torch.float32 and src in (torch.bfloat16, torch.float16)):
        return 0.0
    return 1e-7 if out == torch.float32 else TOL[out]


def check_pack_upper(k) -> str:
    n = 0
    for sizes in ([1], [2, 3], [17, 31, 32, 33], [64, 65, 127, 130], [257]):
        for src, out_dtype in [(a, b) for a in DTYPES for b in DTYPES] + [(torch.float32, None)]:
            seeded("pack", tuple(sizes), src, out_dtype)
            mats = [torch.randn(s, s, device=cases.DEV).to(src) for s in sizes]
            total = sum(ref.packed_size(s) for s in sizes)
            poison_allocator(((total,), out_dtype or src))
            out = k.pack_upper(mats, out_dtype)
            if out.dtype != (out_dtype or src):
                raise AssertionError(f"pack {sizes} {src}->{out_dtype}: result dtype {out.dtype}")
            expect_close(
                out,
                ref.pack_upper([m.double() for m in mats]),
                _cast_tol(src, out.dtype),
                f"pack {sizes} {src}->{out_dtype}",
            )
            n += 1
    big = torch.randn(80, 90, device=cases.DEV)
    mats = [
        big[3:40, 5:42],
        torch.randn(33, 33, device=cases.DEV).t(),
        torch.randn(5, 5, device=cases.DEV, dtype=torch.float64),
        torch.randn(130, 130, device=cases.DEV).to(torch.bfloat16),
    ]
    expect_close(
        k.pack_upper(mats, torch.float32), ref.pack_upper([m.double() for m in mats]), 1e-7, "strided, mixed-dtype pack"
    )
    return f"{n + 1} cases"


def check_unpack_upper(k) -> str:
    n = 0
    pairs = [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),
    ]
    for sizes, (buf_dtype, out_dtype), offset in itertools.product(
        ([1], [3, 1, 2], [17, 31, 32, 33], [64, 65, 127], [130, 257]), pairs, (0, 7)
    ):
        seeded("unpack", tuple(sizes), buf_dtype, out_dtype, offset)
        total = offset + sum(ref.packed_size(s) for s in sizes) + 5
        buf = torch.randn(total, device=cases.DEV).to(buf_dtype)
        scale = torch.rand(len(sizes), device=cases.DEV) * 2 - 0.5
        poison_allocator(*[((s, s), out_dtype) for s in sizes])
        outs = k.unpack_upper(buf, sizes, scale, offset, out_dtype)
        expect = ref.unpack_upper(buf.double(), sizes, scale=scale.double(), dtype=torch.float64, offset=offset)
        for s, o, e in zip(sizes, outs, expect):
            what = f"unpack {sizes} {buf_dtype}->{out_dtype} offset {offset} n={s}"
            if o.dtype != out_dtype or not torch.equal(o, o.mT):
                raise AssertionError(f"{what}: dtype {o.dtype} or not exactly symmetric")
            expect_close(o, e, 1e-7 if out_dtype in (torch.float32, torch.float64) else TOL[out_dtype], what)
        n += 1
    return f"{n} cases"


def check_pack_many(k) -> str:
    """More matrices than one launch's table holds (256): several launches, one result; round trip."""
    seeded("many")
    sizes = [1, 2, 3, 5] * 80
    mats = [torch.randn(s, s, device=cases.DEV) for s in sizes]
    packed = k.pack_upper(mats, None)
    expect_close(packed, ref.pack_upper(mats), 0.0, "pack of 320 matrices")
    scale = torch.rand(len(sizes), device=cases.DEV) + 0.5
    for i, (m, o) in enumerate(zip(mats, k.unpack_upper(packed, sizes, scale, 0, torch.float32))):
        expect_close(o, (m.triu() + m.triu(1).mT) * scale[i], 1e-7, f"unpack #{i} of 320")
    sym = [m + m.mT for m in (torch.randn(s, s, device=cases.DEV) for s in (7, 64, 33, 1, 257))]
    outs = k.unpack_upper(
        k.pack_upper(sym, None), [m.shape[0] for m in sym], torch.ones(5, device=cases.DEV), 0, torch.float32
    )
    if not all(torch.equal(m, o) for m, o in zip(sym, outs)):
        raise AssertionError("pack then unpack does not return the symmetric matrices exactly")
    return "320 matrices, round trip"


# ------------------------------------------------------------------------------------------------
# factors


def check_accumulate_factor(k) -> str:
    sm = cases.sm_count()
    paths = set()
    for (rows, d), decay in itertools.product(cases.FACTOR_CASES, (0.0, 0.9)):
        seeded("factor", rows, d, decay)
        x = torch.randn(rows, d, device=cases.DEV)
        np_ = ref.packed_size(d)
        state = torch.full((np_,), float("nan"), device=cases.DEV) if decay == 0 else torch.randn(np_, device=cases.DEV)
        expect = ref_state(ref.accumulate_factor, state, x.double(), 0.5, decay)
        k.accumulate_factor(state, x, 0.5, decay)
        expect_close(state, expect, TOL[torch.float32], f"rows={rows} d={d} decay={decay}")
        large, splits = syrk_plan(d, rows, sm, rows * d)
        paths.add((large, splits > 1))
    missing = {(a, b) for a in (False, True) for b in (False, True)} - paths
    if missing:
        raise AssertionError(f"the cases miss SYRK paths (128-wide, split) {sorted(missing)} on {sm} SMs")
    for dtype, (rows, d) in itertools.product((torch.bfloat16, torch.float16), ((300, 33), (129, 130), (64, 600))):
        seeded("factor-half", dtype, rows, d)
        x = torch.randn(rows, d, device=cases.DEV).to(dtype)
        state = torch.full((ref.packed_size(d),), float("nan"), device=cases.DEV)
        expect = ref_state(ref.accumulate_factor, state, x.double(), 1.0 / rows, 0.0)
        k.accumulate_factor(state, x, 1.0 / rows, 0.0)
        expect_close(state, expect, TOL[torch.float32], f"{dtype} inputs rows={rows} d={d}")
    x = torch.randn(70, 500, device=cases.DEV).t()[::2]  # (250, 70), both strides non-unit
    state = torch.zeros(ref.packed_size(70), device=cases.DEV)
    expect = ref_state(ref.accumulate_factor, state, x.double(), 2.0, 0.0)
    k.accumulate_factor(state, x, 2.0, 0.0)
    expect_close(state, expect, TOL[torch.float32], "strided x")
    return f"{2 * len(cases.FACTOR_CASES) + 7} cases; 64/128-wide tiles with and without row splits"


def check_conv_a_factor(k) -> str:
    sm = cases.sm_count()
    paths = set()
    n_cases = 0
    for case, layout, decay in itertools.product(CONV_CASES, ("nchw", "channels_last"), (0.0, 0.5)):
        n, c, h, w, ks, s, p, dil, bias = case
        seeded("conv", case, layout, decay)
        x = torch.randn(n, c, h, w, device=cases.DEV)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        d = c * ks[0] * ks[1] + int(bias)
        np_ = ref.packed_size(d)
        state = torch.full((np_,), float("nan"), device=cases.DEV) if decay == 0 else torch.randn(np_, device=cases.DEV)
        expect = ref_state(ref.conv_a_factor, state, x.double(), ks, s, p, dil, bias, 0.25, decay)
        k.conv_a_factor(state, x, list(ks), list(s), list(p), list(dil), bias, 0.25, decay)
        expect_close(state, expect, TOL[torch.float32], f"conv {case} {layout} decay={decay}")
        oh = (h + 2 * p[0] - dil[0] * (ks[0] - 1) - 1) // s[0] + 1
        ow = (w + 2 * p[1] - dil[1] * (ks[1] - 1) - 1) // s[1] + 1
        rows = n * oh * ow
        large, splits = syrk_plan(d, rows, sm, rows * c // 2)
        paths.add((large, splits > 1))
        n_cases += 1
    if (False, True) not in paths or not ((True, False) in paths or (True, True) in paths):
        raise AssertionError(f"the conv cases miss a SYRK path on {sm} SMs: reached {sorted(paths)}")
    seeded("conv-bf16")
    x = torch.randn(4, 8, 12, 12, device=cases.DEV).to(torch.bfloat16)
    state = torch.full((ref.packed_size(8 * 9 + 1),), float("nan"), device=cases.DEV)
    expect = ref_state(ref.conv_a_factor, state, x.double(), (3, 3), (1, 1), (1, 1), (1, 1), True, 1.0, 0.0)
    k.conv_a_factor(state, x, [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 0.0)
    expect_close(state, expect, TOL[torch.float32], "bf16 conv input")
    return f"{n_cases + 1} cases; NCHW and channels-last, split and 128-wide tiles"


# ------------------------------------------------------------------------------------------------
# Cholesky


def check_cholesky(k) -> str:
    old = k.cholesky_kernel_max_n(-1)
    n_cases = 0
    try:
        for path, limit in (("kernel", 10**6), ("aten", 0)):
            k.cholesky_kernel_max_n(limit)  # the shared-memory kernel as far as it fits, or ATen
            for n, dtype in itertools.product(CHOLESKY_SIZES, (torch.float32, torch.float64)):
                seeded("chol", n, dtype, path)
                batch = 5 if n > 64 else 16
                mats = spd(batch, n, dtype)
                damping = (torch.rand(batch, device=cases.DEV, dtype=dtype) * 0.1).contiguous()
                poison_allocator(((batch, n, n), dtype), ((batch,), torch.int32))
                inv, info = k.cholesky_inverse_damped(mats, damping)
                expect, _ = ref.cholesky_inverse_damped(mats.double(), damping.double())
                if info.dtype != torch.int32 or info.shape != (batch,) or not (info == 0).all():
                    raise AssertionError(f"n={n} {dtype} {path}: info {info.tolist()}")
                expect_close(inv, expect, 2e-4 if dtype == torch.float32 else 1e-10, f"n={n} {dtype} {path}")
                n_cases += 1
            mats = spd(4, 37, torch.float32)
            junk = mats.tril() + torch.full_like(mats, float("nan")).triu(1)
            damping = torch.full((4,), 0.01, device=cases.DEV)
            inv, info = k.cholesky_inverse_damped(junk, damping)
            expect, _ = ref.cholesky_inverse_damped(mats.double(), damping.double())
            if not (info == 0).all():
                raise AssertionError(f"{path}: NaN in the strict upper triangle was read")
            expect_close(inv, expect, 2e-4, f"{path}: lower triangle only")
            for n in (3, 33, 130):
                good = spd(6, n, torch.float32)
                bad = good.clone()
                bad[1] = -torch.eye(n, device=cases.DEV)
                bad[3, n // 2, 0] = bad[3, 0, n // 2] = float("nan")
                bad[5, n - 1, n - 1] = float("inf")
                damping = torch.full((6,), 0.05, device=cases.DEV)
                inv, info = k.cholesky_inverse_damped(bad, damping)
                flags = (info != 0).tolist()
                if flags != [False, True, False, True, False, True]:
                    raise AssertionError(f"{path} n={n}: failure flags {flags}, expected matrices 1, 3, 5")
                for b in (0, 2, 4):
                    expect, _ = ref.cholesky_inverse_damped(good[b : b + 1].double(), damping[b : b + 1].double())
                    expect_close(inv[b : b + 1], expect, 2e-4, f"{path} n={n}: good matrix {b} next to failed ones")
            n_cases += 4
        inv, info = k.cholesky_inverse_damped(torch.zeros(0, 4, 4, device=cases.DEV), torch.zeros(0, device=cases.DEV))
        if inv.shape != (0, 4, 4) or info.shape != (0,):
            raise AssertionError("empty batch")
    finally:
        k.cholesky_kernel_max_n(old)
    return f"{n_cases + 1} cases; kernel (below, at, above the 32-wide panel) and ATen paths"


# ------------------------------------------------------------------------------------------------
# BatchNorm


def check_bn(k) -> str:
    sm = cases.sm_count()
    plans = set()
    for shape, decay in itertools.product(BN_SHAPES, (0.0, 0.9)):
        seeded("bn", shape, decay)
        g, xh = torch.randn(shape, device=cases.DEV), torch.randn(shape, device=cases.DEV)
        c = shape[1]
        state = torch.full((c, 3), float("nan"), device=cases.DEV) if decay == 0 else torch.rand(c, 3, device=cases.DEV)
        expect = ref_state(ref.bn_unitwise_fisher, state, g.double(), xh.double(), 0.5, decay)
        k.bn_unitwise_fisher(state, g, xh, 0.5, decay)
        expect_close(state, expect, TOL[torch.float32], f"bn {shape} decay={decay}")
        hw = 1
        for s in shape[2:]:
            hw *= s
        plans.add(bn_plan(shape[0], c, hw, sm)[1] > 1)
    if plans != {False, True}:
        raise AssertionError(f"the BatchNorm shapes miss the one- or several-blocks-per-channel path on {sm} SMs")
    for dtype in (torch.bfloat16, torch.float16):
        g, xh = (
            torch.randn(16, 24, 9, 9, device=cases.DEV).to(dtype),
            torch.randn(16, 24, 9, 9, device=cases.DEV).to(dtype),
        )
        state = torch.full((24, 3), float("nan"), device=cases.DEV)
        expect = ref_state(ref.bn_unitwise_fisher, state, g.double(), xh.double(), 1.0, 0.0)
        k.bn_unitwise_fisher(state, g, xh, 1.0, 0.0)
        expect_close(state, expect, TOL[torch.float32], f"bn {dtype} inputs")
    for channels in (1, 5, 300):
        seeded("bn-solve", channels)
        a, d = torch.rand(channels, device=cases.DEV) + 0.1, torch.rand(channels, device=cases.DEV) + 0.1
        b = (torch.rand(channels, device=cases.DEV) * 2 - 1) * (a * d).sqrt() * 0.9
        fisher = torch.stack([a, b, d], dim=1).contiguous()
        if channels >= 5:
            fisher[1] = torch.tensor([1.0, 1.0, 1.0])
            fisher[3] = torch.tensor([float("nan"), 0.0, 1.0])
        gg, gb = torch.randn(channels, device=cases.DEV), torch.randn(channels, device=cases.DEV)
        for damping in (0.0, 1e-3):
            poison_allocator(((channels,), torch.float32), ((channels,), torch.float32))
            ug, ub = k.bn_unitwise_solve(fisher, gg, gb, damping)
            eg, eb = ref.bn_unitwise_solve(fisher.double(), gg.double(), gb.double(), damping)
            expect_close(ug, eg, 2e-4, f"solve C={channels} damping={damping} gamma")
            expect_close(ub, eb, 2e-4, f"solve C={channels} damping={damping} beta")
            if channels >= 5 and damping == 0.0 and not (ug[1] == gg[1] and ub[3] == gb[3]):
                raise AssertionError("a singular or NaN block must keep the plain gradient")
    return f"{2 * len(BN_SHAPES) + 2} fisher cases (one and several blocks per channel), 6 solves"


def kernel_checks() -> list[Check]:
    """The GPU checks, in order (each needs a CUDA GPU and the built extension)."""
    k = torch.ops.spngd_ext
    named = [
        ("pack_upper: sizes x dtypes, strided and mixed inputs", check_pack_upper),
        ("unpack_upper: sizes x dtypes x offsets", check_unpack_upper),
        ("pack/unpack: 320 matrices (several launches), round trip", check_pack_many),
        ("accumulate_factor: every tiling and split path", check_accumulate_factor),
        ("conv_a_factor: geometries x layouts, split path", check_conv_a_factor),
        ("cholesky_inverse_damped: panel and ATen paths, failures", check_cholesky),
        ("bn_unitwise_fisher / bn_unitwise_solve", check_bn),
        ("raw-op argument checks (child process)", seam_checks.check_error_cases),
        ("no op synchronises with the host", seam_checks.check_no_host_sync),
        ("spngd_ext.ops backend='cuda' equals backend='torch'", seam_checks.check_python_seam),
        ("first-use guard passes every op and dtype", seam_checks.check_first_use_guard),
    ]
    return [Check(name, functools.partial(fn, k), "kernels") for name, fn in named]
