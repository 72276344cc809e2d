"""Loading the compiled extension (``spngd_ext._C``) and the Python side of its op registrations.

Importing ``spngd_ext._C`` runs the C++ static initialisers that declare the ops
(``TORCH_LIBRARY(spngd_ext, ...)``, csrc/spngd_ops.cpp) and register their CUDA kernels. This
module then registers, for every tensor op:

* the CPU kernel: the op's C++ argument checks (``torch.ops.spngd_ext._check_<op>``, the
  functions the CUDA kernel runs first), then the pure-PyTorch path
  (:mod:`spngd_ext.ops.torch_path`), so a raw op computes the same result on either device and
  rejects the same arguments with the same message;
* the fake implementation that tracing (``torch.compile``, ``FakeTensorMode``) runs instead of a
  kernel: the same shape, dtype and device rules through ``torch._check_*`` (which also hold for
  symbolic sizes), and outputs of the right shape and dtype. The accumulating ops mutate
  ``state`` (``Tensor(a!) state`` in their schemas) and return nothing.

The package works without the extension: every op then runs its pure-PyTorch path.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable

import torch

from . import torch_path
from .torch_path import packed_size

_LOADED: bool | None = None
_LOAD_ERROR: str | None = None


def _load() -> bool:
    global _LOADED, _LOAD_ERROR
    if _LOADED is not None:
        return _LOADED
    if os.environ.get("SPNGD_DISABLE_EXTENSION", "") not in ("", "0"):
        _LOADED, _LOAD_ERROR = False, "disabled by SPNGD_DISABLE_EXTENSION"
        return False
    try:
        importlib.import_module("spngd_ext._C")  # registers torch.ops.spngd_ext.*
    except ImportError as exc:  # not built: the pure-PyTorch path is used
        _LOADED, _LOAD_ERROR = False, str(exc)
        return False
    except OSError as exc:  # built against another torch/CUDA: say so once
        _LOADED, _LOAD_ERROR = False, str(exc)
        warnings.warn(f"spngd_ext: compiled extension could not be loaded ({exc}); using pure PyTorch", stacklevel=2)
        return False
    _register_cpu_kernels()
    _register_fakes()
    _LOADED = True
    return True


def extension_loaded() -> bool:
    """True when the compiled ops are registered with PyTorch."""
    return _load()


def extension_error() -> str | None:
    """Why the extension is not loaded (None when it is)."""
    _load()
    return _LOAD_ERROR


def cuda_ops_available() -> bool:
    """True when the CUDA kernels can be used: the extension is loaded and a GPU is visible."""
    return _load() and torch.cuda.is_available()


TENSOR_OPS = (
    "pack_upper",
    "unpack_upper",
    "accumulate_factor",
    "conv_a_factor",
    "cholesky_inverse_damped",
    "bn_unitwise_fisher",
    "bn_unitwise_solve",
)
"""The ops with tensor arguments: each has a CUDA kernel (C++), a CPU kernel and a fake (here)."""


def _register_cpu_kernels() -> None:
    """CPU kernel of every tensor op: its C++ argument checks, then the pure-PyTorch path."""
    raw = torch.ops.spngd_ext

    def pack_upper(mats, dtype):
        raw._check_pack_upper(mats, dtype)
        return torch_path.pack_upper(mats, dtype)

    def unpack_upper(buffer, sizes, scale, offset, dtype):
        raw._check_unpack_upper(buffer, sizes, scale, offset, dtype)
        return torch_path.unpack_upper(buffer, sizes, scale=scale, dtype=dtype, offset=offset)

    def accumulate_factor(state, x, scale, decay):
        raw._check_accumulate_factor(state, x, scale, decay)
        torch_path.accumulate_factor(state, x, scale, decay)

    def conv_a_factor(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay):
        raw._check_conv_a_factor(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay)
        torch_path.conv_a_factor(
            state, x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), has_bias, scale, decay
        )

    def cholesky_inverse_damped(mats, damping):
        raw._check_cholesky_inverse_damped(mats, damping)
        inverses, info = torch_path.cholesky_inverse_damped(mats, damping)
        return inverses.contiguous(), info  # row-major, as the CUDA kernel and the fake return it

    def bn_unitwise_fisher(state, grad_out, xhat, scale, decay):
        raw._check_bn_unitwise_fisher(state, grad_out, xhat, scale, decay)
        torch_path.bn_unitwise_fisher(state, grad_out, xhat, scale, decay)

    def bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping):
        raw._check_bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping)
        return torch_path.bn_unitwise_solve(fisher, grad_gamma, grad_beta, damping)

    kernels = locals()
    for name in TENSOR_OPS:
        torch.library.register_kernel(f"spngd_ext::{name}", "cpu", kernels[name])


# --------------------------------------------------------------------------------------------
# Fakes. Each runs the rules of its C++ check_<op> that decide whether the call is well formed
# and what it returns (ranks, sizes, dtypes, devices), with the same exception type and message;
# the layout rules (contiguity) are left to the kernel, since tracing may see other strides.
# --------------------------------------------------------------------------------------------

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_KERNEL_INPUT_TYPES = (torch.float32, torch.float16, torch.bfloat16)  # read by kernels that sum in fp32
_INT32_MAX = 2**31 - 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _value(op: str, conds, message: str | Callable[[], str]) -> None:
    """ValueError ``spngd_ext::<op>: <message>`` unless every condition holds. ``conds`` is one
    condition or a tuple, each checked on its own: ``a and b`` would turn a symbolic ``a`` into a
    guard, where ``torch._check_value`` records it as an assertion."""
    for cond in conds if isinstance(conds, tuple) else (conds,):
        torch._check_value(cond, lambda: f"spngd_ext::{op}: {message if isinstance(message, str) else message()}")


def _dtype(op: str, name: str, dtype: torch.dtype, allowed: tuple[torch.dtype, ...]) -> None:
    listing = "/".join(_dtype_name(d) for d in allowed)
    torch._check_type(dtype in allowed, lambda: f"spngd_ext::{op}: {name} must be {listing}, got {_dtype_name(dtype)}")


def _floating(op: str, name: str, dtype: torch.dtype) -> None:
    torch._check_type(
        dtype in _FLOAT_TYPES,
        lambda: (
            f"spngd_ext::{op}: {name} must be a floating dtype "
            f"(float32/float64/float16/bfloat16), got {_dtype_name(dtype)}"
        ),
    )


def _same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    _value(
        op,
        t.device == ref.device,
        lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device",
    )


def _state(op: str, state: torch.Tensor, numel, ref: torch.Tensor) -> None:
    _same_device(op, "state", state, "x", ref)
    _dtype(op, "state", state.dtype, (torch.float32,))
    _value(
        op,
        state.numel() == numel,
        lambda: (
            f"state must have {numel} elements (packed upper triangle), got {state.numel()} (shape {list(state.shape)})"
        ),
    )


def _pack_upper_fake(mats, dtype):
    op = "pack_upper"
    _value(op, len(mats) > 0, lambda: "mats must hold at least one matrix")
    for i, m in enumerate(mats):
        name = f"mats[{i}]"
        _same_device(op, name, m, "mats[0]", mats[0])
        _dtype(op, name, m.dtype, _FLOAT_TYPES)
        square = (m.dim() == 2,) + ((m.shape[0] == m.shape[1],) if m.dim() == 2 else ())
        _value(op, square, f"{name} must be a square matrix, got shape {list(m.shape)}")
    out_dtype = dtype if dtype is not None else mats[0].dtype
    _floating(op, "dtype", out_dtype)
    return mats[0].new_empty((sum(packed_size(m.shape[0]) for m in mats),), dtype=out_dtype)


def _unpack_upper_fake(buffer, sizes, scale, offset, dtype):
    op = "unpack_upper"
    _dtype(op, "buffer", buffer.dtype, _FLOAT_TYPES)
    _value(op, buffer.dim() == 1, lambda: f"buffer must be 1-D, got shape {list(buffer.shape)}")
    _floating(op, "dtype", dtype)
    _value(op, tuple(n >= 0 for n in sizes), lambda: f"sizes must be non-negative, got {list(sizes)}")
    need = offset + sum(packed_size(n) for n in sizes)
    _value(
        op,
        (offset >= 0, need <= buffer.numel()),
        lambda: f"buffer has {buffer.numel()} elements, sizes {list(sizes)} at offset {offset} need {need}",
    )
    _same_device(op, "scale", scale, "buffer", buffer)
    _dtype(op, "scale", scale.dtype, (torch.float32,))
    _value(
        op,
        (scale.dim() == 1, scale.numel() == len(sizes)),
        lambda: f"scale must be 1-D with one entry per matrix ({len(sizes)}), got shape {list(scale.shape)}",
    )
    return [buffer.new_empty((n, n), dtype=dtype) for n in sizes]


def _accumulate_factor_fake(state, x, scale, decay):
    op = "accumulate_factor"
    _dtype(op, "x", x.dtype, _KERNEL_INPUT_TYPES)
    _value(op, x.dim() == 2, lambda: f"x must be 2-D (rows, d), got shape {list(x.shape)}")
    _state(op, state, packed_size(x.shape[1]), x)


def _conv_a_factor_fake(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay):
    op = "conv_a_factor"
    _dtype(op, "x", x.dtype, _KERNEL_INPUT_TYPES)
    _value(op, x.dim() == 4, lambda: f"x must be 4-D (N, C, H, W), got shape {list(x.shape)}")
    geometry = (list(kernel_size), list(stride), list(padding), list(dilation))
    _value(
        op,
        all(len(g) == 2 for g in geometry),
        lambda: "kernel_size, stride, padding and dilation must have 2 entries each, got {}, {}, {}, {}".format(
            *geometry
        ),
    )
    k, s, p, d = geometry
    _value(
        op,
        min(k + s + d) >= 1 and min(p) >= 0,
        lambda: f"need kernel_size, stride, dilation >= 1 and padding >= 0, got {k}, {s}, {d}, {p}",
    )
    span = [d[a] * (k[a] - 1) + 1 for a in (0, 1)]
    _value(
        op,
        (x.shape[2] + 2 * p[0] >= span[0], x.shape[3] + 2 * p[1] >= span[1]),
        lambda: (
            "the kernel does "
            f"not fit the padded input (input {list(x.shape)}, kernel_size {k}, padding {p}, dilation {d})"
        ),
    )
    out_h, out_w = ((x.shape[2 + a] + 2 * p[a] - span[a]) // s[a] + 1 for a in (0, 1))
    patches = x.shape[0] * out_h * out_w
    _value(
        op,
        (patches < _INT32_MAX, x.shape[2] * x.shape[3] < _INT32_MAX),
        lambda: f"too many patches ({patches}); split the batch",
    )
    _state(op, state, packed_size(x.shape[1] * k[0] * k[1] + int(has_bias)), x)


def _cholesky_inverse_damped_fake(mats, damping):
    op = "cholesky_inverse_damped"
    _dtype(op, "mats", mats.dtype, (torch.float32, torch.float64))
    shape_message = lambda: f"mats must be (B, n, n), got shape {list(mats.shape)}"  # noqa: E731
    _value(op, mats.dim() == 3, shape_message)
    _value(op, mats.shape[1] == mats.shape[2], shape_message)
    _same_device(op, "damping", damping, "mats", mats)
    torch._check_type(
        damping.dtype == mats.dtype,
        lambda: (
            f"spngd_ext::{op}: damping must have the dtype of mats "
            f"({_dtype_name(mats.dtype)}), got {_dtype_name(damping.dtype)}"
        ),
    )
    _value(
        op,
        (damping.dim() == 1,) + ((damping.shape[0] == mats.shape[0],) if damping.dim() == 1 else ()),
        lambda: f"damping must be ({mats.shape[0]},), got shape {list(damping.shape)}",
    )
    return mats.new_empty(mats.shape), mats.new_empty((mats.shape[0],), dtype=torch.int32)


def _bn_unitwise_fisher_fake(state, grad_out, xhat, scale, decay):
    op = "bn_unitwise_fisher"
    _same_device(op, "xhat", xhat, "grad_out", grad_out)
    _dtype(op, "grad_out", grad_out.dtype, _KERNEL_INPUT_TYPES)
    torch._check_type(
        xhat.dtype == grad_out.dtype,
        lambda: (
            f"spngd_ext::{op}: xhat must have the dtype of grad_out "
            f"({_dtype_name(grad_out.dtype)}), got {_dtype_name(xhat.dtype)}"
        ),
    )
    same_shape = (grad_out.dim() >= 2, grad_out.dim() == xhat.dim())
    if all(same_shape):
        same_shape += tuple(a == b for a, b in zip(grad_out.shape, xhat.shape))
    _value(
        op,
        same_shape,
        lambda: f"grad_out and xhat must share one (N, C, *) shape, got {list(grad_out.shape)} and {list(xhat.shape)}",
    )
    _value(
        op,
        math.prod(grad_out.shape[2:]) < _INT32_MAX - 1024,
        lambda: "a (n, c) plane must hold fewer than 2^31 - 1024 elements",
    )
    _same_device(op, "state", state, "grad_out", grad_out)
    _dtype(op, "state", state.dtype, (torch.float32,))
    _value(
        op,
        (state.dim() == 2,) + ((state.shape[0] == grad_out.shape[1], state.shape[1] == 3) if state.dim() == 2 else ()),
        lambda: f"state must be ({grad_out.shape[1]}, 3), got shape {list(state.shape)}",
    )


def _bn_unitwise_solve_fake(fisher, grad_gamma, grad_beta, damping):
    op = "bn_unitwise_solve"
    _dtype(op, "fisher", fisher.dtype, (torch.float32,))
    _value(
        op,
        (fisher.dim() == 2,) + ((fisher.shape[1] == 3,) if fisher.dim() == 2 else ()),
        lambda: f"fisher must be (C, 3), got shape {list(fisher.shape)}",
    )
    for name, t in (("grad_gamma", grad_gamma), ("grad_beta", grad_beta)):
        _same_device(op, name, t, "fisher", fisher)
        _dtype(op, name, t.dtype, (torch.float32,))
        _value(
            op,
            (t.dim() == 1,) + ((t.shape[0] == fisher.shape[0],) if t.dim() == 1 else ()),
            f"{name} must be ({fisher.shape[0]},), got shape {list(t.shape)}",
        )
    return grad_gamma.new_empty(grad_gamma.shape), grad_beta.new_empty(grad_beta.shape)


def _register_fakes() -> None:
    """The fake implementation of every tensor op (see the module docstring)."""
    fakes = globals()
    for name in TENSOR_OPS:
        torch.library.register_fake(f"spngd_ext::{name}", fakes[f"_{name}_fake"])
