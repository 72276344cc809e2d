"""Kernel microbenchmarks: every spngd_ext CUDA op against its best pure-PyTorch composition.

Shapes follow ResNet-50 (factor sizes 147 ... 4609, BN widths 64 ... 2048, 32 examples per GPU).
Timing: CUDA events around each call, warm-up first, the median of many calls; every case rotates
through several input sets whose total size exceeds the L2 cache, so no call finds its inputs there.
Each row has both times, the speedup and the achieved GB/s or TFLOP/s;
:func:`spngd_ext.bench.kernel_targets.targets` checks the performance targets (met / NOT MET).
Needs a GPU and the built extension; run through ``python -m spngd_ext.bench`` (or
``python bench/kernels.py``).
"""

# ruff: noqa: B023  (every timing lambda runs inside its loop iteration, before the variables change)
from __future__ import annotations

import importlib
import math
import statistics
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import torch_path as ref
from ..ops.conv_gram import conv_a_factor_shifted
from .kernel_targets import targets

__all__ = ["run_kernel_bench", "resnet50_factor_sizes"]

DEV = "cuda"
L2_FLUSH_BYTES = 160 << 20  # input sets per case span at least this much (H100 L2: 50 MB)
ROWS: list[dict] = []
_log: Callable[[str], None] = print


# ------------------------------------------------------------------------------------------------
# timing


def n_sets(set_bytes: int, cap: int = 24) -> int:
    return max(2, min(cap, math.ceil(L2_FLUSH_BYTES / max(set_bytes, 1))))


