"""The C++ argument checks of every raw op (``torch.ops.spngd_ext.*``), as data: each case is a call
that must raise a given exception whose message matches a pattern.

Run by ``python -m spngd_ext.selftest`` (on the GPU, all cases; on the CPU, the cases that are not
about the device, through the CPU kernel, which runs the same checks as the CUDA one and then
the pure-PyTorch path) and by the test suite. Every run happens in a child process
(``python -m spngd_ext.selftest.op_error_cases DEVICE``), so that a crash in an error path shows
which case it was instead of ending the caller.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import ops
from ..ops import packed_size

__all__ = ["ErrorCase", "error_cases", "run_error_cases", "child_command", "run_in_child"]


class ErrorCase(NamedTuple):
    """One call that must raise ``exception`` with a message matching ``pattern``."""

    name: str
    exception: type[BaseException]
    pattern: str  # regex the message must match
    call: Callable[[], object]
    needs_cuda: bool = False  # a device mismatch, or the Python seam to the CUDA kernels


def error_cases(kernels, device: str) -> list[ErrorCase]:
    """Every case with tensors on ``device``; the ``needs_cuda`` ones only make sense on "cuda".

    Args:
        kernels: the raw op namespace (``torch.ops.spngd_ext``); None to list the cases only.
        device: where the cases' tensors live, "cuda" or "cpu".
    """
    x = torch.randn(10, 4, device=device)
    state = torch.zeros(10, device=device)
    z = lambda *shape, **kw: torch.zeros(*shape, device=device, **kw)  # noqa: E731
    conv = lambda x_, stride: kernels.conv_a_factor(
        z(packed_size(9)),
        x_,
        [3, 3],
        stride,
        [0, 0],
        [1, 1],  # noqa: E731
        False,
        1.0,
        0.0,
    )
    return [
        ErrorCase(
            "state dtype",
            TypeError,
            "state must be float32",
            lambda: kernels.accumulate_factor(state.double(), x, 1.0, 0.0),
        ),
        ErrorCase("x rank", ValueError, "x must be 2-D", lambda: kernels.accumulate_factor(state, x[None], 1.0, 0.0)),
        ErrorCase(
            "state size",
            ValueError,
            "state must have 10 elements",
            lambda: kernels.accumulate_factor(z(9), x, 1.0, 0.0),
        ),
        ErrorCase(
            "state device",
            ValueError,
            "state must be a CUDA tensor",
            lambda: kernels.accumulate_factor(state.cpu(), x, 1.0, 0.0),
            needs_cuda=True,
        ),
        ErrorCase(
            "x dtype",
            TypeError,
            "x must be float32/float16/bfloat16",
            lambda: kernels.accumulate_factor(state, x.double(), 1.0, 0.0),
        ),
        ErrorCase(
            "state contiguous",
            ValueError,
            "state must be contiguous",
            lambda: kernels.accumulate_factor(z(20)[::2], x, 1.0, 0.0),
        ),
        ErrorCase(
            "mats device",
            ValueError,
            r"mats\[1\] must be a CUDA tensor",
            lambda: kernels.pack_upper([torch.eye(3, device=device), torch.eye(3)], None),
            needs_cuda=True,
        ),
        ErrorCase(
            "mats square", ValueError, r"mats\[0\] must be a square matrix", lambda: kernels.pack_upper([z(3, 4)], None)
        ),
        ErrorCase(
            "mats dtype",
            TypeError,
            r"mats\[1\] must be float32/float64/float16/bfloat16, got int64",
            lambda: kernels.pack_upper([z(2, 2), z(2, 2, dtype=torch.int64)], None),
        ),
        ErrorCase(
            "pack out dtype",
            TypeError,
            "dtype must be a floating dtype",
            lambda: kernels.pack_upper([z(2, 2)], torch.int32),
        ),
        ErrorCase(
            "buffer size",
            ValueError,
            "need 7",
            lambda: kernels.unpack_upper(z(6), [3], torch.ones(1, device=device), 1, torch.float32),
        ),
        ErrorCase(
            "buffer rank",
            ValueError,
            "buffer must be 1-D",
            lambda: kernels.unpack_upper(z(2, 3), [2], torch.ones(1, device=device), 0, torch.float32),
        ),
        ErrorCase(
            "negative size",
            ValueError,
            "sizes must be non-negative",
            lambda: kernels.unpack_upper(z(6), [-1], torch.ones(1, device=device), 0, torch.float32),
        ),
        ErrorCase(
            "scale size",
            ValueError,
            "scale must be 1-D with one entry per matrix",
            lambda: kernels.unpack_upper(z(6), [3], torch.ones(2, device=device), 0, torch.float32),
        ),
        ErrorCase(
            "scale dtype",
            TypeError,
            "scale must be float32, got float64",
            lambda: kernels.unpack_upper(
                z(6), [3], torch.ones(1, device=device, dtype=torch.float64), 0, torch.float32
            ),
        ),
        ErrorCase(
            "mats shape",
            ValueError,
            r"mats must be \(B, n, n\)",
            lambda: kernels.cholesky_inverse_damped(z(2, 3, 4), z(2)),
        ),
        ErrorCase(
            "mats contiguous",
            ValueError,
            "mats must be contiguous",
            lambda: kernels.cholesky_inverse_damped(z(2, 4, 4).mT, z(2)),
        ),
        ErrorCase(
            "cholesky dtype",
            TypeError,
            "mats must be float32/float64, got float16",
            lambda: kernels.cholesky_inverse_damped(z(2, 4, 4).half(), z(2).half()),
        ),
        ErrorCase(
            "damping dtype",
            TypeError,
            "damping must have the dtype of mats",
            lambda: kernels.cholesky_inverse_damped(z(2, 4, 4), z(2).double()),
        ),
        ErrorCase(
            "damping shape",
            ValueError,
            r"damping must be \(2,\)",
            lambda: kernels.cholesky_inverse_damped(z(2, 4, 4), z(3)),
        ),
        ErrorCase("conv fit", ValueError, "kernel does not fit", lambda: conv(z(1, 1, 2, 2), [1, 1])),
        ErrorCase("conv stride", ValueError, "stride, dilation >= 1", lambda: conv(z(1, 1, 4, 4), [0, 1])),
        ErrorCase("conv rank", ValueError, r"x must be 4-D \(N, C, H, W\)", lambda: conv(z(1, 4, 4), [1, 1])),
        ErrorCase(
            "conv geometry",
            ValueError,
            "must have 2 entries each",
            lambda: kernels.conv_a_factor(
                z(packed_size(9)), z(1, 1, 4, 4), [3], [1, 1], [0, 0], [1, 1], False, 1.0, 0.0
            ),
        ),
        ErrorCase(
            "conv state",
            ValueError,
            "state must have 45 elements",
            lambda: kernels.conv_a_factor(z(44), z(1, 1, 4, 4), [3, 3], [1, 1], [0, 0], [1, 1], False, 1.0, 0.0),
        ),
        ErrorCase(
            "bn state",
            ValueError,
            r"state must be \(3, 3\)",
            lambda: kernels.bn_unitwise_fisher(z(3, 2), z(2, 3), z(2, 3), 1.0, 0.0),
        ),
        ErrorCase(
            "bn dtypes",
            TypeError,
            "xhat must have the dtype of grad_out",
            lambda: kernels.bn_unitwise_fisher(z(3, 3), z(2, 3), z(2, 3).half(), 1.0, 0.0),
        ),
        ErrorCase(
            "bn shapes",
            ValueError,
            "grad_out and xhat must share one",
            lambda: kernels.bn_unitwise_fisher(z(3, 3), z(2, 3), z(2, 4), 1.0, 0.0),
        ),
        ErrorCase(
            "solve shape", ValueError, "grad_beta must be", lambda: kernels.bn_unitwise_solve(z(3, 3), z(3), z(4), 0.0)
        ),
        ErrorCase(
            "solve fisher",
            ValueError,
            r"fisher must be \(C, 3\)",
            lambda: kernels.bn_unitwise_solve(z(3, 2), z(3), z(3), 0.0),
        ),
        ErrorCase(
            "seam dtype",
            TypeError,
            "backend='cuda' kernel takes",
            lambda: ops.accumulate_factor(state.double(), x.double(), scale=1.0, decay=0.0, backend="cuda"),
            needs_cuda=True,
        ),
    ]


def _expect_raises(case: ErrorCase) -> None:
    try:
        case.call()
    except case.exception as exc:
        if not re.search(case.pattern, str(exc)):
            raise AssertionError(
                f"{case.name}: {type(exc).__name__} message {str(exc)!r} does not match {case.pattern!r}"
            ) from exc
        return
    raise AssertionError(f"{case.name}: no {case.exception.__name__} raised")


def run_error_cases(device: str) -> None:
    """Run every case for ``device`` (the ``needs_cuda`` ones only on "cuda"), printing
    ``case: NAME`` before each and ``all error cases raised`` at the end.

    Args:
        device: "cuda" or "cpu".
    """
    from ..ops.extension import extension_error, extension_loaded

    if not extension_loaded():
        raise RuntimeError(f"the compiled extension is not loaded: {extension_error()}")
    for case in error_cases(torch.ops.spngd_ext, device):
        if case.needs_cuda and device != "cuda":
            continue
        print("case:", case.name, flush=True)
        _expect_raises(case)
    print("all error cases raised", flush=True)


def child_command(device: str) -> list[str]:
    """The command that runs :func:`run_error_cases` in a fresh interpreter.

    Args:
        device: "cuda" or "cpu".
    """
    return [sys.executable, "-X", "faulthandler", "-m", "spngd_ext.selftest.op_error_cases", device]


def run_in_child(device: str, timeout_s: float = 300) -> tuple[int, int, str]:
    """Run the cases of ``device`` in a child process: (cases run, cases expected, error or "").

    Args:
        device: "cuda" or "cpu".
        timeout_s: how long the child may take.
    """
    expected = sum(1 for c in error_cases(None, device) if device == "cuda" or not c.needs_cuda)
    try:
        proc = subprocess.run(child_command(device), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 0, expected, f"timed out after {timeout_s:.0f} s"
    ran = [line[6:] for line in proc.stdout.splitlines() if line.startswith("case: ")]
    if proc.returncode != 0 or "all error cases raised" not in proc.stdout:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        where = f" at case {ran[-1]!r}" if ran else ""
        return len(ran), expected, f"rc={proc.returncode}{where}: {last}"
    return len(ran), expected, ""


if __name__ == "__main__":
    run_error_cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")
