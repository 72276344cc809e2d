"""The CUDA kernels (torch.ops.spngd_ext.*) against the float64 reference (spngd_ext.ops.torch_path).

Every test needs a GPU and the built extension. Inputs are fresh random tensors of many shapes (odd
sizes, 1x1, single rows, sizes off the tile grids); outputs are compared as ‖out − ref‖ / ‖ref‖
after checking they are finite, so an unwritten (NaN-poisoned) element always fails. In-place states
are poisoned with NaN when decay = 0; freshly allocated outputs are caught by refilling the caching
allocator with NaN blocks before the call.
"""

from __future__ import annotations

import subprocess
import zlib

import pytest
import torch
from op_error_cases import child_command, error_cases

from spngd_ext import ops as ops_py
from spngd_ext.ops import torch_path as ref
from spngd_ext.ops.extension import extension_error, extension_loaded
from spngd_ext.selftest.kernel_checks import (  # the shapes python -m spngd_ext.selftest runs too
    BN_SHAPES,
    CONV_CASES,
    DTYPES,
    FACTOR_CASES,
    SIZES,
    TOL,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not extension_loaded():
        pytest.fail(f"spngd_ext._C is not loaded on a GPU machine: {extension_error()}")
    return torch.ops.spngd_ext


def seeded(*key) -> None:
    """A fresh seed per test case, reproducible across runs (unlike hash() of strings)."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    assert out.shape == expect.shape, (out.shape, expect.shape)
    out, expect = out.double(), expect.double()
    assert torch.isfinite(out).all(), "output has non-finite entries (unwritten or poisoned)"
    diff = (out - expect).norm().item()
    den = expect.norm().item()
    return diff / den if den > 0 else diff


def check(out, expect, tol, what=""):
    err = rel_err(out, expect)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison_allocator(*tensors_like) -> None:
    """Leave NaN-filled (integers: -2**31) free blocks of the given (shape, dtype)s for the next
    allocations to reuse."""
    blocks = [
        torch.full(shape, float("nan") if dt.is_floating_point else -(2**31), dtype=dt, device=DEV)
        for shape, dt in tensors_like
    ]
    del blocks


def spd(batch, n, dtype, cond_shift=0.05):
    x = torch.randn(batch, 2 * n + 2, n, dtype=torch.float64, device=DEV)
    m = x.mT @ x / (2 * n + 2) + cond_shift * torch.eye(n, dtype=torch.float64, device=DEV)
    return m.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------
# pack / unpack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1], [2, 3], [17, 31, 32, 33], [64, 65, 127, 130], [257]])
@pytest.mark.parametrize("src_dtype,out_dtype", [(a, b) for a in DTYPES for b in DTYPES] + [(torch.float32, None)])
def test_pack_upper(kernels, sizes, src_dtype, out_dtype):
    seeded("pack", tuple(sizes), src_dtype, out_dtype)
    mats = [torch.randn(n, n, device=DEV).to(src_dtype) for n in sizes]
    total = sum(ref.packed_size(n) for n in sizes)
    poison_allocator(((total,), out_dtype or src_dtype))
    out = kernels.pack_upper(mats, out_dtype)
    assert out.dtype == (out_dtype or src_dtype) and out.shape == (total,)
    expect = ref.pack_upper([m.double() for m in mats])
    check(out, expect, cast_tol(src_dtype, out.dtype), "pack")


def cast_tol(src: torch.dtype, out: torch.dtype) -> float:
    """0 where the cast is exact, else the output dtype's rounding."""
    if out in (src, torch.float64) or (out == torch.float32 and src in (torch.bfloat16, torch.float16)):
        return 0.0
    return 1e-7 if out == torch.float32 else TOL[out]


def test_pack_upper_strided_and_mixed(kernels):
    seeded("pack-strided")
    big = torch.randn(80, 90, device=DEV)
    mats = [
        big[3:40, 5:42],  # row stride 90
        torch.randn(33, 33, device=DEV).t(),  # column-major
        torch.randn(5, 5, device=DEV, dtype=torch.float64),
        torch.randn(130, 130, device=DEV).to(torch.bfloat16),
    ]
    out = kernels.pack_upper(mats, torch.float32)
    check(out, ref.pack_upper([m.double() for m in mats]), 1e-7, "strided/mixed pack")


def test_pack_unpack_many_matrices(kernels):
    """More matrices than one launch's table holds (256): several launches, one result."""
    seeded("many")
    sizes = [1, 2, 3, 5] * 80
    mats = [torch.randn(n, n, device=DEV) for n in sizes]
    packed = kernels.pack_upper(mats, None)
    check(packed, ref.pack_upper(mats), 0.0, "pack of 320 matrices")
    scale = torch.rand(len(sizes), device=DEV) + 0.5
    outs = kernels.unpack_upper(packed, sizes, scale, 0, torch.float32)
    for k, (m, o) in enumerate(zip(mats, outs)):
        sym = m.triu() + m.triu(1).mT
        check(o, sym * scale[k], 1e-7, f"unpack #{k}")


@pytest.mark.parametrize("sizes", [[1], [3, 1, 2], [17, 31, 32, 33], [64, 65, 127], [130, 257]])
@pytest.mark.parametrize(
    "buf_dtype,out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("offset", [0, 7])
def test_unpack_upper(kernels, sizes, buf_dtype, out_dtype, offset):
    seeded("unpack", tuple(sizes), buf_dtype, out_dtype, offset)
    total = offset + sum(ref.packed_size(n) for n in sizes) + 5  # junk before and after
    buf = torch.randn(total, device=DEV).to(buf_dtype)
    scale = torch.rand(len(sizes), device=DEV) * 2 - 0.5
    poison_allocator(*[((n, n), out_dtype) for n in sizes])
    outs = kernels.unpack_upper(buf, sizes, scale, offset, out_dtype)
    expect = ref.unpack_upper(buf.double(), sizes, scale=scale.double(), dtype=torch.float64, offset=offset)
    for n, o, e in zip(sizes, outs, expect):
        assert o.dtype == out_dtype and o.shape == (n, n)
        assert torch.equal(o, o.mT), "output not exactly symmetric"
        check(o, e, 1e-7 if out_dtype in (torch.float32, torch.float64) else TOL[out_dtype], f"unpack n={n}")


def test_pack_unpack_roundtrip(kernels):
    seeded("roundtrip")
    sizes = [7, 64, 33, 1, 257]
    mats = [torch.randn(n, n, device=DEV) for n in sizes]
    mats = [m + m.mT for m in mats]
    ones = torch.ones(len(sizes), device=DEV)
    outs = kernels.unpack_upper(kernels.pack_upper(mats, None), sizes, ones, 0, torch.float32)
    for m, o in zip(mats, outs):
        assert torch.equal(m, o)


# --------------------------------------------------------------------------------------------
# factor accumulation
# --------------------------------------------------------------------------------------------


def ref_factor(fn, state, *args):
    s = state.double().clone()
    fn(s, *args)
    return s


@pytest.mark.parametrize("rows,d", FACTOR_CASES)
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_accumulate_factor(kernels, rows, d, decay):
    seeded("factor", rows, d, decay)
    x = torch.randn(rows, d, device=DEV)
    state = (
        torch.full((ref.packed_size(d),), float("nan"), device=DEV)
        if decay == 0
        else torch.randn(ref.packed_size(d), device=DEV)
    )
    expect = ref_factor(ref.accumulate_factor, state, x.double(), 0.5, decay)
    kernels.accumulate_factor(state, x, 0.5, decay)
    check(state, expect, TOL[torch.float32], f"rows={rows} d={d} decay={decay}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,d", [(300, 33), (129, 130), (64, 600)])
def test_accumulate_factor_half_inputs(kernels, dtype, rows, d):
    seeded("factor-half", dtype, rows, d)
    x = torch.randn(rows, d, device=DEV).to(dtype)
    state = torch.full((ref.packed_size(d),), float("nan"), device=DEV)
    expect = ref_factor(ref.accumulate_factor, state, x.double(), 1.0 / rows, 0.0)
    kernels.accumulate_factor(state, x, 1.0 / rows, 0.0)
    check(state, expect, TOL[torch.float32], f"{dtype} inputs (exact in fp64), fp32 sums")


def test_accumulate_factor_strided_input(kernels):
    seeded("factor-strided")
    x = torch.randn(70, 500, device=DEV).t()[::2]  # (250, 70), both strides non-unit
    state = torch.zeros(ref.packed_size(70), device=DEV)
    expect = ref_factor(ref.accumulate_factor, state, x.double(), 2.0, 0.0)
    kernels.accumulate_factor(state, x, 2.0, 0.0)
    check(state, expect, TOL[torch.float32], "strided x")


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_conv_a_factor(kernels, case, layout, decay):
    n, c, h, w, k, s, p, dil, bias = case
    seeded("conv", case, layout, decay)
    x = torch.randn(n, c, h, w, device=DEV)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    d = c * k[0] * k[1] + int(bias)
    state = (
        torch.full((ref.packed_size(d),), float("nan"), device=DEV)
        if decay == 0
        else torch.randn(ref.packed_size(d), device=DEV)
    )
    expect = ref_factor(ref.conv_a_factor, state, x.double(), k, s, p, dil, bias, 0.25, decay)
    kernels.conv_a_factor(state, x, list(k), list(s), list(p), list(dil), bias, 0.25, decay)
    check(state, expect, TOL[torch.float32], f"conv {case} {layout}")


def test_conv_a_factor_bf16(kernels):
    seeded("conv-bf16")
    x = torch.randn(4, 8, 12, 12, device=DEV).to(torch.bfloat16)
    state = torch.full((ref.packed_size(8 * 9 + 1),), float("nan"), device=DEV)
    expect = ref_factor(ref.conv_a_factor, state, x.double(), (3, 3), (1, 1), (1, 1), (1, 1), True, 1.0, 0.0)
    kernels.conv_a_factor(state, x, [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 0.0)
    check(state, expect, TOL[torch.float32], "bf16 conv input")


# --------------------------------------------------------------------------------------------
# Cholesky inverse
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["kernel", "aten"])
def chol_path(request, kernels):
    """Force the shared-memory kernel (as far as shared memory allows) or the ATen path."""
    old = kernels.cholesky_kernel_max_n(10**6 if request.param == "kernel" else 0)
    yield request.param
    kernels.cholesky_kernel_max_n(old)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_inverse(kernels, chol_path, n, dtype):
    seeded("chol", n, dtype, chol_path)
    batch = 5 if n > 64 else 16
    mats = spd(batch, n, dtype)
    damping = (torch.rand(batch, device=DEV, dtype=dtype) * 0.1).contiguous()
    poison_allocator(((batch, n, n), dtype), ((batch,), torch.int32))
    inv, info = kernels.cholesky_inverse_damped(mats, damping)
    expect, _ = ref.cholesky_inverse_damped(mats.double(), damping.double())
    assert info.dtype == torch.int32 and info.shape == (batch,)
    assert (info == 0).all(), info
    check(inv, expect, 2e-4 if dtype == torch.float32 else 1e-10, f"n={n} {dtype} {chol_path}")


def test_cholesky_reads_lower_triangle_only(kernels, chol_path):
    seeded("chol-lower", chol_path)
    mats = spd(4, 37, torch.float32)
    junk = mats.tril() + torch.full_like(mats, float("nan")).triu(1)
    damping = torch.full((4,), 0.01, device=DEV)
    inv, info = kernels.cholesky_inverse_damped(junk, damping)
    expect, _ = ref.cholesky_inverse_damped(mats.double(), damping.double())
    assert (info == 0).all()
    check(inv, expect, 2e-4, "NaN in the strict upper triangle is ignored")


@pytest.mark.parametrize("n", [3, 33, 130])
def test_cholesky_failure_flags(kernels, chol_path, n):
    seeded("chol-fail", n, chol_path)
    good = spd(6, n, torch.float32)
    mats = good.clone()
    mats[1] = -torch.eye(n, device=DEV)  # not PD (even with damping)
    mats[3, n // 2, 0] = float("nan")  # NaN below the diagonal
    mats[3, 0, n // 2] = float("nan")
    mats[5, n - 1, n - 1] = float("inf")  # infinite pivot
    damping = torch.full((6,), 0.05, device=DEV)
    inv, info = kernels.cholesky_inverse_damped(mats, damping)
    assert info.shape == (6,)
    bad = [1, 3, 5]
    assert all(info[b].item() != 0 for b in bad), info
    for b in (0, 2, 4):
        assert info[b].item() == 0, info
        expect, _ = ref.cholesky_inverse_damped(good[b : b + 1].double(), damping[b : b + 1].double())
        check(inv[b : b + 1], expect, 2e-4, f"good matrix {b} next to failed ones")


def test_cholesky_empty_batch(kernels):
    inv, info = kernels.cholesky_inverse_damped(torch.zeros(0, 4, 4, device=DEV), torch.zeros(0, device=DEV))
    assert inv.shape == (0, 4, 4) and info.shape == (0,)


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_bn_unitwise_fisher(kernels, shape, decay):
    seeded("bn", shape, decay)
    g = torch.randn(shape, device=DEV)
    xh = torch.randn(shape, device=DEV)
    c = shape[1]
    state = torch.full((c, 3), float("nan"), device=DEV) if decay == 0 else torch.rand(c, 3, device=DEV)
    expect = ref_factor(ref.bn_unitwise_fisher, state, g.double(), xh.double(), 0.5, decay)
    kernels.bn_unitwise_fisher(state, g, xh, 0.5, decay)
    check(state, expect, TOL[torch.float32], f"bn {shape}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bn_unitwise_fisher_half(kernels, dtype):
    seeded("bn-half", dtype)
    g = torch.randn(16, 24, 9, 9, device=DEV).to(dtype)
    xh = torch.randn(16, 24, 9, 9, device=DEV).to(dtype)
    state = torch.full((24, 3), float("nan"), device=DEV)
    expect = ref_factor(ref.bn_unitwise_fisher, state, g.double(), xh.double(), 1.0, 0.0)
    kernels.bn_unitwise_fisher(state, g, xh, 1.0, 0.0)
    check(state, expect, TOL[torch.float32], f"{dtype} inputs")


@pytest.mark.parametrize("channels", [1, 5, 300])
def test_bn_unitwise_solve(kernels, channels):
    seeded("bn-solve", channels)
    a, d = torch.rand(channels, device=DEV) + 0.1, torch.rand(channels, device=DEV) + 0.1
    b = (torch.rand(channels, device=DEV) * 2 - 1) * (a * d).sqrt() * 0.9
    fisher = torch.stack([a, b, d], dim=1).contiguous()
    if channels >= 5:
        fisher[1] = torch.tensor([1.0, 1.0, 1.0])  # singular once damping is 0
        fisher[3] = torch.tensor([float("nan"), 0.0, 1.0])  # non-finite
    gg, gb = torch.randn(channels, device=DEV), torch.randn(channels, device=DEV)
    for damping in (0.0, 1e-3):
        poison_allocator(((channels,), torch.float32), ((channels,), torch.float32))
        ug, ub = kernels.bn_unitwise_solve(fisher, gg, gb, damping)
        eg, eb = ref.bn_unitwise_solve(fisher.double(), gg.double(), gb.double(), damping)
        check(ug, eg, 2e-4, "gamma (fp32 2x2 solves, condition up to ~2e3)")
        check(ub, eb, 2e-4, "beta")
        if channels >= 5 and damping == 0.0:
            assert ug[1] == gg[1] and ub[3] == gb[3], "a singular/NaN block must keep the plain gradient"


# --------------------------------------------------------------------------------------------
# Argument checks, host syncs, the Python seam
# --------------------------------------------------------------------------------------------


def test_error_messages(kernels):
    """Wrong device/dtype/shape raise the right exception naming the argument (the cases are in
    tests/op_error_cases.py). Run in a child process, so that a crash in an error path fails this
    test (showing the case) instead of ending the whole test run."""
    proc = subprocess.run(child_command("cuda"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "all error cases raised" in proc.stdout, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    ran = [line for line in proc.stdout.splitlines() if line.startswith("case: ")]
    assert len(ran) == len(error_cases(None, "cuda"))  # every case, the device ones included


def test_no_host_sync(kernels):
    """No op synchronises with the host (torch raises on a synchronising call in this mode)."""
    mats = spd(4, 40, torch.float32)
    damping = torch.full((4,), 0.01, device=DEV)
    x = torch.randn(64, 40, device=DEV)
    state = torch.zeros(ref.packed_size(40), device=DEV)
    conv_state = torch.zeros(ref.packed_size(3 * 9 + 1), device=DEV)
    img = torch.randn(2, 3, 8, 8, device=DEV)
    bn_state = torch.zeros(5, 3, device=DEV)
    g = torch.randn(64, 5, 4, 4, device=DEV)
    old = kernels.cholesky_kernel_max_n(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.unpack_upper(
            kernels.pack_upper([mats[0], mats[1]], torch.bfloat16),
            [40, 40],
            torch.ones(2, device=DEV),
            0,
            torch.float32,
        )
        kernels.accumulate_factor(state, x, 1.0, 0.5)
        kernels.conv_a_factor(conv_state, img, [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 0.0)
        kernels.bn_unitwise_fisher(bn_state, g, g, 1.0, 0.0)
        kernels.bn_unitwise_solve(bn_state, bn_state[:, 0].contiguous(), bn_state[:, 1].contiguous(), 1e-3)
        for limit in (10**6, 0):  # the kernel and the ATen path
            kernels.cholesky_kernel_max_n(limit)
            kernels.cholesky_inverse_damped(mats, damping)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        kernels.cholesky_kernel_max_n(old)


def test_python_seam_uses_kernels(kernels):
    """ops.py with backend='cuda' and 'torch' agree (the seam passes the right arguments)."""
    seeded("seam")
    x = torch.randn(50, 20, device=DEV)
    s_cuda, s_torch = torch.zeros(210, device=DEV), torch.zeros(210, device=DEV)
    ops_py.accumulate_factor(s_cuda, x, scale=0.1, decay=0.0, backend="cuda")
    ops_py.accumulate_factor(s_torch, x, scale=0.1, decay=0.0, backend="torch")
    check(s_cuda, s_torch, 1e-5, "accumulate_factor via ops.py")
    packed = ops_py.pack_upper([torch.eye(3, device=DEV)], backend="cuda")
    (full,) = ops_py.unpack_upper(packed, [3], scale=2.0, backend="cuda")
    assert torch.equal(full, 2 * torch.eye(3, device=DEV))
    m = spd(2, 10, torch.float32)
    inv_c, info_c = ops_py.cholesky_inverse_damped(m, 0.01, backend="cuda")
    inv_t, info_t = ops_py.cholesky_inverse_damped(m, 0.01, backend="torch")
    assert (info_c == 0).all() and (info_t == 0).all()
    check(inv_c, inv_t, 1e-4, "cholesky via ops.py")
