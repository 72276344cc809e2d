"""Symmetric packing: upper triangles of square matrices to and from one flat buffer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import torch_path
from .checks import check_same_device, check_tensor
from .dispatch import FLOAT_DTYPES, Backend, use_kernel
from .torch_path import packed_size

__all__ = ["pack_upper", "unpack_upper"]


def pack_upper(
    mats: Sequence[Tensor], *, dtype: torch.dtype | None = None, backend: Backend | str = Backend.AUTO
) -> Tensor:
    """Upper triangles (row by row) of square matrices, concatenated into one 1-D buffer.

    The inverse of :func:`unpack_upper` (which the optimizer uses to read its packed factors);
    SPNGD accumulates factors packed directly, so it does not call this op itself.

    Args:
        mats: square matrices (only their upper triangles are read), on one device.
        dtype: the output dtype (None: the first matrix's).
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.

    ``dtype`` casts on the way (e.g. fp32 factors to bf16 for communication).
    """
    op = "pack_upper"
    mats = list(mats)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype (float32/float64/bf16/fp16) or None, got {dtype}")
    for i, m in enumerate(mats):
        check_tensor(f"mats[{i}]", m, op, dim=2)
        if m.shape[0] != m.shape[1]:
            raise ValueError(f"{op}: mats[{i}] must be square, got shape {tuple(m.shape)}")
    if mats:
        check_same_device(op, **{f"mats[{i}]": m for i, m in enumerate(mats)})
    if use_kernel(backend, mats, op):
        return torch.ops.spngd_ext.pack_upper(mats, dtype)
    return torch_path.pack_upper(mats, dtype=dtype)


def unpack_upper(
    buffer: Tensor,
    sizes: Sequence[int],
    *,
    scale: float | Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
    offset: int = 0,
    backend: Backend | str = Backend.AUTO,
) -> list[Tensor]:
    """Full symmetric matrices of the given sizes from ``buffer[offset:]``, each times ``scale``.

    Args:
        buffer: the 1-D packed buffer.
        sizes: the matrix sizes, in buffer order.
        scale: a float, or a 1-D tensor with one entry per matrix on the buffer's device.
        dtype: the output dtype.
        offset: where the first matrix starts in ``buffer``.
        backend: "auto", "cuda" or "torch" (a :class:`Backend` or its value), see the module docstring.
    """
    op = "unpack_upper"
    check_tensor("buffer", buffer, op, dim=1)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be a floating dtype (float32/float64/bf16/fp16), got {dtype}")
    sizes = [int(n) for n in sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"{op}: sizes must be positive, got {sizes}")
    need = offset + sum(packed_size(n) for n in sizes)
    if offset < 0 or need > buffer.numel():
        raise ValueError(f"{op}: buffer has {buffer.numel()} elements, sizes {sizes} at offset {offset} need {need}")
    if isinstance(scale, Tensor):
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(len(sizes))
        if scale.dim() != 1 or scale.numel() != len(sizes):
            raise ValueError(
                f"{op}: scale must be a float or a 1-D tensor of {len(sizes)} entries, got shape {tuple(scale.shape)}"
            )
        check_same_device(op, buffer=buffer, scale=scale)
    if use_kernel(backend, [buffer], op):
        if not isinstance(scale, Tensor):
            scale = torch.full((len(sizes),), float(scale), dtype=torch.float32, device=buffer.device)
        return list(torch.ops.spngd_ext.unpack_upper(buffer, sizes, scale.float().contiguous(), offset, dtype))
    return torch_path.unpack_upper(buffer, sizes, scale=scale, dtype=dtype, offset=offset)
