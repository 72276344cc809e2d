"""First-use check of the compiled kernels: each op is compared once per process with the PyTorch path.

The first time the dispatch in :mod:`spngd_ext.ops` is about to run a compiled op on a device for a
given dtype and memory layout, :func:`admit` runs that op on a small input of the same dtype and
layout twice: through the kernel, and through the pure-PyTorch path in float64. The verdict is
cached for the process under ``(op, device, dtypes and layouts)``.

* With ``backend="auto"``, a kernel that raises, or whose result differs from the float64 PyTorch
  result by more than :data:`TOLERANCE` (relative Frobenius error, by result dtype) or is not
  finite, is not used again in this process: the op runs its PyTorch path, one
  :class:`KernelGuardWarning` names the op, the device and the error, and :func:`fallbacks` (shown
  as ``kernel_fallbacks`` in ``SPNGD.counters``) records it.
* With ``backend="cuda"`` the same failure raises :class:`KernelCheckError` instead.
* ``SPNGD_KERNEL_GUARD=0`` turns the check off (for benchmarks): every eligible call then runs the
  kernel unchecked.

A check costs a few small launches and one host synchronisation, once per key. It draws its inputs
from its own generator, so the caller's random streams are unchanged. It is skipped (the kernel is
used unchecked, nothing cached) while ``torch.compile`` traces and while a CUDA graph is captured,
where a synchronising comparison cannot run. A kernel fault that leaves the CUDA context unusable
(an illegal memory access) cannot be recovered by falling back; the check then reports it once, and
every later CUDA call fails as well.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = [
    "ENV_VAR",
    "TOLERANCE",
    "KernelCheckError",
    "KernelGuardWarning",
    "admit",
    "check_op",
    "enabled",
    "fallback_count",
    "fallbacks",
    "guarded_ops",
    "reset",
    "verdicts",
]

ENV_VAR = "SPNGD_KERNEL_GUARD"
# Largest accepted ‖kernel − reference‖ / ‖reference‖, by the dtype of the kernel's result. The
# inputs are exact in float64, so the error is the kernel's own rounding (fp32 sums over a few
# hundred terms, half-precision casts); a broken kernel is off by O(1).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


class KernelGuardWarning(RuntimeWarning):
    """A compiled op failed its first-use check and runs its PyTorch path for the rest of the process."""


class KernelCheckError(RuntimeError):
    """A compiled op failed its first-use check under ``backend="cuda"``."""


_lock = threading.Lock()
_verdicts: dict[tuple, str | None] = {}  # key -> None (kernel agrees) or the error text
_fallbacks: list[dict] = []  # one entry per key that fell back under backend="auto"
_warned: set[tuple] = set()
_checking = threading.local()  # ops whose check is running on this thread (their kernel calls pass)


def enabled() -> bool:
    """Whether the first-use check runs (``SPNGD_KERNEL_GUARD`` unset, or not 0/false/off/no)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _layout(t: Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _key(op: str, tensors: Sequence[Tensor]) -> tuple:
    return (op, tensors[0].device, frozenset((t.dtype, _layout(t)) for t in tensors))


def _inputs(key: tuple) -> list[str]:
    return sorted(f"{str(dtype)[6:]} {layout}" for dtype, layout in key[2])


def _describe(key: tuple) -> str:
    return f"{key[0]} on {key[1]} ({', '.join(_inputs(key))})"


def admit(op: str, backend: str, tensors: Sequence[Tensor]) -> bool:
    """Whether the dispatch may run the compiled ``op`` on ``tensors`` (already found eligible).

    Runs the op's check on the first call for its key. Returns False (the caller takes the PyTorch
    path) when the check failed and ``backend`` is "auto"; raises :class:`KernelCheckError` when it
    failed and ``backend`` is "cuda".

    Args:
        op: the op's name in :mod:`spngd_ext.ops` (one of :func:`guarded_ops`).
        backend: the caller's backend, "auto" or "cuda" (string or :class:`~spngd_ext.options.Backend`).
        tensors: the tensors the dispatch inspected; their device, dtypes and layouts form the key.
    """
    if torch.compiler.is_compiling() or not tensors or _traced(tensors[0]):
        return True
    if op in getattr(_checking, "ops", ()):
        return True  # the check's own kernel call
    key = _key(op, tensors)
    verdict = _verdicts.get(key, _UNKNOWN)
    if verdict is _UNKNOWN:
        if not enabled() or op not in _CHECKS:
            return True
        if tensors[0].is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        verdict = check_op(op, tensors)
        with _lock:
            _verdicts[key] = verdict
    if verdict is None:
        return True
    if str(getattr(backend, "value", backend)) == "cuda":
        raise KernelCheckError(
            f"{op}: the CUDA kernel failed its first-use check on {key[1]}: {verdict} "
            f"(backend='auto' would fall back to PyTorch; {ENV_VAR}=0 skips the check)"
        )
    with _lock:
        first = key not in _warned
        if first:
            _warned.add(key)
            _fallbacks.append({"op": op, "device": str(key[1]), "inputs": _inputs(key), "error": verdict})
    if first:
        warnings.warn(
            f"spngd_ext: {op} on {key[1]}: the CUDA kernel failed its first-use check ({verdict}); "
            f"this op runs its PyTorch path for the rest of the process",
            KernelGuardWarning,
            stacklevel=4,
        )
    return False


_UNKNOWN = object()


def _traced(t: Tensor) -> bool:
    """Fake or meta tensors (tracing, shape propagation): there is nothing to compare."""
    return t.is_meta or isinstance(t, FakeTensor)


def check_op(op: str, tensors: Sequence[Tensor]) -> str | None:
    """Run ``op``'s check on small inputs shaped like ``tensors``; None when the kernel agrees with
    the float64 PyTorch path, else the error (the exception, or the mismatch) as text.

    Args:
        op: one of :func:`guarded_ops`.
        tensors: real inputs: the check copies their device, dtypes and memory layouts.
    """
    from . import ops  # the dispatch imports this module

    active: frozenset[str] = getattr(_checking, "ops", frozenset())
    _checking.ops = active | {op}
    device = tensors[0].device
    # The comparison's one host synchronisation is the check's own, not the caller's: exempt it
    # from torch.cuda.set_sync_debug_mode, which would otherwise fail a good kernel.
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if sync_mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator(device=device).manual_seed(0)
            for label, out, expect in _CHECKS[op](ops, list(tensors), gen):
                error = _mismatch(out, expect)
                if error is not None:
                    return f"{label}: {error}" if label else error
    except Exception as exc:  # noqa: BLE001  (any failure of the kernel is the verdict)
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
        _checking.ops = active
        if sync_mode:
            torch.cuda.set_sync_debug_mode(sync_mode)
    return None


def _mismatch(out: Tensor, expect: Tensor) -> str | None:
    if out.shape != expect.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(expect.shape)}"
    got, ref = out.detach().double().cpu(), expect.detach().double().cpu()
    if not torch.isfinite(got).all():
        return "non-finite values in the kernel's result"
    den = ref.norm().item()
    err = (got - ref).norm().item() / (den if den > 0 else 1.0)
    tol = TOLERANCE.get(out.dtype, 1e-4)
    if not err <= tol:
        return f"relative error {err:.2e} > tolerance {tol:.0e} ({str(out.dtype)[6:]} result)"
    return None


