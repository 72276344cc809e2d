"""Property-based tests (hypothesis) of every op in ``spngd_ext.ops`` against float64 oracles.

Hypothesis draws shapes, dtypes, hyperparameters and a seed; the tensors come from a seeded torch
generator (fast, and still reproducible and shrinkable through the seed). Oracles are written
independently of :mod:`spngd_ext.ops.torch_path` where that reference is itself the thing under test
(explicit patch extraction for convolutions, explicit 2×2 solves, a Kronecker-product solve, the
packed-index formula of docs/design.md, ``torch.optim.SGD``).

Every property runs on the CPU (backend="torch") and, marked ``gpu`` and skipped without a GPU and
the built extension, on CUDA (backend="cuda", restricted to the dtypes the kernels take). Sizes are
drawn per target (``size``): small on the CPU (CI time), and on CUDA across the kernels' launch
plans (several SYRK tiles, the large-tile variant, row splits, several Cholesky panels and thread
counts, the PyTorch fallback above the kernel's largest size, BatchNorm batch splits, several pack
launches and unpack tiles), with sizes just below, at and above each threshold;
``test_cuda_sizes_cross_the_kernel_thresholds`` reads the thresholds from csrc/cuda.
Examples are derandomised so CI is reproducible; set SPNGD_HYPOTHESIS_RANDOM=1 to explore.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spngd_ext import cuda_ops_available, ops
from spngd_ext.ops.torch_path import packed_size

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_FLOAT = [F32, F64, BF16, F16]
EPS = {F64: 2.0**-52, F32: 2.0**-23, BF16: 2.0**-7, F16: 2.0**-10}

TARGETS = [
    pytest.param(("cpu", "torch"), id="cpu"),
    pytest.param(
        ("cuda", "cuda"),
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not cuda_ops_available(), reason="needs a CUDA GPU and the built extension"),
        ],
    ),
]


def fast(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=os.environ.get("SPNGD_HYPOTHESIS_RANDOM", "") in ("", "0"),
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


seeds = st.integers(0, 2**31 - 1)


# Sizes each property draws: (CPU range, CUDA range, CUDA sizes next to a launch-plan threshold).
# The thresholds (csrc/cuda): SYRK tiles 64 (128 for d >= 512), a row split per 128 rows, 8-row
# stages; Cholesky panels of 32 columns, thread counts switching at 32/64/128, the kernel up to
# n = 256; BatchNorm 256-thread blocks, 32 lanes per plane for HW >= 32, 256 channels per solve
# block; pack 8 rows per block, 32×32 unpack tiles, 256 matrices per launch.
SIZES = {
    "factor_d": ((1, 12), (1, 600), [1, 63, 64, 65, 127, 128, 129, 511, 512, 513]),
    "factor_rows": ((0, 40), (0, 700), [0, 1, 7, 127, 128, 129, 257, 383, 641]),
    "conv_batch": ((1, 3), (1, 8), [1, 8]),
    "conv_channels": ((1, 3), (1, 12), [1, 7, 8, 12]),
    "conv_extent": ((0, 4), (0, 20), [0, 20]),
    "chol_n": ((1, 10), (1, 300), [1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]),
    "chol_rank_n": ((2, 10), (2, 200), [33, 65, 129]),
    "chol_flag_n": ((1, 8), (1, 100), [1, 33, 65, 97]),
    "chol_tri_n": ((1, 8), (1, 140), [1, 33, 65, 129]),
    "bn_batch": ((1, 6), (1, 300), [1, 8, 9, 33, 256, 257]),
    "bn_channels": ((1, 5), (1, 40), [1, 3, 40]),
    "bn_spatial": ((1, 4), (1, 9), [1, 6, 9]),
    "bn_solve_c": ((1, 8), (1, 700), [1, 255, 256, 257, 511, 512, 513]),
    "pack_n": ((1, 12), (1, 100), [1, 8, 9, 31, 32, 33, 64, 65, 97]),
    "pack_count": ((1, 4), (1, 4), [257, 300]),
}


def size(target, name: str) -> st.SearchStrategy[int]:
    """The sizes ``name`` draws on this target (see SIZES)."""
    (lo, hi), (cuda_lo, cuda_hi), edges = SIZES[name]
    if not is_cuda(target):
        return st.integers(lo, hi)
    return st.one_of(st.integers(lo, hi), st.sampled_from(edges), st.integers(cuda_lo, cuda_hi))


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(g: torch.Generator, *shape, device: str = "cpu", dtype=F64) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g, dtype=F64, device=device).to(dtype)


def is_cuda(target) -> bool:
    return target[0] == "cuda"


def packed_upper_f64(m: torch.Tensor) -> torch.Tensor:
    """Packed upper triangle by the docs/design.md index formula (not triu_indices): element (i, j),
    j >= i, goes to i·n − i(i−1)/2 + (j − i)."""
    n = m.shape[0]
    i = torch.arange(n)[:, None].expand(n, n)
    j = torch.arange(n)[None, :].expand(n, n)
    upper = j >= i
    index = i * n - i * (i - 1) // 2 + (j - i)
    out = torch.full((packed_size(n),), float("nan"), dtype=F64)
    out[index[upper]] = m.double()[upper]
    assert not torch.isnan(out).any() or torch.isnan(m[upper]).any(), "the index formula left a hole"
    return out


def assert_within(got: torch.Tensor, expect: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |got − expect| <= bound (all float64 on the CPU), and got finite."""
    got = got.detach().double().cpu()
    assert got.shape == expect.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(expect.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - expect).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: error {err.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e} "
        f"at flat index {worst.item()} (got {got.flatten()[worst].item():.6e}, expected {expect.flatten()[worst].item():.6e})"
    )


