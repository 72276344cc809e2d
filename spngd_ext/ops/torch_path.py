"""Pure-PyTorch implementations of every curvature primitive.

This is the production path wherever the CUDA kernels do not run (CPU tensors, dtypes the
kernels do not take, ``backend="torch"``), and the float64 oracle the kernels are tested against:
each function is written for clarity first and works in any floating dtype. The public, checked
entry points are in :mod:`spngd_ext.ops`; these functions take positional arguments and do not
validate them. Each takes the arguments of its namesake in :mod:`spngd_ext.ops` (documented
there), positionally. The unit-wise (2×2 per unit) functions live in
:mod:`spngd_ext.ops.torch_unitwise` and are re-exported here.

Packed layout (docs/design.md): a symmetric n×n matrix is stored as its upper triangle, row by row —
element (i, j), i <= j, at ``i*n - i*(i-1)/2 + (j - i)`` — which is exactly the order of
``torch.triu_indices(n, n)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .decay_add import decay_and_add
from .torch_unitwise import (
    bn_unit_gradients_from_input,
    bn_unitwise_fisher,
    bn_unitwise_fisher_from_sums,
    bn_unitwise_solve,
    gn_unit_gradients_from_input,
)

__all__ = [
    "packed_size",
    "triu_flat_index",
    "pack_upper",
    "unpack_upper",
    "accumulate_factor",
    "conv_patches",
    "conv_a_factor",
    "cholesky_inverse_damped",
    "bn_unitwise_fisher",
    "bn_unit_gradients_from_input",
    "gn_unit_gradients_from_input",
    "bn_unitwise_fisher_from_sums",
    "bn_unitwise_solve",
    "precondition",
    "kl_clip_coefficient",
    "momentum_update",
]


def packed_size(n: int) -> int:
    """Number of elements of the packed upper triangle of an n×n matrix."""
    return n * (n + 1) // 2


@lru_cache(maxsize=256)
def _triu_flat_index_cpu(n: int) -> Tensor:
    rows, cols = torch.triu_indices(n, n)
    return rows * n + cols


_INDEX_CACHE: dict[tuple[int, torch.device], Tensor] = {}


def triu_flat_index(n: int, device: torch.device | str = "cpu") -> Tensor:
    """Indices of the upper triangle (row by row) into a flattened n×n matrix; cached per device."""
    device = torch.device(device)
    key = (n, device)
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        idx = _triu_flat_index_cpu(n).to(device)
        _INDEX_CACHE[key] = idx
    return idx


def pack_upper(mats: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate the packed upper triangles of square matrices into one 1-D buffer.

    Only the upper triangle is read (the lower one may hold anything). ``dtype`` casts the output
    (for example to bf16 for communication); by default the dtype of the first matrix.
    """
    if len(mats) == 0:
        return torch.empty(0, dtype=dtype or torch.float32)
    out_dtype = dtype or mats[0].dtype
    parts = [m.reshape(-1)[triu_flat_index(m.shape[0], m.device)] for m in mats]
    return torch.cat(parts).to(out_dtype)


def unpack_upper(
    buffer: Tensor,
    sizes: Sequence[int],
    scale: float | Tensor = 1.0,
    dtype: torch.dtype = torch.float32,
    offset: int = 0,
) -> list[Tensor]:
    """Full symmetric matrices from a packed buffer, each multiplied by ``scale``.

    ``scale`` is a float or a 1-D tensor with one entry per matrix. Matrices are read from
    ``buffer[offset:]`` in order. Matrices of one size are unpacked together (one gather, one
    scatter, one symmetrisation): a depthwise layer has one small factor pair per channel, and a
    loop over thousands of them costs more than the factors' arithmetic. The returned matrices of
    one size are views of one tensor.
    """
    out: list[Tensor] = [buffer.new_empty(0)] * len(sizes)
    starts, pos = [], offset
    by_size: dict[int, list[int]] = {}
    for k, n in enumerate(sizes):
        starts.append(pos)
        pos += packed_size(n)
        by_size.setdefault(n, []).append(k)
    per_matrix = scale if isinstance(scale, Tensor) and scale.dim() > 0 else None
    for n, ks in by_size.items():
        m, c = packed_size(n), len(ks)
        if c == 1:
            seg = buffer[starts[ks[0]] : starts[ks[0]] + m].to(dtype).view(1, m)
        elif m >= 64:  # few and large: slices (no index tensor as large as the factors)
            seg = torch.stack([buffer[starts[k] : starts[k] + m] for k in ks]).to(dtype)
        else:  # many and small: one gather
            first = torch.tensor([starts[k] for k in ks], device=buffer.device)
            seg = buffer[first[:, None] + torch.arange(m, device=buffer.device)].to(dtype)  # (c, m)
        full = torch.zeros(c, n * n, dtype=dtype, device=buffer.device)
        full.index_copy_(1, triu_flat_index(n, buffer.device), seg)  # 2x faster than full[:, idx] = seg on CPU
        full = full.view(c, n, n)
        full = full + full.triu(1).transpose(1, 2)
        if per_matrix is not None:
            s = per_matrix[torch.tensor(ks, device=per_matrix.device)].to(dtype=dtype, device=buffer.device)
            full = full * s.view(c, 1, 1)
        else:
            full = full * scale
        for k, matrix in zip(ks, full.unbind(0)):
            out[k] = matrix
    return out


