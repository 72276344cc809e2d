"""Checks that run on any machine, and the end-to-end optimizer step check (any device).

* The PyTorch path of every op in float32 against float64 (the path every op falls back to), and
  its two conv A-factor forms (shifted correlations, im2col) against each other in float64.
* The raw ops' argument checks through the CPU registration of the compiled extension.
* A few SP-NGD steps of the main job's CNN with the kernels against the same steps on the PyTorch
  path (on a GPU: ``backend="cuda"``, so every op runs its kernel; on the CPU both are PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernel_guard, ops
from ..ops import torch_path as ref
from ..ops.extension import cuda_ops_available, extension_error, extension_loaded
from .runner import Check, Skip

__all__ = ["cpu_checks", "end_to_end_check", "optimizer_steps"]


def _rel(out: torch.Tensor, expect: torch.Tensor) -> float:
    out, expect = out.double(), expect.double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = expect.norm().item()
    return (out - expect).norm().item() / (den if den > 0 else 1.0)


def _expect_close(out: torch.Tensor, expect: torch.Tensor, tol: float, what: str) -> None:
    err = _rel(out, expect)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.2e} > {tol:.0e}")


def check_torch_path_fp32() -> str:
    """Each op's PyTorch path in float32 against the same path in float64."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tol = 5e-5
    n = 0
    for rows, d in ((1, 1), (7, 33), (300, 65)):
        x = rnd(rows, d)
        s32, s64 = torch.zeros(ref.packed_size(d)), torch.zeros(ref.packed_size(d), dtype=torch.float64)
        ops.accumulate_factor(s32, x, scale=0.5, decay=0.0, backend="torch")
        ops.accumulate_factor(s64, x.double(), scale=0.5, decay=0.0, backend="torch")
        _expect_close(s32, s64, tol, f"accumulate_factor rows={rows} d={d}")
        n += 1
    for shape, k, s, p, layout in (
        ((2, 3, 9, 9), 3, 1, 1, "nchw"),
        ((2, 4, 8, 7), 3, 1, 1, "channels_last"),
        ((2, 3, 11, 11), 3, 2, 0, "nchw"),
    ):
        x = rnd(*shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        d = shape[1] * k * k + 1
        s32, s64 = torch.zeros(ref.packed_size(d)), torch.zeros(ref.packed_size(d), dtype=torch.float64)
        for state, inp in ((s32, x), (s64, x.double())):
            ops.conv_a_factor(
                state, inp, kernel_size=k, stride=s, padding=p, has_bias=True, scale=0.25, decay=0.0, backend="torch"
            )
        _expect_close(s32, s64, tol, f"conv_a_factor {shape} stride {s} {layout}")
        n += 1
    for nn_ in (1, 17, 65):
        x = rnd(3, 2 * nn_ + 2, nn_).double()
        m = x.mT @ x / (2 * nn_ + 2)
        inv32, info32 = ops.cholesky_inverse_damped(m.float(), 0.05, backend="torch")
        inv64, info64 = ops.cholesky_inverse_damped(m, 0.05, backend="torch")
        if (info32 != 0).any() or (info64 != 0).any():
            raise AssertionError(f"cholesky_inverse_damped n={nn_}: a positive definite matrix was flagged")
        _expect_close(inv32, inv64, 1e-4, f"cholesky_inverse_damped n={nn_}")
        n += 1
    gout, xh = rnd(8, 5, 4, 4), rnd(8, 5, 4, 4)
    f32, f64 = torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.float64)
    ops.bn_unitwise_fisher(f32, gout, xh, scale=0.5, decay=0.0, backend="torch")
    ops.bn_unitwise_fisher(f64, gout.double(), xh.double(), scale=0.5, decay=0.0, backend="torch")
    _expect_close(f32, f64, tol, "bn_unitwise_fisher")
    gg, gb = rnd(5), rnd(5)
    u32 = ops.bn_unitwise_solve(f32, gg, gb, damping=1e-3, backend="torch")
    u64 = ops.bn_unitwise_solve(f64, gg.double(), gb.double(), damping=1e-3, backend="torch")
    _expect_close(torch.cat(u32), torch.cat(u64), 1e-3, "bn_unitwise_solve")
    mats = [rnd(3, 3), rnd(17, 17)]
    packed = ops.pack_upper(mats, backend="torch")
    full = ops.unpack_upper(packed, [3, 17], scale=2.0, backend="torch")
    for m, f in zip(mats, full):
        if not torch.equal(f, 2 * (m.triu() + m.triu(1).mT)):
            raise AssertionError("pack_upper then unpack_upper does not give the scaled symmetric matrix")
    return f"{n + 4} cases, tolerance {tol:.0e} (Cholesky, solve: 1e-4, 1e-3)"


