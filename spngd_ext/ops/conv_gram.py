"""Conv A factor from shifted self-correlations of the input: no im2col (stride 1, dilation 1).

For a stride-1 convolution, block ((i, j), (i', j')) of the patch Gram Σ_t a_t a_tᵀ pairs the
input with itself shifted by δ = (i' - i, j' - j). The self-correlation of the input at every δ
in the (2kh-1)×(2kw-1) window is a convolution weight gradient (the input against itself), which
oneDNN and cuDNN compute at full speed: (2kh-1)(2kw-1)·C² multiply-adds per pixel instead of the
im2col Gram's (C·kh·kw)², and no (N·T)×(C·kh·kw) matrix. On this project's CPU it is ~10× faster
than im2col + GEMM for the main job's 16- and 32-channel convolutions.

The correlation sums over every position where both pixels lie in the image, the patch Gram
only over the conv's output positions. Where the two differ is a border effect, removed exactly
by inclusion-exclusion: for each block, the rows ``Ey`` and columns ``Ex`` of output positions
that the correlation counts but the conv does not are subtracted as whole-row (whole-column)
1-D correlations, and their crossings (single pixel pairs) are added back. A per-geometry plan
(cached) says which corrections each block gets, so one call does a fixed handful of ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .decay_add import decay_and_add
from .torch_path import triu_flat_index

_CHUNK_PIXELS = 1 << 16  # images per correlation call: this many pixels, at least one image

__all__ = ["supports_shifted_gram", "patch_gram_shifted", "patch_sums", "conv_a_factor_shifted"]


def supports_shifted_gram(stride: tuple[int, int], dilation: tuple[int, int]) -> bool:
    """Whether :func:`patch_gram_shifted` applies to this geometry (stride 1, dilation 1).

    Args:
        stride: the conv's (sh, sw).
        dilation: the conv's (dh, dw).
    """
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)


def _excess_1d(i: int, i2: int, size: int, kernel: int, pad: int) -> list[int]:
    """Output positions t (along one axis) where pixels t+i-pad and t+i2-pad are both in the
    image, but t is not one of the conv's ``size + 2 pad - kernel + 1`` outputs."""
    out = size + 2 * pad - kernel + 1
    lo, hi = pad - min(i, i2), pad - max(i, i2) + size  # both pixels in the image: lo <= t < hi
    return [t for t in range(lo, hi) if t < 0 or t >= out]


@dataclass(frozen=True)
class _Plan:
    """Index tensors (CPU, int64) that assemble one geometry's Gram from correlations."""

    dy: Tensor  # (K, K): i' - i + kh - 1, to gather the main correlation
    dx: Tensor  # (K, K): j' - j + kw - 1
    row_pairs: tuple[tuple[int, int], ...]  # image rows (r, r') whose 1-D correlation is needed
    col_pairs: tuple[tuple[int, int], ...]  # image columns (c, c')
    pixel_pairs: tuple[tuple[int, int, int, int], ...]  # (r, c, r', c') single-pixel Grams
    block: Tensor  # (M,): block index a*K + b each correction goes to
    item: Tensor  # (M,): row into the stacked correction items
    sign: Tensor  # (M,): +1 subtract (strips), -1 add back (crossings)


