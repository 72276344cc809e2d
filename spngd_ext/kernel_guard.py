"""First-use check of the compiled kernels: each op is compared once per process with the PyTorch path.

The first time the dispatch in :mod:`spngd_ext.ops` is about to run a compiled op on a device for a
given dtype and memory layout, :func:`admit` runs that op on a small input of the same dtype and
layout twice: through the kernel, and through the pure-PyTorch path in float64. The verdict is
cached for the process under ``(op, device, dtypes and layouts)``.
The per-op comparisons are in :mod:`spngd_ext.kernel_guard_checks`: they call the compiled op
and the PyTorch path directly, never the dispatching public ops, so the guard does not depend on
the dispatch that calls it.

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
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .kernel_guard_checks import CHECKS, layout

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


def enabled() -> bool:
    """Whether the first-use check runs (``SPNGD_KERNEL_GUARD`` unset, or not 0/false/off/no)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _key(op: str, tensors: Sequence[Tensor]) -> tuple:
    return (op, tensors[0].device, frozenset((t.dtype, layout(t)) for t in tensors))


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
    key = _key(op, tensors)
    verdict = _verdicts.get(key, _UNKNOWN)
    if verdict is _UNKNOWN:
        if not enabled() or op not in CHECKS:
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
    device = tensors[0].device
    # The comparison's one host synchronisation is the check's own, not the caller's: exempt it
    # from torch.cuda.set_sync_debug_mode, which would otherwise fail a good kernel.
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if sync_mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gen = torch.Generator(device=device).manual_seed(0)
            for label, out, expect in CHECKS[op](list(tensors), gen):
                error = _mismatch(out, expect)
                if error is not None:
                    return f"{label}: {error}" if label else error
    except Exception as exc:  # noqa: BLE001  (any failure of the kernel is the verdict)
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    finally:
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
    return tuple(CHECKS)