# ============================================================================ pack / unpack
@pytest.mark.parametrize("target", TARGETS)
@fast(150)
@given(
    data=st.data(),
    src=st.sampled_from(ALL_FLOAT),
    packed=st.sampled_from([None, *ALL_FLOAT]),
    out=st.sampled_from(ALL_FLOAT),
    scale_kind=st.sampled_from(["float", "tensor", "0-dim"]),
    offset=st.integers(0, 5),
    magnitude=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=seeds,
)
def test_pack_unpack_round_trip(target, data, src, packed, out, scale_kind, offset, magnitude, seed):
    device, backend = target
    count = data.draw(size(target, "pack_count"), label="count")
    each = size(target, "pack_n") if count <= 4 else st.integers(1, 6)  # over 256 matrices: several launches
    sizes = data.draw(st.lists(each, min_size=count, max_size=count), label="sizes")
    g = gen(seed)
    # lower triangles hold garbage (NaN): only the upper triangle may be read
    mats = []
    for n in sizes:
        m = randn(g, n, n) * magnitude
        m = torch.where(torch.ones(n, n, dtype=torch.bool).triu(), m, torch.full_like(m, float("nan")))
        mats.append(m.to(src).to(device))
    buf = ops.pack_upper(mats, dtype=packed, backend=backend)
    buf_dtype = packed or src
    assert buf.dtype == buf_dtype and buf.dim() == 1 and buf.numel() == sum(packed_size(n) for n in sizes)
    expect_buf = torch.cat([packed_upper_f64(m.cpu().double()) for m in mats]).to(buf_dtype)
    assert torch.equal(buf.cpu(), expect_buf), "pack_upper: wrong element, order or cast"

    # unpack from inside a larger buffer (NaN before and after the packed run)
    pad = torch.full((offset,), float("nan"), dtype=buf_dtype, device=device)
    tail = torch.full((3,), float("nan"), dtype=buf_dtype, device=device)
    big = torch.cat([pad, buf, tail])
    factors = torch.rand(len(sizes), generator=g, dtype=F64) * 8 - 4
    if scale_kind == "float":
        scale, per = float(factors[0]), [float(factors[0])] * len(sizes)
    elif scale_kind == "0-dim":
        scale, per = factors[0].to(device), [float(factors[0])] * len(sizes)
    else:
        scale, per = factors.to(device), factors.tolist()
    outs = ops.unpack_upper(big, sizes, scale=scale, dtype=out, offset=offset, backend=backend)
    assert len(outs) == len(sizes)
    tol = 4 * max(EPS[buf_dtype], EPS[out], EPS[F32])
    for k, (m, o, s) in enumerate(zip(mats, outs, per)):
        assert o.dtype == out and o.device.type == device
        assert torch.equal(o, o.T), f"matrix {k}: not exactly symmetric"
        up = m.cpu().double().to(buf_dtype).double().triu()
        expect = (up + up.triu(1).T) * s
        # relative bound, plus an absolute one for half-precision subnormals
        assert_within(o, expect, tol * expect.abs() + 2.0**-24 * max(1.0, abs(s)), f"unpack matrix {k}")


# ============================================================================ accumulate_factor
def acc_eps(state_dtype, *input_dtypes) -> float:
    """Unit roundoff the accumulating ops guarantee: float32 at least (docs/design.md: "accumulation is
    always in fp32"), float64 only when the state and every input are float64. (The reference forms
    products in promote(first input, float32): a float32 input into a float64 state accumulates in
    float32, although ops.accumulate_factor's docstring says "in state's dtype".)"""
    all64 = state_dtype == F64 and all(dt == F64 for dt in input_dtypes)
    return EPS[F64] if all64 else EPS[F32]


def gram_bound(x64: torch.Tensor, eps: float, scale: float, decay: float, s0: torch.Tensor) -> torch.Tensor:
    """Rounding bound of decay·s0 + scale·XᵀX (packed) accumulated with unit roundoff eps."""
    rows = x64.shape[0]
    absgram = packed_upper_f64(x64.abs().T @ x64.abs())
    return 4 * eps * (rows + 4) * (abs(scale) * absgram + abs(decay) * s0.abs()) + 1e-300


