"""Step-based learning-rate schedules: linear warm-up, then polynomial, cosine or constant.

Large-batch training needs the warm-up (the first steps at full rate diverge) and the decay is
what lets the last epochs settle; both are expressed per optimizer step, not per epoch, because
an epoch at batch 8192 is only a handful of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCHEDULES", "lr_factor_fn", "build_lr_scheduler"]

SCHEDULES = ("poly", "cosine", "constant")


def lr_factor_fn(
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "poly",
    poly_power: float = 2.0,
    final_factor: float = 0.0,
) -> Callable[[int], float]:
    """``factor(step)``: multiplier of the base LR for the update with index ``step`` (0-based).

    Warm-up rises linearly from 1/(warmup_steps+1) so the very first update is not zero. After
    warm-up the factor decays from 1 to ``final_factor`` at ``total_steps``:
    poly: ``(1 - p)^power``; cosine: ``(1 + cos(pi p)) / 2``; constant: 1, where ``p`` is the
    fraction of the post-warm-up steps done.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        if schedule == "poly":
            shape = (1.0 - progress) ** poly_power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return final_factor + (1.0 - final_factor) * shape

    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "poly",
    poly_power: float = 2.0,
    final_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped once per optimizer step (after ``optimizer.step()``)."""
    factor = lr_factor_fn(total_steps, warmup_steps, schedule, poly_power, final_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