def check_conv_forms_agree() -> str:
    """The two PyTorch forms of the conv A factor (shifted correlations for stride 1, and im2col)
    give the same float64 result."""
    g = torch.Generator().manual_seed(1)
    n = 0
    for shape, k, p in (((2, 3, 9, 9), 3, 1), ((3, 2, 7, 5), 3, 0), ((2, 4, 6, 6), 5, 2), ((1, 1, 4, 4), 1, 0)):
        for bias in (False, True):
            x = torch.randn(*shape, generator=g, dtype=torch.float64)
            d = shape[1] * k * k + int(bias)
            via_ops = torch.zeros(ref.packed_size(d), dtype=torch.float64)
            ops.conv_a_factor(
                via_ops, x, kernel_size=k, padding=p, has_bias=bias, scale=1.0, decay=0.0, backend="torch"
            )
            im2col = ref.conv_a_factor(torch.zeros_like(via_ops), x, (k, k), (1, 1), (p, p), (1, 1), bias, 1.0, 0.0)
            _expect_close(via_ops, im2col, 1e-12, f"conv {shape} kernel {k} padding {p} bias {bias}")
            n += 1
    return f"{n} geometries"


def check_cpu_error_cases() -> str:
    if not extension_loaded():
        raise Skip(f"skipped: the compiled extension is not loaded ({extension_error()})")
    from .op_error_cases import run_in_child

    ran, expected, error = run_in_child("cpu", timeout_s=120)
    if error or ran != expected:
        raise AssertionError(error or f"{ran} of {expected} cases ran")
    return f"{ran} cases raised the right error"


def optimizer_steps(device: str, backend: str, steps: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Parameters of the main job's CNN after ``steps`` SP-NGD steps on fixed random batches.

    Args:
        device: where the model and data live.
        backend: the optimizer's backend ("auto", "cuda" or "torch").
        steps: how many steps.
        seed: seeds the model, the data and the Monte-Carlo labels.
    """
    from .. import SPNGD
    from ..bench.models import small_bn_cnn

    torch.manual_seed(seed)
    model = small_bn_cnn().to(device)
    g = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(16, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device))
        for _ in range(steps)
    ]
    opt = SPNGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4, damping=1e-2, backend=backend)
    torch.manual_seed(seed + 1)  # the same Monte-Carlo labels on every backend
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
        if not torch.isfinite(loss):
            raise AssertionError(f"non-finite loss {loss.item()} on backend {backend!r}")
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def end_to_end_check(device: str) -> str:
    """Three SP-NGD steps with the kernels against the same steps on the PyTorch path: the change
    of every parameter agrees within 2e-3 relative."""
    kernels = device == "cuda" and cuda_ops_available()
    backend = "cuda" if kernels else "auto"
    before = kernel_guard.fallback_count()
    start = _initial_params(device)
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        got = optimizer_steps(device, backend)
        expect = optimizer_steps(device, "torch")
    worst, where = 0.0, ""
    for name in expect:
        err = _rel(got[name] - start[name], expect[name] - start[name])
        if err > worst:
            worst, where = err, name
    if not worst <= 2e-3:
        raise AssertionError(
            f"backend {backend!r} vs 'torch': parameter change of {where} differs by {worst:.2e} (> 2e-3)"
        )
    if kernel_guard.fallback_count() != before:
        raise AssertionError(f"a first-use check fell back: {kernel_guard.fallbacks()[-1]}")
    what = "CUDA kernels" if kernels else "PyTorch path (no GPU kernels here)"
    return f"{what} vs PyTorch path: largest relative difference {worst:.1e} ({where or 'all equal'})"


def _initial_params(device: str) -> dict[str, torch.Tensor]:
    from ..bench.models import small_bn_cnn

    torch.manual_seed(0)  # as optimizer_steps(seed=0) builds its model
    return {name: p.detach().to(device) for name, p in small_bn_cnn().named_parameters()}


def cpu_checks() -> list[Check]:
    """The checks that need no GPU."""
    return [
        Check("PyTorch path: float32 against float64", check_torch_path_fp32, "cpu"),
        Check("PyTorch path: conv A factor, shifted vs im2col (float64)", check_conv_forms_agree, "cpu"),
        Check("raw-op argument checks, CPU registration (child process)", check_cpu_error_cases, "cpu"),
    ]