@pytest.mark.parametrize("target", TARGETS)
@fast(150)
@given(
    data=st.data(),
    x_dtype=st.sampled_from(ALL_FLOAT),
    state_dtype=st.sampled_from([F32, F64]),
    scale=st.sampled_from([1.0, 0.0, -0.5, 1 / 7]),
    decay=st.sampled_from([0.0, 1.0, 0.5, 0.95]),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0]),
    transposed=st.booleans(),
    seed=seeds,
)
def test_accumulate_factor_matches_float64_gram(
    target, data, x_dtype, state_dtype, scale, decay, magnitude, transposed, seed
):
    device, backend = target
    rows, d = data.draw(size(target, "factor_rows"), label="rows"), data.draw(size(target, "factor_d"), label="d")
    if is_cuda(target):
        assume(x_dtype != F64 and state_dtype == F32)
    g = gen(seed)
    x = (randn(g, d, rows).T if transposed else randn(g, rows, d)) * magnitude  # transposed: non-contiguous
    x = x.to(x_dtype).to(device)
    s0 = randn(g, packed_size(d))
    state = s0.to(state_dtype).to(device).clone()  # never an alias of s0
    if decay == 0.0:
        state.fill_(float("nan"))  # overwritten, whatever it held
        s0 = torch.zeros_like(s0)
    s0 = s0.to(state_dtype).double()
    ret = ops.accumulate_factor(state, x, scale=scale, decay=decay, backend=backend)
    assert ret is state or ret.data_ptr() == state.data_ptr(), "in place"
    x64 = x.cpu().double()
    expect = decay * s0 + scale * packed_upper_f64(x64.T @ x64)
    assert_within(state, expect, gram_bound(x64, acc_eps(state_dtype, x_dtype), scale, decay, s0), "accumulate_factor")


# ============================================================================ conv_a_factor
def patches_f64(x: torch.Tensor, k, s, p, d) -> torch.Tensor:
    """(N·T, C·kh·kw) patches by explicit strided slicing of the zero-padded input."""
    n, c = x.shape[:2]
    xp = F.pad(x, (p[1], p[1], p[0], p[0]))
    ho = (x.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (x.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    cols = []
    for ci in range(c):
        for i in range(k[0]):
            for j in range(k[1]):
                r0, c0 = i * d[0], j * d[1]
                sl = xp[:, ci, r0 : r0 + s[0] * (ho - 1) + 1 : s[0], c0 : c0 + s[1] * (wo - 1) + 1 : s[1]]
                cols.append(sl.reshape(n, ho * wo))
    return torch.stack(cols, dim=-1).reshape(n * ho * wo, c * k[0] * k[1]), ho * wo


def geometry(target) -> st.SearchStrategy:
    """(kernel, stride, padding, dilation, extent beyond the smallest input) along one axis."""
    return st.tuples(
        st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2), size(target, "conv_extent")
    )


@pytest.mark.parametrize("target", TARGETS)
@fast(100)
@given(
    data=st.data(),
    out_ch=st.integers(1, 3),
    bias=st.booleans(),
    channels_last=st.booleans(),
    x_dtype=st.sampled_from([F32, F64, BF16]),
    decay=st.sampled_from([0.0, 1.0, 0.5]),
    scale=st.sampled_from([1.0, 0.25]),
    seed=seeds,
)
def test_conv_a_factor_matches_explicit_patches(target, data, out_ch, bias, channels_last, x_dtype, decay, scale, seed):
    device, backend = target
    n, c = data.draw(size(target, "conv_batch"), label="n"), data.draw(size(target, "conv_channels"), label="c")
    geo_h, geo_w = data.draw(geometry(target), label="geo_h"), data.draw(geometry(target), label="geo_w")
    if is_cuda(target):
        assume(x_dtype != F64)
    (kh, sh, ph, dh, eh), (kw, sw, pw, dw, ew) = geo_h, geo_w
    h = max(1, dh * (kh - 1) + 1 - 2 * ph + eh)  # at least one output row
    w = max(1, dw * (kw - 1) + 1 - 2 * pw + ew)
    k, s, p, d = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    g = gen(seed)
    x = randn(g, n, c, h, w).to(x_dtype)
    x64 = x.double()
    cols, t = patches_f64(x64, k, s, p, d)

    # the oracle's column order is the one a Conv2d weight viewed as d_out × (C·kh·kw) multiplies
    weight = randn(g, out_ch, c, kh, kw)
    conv = F.conv2d(x64, weight, stride=s, padding=p, dilation=d).reshape(n, out_ch, t)
    via_cols = (cols @ weight.reshape(out_ch, -1).T).reshape(n, t, out_ch).transpose(1, 2)
    torch.testing.assert_close(via_cols, conv, rtol=1e-10, atol=1e-10)

    if bias:
        cols = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=F64)], dim=1)
    dim = cols.shape[1]
    s0 = randn(g, packed_size(dim))
    state = s0.float().to(device)
    if decay == 0.0:
        state.fill_(float("nan"))
        s0 = torch.zeros_like(s0)
    s0 = s0.float().double()
    xin = x.to(device)
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    ops.conv_a_factor(
        state,
        xin,
        kernel_size=k,
        stride=s,
        padding=p,
        dilation=d,
        has_bias=bias,
        scale=scale,
        decay=decay,
        backend=backend,
    )
    expect = decay * s0 + scale * packed_upper_f64(cols.T @ cols)
    assert_within(
        state,
        expect,
        gram_bound(cols, acc_eps(F32, x_dtype), scale, decay, s0),
        f"conv_a_factor k={k} s={s} p={p} d={d} bias={bias}",
    )


