"""Training-batch augmentation: random shifts and horizontal flips of whole image batches.

The training loop keeps the dataset on its device as one tensor, so augmentation works on a
gathered batch there, in two parts:

* :func:`draw_shift_flip` draws every example's shift and flip on the CPU from a seeded
  generator. The training loop draws them for the whole global batch and gives each rank its
  slice, so a run sees the same augmented examples whatever its number of ranks.
* :func:`apply_shift_flip` moves the images: one padded copy and one gather, no per-example loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augmentation", "ShiftFlip", "check_max_shift", "draw_shift_flip", "apply_shift_flip"]


class Augmentation(str, enum.Enum):
    """What ``--augment`` does to each training batch."""

    NONE = "none"
    SHIFT_FLIP = "shift-flip"  # shift by up to 2 pixels each way, then flip half the images


@dataclass(frozen=True)
class ShiftFlip:
    """Per-example parameters: output pixel (i, j) reads input pixel (i - dy, j - dx)."""

    dy: torch.Tensor  # (N,) int64 in [-max_shift, max_shift]
    dx: torch.Tensor  # (N,) int64 in [-max_shift, max_shift]
    flip: torch.Tensor  # (N,) bool: mirror left-right after the shift

    def __len__(self) -> int:
        return self.dy.shape[0]

    def select(self, index: torch.Tensor) -> ShiftFlip:
        """The parameters of the examples ``index`` (a rank's slice of the global batch)."""
        return ShiftFlip(self.dy[index], self.dx[index], self.flip[index])


def check_max_shift(shift_y: int, shift_x: int, height: int, width: int) -> None:
    """A shift must leave part of the image in view: |dy| < height and |dx| < width."""
    if shift_y >= height or shift_x >= width:
        raise ValueError(
            f"a shift of up to ({shift_y}, {shift_x}) pixels (rows, columns) empties a "
            f"{height}x{width} image; use a smaller --max-shift"
        )


def draw_shift_flip(n: int, *, max_shift: int, generator: torch.Generator) -> ShiftFlip:
    """Uniform shifts in [-max_shift, max_shift] on each axis and a fair coin per flip."""
    if n < 0:
        raise ValueError(f"draw_shift_flip: n must be >= 0, got {n}")
    if max_shift < 0:
        raise ValueError(f"draw_shift_flip: max_shift must be >= 0, got {max_shift}")
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return ShiftFlip(dy, dx, flip)


def apply_shift_flip(x: torch.Tensor, params: ShiftFlip, *, fill: float) -> torch.Tensor:
    """Shift each image of ``x`` (N, C, H, W) by its (dy, dx), then mirror the flagged ones.

    Pixels shifted in from outside the image take the value ``fill`` (for normalised data, the
    normalised value of a blank pixel). Returns a new contiguous tensor; ``x`` is not changed.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_shift_flip: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if len(params) != n:
        raise ValueError(f"apply_shift_flip: {len(params)} shift/flip parameters for {n} images")
    if n == 0:
        return x.clone()
    shift_y, shift_x = int(params.dy.abs().max()), int(params.dx.abs().max())  # CPU: no device sync
    check_max_shift(shift_y, shift_x, h, w)
    shift = max(shift_y, shift_x)
    padded = F.pad(x, (shift, shift, shift, shift), value=fill)
    dy, dx, flip = torch.stack([params.dy, params.dx, params.flip.long()]).to(x.device)  # one copy
    flip = flip.bool()
    rows = torch.arange(h, device=x.device) + shift - dy[:, None]  # (N, H)
    cols = torch.arange(w, device=x.device) + shift - dx[:, None]  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    examples = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: (N, H, W, C).
    out = padded[examples, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