@functools.lru_cache(maxsize=64)
def _plan(h: int, w: int, kh: int, kw: int, ph: int, pw: int) -> _Plan:
    positions = [(i, j) for i in range(kh) for j in range(kw)]  # F.unfold's (ki, kj) order
    k = len(positions)
    dy = torch.tensor([[i2 - i + kh - 1 for (i2, _) in positions] for (i, _) in positions])
    dx = torch.tensor([[j2 - j + kw - 1 for (_, j2) in positions] for (_, j) in positions])
    rows: dict[tuple[int, int], int] = {}
    cols: dict[tuple[int, int], int] = {}
    pixels: dict[tuple[int, int, int, int], int] = {}
    entries: list[
        tuple[int, str, int, int]
    ] = []  # (block, kind, item index within its kind, sign)  # (block, kind, key, offset, sign)
    for a, (i, j) in enumerate(positions):
        for b, (i2, j2) in enumerate(positions):
            ey = _excess_1d(i, i2, h, kh, ph)
            ex = _excess_1d(j, j2, w, kw, pw)
            for t in ey:  # the whole row pair, every horizontal offset the pixels can take
                key = (t + i - ph, t + i2 - ph)
                rows.setdefault(key, len(rows))
                entries.append((a * k + b, "row", rows[key] * (2 * kw - 1) + j2 - j + kw - 1, 1))
            for t in ex:
                key = (t + j - pw, t + j2 - pw)
                cols.setdefault(key, len(cols))
                entries.append((a * k + b, "col", cols[key] * (2 * kh - 1) + i2 - i + kh - 1, 1))
            for ty in ey:  # counted in both a row and a column strip: add back once
                for tx in ex:
                    pixel_pair = (ty + i - ph, tx + j - pw, ty + i2 - ph, tx + j2 - pw)
                    pixels.setdefault(pixel_pair, len(pixels))
                    entries.append((a * k + b, "pix", pixels[pixel_pair], -1))
    n_row_items = len(rows) * (2 * kw - 1)
    n_col_items = len(cols) * (2 * kh - 1)
    block, item, sign = [], [], []
    # rows first, then columns, then pixels, as the correlation items are concatenated
    start = {"row": 0, "col": n_row_items, "pix": n_row_items + n_col_items}
    for blk, kind, within, sgn in entries:
        idx = start[kind] + within
        block.append(blk)
        item.append(idx)
        sign.append(sgn)
    return _Plan(
        dy=dy,
        dx=dx,
        row_pairs=tuple(rows),
        col_pairs=tuple(cols),
        pixel_pairs=tuple(pixels),
        block=torch.tensor(block, dtype=torch.long),
        item=torch.tensor(item, dtype=torch.long),
        sign=torch.tensor(sign, dtype=torch.float64),
    )


def _weight_grad(go: Tensor, inp: Tensor, kernel: list[int], groups: int) -> Tensor:
    """Σ_n Σ_t go[n, o, t] · inp_padded[n, i, t + u]: a conv weight gradient, padding kernel-1."""
    c_out, c_in = go.shape[1], inp.shape[1] // groups
    ndim = len(kernel)
    weight = go.new_empty((c_out, c_in, *[2 * k - 1 for k in kernel]))

    def run() -> Tensor:
        return torch.ops.aten.convolution_backward(
            go,
            inp,
            weight,
            None,
            [1] * ndim,
            [k - 1 for k in kernel],
            [1] * ndim,
            False,
            [0] * ndim,
            groups,
            [False, True, False],
        )[1]

    if not go.is_cuda:
        return run()
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        # Full fp32 on GPUs: TF32's 10-bit mantissa would cost the statistics ~3 digits, and the
        # border corrections subtract large sums.
        torch.backends.cudnn.allow_tf32 = False
        return run()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _pair_correlations(x: Tensor, pairs: tuple[tuple[int, int], ...], axis: int, kernel: int) -> Tensor:
    """1-D correlations of image rows (axis 2) or columns (axis 3): (len(pairs)·(2k-1), C, C),
    item p·(2k-1) + d is Σ_{n,u} x[r_p, u, c] · x[r'_p, u + d - (k-1), c']."""
    n, c = x.shape[:2]
    first = torch.stack([x.select(axis, r) for r, _ in pairs], dim=1)  # (N, P, C, L)
    second = torch.stack([x.select(axis, r2) for _, r2 in pairs], dim=1)
    p = len(pairs)
    corr = _weight_grad(first.reshape(n, p * c, -1), second.reshape(n, p * c, -1), [kernel], groups=p)
    return corr.view(p, c, c, 2 * kernel - 1).permute(0, 3, 1, 2).reshape(-1, c, c)