def time_ms(fn, sets: int, budget_s: float) -> float:
    """Median milliseconds of fn(k) over input sets k = 0, 1, ..., after a warm-up."""
    for k in range(min(sets, 3)):
        fn(k)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn(0)
    e1.record()
    torch.cuda.synchronize()
    reps = int(min(200, max(5, budget_s * 1e3 / max(e0.elapsed_time(e1), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for r, (a, b) in enumerate(events):
        a.record()
        fn(r % sets)
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def row(op: str, case: str, ours: float | None, base: float | None, **extra) -> dict:
    r = {
        "op": op,
        "case": case,
        "ours_ms": ours,
        "base_ms": base,
        "speedup": (base / ours) if ours and base else None,
        **extra,
    }
    ROWS.append(r)
    rate = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    ours_s = f"{ours:9.4f}" if ours is not None else "        -"
    base_s = f"{base:9.4f}" if base is not None else "        -"
    sp = f"{r['speedup']:6.2f}x" if r["speedup"] else "      -"
    _log(f"{op:<24s} {case:<34s} ours {ours_s} ms  base {base_s} ms  {sp}  {rate}")
    return r


# ------------------------------------------------------------------------------------------------
# shapes


def resnet50_factor_sizes() -> list[int]:
    """A and G sizes of every conv/fc of ResNet-50 (no conv bias; fc has one)."""
    sizes = [3 * 49, 64]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            sizes += [cin, width, width * 9, width, width, width * 4]
            if b == 0:
                sizes += [cin, width * 4]  # downsample
            cin = width * 4
    return sizes + [2049, 1000]


def copy_bandwidth() -> float:
    x = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = time_ms(lambda k: y.copy_(x), 1, 0.2)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# benchmarks


def bench_pack(kernels, quick, budget, copy_gbps):
    sizes = resnet50_factor_sizes()  # all 108 even with --quick: a small set only measures latency
    packed = sum(ref.packed_size(n) for n in sizes)
    for out_dtype in (torch.float32, torch.bfloat16):
        sets = n_sets(packed * 8)
        mats = [[torch.randn(n, n, device=DEV) for n in sizes] for _ in range(sets)]
        ours = time_ms(lambda k: kernels.pack_upper(mats[k], out_dtype), sets, budget)
        base = time_ms(lambda k: ref.pack_upper(mats[k], dtype=out_dtype), sets, budget)
        gbytes = packed * (4 + out_dtype.itemsize) / 1e9
        row(
            "pack_upper",
            f"{len(sizes)} ResNet-50 factors fp32->{str(out_dtype)[6:]}",
            ours,
            base,
            GBps=gbytes / (ours * 1e-3),
            pct_copy=100 * gbytes / (ours * 1e-3) / copy_gbps,
        )
        mats = []  # free the input sets before the next case
        bufs = [torch.randn(packed, device=DEV).to(out_dtype) for _ in range(sets)]
        scale = torch.rand(len(sizes), device=DEV)
        ours = time_ms(lambda k: kernels.unpack_upper(bufs[k], sizes, scale, 0, torch.float32), sets, budget)
        base = time_ms(lambda k: ref.unpack_upper(bufs[k], sizes, scale=scale, dtype=torch.float32), sets, budget)
        full = sum(n * n for n in sizes)
        gbytes = (packed * out_dtype.itemsize + full * 4) / 1e9
        row(
            "unpack_upper",
            f"{len(sizes)} factors {str(out_dtype)[6:]}->fp32, scaled",
            ours,
            base,
            GBps=gbytes / (ours * 1e-3),
            pct_copy=100 * gbytes / (ours * 1e-3) / copy_gbps,
        )
        bufs = []  # free the input sets before the next case


def torch_factor(state, x, scale, decay, idx):
    x = x.float()
    full = x.t() @ x
    state.mul_(decay).add_(full.view(-1).index_select(0, idx), alpha=scale)


def bench_factor(kernels, quick, budget):
    cases = [
        (4096, 147),
        (8192, 256),
        (256, 512),
        (8192, 576),
        (256, 1000),
        (6272, 1152),
        (256, 2049),
        (6272, 2304),
        (1568, 4609),
        (128, 4609),
    ]
    if quick:
        cases = [(8192, 256), (8192, 576), (6272, 1152), (1568, 4609)]
    typed = [(r, d, torch.float32) for r, d in cases] + [(8192, 576, torch.bfloat16), (1568, 2304, torch.bfloat16)]
    for rows, d, dtype in typed:
        sets = n_sets(rows * d * dtype.itemsize)
        xs = [torch.randn(rows, d, device=DEV).to(dtype) for _ in range(sets)]
        state = torch.zeros(ref.packed_size(d), device=DEV)
        idx = ref.triu_flat_index(d, DEV)
        ours = time_ms(lambda k: kernels.accumulate_factor(state, xs[k], 0.5, 0.9), sets, budget)
        base = time_ms(lambda k: torch_factor(state, xs[k], 0.5, 0.9, idx), sets, budget)
        row(
            "accumulate_factor",
            f"x {rows}x{d} {str(dtype)[6:]}",
            ours,
            base,
            d=d,
            TFLOPs_useful=rows * d * (d + 1) / (ours * 1e-3) / 1e12,
        )
        xs = []  # free the input sets before the next case


def conv_unfold_factor(state, x, k, s, p, scale, decay, idx):
    cols = F.unfold(x, k, padding=p, stride=s)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    full = cols.t() @ cols
    state.mul_(decay).add_(full.view(-1).index_select(0, idx), alpha=scale)


def extra_memory(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_conv(kernels, quick, budget):
    # (name, N, C, H, kernel, stride, padding): ResNet-50 convs with a spatial kernel, 32 images per GPU
    cases = [
        ("conv1 7x7/2", 32, 3, 224, 7, 2, 3),
        ("layer1 3x3", 32, 64, 56, 3, 1, 1),
        ("layer2 3x3", 32, 128, 28, 3, 1, 1),
        ("layer3 3x3", 32, 256, 14, 3, 1, 1),
        ("layer4 3x3", 32, 512, 7, 3, 1, 1),
    ]
    if quick:
        cases = cases[1:4]
    for name, n, c, h, k, s, p in cases:
        d = c * k * k
        sets = n_sets(n * c * h * h * 4, cap=8)
        xs = [torch.randn(n, c, h, h, device=DEV) for _ in range(sets)]
        state = torch.zeros(ref.packed_size(d), device=DEV)
        idx = ref.triu_flat_index(d, DEV)
        args = ([k, k], [s, s], [p, p], [1, 1], False, 0.5, 0.9)
        ours = time_ms(lambda i: kernels.conv_a_factor(state, xs[i], *args), sets, budget)
        base = time_ms(lambda i: conv_unfold_factor(state, xs[i], k, s, p, 0.5, 0.9, idx), sets, budget)
        mem_ours = extra_memory(lambda: kernels.conv_a_factor(state, xs[0], *args))
        mem_base = extra_memory(lambda: conv_unfold_factor(state, xs[0], k, s, p, 0.5, 0.9, idx))
        # The torch path's shifted self-correlations (cuDNN weight-gradient convs), for comparison.
        shifted = float("nan")
        if s == 1:
            try:
                shifted = time_ms(
                    lambda i: conv_a_factor_shifted(state, xs[i], (k, k), (p, p), False, 0.5, 0.9), sets, budget
                )
            except Exception as exc:  # an informational column must not sink the kernel bench
                _log(f"  shifted-correlation path failed: {exc!r}")
        row(
            "conv_a_factor",
            f"{name} N={n} C={c} {h}x{h} d={d}",
            ours,
            base,
            kk=k * k,
            extra_MB_ours=mem_ours / 2**20,
            extra_MB_unfold=mem_base / 2**20,
            shifted_ms=shifted,
        )
        xs = []  # free the input sets before the next case


def torch_cholesky_inverse(m, damping, eye):
    chol, _ = torch.linalg.cholesky_ex(m + damping.view(-1, 1, 1) * eye)
    return torch.cholesky_inverse(chol)


def kernel_fits(n: int, itemsize: int) -> bool:
    """Whether cholesky.cu's shared-memory layout for n fits this card (mirrors smem_bytes there)."""
    need = (n * (n + 1) // 2 + 32 * (n | 1) + 8 + n) * itemsize + 64
    props = torch.cuda.get_device_properties(DEV)
    return need <= getattr(props, "shared_memory_per_block_optin", 227 * 1024)


def bench_cholesky(kernels, quick, budget):
    try:  # optional, for a CuPy column: not a dependency
        cupy = importlib.import_module("cupy")
    except Exception:  # noqa: BLE001  (any import failure: no CuPy column)
        cupy = None
    ns = [16, 32, 64, 128, 147, 192, 256, 300, 512, 1024] if not quick else [32, 64, 128, 256, 512]
    crossover = None
    default = kernels.cholesky_kernel_max_n(-1)
    for batch in (16, 64):
        for n in ns:
            if batch == 64 and n > 512:
                continue
            sets = n_sets(batch * n * n * 4, cap=8)
            ms = []
            for _ in range(sets):
                x = torch.randn(batch, 2 * n, n, device=DEV)
                ms.append((x.mT @ x / (2 * n)).contiguous())
            damp = torch.full((batch,), 1e-2, device=DEV)
            eye = torch.eye(n, device=DEV)
            ours = time_ms(lambda k: kernels.cholesky_inverse_damped(ms[k], damp), sets, budget)
            kernels.cholesky_kernel_max_n(10**6)
            forced = time_ms(lambda k: kernels.cholesky_inverse_damped(ms[k], damp), sets, budget)
            kernels.cholesky_kernel_max_n(0)
            aten = time_ms(lambda k: kernels.cholesky_inverse_damped(ms[k], damp), sets, budget)
            kernels.cholesky_kernel_max_n(default)
            base = time_ms(lambda k: torch_cholesky_inverse(ms[k], damp, eye), sets, budget)
            extra = {"n": n, "batch": batch, "kernel_ms": forced if kernel_fits(n, 4) else None, "aten_path_ms": aten}
            if cupy is not None:
                try:  # CuPy's batched Cholesky (factorisation only), on torch's stream
                    with warnings.catch_warnings():  # ExternalStream: deprecated in new CuPy, still works
                        warnings.simplefilter("ignore", DeprecationWarning)
                        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
                    with stream:
                        cms = [cupy.from_dlpack(m + 1e-2 * eye) for m in ms]
                        extra["cupy_cholesky_only_ms"] = time_ms(lambda k: cupy.linalg.cholesky(cms[k]), sets, budget)
                except Exception as exc:  # noqa: BLE001  (a broken CuPy install must not stop the run)
                    _log(f"  cupy failed: {exc}")
                    cupy = None
            row("cholesky_inverse_damped", f"B={batch} n={n}", ours, base, **extra)
            if batch == 16 and kernel_fits(n, 4) and forced < aten:
                crossover = n  # largest n (so far) where the kernel still wins
    return crossover


def bench_bn(kernels, quick, budget):
    cases = [(32, 64, 112), (32, 256, 56), (32, 512, 28), (32, 1024, 14), (32, 2048, 7), (256, 2048, 1)]
    if quick:
        cases = cases[1:4]
    for n, c, h in cases:
        shape = (n, c, h, h) if h > 1 else (n, c)
        sets = n_sets(2 * n * c * h * h * 4)
        gs = [torch.randn(shape, device=DEV) for _ in range(sets)]
        xs = [torch.randn(shape, device=DEV) for _ in range(sets)]
        state = torch.zeros(c, 3, device=DEV)
        ours = time_ms(lambda k: kernels.bn_unitwise_fisher(state, gs[k], xs[k], 0.5, 0.9), sets, budget)
        base = time_ms(lambda k: ref.bn_unitwise_fisher(state, gs[k], xs[k], 0.5, 0.9), sets, budget)
        row("bn_unitwise_fisher", f"N={n} C={c} {h}x{h}", ours, base, GBps=2 * gs[0].numel() * 4 / (ours * 1e-3) / 1e9)
        gs, xs = [], []  # free the input sets before the next case
    for c in (64, 2048):
        fisher = torch.rand(c, 3, device=DEV) + torch.tensor([1.0, 0.0, 1.0], device=DEV)
        gg, gb = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
        ours = time_ms(lambda k: kernels.bn_unitwise_solve(fisher, gg, gb, 1e-3), 1, budget)
        base = time_ms(lambda k: ref.bn_unitwise_solve(fisher, gg, gb, 1e-3), 1, budget)
        row("bn_unitwise_solve", f"C={c}", ours, base)


def run_kernel_bench(quick: bool, log: Callable[[str], None] = print) -> dict:
    """Run every kernel benchmark; returns the device, the copy bandwidth, the rows and the targets.

    Args:
        quick: a smaller sweep (about a third of the cases, shorter timing).
        log: receives one line per row as it is measured.
    """
    global _log
    _log = log
    ROWS.clear()
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines stay fp32, like the kernels
    try:
        kernels = torch.ops.spngd_ext
        budget = 0.05 if quick else 0.12
        name = torch.cuda.get_device_name()
        copy_gbps = copy_bandwidth()
        log(f"device {name}, torch {torch.__version__}; device-to-device copy {copy_gbps:.0f} GB/s (read+write)")
        bench_pack(kernels, quick, budget, copy_gbps)
        bench_factor(kernels, quick, budget)
        bench_conv(kernels, quick, budget)
        crossover = bench_cholesky(kernels, quick, budget)
        bench_bn(kernels, quick, budget)
        results = targets(ROWS, crossover)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return {
        "device": name,
        "torch": torch.__version__,
        "copy_GBps": copy_gbps,
        "quick": quick,
        "rows": list(ROWS),
        "targets": results,
    }