def _gram_block_rows(d: int) -> int:
    """Block rows of the upper-triangle Gram: a block row i computes only the blocks j ≥ i."""
    return 1 if d < 128 else 2 if d < 512 else 4


def _packed_gram(x: Tensor) -> Tensor:
    """Packed upper triangle of xᵀx, computed in at least float32.

    Only the upper triangle is read back, so with B block rows the blocks below the diagonal
    are never computed: (B + 1)/(2B) of the full GEMM's work (3/4 at B = 2; 1.3–1.5x faster on
    CPU at d = 256). Its lower part is left unwritten.
    """
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(acc_dtype)
    d = x.shape[1]
    rows = _gram_block_rows(d)
    if rows == 1:
        gram = x.transpose(0, 1) @ x
    else:
        gram = x.new_empty(d, d)
        edges = [(i * d) // rows for i in range(rows + 1)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            gram[lo:hi, lo:] = x[:, lo:hi].transpose(0, 1) @ x[:, lo:]
    return gram.reshape(-1)[triu_flat_index(d, x.device)]


def accumulate_factor(state: Tensor, x: Tensor, scale: float, decay: float) -> Tensor:
    """In place: ``state = decay * state + scale * packed_upper(xᵀx)``; returns ``state``.

    ``x`` is (rows, d), ``state`` the packed (d(d+1)/2,) accumulator. ``decay == 0`` overwrites
    (whatever ``state`` held, NaN included, is ignored), as BLAS treats beta = 0.
    """
    contrib = _packed_gram(x).to(state.dtype) * scale
    return decay_and_add(state, contrib, decay)


def conv_patches(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """im2col: (N, C, H, W) → (N·T, C·kh·kw), T = H_out·W_out, rows ordered (n, t), columns
    (c, ki, kj) as F.unfold orders them.

    Built from strided views (``Tensor.unfold``) and one copy: on CPU this is 3–6× faster than
    ``F.unfold`` for the main job's convolutions, with identical values.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # N, C, OH, OW, ekh, ekw
    if dh > 1 or dw > 1:
        windows = windows[..., ::dh, ::dw]
    n, c, oh, ow = windows.shape[:4]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def conv_a_factor(
    state: Tensor,
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    has_bias: bool,
    scale: float,
    decay: float,
) -> Tensor:
    """In place: ``state = decay*state + scale * Σ_{n,t} a_{n,t} a_{n,t}ᵀ`` (packed), a = patch [+1]."""
    cols = conv_patches(x, kernel_size, stride, padding, dilation)
    if has_bias:
        cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
    return accumulate_factor(state, cols, scale, decay)


def cholesky_inverse_damped(mats: Tensor, damping: Tensor | float) -> tuple[Tensor, Tensor]:
    """(M_b + damping_b·I)⁻¹ for a batch (B, n, n) of symmetric matrices, through Cholesky.

    Returns ``(inverses, info)``; ``info[b] != 0`` marks a matrix whose factorisation failed or
    whose inverse is not finite (its inverse entries are then unspecified). Never raises for a
    non-PD input and never synchronises with the host.
    """
    if not isinstance(damping, Tensor):
        damping = torch.full((mats.shape[0],), float(damping), dtype=mats.dtype, device=mats.device)
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    damped = mats + damping.to(mats.dtype).view(-1, 1, 1) * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    # A failed factorisation leaves a partial factor that cholesky_inverse would reject with an
    # exception; substitute the identity so the batch completes, and report it through info.
    failed = (info != 0).view(-1, 1, 1)
    chol = torch.where(failed, eye.expand_as(chol), chol)
    inv = torch.cholesky_inverse(chol)
    finite = torch.isfinite(inv).flatten(1).all(dim=1)
    info = torch.where(finite | (info != 0), info, torch.full_like(info, -1))
    return inv, info.to(torch.int32)


def precondition(g_inv: Tensor, grad: Tensor, a_inv: Tensor) -> Tensor:
    """U = Ĝ⁻¹ · grad · Â⁻¹ for one layer (grad is d_out × d_in[+1]); batched if given (B, ·, ·)."""
    return g_inv @ grad @ a_inv


def kl_clip_coefficient(
    updates: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[float], kl_clip: float
) -> Tensor:
    """ν = min(1, sqrt(kl_clip / Σ_l lr_l² ⟨U_l, ∇_l⟩)) as a 0-dim tensor (no host sync).

    A non-positive or non-finite quadratic form gives ν = 1 (nothing to clip against).
    """
    device = updates[0].device if updates else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for u, g, lr in zip(updates, grads, lrs):
        total = total + (lr * lr) * (u.float() * g.float()).sum()
    ok = torch.isfinite(total) & (total > 0)
    nu = torch.sqrt(kl_clip / torch.where(ok, total, torch.ones_like(total)))
    return torch.where(ok, torch.clamp(nu, max=1.0), torch.ones_like(nu))


def momentum_update(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor | None]:
    """torch-SGD convention: d = U + wd·θ; v ← m·v + d (v = d when no buffer); θ ← θ − lr·v.

    Returns the (possibly new) momentum buffers.
    """
    out = []
    for p, u, buf in zip(params, updates, momentum_buffers):
        d = u if weight_decay == 0 else u + weight_decay * p
        if momentum != 0:
            if buf is None:
                buf = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d)
            d = buf
        p.add_(d, alpha=-lr)
        out.append(buf)
    return out
