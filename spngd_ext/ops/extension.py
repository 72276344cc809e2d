"""Loading the compiled extension (``spngd_ext._C``) and registering fake implementations.

Importing ``spngd_ext._C`` runs the C++ static initialisers that declare the ops
(``TORCH_LIBRARY(spngd_ext, ...)``) and register their CUDA kernels. The package works without
it: every op then runs its pure-PyTorch path (:mod:`spngd_ext.ops.torch_path`).
"""

from __future__ import annotations

import os
import warnings

import torch

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
        from .. import _C  # noqa: F401  (registers torch.ops.spngd_ext.*)
    except ImportError as exc:  # not built: the pure-PyTorch path is used
        _LOADED, _LOAD_ERROR = False, str(exc)
        return False
    except OSError as exc:  # built against another torch/CUDA: say so once
        _LOADED, _LOAD_ERROR = False, str(exc)
        warnings.warn(f"spngd_ext: compiled extension could not be loaded ({exc}); using pure PyTorch", stacklevel=2)
        return False
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


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile / FakeTensor tracing can run through the ops."""
    from .torch_path import packed_size

    lib = "spngd_ext::"

    @torch.library.register_fake(lib + "pack_upper")
    def _pack_upper_fake(mats, dtype):
        total = sum(packed_size(m.shape[0]) for m in mats)
        out_dtype = dtype if dtype is not None else mats[0].dtype
        return mats[0].new_empty((total,), dtype=out_dtype)

    @torch.library.register_fake(lib + "unpack_upper")
    def _unpack_upper_fake(buffer, sizes, scale, offset, dtype):
        return [buffer.new_empty((n, n), dtype=dtype) for n in sizes]

    @torch.library.register_fake(lib + "accumulate_factor")
    def _accumulate_factor_fake(state, x, scale, decay):
        return None

    @torch.library.register_fake(lib + "conv_a_factor")
    def _conv_a_factor_fake(state, x, kernel_size, stride, padding, dilation, has_bias, scale, decay):
        return None

    @torch.library.register_fake(lib + "cholesky_inverse_damped")
    def _cholesky_inverse_damped_fake(mats, damping):
        return torch.empty_like(mats), mats.new_empty((mats.shape[0],), dtype=torch.int32)

    @torch.library.register_fake(lib + "bn_unitwise_fisher")
    def _bn_unitwise_fisher_fake(state, grad_out, xhat, scale, decay):
        return None

    @torch.library.register_fake(lib + "bn_unitwise_solve")
    def _bn_unitwise_solve_fake(fisher, grad_gamma, grad_beta, damping):
        return torch.empty_like(grad_gamma), torch.empty_like(grad_beta)
