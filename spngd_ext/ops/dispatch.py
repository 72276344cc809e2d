"""Which implementation an op runs: the compiled kernel or the pure-PyTorch path.

:func:`use_kernel` is the one place that decides. ``backend`` is a :class:`~spngd_ext.options.Backend`
or its string value: ``"auto"`` takes the kernel when the extension is loaded, a GPU is visible,
every tensor is on it and every dtype is one the kernel takes; ``"cuda"`` insists on the kernel and
raises (naming the op) when it cannot be used; ``"torch"`` always takes :mod:`spngd_ext.ops.torch_path`.

The first time a kernel is chosen for an (op, device, dtypes, layouts) in a process,
:func:`spngd_ext.kernel_guard.admit` compares it with the PyTorch path on a small input; a kernel
that fails runs its PyTorch path under "auto" (with one warning) and raises under "cuda".
``SPNGD_KERNEL_GUARD=0`` turns that check off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import kernel_guard
from ..options import Backend
from .extension import cuda_ops_available, extension_loaded

__all__ = ["Backend", "FLOAT_DTYPES", "FP32_KERNEL_DTYPES", "as_backend", "use_kernel"]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FP32_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp32 accumulation, no float64


def as_backend(backend: Backend | str, op: str) -> Backend:
    """``backend`` as the enum; ValueError naming ``op`` for anything else.

    Args:
        backend: a :class:`Backend` or one of its string values ("auto", "cuda", "torch").
        op: the op's name, for the error message.
    """
    try:
        return Backend(backend)
    except ValueError:
        choices = tuple(b.value for b in Backend)
        raise ValueError(f"{op}: backend must be one of {choices}, got {backend!r}") from None


def use_kernel(
    backend: Backend | str, tensors: Sequence[Tensor], op: str, kernel_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> bool:
    """Whether ``op`` calls its compiled kernel for these tensors.

    Args:
        backend: "auto", "cuda" or "torch" (enum or string), see the module docstring.
        tensors: the op's tensor arguments; the kernel runs only when all are on a CUDA device.
        op: the op's name, for error messages.
        kernel_dtypes: the dtypes the kernel takes; others go to the PyTorch path under "auto" and
            raise ``TypeError`` under "cuda".

    Raises:
        RuntimeError: ``backend="cuda"`` without the built extension or without a visible GPU.
        KernelCheckError: ``backend="cuda"`` and the kernel failed its first-use check
            (:mod:`spngd_ext.kernel_guard`; under "auto" the op falls back to PyTorch instead).
        ValueError: ``backend="cuda"`` with a tensor off the GPU, or an unknown backend.
    """
    backend = as_backend(backend, op)
    if backend is Backend.TORCH or not tensors:
        return False
    on_cuda = all(on_kernel_device(t) for t in tensors)
    dtypes_ok = all(t.dtype in kernel_dtypes for t in tensors)
    if backend is Backend.CUDA:
        if not cuda_ops_available():
            if extension_loaded():
                raise RuntimeError(f"{op}: backend='cuda' but no CUDA GPU is visible (use backend='auto' or 'torch')")
            raise RuntimeError(
                f"{op}: backend='cuda' but the spngd_ext CUDA extension is not built "
                "(reinstall with nvcc available, or use backend='auto'/'torch')"
            )
        if not on_cuda:
            raise ValueError(f"{op}: backend='cuda' needs every tensor on a CUDA device")
        if not dtypes_ok:
            got = sorted({str(t.dtype) for t in tensors})
            raise TypeError(
                f"{op}: backend='cuda' kernel takes {[str(d) for d in kernel_dtypes]}, got {got}; "
                "use backend='auto' or 'torch'"
            )
        return kernel_guard.admit(op, backend, tensors)  # raises if the kernel failed its first-use check
    return on_cuda and dtypes_ok and cuda_ops_available() and kernel_guard.admit(op, backend, tensors)


def on_kernel_device(t: Tensor) -> bool:
    """Whether ``t`` is where the kernels run (a CUDA device). The guard's CPU tests replace it.

    Args:
        t: one of an op's tensor arguments.
    """
    return t.is_cuda
