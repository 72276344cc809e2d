"""Fake compiled kernels for CPU tests of the kernel guard and the GPU self-test checks (not
collected: no test_ prefix).

``CORRECT`` holds each raw op (``torch.ops.spngd_ext.<op>``'s signature) computed by the PyTorch
path; :func:`wrong` spoils a result slightly, :func:`raising` raises like a kernel built for another
card. ``install_fake_gpu`` makes CPU tensors kernel-eligible and installs these kernels.
"""

from __future__ import annotations

import torch

from spngd_ext import kernel_guard
from spngd_ext.ops import dispatch
from spngd_ext.ops import torch_path as tp


def _in_place(fn):
    """The raw in-place ops return nothing."""
    return lambda *args: (fn(*args), None)[1]


CORRECT = {
    "pack_upper": lambda mats, dtype: tp.pack_upper(mats, dtype),
    "unpack_upper": lambda buffer, sizes, scale, offset, dtype: tp.unpack_upper(
        buffer, sizes, scale=scale, dtype=dtype, offset=offset
    ),
    "accumulate_factor": _in_place(tp.accumulate_factor),
    "conv_a_factor": _in_place(tp.conv_a_factor),
    "cholesky_inverse_damped": lambda mats, damping: tp.cholesky_inverse_damped(mats, damping),
    "bn_unitwise_fisher": _in_place(tp.bn_unitwise_fisher),
    "bn_unitwise_solve": lambda fisher, gg, gb, damping: tp.bn_unitwise_solve(fisher, gg, gb, damping),
}


def off(t: torch.Tensor) -> None:
    t.add_(1e-2 * t.abs().max().clamp(min=1.0))  # a small, clearly wrong change


def wrong(op: str):
    """The correct kernel, then an error in its result (in place for the accumulating ops)."""
    correct = CORRECT[op]

    def kernel(*args):
        out = correct(*args)
        if out is None:  # in-place ops: the state is the first argument
            off(args[0])
        elif isinstance(out, torch.Tensor):
            out = out.clone()
            off(out)
        else:  # tuples and lists: spoil the first result
            out = list(out)
            out[0] = out[0].clone()
            off(out[0])
            out = tuple(out) if op != "unpack_upper" else out
        return out

    return kernel


def raising(*args):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def install_fake_gpu(monkeypatch):
    """For a fixture (``yield from install_fake_gpu(monkeypatch)``): CPU tensors count as
    kernel-eligible, the compiled ops are the correct Python ones, the guard starts with no
    verdicts. Yields ``install(op, kernel)``, which puts ``kernel`` in place of the op and returns
    a list that receives the element count of the first tensor argument of each call."""
    monkeypatch.setattr(dispatch, "cuda_ops_available", lambda: True)
    monkeypatch.setattr(dispatch, "on_kernel_device", lambda t: True)
    monkeypatch.delenv(kernel_guard.ENV_VAR, raising=False)
    kernel_guard.reset()

    def install(op: str, kernel) -> list:
        calls: list = []

        def recorded(*args):
            first = args[0]
            calls.append(first[0].numel() if isinstance(first, list) else first.numel())
            return kernel(*args)

        monkeypatch.setattr(torch.ops.spngd_ext, op, recorded, raising=False)
        return calls

    for name, kernel in CORRECT.items():
        install(name, kernel)
    yield install
    kernel_guard.reset()
