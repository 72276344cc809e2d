"""The per-op first-use checks that :mod:`spngd_ext.kernel_guard` runs: one small comparison per op.

Each check calls the compiled op (``torch.ops.spngd_ext.<op>``) with the arguments the public op in
:mod:`spngd_ext.ops` passes it, and the pure-PyTorch path (:mod:`spngd_ext.ops.torch_path`) in
float64 on the same values. It never calls the public ops: they dispatch through the guard, so this
module depends on the compiled ops and the PyTorch path alone, and the dispatch does not depend on it.

:data:`CHECKS` maps an op's name to ``check(real tensors, generator) -> [(label, kernel result,
float64 reference)]``. The inputs copy the real tensors' dtypes and memory layouts (channels-last,
transposed) at a tiny size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .ops import torch_path

__all__ = ["CHECKS", "CheckResult", "layout"]

CheckResult = list[tuple[str, Tensor, Tensor]]
# The dtypes the packing kernels cast to on the way.
_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def layout(t: Tensor) -> str:
    """The memory layout of ``t`` as the guard keys it: "contiguous", "channels_last" or "strided".

    Args:
        t: any tensor.
    """
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _randn(like: Tensor, shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype | None = None) -> Tensor:
    """Random values in ``dtype`` (default like's) on like's device, laid out like ``like``."""
    dtype = dtype or like.dtype
    like_layout = layout(like)
    if like_layout == "channels_last" and len(shape) == 4:
        return (
            torch.randn(*shape, generator=gen, device=like.device)
            .to(dtype)
            .contiguous(memory_format=torch.channels_last)
        )
    if like_layout == "strided" and len(shape) == 2:
        return torch.randn(shape[1], shape[0], generator=gen, device=like.device).to(dtype).t()
    return torch.randn(*shape, generator=gen, device=like.device).to(dtype)


def _check_accumulate_factor(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    state, x = tensors
    probe = _randn(x, (19, 6), gen)
    results = []
    for decay in (0.0, 0.75):
        s = torch.randn(21, generator=gen, device=state.device).to(state.dtype)
        if decay == 0.0:
            s.fill_(float("nan"))  # decay 0 overwrites: NaN must not survive
        ref = torch.zeros(21, dtype=torch.float64, device=state.device) if decay == 0.0 else s.double()
        torch.ops.spngd_ext.accumulate_factor(s, probe.contiguous(), 0.5, decay)
        torch_path.accumulate_factor(ref, probe.double(), 0.5, decay)
        results.append((f"decay {decay}", s, ref))
    return results


def _check_conv_a_factor(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    state, x = tensors
    results = []
    for k, s, p, bias in ((3, 1, 1, True), (3, 2, 0, False)):
        probe = _randn(x, (2, 3, 7, 6), gen)
        d = 3 * k * k + int(bias)
        st = torch.randn(d * (d + 1) // 2, generator=gen, device=state.device).to(state.dtype)
        ref = st.double()
        torch.ops.spngd_ext.conv_a_factor(st, probe, [k, k], [s, s], [p, p], [1, 1], bias, 0.25, 0.5)
        torch_path.conv_a_factor(ref, probe.double(), (k, k), (s, s), (p, p), (1, 1), bias, 0.25, 0.5)
        results.append((f"kernel {k} stride {s} padding {p} bias {bias}", st, ref))
    return results


def _check_cholesky_inverse_damped(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    (mats,) = tensors
    x = torch.randn(3, 16, 7, generator=gen, device=mats.device, dtype=torch.float64)
    spd = x.mT @ x / 16
    spd[2] = -torch.eye(7, dtype=torch.float64, device=mats.device)  # not PD: must be flagged
    damping = torch.tensor([1e-2, 1e-1, 1e-2], dtype=mats.dtype, device=mats.device)
    inv, info = torch.ops.spngd_ext.cholesky_inverse_damped(spd.to(mats.dtype).contiguous(), damping.contiguous())
    ref, ref_info = torch_path.cholesky_inverse_damped(spd, damping.double())
    flags, ref_flags = (info != 0).cpu().tolist(), (ref_info != 0).cpu().tolist()
    if flags != ref_flags:
        raise AssertionError(f"failure flags {flags}, expected {ref_flags}")
    return [("inverse", inv[:2], ref[:2])]


def _check_bn_unitwise_fisher(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    state, grad_out, xhat = tensors
    shape = (3, 4, 5, 5) if grad_out.dim() == 4 else (6, 4)
    g, xh = _randn(grad_out, shape, gen), _randn(xhat, shape, gen)
    st = torch.rand(4, 3, generator=gen, device=state.device).to(state.dtype)
    ref = st.double()
    g_ref, xh_ref = g.double(), xh.double()
    if g.dtype != xh.dtype:  # the kernel reads both in one dtype, as the public op passes them
        common = torch.promote_types(g.dtype, xh.dtype)
        g, xh = g.to(common), xh.to(common)
    torch.ops.spngd_ext.bn_unitwise_fisher(st, g.contiguous(), xh.contiguous(), 0.5, 0.9)
    torch_path.bn_unitwise_fisher(ref, g_ref, xh_ref, 0.5, 0.9)
    return [("", st, ref)]


def _check_bn_unitwise_solve(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    fisher, _, _ = tensors
    dev = fisher.device
    a, d = torch.rand(6, generator=gen, device=dev) + 0.5, torch.rand(6, generator=gen, device=dev) + 0.5
    b = (torch.rand(6, generator=gen, device=dev) - 0.5) * (a * d).sqrt()
    f = torch.stack([a, b, d], dim=1)
    f[4] = torch.tensor([1.0, 1.0, 1.0], device=dev)  # singular at damping 0: keeps the gradient
    gg, gb = torch.randn(6, generator=gen, device=dev), torch.randn(6, generator=gen, device=dev)
    f, gg, gb = f.to(fisher.dtype), gg.to(fisher.dtype), gb.to(fisher.dtype)
    ug, ub = torch.ops.spngd_ext.bn_unitwise_solve(f.contiguous(), gg.contiguous(), gb.contiguous(), 0.0)
    eg, eb = torch_path.bn_unitwise_solve(f.double(), gg.double(), gb.double(), 0.0)
    return [("gamma", ug, eg), ("beta", ub, eb)]


def _check_pack_upper(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    mats = []
    for t in {(m.dtype, layout(m)): m for m in tensors}.values():
        mats += [_randn(t, (3, 3), gen), _randn(t, (5, 5), gen)]
    results = []
    for out_dtype in (None, *_OUT_DTYPES):
        out = torch.ops.spngd_ext.pack_upper(mats, out_dtype)
        ref = torch_path.pack_upper([m.double() for m in mats], dtype=torch.float64)
        if out_dtype is not None:  # the cast's own rounding is the expected result
            ref = ref.to(out_dtype)
        results.append((f"to {out_dtype}", out, ref))
    return results


def _check_unpack_upper(tensors: list[Tensor], gen: torch.Generator) -> CheckResult:
    (buffer,) = tensors
    sizes = [3, 1, 4]
    buf = torch.randn(2 + 6 + 1 + 10 + 3, generator=gen, device=buffer.device).to(buffer.dtype)
    scale = torch.rand(3, generator=gen, device=buffer.device) + 0.5
    results = []
    for out_dtype in _OUT_DTYPES:
        outs = torch.ops.spngd_ext.unpack_upper(buf, sizes, scale.float().contiguous(), 2, out_dtype)
        refs = torch_path.unpack_upper(buf.double(), sizes, scale=scale.double(), dtype=torch.float64, offset=2)
        results += [(f"to {out_dtype}, matrix {i}", o, r.to(out_dtype)) for i, (o, r) in enumerate(zip(outs, refs))]
    return results


CHECKS: dict[str, Callable[[list[Tensor], torch.Generator], CheckResult]] = {
    "pack_upper": _check_pack_upper,
    "unpack_upper": _check_unpack_upper,
    "accumulate_factor": _check_accumulate_factor,
    "conv_a_factor": _check_conv_a_factor,
    "cholesky_inverse_damped": _check_cholesky_inverse_damped,
    "bn_unitwise_fisher": _check_bn_unitwise_fisher,
    "bn_unitwise_solve": _check_bn_unitwise_solve,
}