def fallbacks() -> list[dict]:
    """Every (op, device, inputs) that fell back to PyTorch in this process, with its error."""
    with _lock:
        return [dict(f) for f in _fallbacks]


def fallback_count() -> int:
    """How many (op, device, inputs) keys fell back to PyTorch in this process."""
    return len(_fallbacks)


def verdicts() -> dict[str, str | None]:
    """Every check run so far: description -> None (passed) or the error."""
    with _lock:
        return {_describe(k): v for k, v in _verdicts.items()}


def reset() -> None:
    """Forget every verdict, warning and fallback (the next call of each op is checked again)."""
    with _lock:
        _verdicts.clear()
        _fallbacks.clear()
        _warned.clear()


def guarded_ops() -> tuple[str, ...]:
    """The ops that have a first-use check (every op with a compiled kernel)."""
    return tuple(_CHECKS)


# ------------------------------------------------------------------------------------------------
# Per-op checks: fn(ops, real tensors, generator) -> [(label, kernel result, float64 reference)].
# Inputs copy the real tensors' dtype and layout (channels-last, transposed) at a tiny size.


def _randn(like: Tensor, shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype | None = None) -> Tensor:
    """Random values in ``dtype`` (default like's) on like's device, laid out like ``like``."""
    dtype = dtype or like.dtype
    layout = _layout(like)
    if layout == "channels_last" and len(shape) == 4:
        return (
            torch.randn(*shape, generator=gen, device=like.device)
            .to(dtype)
            .contiguous(memory_format=torch.channels_last)
        )
    if layout == "strided" and len(shape) == 2:
        return torch.randn(shape[1], shape[0], generator=gen, device=like.device).to(dtype).t()
    return torch.randn(*shape, generator=gen, device=like.device).to(dtype)


def _check_accumulate_factor(ops, tensors, gen):
    state, x = tensors
    probe = _randn(x, (19, 6), gen)
    results = []
    for decay in (0.0, 0.75):
        s = torch.randn(21, generator=gen, device=state.device).to(state.dtype)
        if decay == 0.0:
            s.fill_(float("nan"))  # decay 0 overwrites: NaN must not survive
        ref = torch.zeros(21, dtype=torch.float64, device=state.device) if decay == 0.0 else s.double()
        ops.accumulate_factor(s, probe, scale=0.5, decay=decay, backend="cuda")
        ops.accumulate_factor(ref, probe.double(), scale=0.5, decay=decay, backend="torch")
        results.append((f"decay {decay}", s, ref))
    return results


