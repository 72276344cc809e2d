"""--augment shift-flip: the batched shift and flip against a per-pixel loop, and its checks."""

from __future__ import annotations

import pytest
import torch

from spngd_ext.train.augment import ShiftFlip, apply_shift_flip, draw_shift_flip


def shifted_and_flipped_by_loop(x: torch.Tensor, p: ShiftFlip, fill: float) -> torch.Tensor:
    """Output pixel (i, j) reads input (i - dy, j - dx), else ``fill``; then mirror if flagged."""
    n, _, h, w = x.shape
    out = torch.full_like(x, fill)
    for k in range(n):
        dy, dx = int(p.dy[k]), int(p.dx[k])
        for i in range(h):
            for j in range(w):
                if 0 <= i - dy < h and 0 <= j - dx < w:
                    out[k, :, i, j] = x[k, :, i - dy, j - dx]
        if p.flip[k]:
            out[k] = out[k].flip(-1)
    return out


@pytest.mark.parametrize(
    "shape, max_shift",
    [
        ((1, 1, 1, 1), 0),
        ((5, 1, 28, 28), 2),
        ((7, 3, 5, 6), 2),
        ((4, 2, 9, 4), 3),
        ((9, 1, 3, 7), 1),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_per_pixel_loop(shape, max_shift: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    params = draw_shift_flip(shape[0], max_shift=max_shift, generator=gen)
    before = x.clone()
    out = apply_shift_flip(x, params, fill=-7.5)
    assert torch.equal(out, shifted_and_flipped_by_loop(x, params, -7.5))
    assert torch.equal(x, before) and out.is_contiguous() and out.dtype == x.dtype


def test_zero_shift_without_flip_is_the_identity() -> None:
    x = torch.randn(3, 2, 4, 5)
    zero = torch.zeros(3, dtype=torch.int64)
    out = apply_shift_flip(x, ShiftFlip(zero, zero, torch.zeros(3, dtype=torch.bool)), fill=1.0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_one_known_shift_and_flip() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    down_right = ShiftFlip(torch.tensor([1]), torch.tensor([1]), torch.tensor([False]))
    assert apply_shift_flip(x, down_right, fill=-1.0)[0, 0].tolist() == [[-1, -1, -1], [-1, 0, 1], [-1, 3, 4]]
    flipped = ShiftFlip(torch.tensor([0]), torch.tensor([0]), torch.tensor([True]))
    assert apply_shift_flip(x, flipped, fill=-1.0)[0, 0].tolist() == [[2, 1, 0], [5, 4, 3], [8, 7, 6]]


def test_draws_cover_the_range_and_repeat_with_the_seed() -> None:
    a = draw_shift_flip(4000, max_shift=2, generator=torch.Generator().manual_seed(3))
    b = draw_shift_flip(4000, max_shift=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.dy, b.dy) and torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    assert set(a.dy.tolist()) == set(a.dx.tolist()) == {-2, -1, 0, 1, 2}
    assert 0.45 < a.flip.float().mean() < 0.55


def test_select_takes_a_ranks_slice() -> None:
    p = draw_shift_flip(10, max_shift=2, generator=torch.Generator().manual_seed(0))
    index = torch.arange(10).tensor_split(3)[1]
    part = p.select(index)
    assert len(part) == len(index) and torch.equal(part.dx, p.dx[index])
    assert torch.equal(part.flip, p.flip[index]) and torch.equal(part.dy, p.dy[index])


def test_a_wide_image_takes_a_shift_as_tall_as_itself_sideways() -> None:
    """The limit is per axis: a 2x5 image can move 4 columns but only 1 row."""
    x = torch.randn(1, 1, 2, 5)
    p = ShiftFlip(torch.tensor([1]), torch.tensor([4]), torch.tensor([False]))
    assert torch.equal(apply_shift_flip(x, p, fill=0.0), shifted_and_flipped_by_loop(x, p, 0.0))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_slices_add_up_to_the_single_process_batch(world: int) -> None:
    """What the training loop does: parameters drawn for the global batch, each rank applying its
    slice to its examples. Concatenated over ranks, that is the single-process augmented batch."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(11, 1, 6, 6, generator=gen)
    params = draw_shift_flip(11, max_shift=2, generator=gen)
    whole = apply_shift_flip(x, params, fill=-1.0)
    parts = [apply_shift_flip(x[mine], params.select(mine), fill=-1.0) for mine in torch.arange(11).tensor_split(world)]
    assert torch.equal(torch.cat(parts), whole)


def test_empty_batch() -> None:
    p = draw_shift_flip(0, max_shift=2, generator=torch.Generator())
    assert apply_shift_flip(torch.empty(0, 1, 4, 4), p, fill=0.0).shape == (0, 1, 4, 4)


@pytest.mark.parametrize(
    "call, complaint",
    [
        (
            lambda: apply_shift_flip(
                torch.zeros(2, 4, 4),
                ShiftFlip(*[torch.zeros(2, dtype=torch.int64)] * 2, torch.zeros(2, dtype=torch.bool)),
                fill=0.0,
            ),
            r"x must be \(N, C, H, W\)",
        ),
        (
            lambda: apply_shift_flip(
                torch.zeros(3, 1, 4, 4), draw_shift_flip(2, max_shift=1, generator=torch.Generator()), fill=0.0
            ),
            "2 shift/flip parameters for 3 images",
        ),
        (
            lambda: apply_shift_flip(
                torch.zeros(1, 1, 2, 5),
                ShiftFlip(torch.tensor([2]), torch.tensor([0]), torch.tensor([False])),
                fill=0.0,
            ),
            r"a shift of up to \(2, 0\) pixels \(rows, columns\) empties a 2x5 image",
        ),
        (lambda: draw_shift_flip(3, max_shift=-1, generator=torch.Generator()), "max_shift must be >= 0"),
        (lambda: draw_shift_flip(-1, max_shift=1, generator=torch.Generator()), "n must be >= 0"),
    ],
)
def test_bad_input_is_a_clear_error(call, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        call()