# ============================================================================ cholesky_inverse_damped
def spd_with_spectrum(g, n: int, eigs: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(g, n, n))
    return (q * eigs) @ q.T


def residual_and_cond(m64: torch.Tensor, lam: float, inv: torch.Tensor) -> tuple[float, float]:
    damped = m64 + lam * torch.eye(m64.shape[0], dtype=F64)
    res = (damped @ inv.cpu().double() - torch.eye(m64.shape[0], dtype=F64)).norm().item()
    ev = torch.linalg.eigvalsh(damped)
    cond = (ev.abs().max() / ev.abs().min()).item() if ev.abs().min() > 0 else math.inf
    return res, cond


@pytest.mark.parametrize("target", TARGETS)
@fast(150)
@given(
    batch=st.integers(1, 3),
    data=st.data(),
    dtype=st.sampled_from([F32, F64]),
    log_cond=st.floats(0.0, 8.0),
    log_rel_damping=st.one_of(st.just(None), st.floats(-10.0, 0.0)),
    top=st.sampled_from([1e-3, 1.0, 1e3]),
    damping_as_tensor=st.booleans(),
    seed=seeds,
)
def test_cholesky_inverse_damped_spd_and_ill_conditioned(
    target, batch, data, dtype, log_cond, log_rel_damping, top, damping_as_tensor, seed
):
    """info == 0 ⇒ a finite inverse with ‖(M+λI)·inv − I‖ small relative to cond(M+λI);
    a float64 matrix with cond ≤ 1e8 (float32: ≤ 1e4) must factorise."""
    device, backend = target
    n = data.draw(size(target, "chol_n"), label="n")
    g = gen(seed)
    eigs = top * torch.logspace(0, -log_cond, n, dtype=F64)
    mats64 = torch.stack([spd_with_spectrum(g, n, eigs[torch.randperm(n, generator=g)]) for _ in range(batch)])
    mats64 = (mats64 + mats64.mT) / 2
    lam = 0.0 if log_rel_damping is None else top * 10.0**log_rel_damping
    mats = mats64.to(dtype).to(device)
    damping = torch.full((batch,), lam, dtype=dtype, device=device) if damping_as_tensor else lam
    inv, info = ops.cholesky_inverse_damped(mats, damping, backend=backend)
    assert inv.shape == mats.shape and inv.dtype == dtype and info.shape == (batch,)
    for b in range(batch):
        m_cast = mats[b].cpu().double()  # what the op really received
        lam_cast = float(torch.tensor(lam, dtype=dtype))
        res, cond = residual_and_cond(m_cast, lam_cast, inv[b])
        must_succeed = cond <= (1e8 if dtype == F64 else 1e4)
        if int(info[b]) == 0:
            assert torch.isfinite(inv[b]).all(), f"[{b}] info == 0 but the inverse is not finite"
            assert res <= 50 * n * EPS[dtype] * cond + 1e-12, f"[{b}] residual {res:.3e} for cond {cond:.3e} ({dtype})"
        else:
            assert not must_succeed, f"[{b}] a PD matrix with cond {cond:.3e} was flagged failed (info={int(info[b])})"


@pytest.mark.parametrize("target", TARGETS)
@fast(100)
@given(
    data=st.data(),
    rank_frac=st.floats(0.0, 0.9),
    dtype=st.sampled_from([F32, F64]),
    log_rel_damping=st.floats(-6.0, 0.0),
    seed=seeds,
)
def test_cholesky_inverse_damped_rank_deficient_factor(target, data, rank_frac, dtype, log_rel_damping, seed):
    """A low-rank XᵀX (a factor from fewer examples than its size) is PD once damped."""
    device, backend = target
    n = data.draw(size(target, "chol_rank_n"), label="n")
    g = gen(seed)
    r = max(1, int(rank_frac * n))
    x = randn(g, r, n)
    m64 = x.T @ x / r
    lam = 10.0**log_rel_damping * m64.trace().item() / n
    mats = m64.to(dtype)[None].to(device)
    inv, info = ops.cholesky_inverse_damped(mats, lam, backend=backend)
    res, cond = residual_and_cond(mats[0].cpu().double(), float(torch.tensor(lam, dtype=dtype)), inv[0])
    if dtype == F64 or cond < 1e4:
        assert int(info[0]) == 0, f"damped rank-{r} factor (cond {cond:.2e}) failed"
    if int(info[0]) == 0:
        assert torch.isfinite(inv).all()
        assert res <= 50 * n * EPS[dtype] * cond + 1e-12, f"residual {res:.3e}, cond {cond:.3e}"