def _check_conv_a_factor(ops, tensors, gen):
    state, x = tensors
    results = []
    for k, s, p, bias in ((3, 1, 1, True), (3, 2, 0, False)):
        probe = _randn(x, (2, 3, 7, 6), gen)
        d = 3 * k * k + int(bias)
        st = torch.randn(d * (d + 1) // 2, generator=gen, device=state.device).to(state.dtype)
        ref = st.double()
        geometry = dict(kernel_size=k, stride=s, padding=p, has_bias=bias, scale=0.25, decay=0.5)
        ops.conv_a_factor(st, probe, **geometry, backend="cuda")
        ops.conv_a_factor(ref, probe.double(), **geometry, backend="torch")
        results.append((f"kernel {k} stride {s} padding {p} bias {bias}", st, ref))
    return results


def _check_cholesky_inverse_damped(ops, tensors, gen):
    (mats,) = tensors
    x = torch.randn(3, 16, 7, generator=gen, device=mats.device, dtype=torch.float64)
    spd = x.mT @ x / 16
    spd[2] = -torch.eye(7, dtype=torch.float64, device=mats.device)  # not PD: must be flagged
    damping = torch.tensor([1e-2, 1e-1, 1e-2], dtype=mats.dtype, device=mats.device)
    inv, info = ops.cholesky_inverse_damped(spd.to(mats.dtype), damping, backend="cuda")
    ref, ref_info = ops.cholesky_inverse_damped(spd, damping.double(), backend="torch")
    flags, ref_flags = (info != 0).cpu().tolist(), (ref_info != 0).cpu().tolist()
    if flags != ref_flags:
        raise AssertionError(f"failure flags {flags}, expected {ref_flags}")
    return [("inverse", inv[:2], ref[:2])]


def _check_bn_unitwise_fisher(ops, tensors, gen):
    state, grad_out, xhat = tensors
    shape = (3, 4, 5, 5) if grad_out.dim() == 4 else (6, 4)
    g, xh = _randn(grad_out, shape, gen), _randn(xhat, shape, gen)
    st = torch.rand(4, 3, generator=gen, device=state.device).to(state.dtype)
    ref = st.double()
    ops.bn_unitwise_fisher(st, g, xh, scale=0.5, decay=0.9, backend="cuda")
    ops.bn_unitwise_fisher(ref, g.double(), xh.double(), scale=0.5, decay=0.9, backend="torch")
    return [("", st, ref)]


def _check_bn_unitwise_solve(ops, tensors, gen):
    fisher, _, _ = tensors
    dev = fisher.device
    a, d = torch.rand(6, generator=gen, device=dev) + 0.5, torch.rand(6, generator=gen, device=dev) + 0.5
    b = (torch.rand(6, generator=gen, device=dev) - 0.5) * (a * d).sqrt()
    f = torch.stack([a, b, d], dim=1)
    f[4] = torch.tensor([1.0, 1.0, 1.0], device=dev)  # singular at damping 0: keeps the gradient
    gg, gb = torch.randn(6, generator=gen, device=dev), torch.randn(6, generator=gen, device=dev)
    f, gg, gb = f.to(fisher.dtype), gg.to(fisher.dtype), gb.to(fisher.dtype)
    ug, ub = ops.bn_unitwise_solve(f, gg, gb, damping=0.0, backend="cuda")
    eg, eb = ops.bn_unitwise_solve(f.double(), gg.double(), gb.double(), damping=0.0, backend="torch")
    return [("gamma", ug, eg), ("beta", ub, eb)]


_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_pack_upper(ops, tensors, gen):
    mats = []
    for t in {(m.dtype, _layout(m)): m for m in tensors}.values():
        mats += [_randn(t, (3, 3), gen), _randn(t, (5, 5), gen)]
    results = []
    for out_dtype in (None, *_OUT_DTYPES):
        out = ops.pack_upper(mats, dtype=out_dtype, backend="cuda")
        ref = ops.pack_upper([m.double() for m in mats], dtype=torch.float64, backend="torch")
        if out_dtype is not None:  # the cast's own rounding is the expected result
            ref = ref.to(out_dtype)
        results.append((f"to {out_dtype}", out, ref))
    return results


def _check_unpack_upper(ops, tensors, gen):
    (buffer,) = tensors
    sizes = [3, 1, 4]
    buf = torch.randn(2 + 6 + 1 + 10 + 3, generator=gen, device=buffer.device).to(buffer.dtype)
    scale = torch.rand(3, generator=gen, device=buffer.device) + 0.5
    results = []
    for out_dtype in _OUT_DTYPES:
        outs = ops.unpack_upper(buf, sizes, scale=scale, dtype=out_dtype, offset=2, backend="cuda")
        refs = ops.unpack_upper(
            buf.double(), sizes, scale=scale.double(), dtype=torch.float64, offset=2, backend="torch"
        )
        results += [(f"to {out_dtype}, matrix {i}", o, r.to(out_dtype)) for i, (o, r) in enumerate(zip(outs, refs))]
    return results


_CHECKS: dict[str, Callable] = {
    "pack_upper": _check_pack_upper,
    "unpack_upper": _check_unpack_upper,
    "accumulate_factor": _check_accumulate_factor,
    "conv_a_factor": _check_conv_a_factor,
    "cholesky_inverse_damped": _check_cholesky_inverse_damped,
    "bn_unitwise_fisher": _check_bn_unitwise_fisher,
    "bn_unitwise_solve": _check_bn_unitwise_solve,
}