def patch_gram_shifted(x: Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """Σ_{n,t} a_{n,t} a_{n,t}ᵀ for a stride-1, dilation-1 conv, as a dense (d, d) matrix with
    d = C·kh·kw ordered (c, ki, kj) like ``F.unfold``; computed in at least float32.

    Equal (up to rounding) to ``cols.T @ cols`` with ``cols`` the im2col matrix.

    Args:
        x: the (N, C, H, W) input.
        kernel_size: (kh, kw).
        padding: (ph, pw), zero padding.
    """
    if x.dim() != 4:
        raise ValueError(f"patch_gram_shifted: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    (kh, kw), (ph, pw) = kernel_size, padding
    n, c, h, w = x.shape
    if h + 2 * ph - kh + 1 < 1 or w + 2 * pw - kw + 1 < 1:
        raise ValueError(
            f"patch_gram_shifted: kernel {kernel_size} with padding {padding} does not fit a {h}x{w} input"
        )
    x = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    k = kh * kw
    if n == 0:  # an empty batch contributes nothing (the im2col Gram of zero rows)
        return x.new_zeros(c * k, c * k)
    plan = _plan(h, w, kh, kw, ph, pw)
    # (C, C, 2kh-1, 2kw-1), summed over chunks of about _CHUNK_PIXELS pixels: one float32 sum over
    # a whole large batch loses ~10x more digits (3.9e-4 vs 1.7e-5 relative at 1024x16x28x28,
    # bench/conv_a_cpu.py) and runs no faster.
    step = max(1, _CHUNK_PIXELS // (h * w))
    corr = _weight_grad(x[:step], x[:step], [kh, kw], groups=1)
    for start in range(step, n, step):
        chunk = x[start : start + step]
        corr += _weight_grad(chunk, chunk, [kh, kw], groups=1)
    dy, dx = plan.dy.to(x.device), plan.dx.to(x.device)
    blocks = corr[:, :, dy, dx]  # (C, C, K, K): [c, c', a, b]
    if plan.block.numel():
        items = []
        if plan.row_pairs:
            items.append(_pair_correlations(x, plan.row_pairs, axis=2, kernel=kw))
        if plan.col_pairs:
            items.append(_pair_correlations(x, plan.col_pairs, axis=3, kernel=kh))
        if plan.pixel_pairs:
            first = torch.stack([x[:, :, r, q] for r, q, _, _ in plan.pixel_pairs])  # (P, N, C)
            second = torch.stack([x[:, :, r, q] for _, _, r, q in plan.pixel_pairs])
            items.append(torch.bmm(first.transpose(1, 2), second))
        stacked = torch.cat(items)
        sign = plan.sign.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
        excess = x.new_zeros(k * k, c, c).index_add_(0, plan.block.to(x.device), stacked[plan.item.to(x.device)] * sign)
        blocks = blocks - excess.view(k, k, c, c).permute(2, 3, 0, 1)
    return blocks.permute(0, 2, 1, 3).reshape(c * k, c * k)


def patch_sums(x: Tensor, kernel_size: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """Σ_{n,t} a_{n,t} (d,), the bias row of the A factor: for each (c, ki, kj) the sum of the
    input over the window that kernel tap visits (2-D prefix sums, float64 then cast back).

    Args:
        x: the (N, C, H, W) input.
        kernel_size: (kh, kw).
        padding: (ph, pw), zero padding.
    """
    (kh, kw), (ph, pw) = kernel_size, padding
    n, c, h, w = x.shape
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    total = torch.nn.functional.pad(x.sum(0, dtype=torch.float64), (pw, pw, ph, ph))
    prefix = torch.nn.functional.pad(total.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, Hp+1, Wp+1)
    i = torch.arange(kh, device=x.device).repeat_interleave(kw)
    j = torch.arange(kw, device=x.device).repeat(kh)
    sums = prefix[:, i + oh, j + ow] - prefix[:, i, j + ow] - prefix[:, i + oh, j] + prefix[:, i, j]
    return sums.reshape(-1).to(torch.promote_types(x.dtype, torch.float32))


def conv_a_factor_shifted(
    state: Tensor,
    x: Tensor,
    kernel_size: tuple[int, int],
    padding: tuple[int, int],
    has_bias: bool,
    scale: float,
    decay: float,
) -> Tensor:
    """In place ``state = decay·state + scale·packed_upper(Σ a aᵀ)``, a = patch [+1]; the same
    contract as :func:`spngd_ext.ops.torch_path.conv_a_factor` for stride 1, dilation 1.

    Args:
        state: the packed accumulator.
        x: the (N, C, H, W) input.
        kernel_size: (kh, kw).
        padding: (ph, pw), zero padding.
        has_bias: append the constant 1 to every patch.
        scale: factor of the new Gram.
        decay: factor of the old state (0: overwrite).
    """
    gram = patch_gram_shifted(x, kernel_size, padding)
    if has_bias:
        n, _, h, w = x.shape
        count = n * (h + 2 * padding[0] - kernel_size[0] + 1) * (w + 2 * padding[1] - kernel_size[1] + 1)
        sums = patch_sums(x, kernel_size, padding).to(gram.dtype)
        d = gram.shape[0]
        full = gram.new_empty(d + 1, d + 1)
        full[:d, :d] = gram
        full[:d, d] = sums
        full[d, :d] = sums
        full[d, d] = count
        gram = full
    contrib = gram.reshape(-1)[triu_flat_index(gram.shape[0], gram.device)].to(state.dtype) * scale
    return decay_and_add(state, contrib, decay)