@pytest.mark.parametrize("target", TARGETS)
@fast(100)
@given(
    data=st.data(),
    dtype=st.sampled_from([F32, F64]),
    kind=st.sampled_from(["negative", "nan", "inf", "-inf"]),
    position=st.integers(0, 2),
    lam=st.sampled_from([0.0, 1e-3, 1.0]),
    seed=seeds,
)
def test_cholesky_inverse_damped_flags_non_pd_without_raising(target, data, dtype, kind, position, lam, seed):
    """A non-PD (after damping) or non-finite matrix gets info ≠ 0 and no exception; the other
    matrices of the batch are unaffected."""
    device, backend = target
    n = data.draw(size(target, "chol_flag_n"), label="n")
    g = gen(seed)
    good = [spd_with_spectrum(g, n, torch.logspace(0, -2, n, dtype=F64)) for _ in range(2)]
    if kind == "negative":
        eigs = torch.logspace(0, -2, n, dtype=F64)
        eigs[torch.randint(n, (1,), generator=g)] = -(lam + 0.5)  # λ_min(M + λI) <= −0.5
        bad = spd_with_spectrum(g, n, eigs)
    else:
        bad = good[0].clone()
        i, j = (int(v) for v in torch.randint(n, (2,), generator=g))
        i, j = max(i, j), min(i, j)  # on or below the diagonal: the part that is read
        if kind == "inf" and i == j:  # +inf strictly below the diagonal (|a_ij| > sqrt(a_ii·a_jj));
            assume(n >= 2)  # on the diagonal it is a limit case (see the report)
            i, j = (i, 0) if i > 0 else (1, 0)
        bad[i, j] = float(kind)
    stack = good[:]
    stack.insert(position, bad)
    mats = torch.stack(stack).to(dtype).to(device)
    inv, info = ops.cholesky_inverse_damped(mats, lam, backend=backend)
    assert int(info[position]) != 0, f"{kind} matrix not flagged"
    alone, alone_info = ops.cholesky_inverse_damped(torch.stack(good).to(dtype).to(device), lam, backend=backend)
    assert alone_info.eq(0).all()
    keep = [b for b in range(3) if b != position]
    for j, b in enumerate(keep):
        assert int(info[b]) == 0, "a failing neighbour must not fail the others"
        torch.testing.assert_close(
            inv[b], alone[j], rtol=1e-5 if dtype == F32 else 1e-12, atol=1e-6 if dtype == F32 else 1e-13
        )


@pytest.mark.parametrize("target", TARGETS)
@fast(50)
@given(data=st.data(), dtype=st.sampled_from([F32, F64]), seed=seeds)
def test_cholesky_inverse_damped_reads_only_the_lower_triangle(target, data, dtype, seed):
    device, backend = target
    n = data.draw(size(target, "chol_tri_n"), label="n")
    g = gen(seed)
    m = spd_with_spectrum(g, n, torch.logspace(0, -2, n, dtype=F64))
    junk = m.tril() + (randn(g, n, n) * 1e3).triu(1)
    a, ia = ops.cholesky_inverse_damped(m.to(dtype)[None].to(device), 1e-2, backend=backend)
    b, ib = ops.cholesky_inverse_damped(junk.to(dtype)[None].to(device), 1e-2, backend=backend)
    assert int(ia[0]) == 0 and int(ib[0]) == 0
    torch.testing.assert_close(a, b, rtol=1e-6 if dtype == F32 else 1e-13, atol=1e-6 if dtype == F32 else 1e-13)


# ============================================================================ BatchNorm unit-wise
@pytest.mark.parametrize("target", TARGETS)
@fast(100)
@given(
    data=st.data(),
    g_dtype=st.sampled_from(ALL_FLOAT),
    x_dtype=st.sampled_from(ALL_FLOAT),
    state_dtype=st.sampled_from([F32, F64]),
    scale=st.sampled_from([1.0, 0.5, 16.0]),
    decay=st.sampled_from([0.0, 1.0, 0.9]),
    seed=seeds,
)
def test_bn_unitwise_fisher_matches_explicit_outer_products(
    target, data, g_dtype, x_dtype, state_dtype, scale, decay, seed
):
    device, backend = target
    n, c = data.draw(size(target, "bn_batch"), label="n"), data.draw(size(target, "bn_channels"), label="c")
    spatial = data.draw(st.lists(size(target, "bn_spatial"), min_size=0, max_size=2), label="spatial")
    if is_cuda(target):
        assume(F64 not in (g_dtype, x_dtype) and state_dtype == F32)
    g = gen(seed)
    shape = (n, c, *spatial)
    grad = randn(g, *shape).to(g_dtype)
    xhat = randn(g, *shape).to(x_dtype)
    s0 = randn(g, c, 3)
    state = s0.to(state_dtype).to(device).clone()  # never an alias of s0
    if decay == 0.0:
        state.fill_(float("nan"))
        s0 = torch.zeros_like(s0)
    s0 = s0.to(state_dtype).double()
    ops.bn_unitwise_fisher(state, grad.to(device), xhat.to(device), scale=scale, decay=decay, backend=backend)
    g64, x64 = grad.double().reshape(n, c, -1), xhat.double().reshape(n, c, -1)
    # per example and channel u = [Σ_hw g·x̂, Σ_hw g]; F_c = Σ_n u uᵀ (and the same of |·| for the bound)
    u = torch.stack([(g64 * x64).sum(-1), g64.sum(-1)], dim=-1)
    ua = torch.stack([(g64 * x64).abs().sum(-1), g64.abs().sum(-1)], dim=-1)
    fisher, absf = torch.einsum("nci,ncj->cij", u, u), torch.einsum("nci,ncj->cij", ua, ua)
    expect = torch.stack([fisher[:, 0, 0], fisher[:, 0, 1], fisher[:, 1, 1]], dim=1) * scale
    bound = torch.stack([absf[:, 0, 0], absf[:, 0, 1], absf[:, 1, 1]], dim=1) * abs(scale)
    expect += decay * s0
    hw = g64.shape[-1]
    bound = 8 * acc_eps(state_dtype, g_dtype, x_dtype) * (n + 2 * hw + 4) * (bound + abs(decay) * s0.abs()) + 1e-300
    assert_within(state, expect, bound, "bn_unitwise_fisher")


@pytest.mark.parametrize("target", TARGETS)
@fast(120)
@given(
    data=st.data(),
    dtype=st.sampled_from([F32, F64]),
    damping=st.sampled_from([1e-4, 1e-2, 1.0]),
    n_examples=st.integers(1, 4),
    garbage=st.lists(st.sampled_from(["nan", "inf"]), max_size=2),
    seed=seeds,
)
def test_bn_unitwise_solve_matches_explicit_2x2_solves(target, data, dtype, damping, n_examples, garbage, seed):
    """(F_c + λI)⁻¹[∇γ_c, ∇β_c] per channel; a channel whose block is not finite keeps its gradient."""
    device, backend = target
    c = data.draw(size(target, "bn_solve_c"), label="c")
    if is_cuda(target):
        assume(dtype == F32)
    g = gen(seed)
    u = randn(g, n_examples, c, 2)
    blocks = torch.einsum("nci,ncj->cij", u, u) / n_examples  # PSD, possibly singular (1 example)
    fisher = torch.stack([blocks[:, 0, 0], blocks[:, 0, 1], blocks[:, 1, 1]], dim=1)
    bad_channels = set()
    for k, what in enumerate(garbage):
        ch = int(torch.randint(c, (1,), generator=g))
        fisher[ch, k % 3] = float(what)
        bad_channels.add(ch)
    gg, gb = randn(g, c), randn(g, c)
    fisher_t, gg_t, gb_t = (t.to(dtype).to(device) for t in (fisher, gg, gb))
    ug, ub = ops.bn_unitwise_solve(fisher_t, gg_t, gb_t, damping=damping, backend=backend)
    assert ug.dtype == dtype and ub.dtype == dtype and ug.shape == (c,) and ub.shape == (c,)
    f_cast = fisher_t.cpu().double()
    got = torch.stack([ug, ub], dim=1).cpu().double()  # (C, 2)
    rhs = torch.stack([gg_t, gb_t], dim=1).cpu().double()
    for ch in bad_channels:
        assert torch.equal(got[ch], rhs[ch]), f"channel {ch}: a non-finite block must give the plain gradient"
    good = torch.tensor([ch for ch in range(c) if ch not in bad_channels], dtype=torch.long)
    if good.numel() == 0:
        return
    f = f_cast[good]
    a = torch.stack(
        [torch.stack([f[:, 0], f[:, 1]], -1), torch.stack([f[:, 1], f[:, 2]], -1)], -2
    ) + damping * torch.eye(2, dtype=F64)
    expect = torch.linalg.solve(a, rhs[good].unsqueeze(-1)).squeeze(-1)  # explicit 2×2 systems, one per channel
    cond = torch.linalg.cond(a)
    smallest = torch.linalg.eigvalsh(a)[:, 0]
    bound = 20 * EPS[dtype] * cond[:, None] * (expect.abs() + (rhs[good].abs().amax(1) / smallest)[:, None]) + 1e-300
    assert_within(
        got[good], expect, bound, f"bn_unitwise_solve (channels {good.tolist()[:8]}…, cond ≤ {cond.max().item():.2e})"
    )


# ============================================================================ precondition
@pytest.mark.parametrize("target", TARGETS)
@fast(120)
@given(
    dim_g=st.integers(1, 6),
    dim_a=st.integers(1, 6),
    batch=st.one_of(st.none(), st.integers(1, 3)),
    dtype=st.sampled_from([F32, F64]),
    grad_dtype=st.sampled_from([F32, F64, BF16]),
    log_cond=st.floats(0.0, 3.0),
    seed=seeds,
)
def test_precondition_matches_a_kronecker_solve(target, dim_g, dim_a, batch, dtype, grad_dtype, log_cond, seed):
    """U = Ĝ⁻¹ ∇ Â⁻¹ solves (Âᵀ ⊗ Ĝ) vec(U) = vec(∇) (column-major vec)."""
    device, backend = target
    g = gen(seed)
    b = batch or 1
    gs = [spd_with_spectrum(g, dim_g, torch.logspace(0, -log_cond, dim_g, dtype=F64)) for _ in range(b)]
    as_ = [spd_with_spectrum(g, dim_a, torch.logspace(0, -log_cond, dim_a, dtype=F64)) for _ in range(b)]
    grads = randn(g, b, dim_g, dim_a).to(grad_dtype)
    g_inv = torch.stack([torch.linalg.inv(m) for m in gs]).to(dtype)
    a_inv = torch.stack([torch.linalg.inv(m) for m in as_]).to(dtype)
    args = (g_inv, grads, a_inv) if batch else (g_inv[0], grads[0], a_inv[0])
    u = ops.precondition(*(t.to(device) for t in args), backend=backend)
    assert u.shape == args[1].shape and u.dtype == dtype
    u = u.reshape(b, dim_g, dim_a).cpu().double()
    for k in range(b):
        # the system the inverses really describe (they were rounded to dtype)
        g_eff = torch.linalg.inv(g_inv[k].double())
        a_eff = torch.linalg.inv(a_inv[k].double())
        rhs = grads[k].double().to(dtype).double()  # the op computes in the inverses' dtype
        kron = torch.kron(a_eff.T.contiguous(), g_eff.contiguous())  # (this torch.kron rejects column-major inputs)
        expect = torch.linalg.solve(kron, rhs.T.reshape(-1)).reshape(dim_a, dim_g).T
        cond = torch.linalg.cond(kron).item()
        # matmul rounding in dtype (elementwise |Ĝ⁻¹||∇||Â⁻¹|), plus the oracle's own float64 solve
        chain = g_inv[k].double().abs() @ rhs.abs() @ a_inv[k].double().abs()
        bound = 20 * EPS[dtype] * (dim_a + dim_g) * chain + 50 * EPS[F64] * cond * expect.abs().max() + 1e-300
        assert_within(u[k], expect, bound, f"precondition [{k}] (cond {cond:.2e})")


# ============================================================================ KL clip
@pytest.mark.parametrize("target", TARGETS)
@fast(150)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
    dtype=st.sampled_from([F32, F64, BF16]),
    lrs=st.lists(st.sampled_from([0.0, 1e-3, 0.1, 1.0]), min_size=4, max_size=4),
    log_ratio=st.floats(-4.0, 1.0),
    alignment=st.sampled_from([1.0, -1.0, 0.3]),
    poison=st.sampled_from([None, "nan", "inf"]),
    seed=seeds,
)
def test_kl_clip_coefficient_formula(target, shapes, dtype, lrs, log_ratio, alignment, poison, seed):
    """ν = min(1, sqrt(kl_clip / Σ lr²⟨U, ∇⟩)); ν = 1 when the sum is ≤ 0 or not finite."""
    device, _ = target
    g = gen(seed)
    grads = [randn(g, *s).to(dtype) for s in shapes]
    updates = [(alignment * gr.double() + 0.5 * randn(g, *s)).to(dtype) for gr, s in zip(grads, shapes)]
    if poison:
        updates[-1].view(-1)[0] = float(poison)
    lrs = lrs[: len(shapes)]
    total = sum(lr * lr * (u.double() * gr.double()).sum().item() for u, gr, lr in zip(updates, grads, lrs))
    # kl_clip relative to the quadratic form, so that most examples really clip (ν < 1)
    scale_kl = abs(total) if math.isfinite(total) and total != 0 else 1.0
    kl = scale_kl * 10.0**log_ratio
    nu = ops.kl_clip_coefficient([u.to(device) for u in updates], [gr.to(device) for gr in grads], lrs, kl)
    assert nu.dim() == 0 and nu.device.type == device
    nu = nu.item()
    if not math.isfinite(total):
        assert nu == 1.0
        return
    # float32 summation: |Δtotal| <= n·eps·Σ|terms|; ν ∝ total^(-1/2)
    abs_total = sum(lr * lr * (u.double() * gr.double()).abs().sum().item() for u, gr, lr in zip(updates, grads, lrs))
    n_terms = sum(u.numel() for u in updates)
    rel = (n_terms + 4) * EPS[F32] * abs_total / abs(total) if total != 0 else (0.0 if abs_total == 0 else math.inf)
    assume(rel < 0.1)  # a nearly cancelling sum (sign uncertain in float32) says nothing about the formula
    if total <= 0:
        assert nu == 1.0
        return
    expect = min(1.0, math.sqrt(kl / total))
    assert nu == pytest.approx(expect, rel=rel + 1e-6, abs=1e-7)
    from_total = ops.kl_clip_from_total(torch.tensor(total, dtype=F32, device=device), kl).item()
    assert from_total == pytest.approx(expect, rel=1e-6)


# ============================================================================ momentum update
@pytest.mark.parametrize("target", TARGETS)
@fast(80)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from([F32, F64]),
    lr=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    steps=st.integers(1, 4),
    seed=seeds,
)
def test_momentum_update_matches_torch_sgd(target, shapes, dtype, lr, momentum, weight_decay, steps, seed):
    device, _ = target
    g = gen(seed)
    init = [randn(g, *s).to(dtype).to(device) for s in shapes]
    ours = [t.clone() for t in init]
    bufs = [torch.zeros_like(t) for t in init]  # what SPNGD allocates before the first step
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    sgd = torch.optim.SGD(ref, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    for _ in range(steps):
        ups = [randn(g, *s).to(dtype).to(device) for s in shapes]
        ops.momentum_update(ours, ups, bufs, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for p, u in zip(ref, ups):
            p.grad = u.clone()
        sgd.step()
    for k, (a, b) in enumerate(zip(ours, ref)):
        if is_cuda(target):
            torch.testing.assert_close(a, b.detach(), rtol=4 * EPS[dtype], atol=4 * EPS[dtype])
        else:
            assert torch.equal(a, b.detach()), f"param {k}: max diff {(a - b).abs().max().item():.3e}"
        if momentum != 0:
            torch.testing.assert_close(
                bufs[k], sgd.state[ref[k]]["momentum_buffer"], rtol=4 * EPS[dtype], atol=4 * EPS[dtype]
            )


# ============================================================================ sizes vs launch plans
CSRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def constant(file: str, pattern: str) -> list[int]:
    """The integers ``pattern`` (a regex with groups) captures in csrc/cuda/<file>; fails if absent."""
    text = (CSRC / file).read_text()
    match = re.search(pattern, text)
    assert match, f"csrc/cuda/{file}: {pattern!r} not found (the launch plan changed: update SIZES and this test)"
    return [int(v) for v in match.groups()]


def cuda_range(name: str) -> tuple[int, int, list[int]]:
    _, (lo, hi), edges = SIZES[name]
    assert all(lo <= e for e in edges), f"{name}: an edge size below the CUDA range"
    return lo, max(hi, *edges), edges


def crosses(name: str, threshold: int) -> None:
    """The CUDA sizes of ``name`` reach both sides of ``threshold`` (≤ it and above it), including
    the size right after it."""
    lo, hi, edges = cuda_range(name)
    assert lo <= threshold < hi, f"{name}: CUDA sizes {lo}..{hi} do not cross {threshold}"
    assert threshold + 1 in edges, (
        f"{name}: {threshold + 1} (just past {threshold}) is not among the edge sizes {edges}"
    )


def test_cuda_sizes_cross_the_kernel_thresholds():
    """The CUDA strategies draw sizes on both sides of every launch-plan threshold of csrc/cuda, read
    from the sources, so that a tile or block that grows past the drawn sizes fails here."""
    # SYRK (accumulate_factor, conv_a_factor): tile edges, the large-tile switch, row splits, stages.
    (stage_rows,) = constant("syrk_tiles.cuh", r"constexpr int kBK = (\d+);")
    (large_from,) = constant("syrk_tiles.cuh", r"const bool large = d >= (\d+);")
    large_tile, small_tile = constant("syrk_tiles.cuh", r"const int64_t bm = large \? (\d+) : (\d+);")
    (split_stages,) = constant("syrk_tiles.cuh", r"cdiv\(rows, (\d+) \* kBK\)")
    for threshold in (small_tile, 2 * small_tile, large_from, large_from // large_tile * large_tile):
        crosses("factor_d", threshold)
    crosses("factor_rows", split_stages * stage_rows)  # more than one row split
    assert any(e > split_stages * stage_rows and e % stage_rows for e in SIZES["factor_rows"][2]), (
        "a split of rows off the stage grid"
    )
    _, conv_batch, _ = cuda_range("conv_batch")
    _, conv_channels, _ = cuda_range("conv_channels")
    _, conv_extent, _ = cuda_range("conv_extent")
    assert conv_channels * 3 * 3 + 1 > small_tile, "conv_a_factor: the patch dimension stays within one tile"
    assert conv_batch * (1 + conv_extent) ** 2 > split_stages * stage_rows, (
        "conv_a_factor: never more than one row split"
    )

    # Cholesky: panel width, thread-count steps, the kernel's largest size (the PyTorch path above it).
    (panel,) = constant("cholesky_blocked.cuh", r"constexpr int kNB = (\d+);")
    steps = constant("cholesky_blocked.cuh", r"return n <= (\d+) \? \d+ : n <= (\d+) \? \d+ : n <= (\d+) \?")
    (kernel_max_n,) = constant("cholesky.cu", r"constexpr int64_t kDefaultKernelMaxN = (\d+);")
    for threshold in (panel, 2 * panel, *steps, kernel_max_n):
        crosses("chol_n", threshold)
    for name in ("chol_rank_n", "chol_flag_n", "chol_tri_n"):
        crosses(name, panel)
        crosses(name, 2 * panel)

    # BatchNorm: lanes per plane (HW >= 32 gets the widest), the batch split across blocks, the solve's blocks.
    (bn_threads,) = constant("batchnorm_kernels.cuh", r"constexpr int kBnThreads = (\d+);")
    (max_lanes,) = constant("batchnorm_kernels.cuh", r"int sub = (\d+);")
    (solve_block,) = constant("batchnorm.cu", r"ceil_div\(C, (\d+)\)")
    _, spatial, _ = cuda_range("bn_spatial")
    assert spatial * spatial >= max_lanes, "bn_unitwise_fisher: never the widest lane count"
    crosses("bn_batch", bn_threads // max_lanes)  # examples per block with 32 lanes: the batch splits beyond
    crosses("bn_batch", bn_threads)  # one lane per plane (HW = 1): the batch splits beyond
    crosses("bn_solve_c", solve_block)
    crosses("bn_solve_c", 2 * solve_block)

    # pack/unpack: rows per pack block, unpack tile, matrices per launch.
    (pack_rows,) = constant("pack_kernels.cuh", r"constexpr int kPackWarps = (\d+);")
    (tile,) = constant("pack_kernels.cuh", r"constexpr int kTile = (\d+);")
    (max_mats,) = constant("pack_kernels.cuh", r"constexpr int kMaxMats = (\d+);")
    for threshold in (pack_rows, tile, 2 * tile):
        crosses("pack_n", threshold)
    crosses("pack_count", max_mats)
