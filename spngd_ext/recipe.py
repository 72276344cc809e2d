"""SP-NGD's large-batch recipe pieces that are not the optimizer itself.

* :func:`damping_schedule` — start from a larger damping and move geometrically to the base value
  over a warm-up, then optionally decay geometrically to a final value (pass it as ``damping=``).
* :func:`rescaled_weight_norm_limit` — the norm bound √(2·fan_out) used by ``SPNGD(weight_rescale=True)``.

Polynomial learning-rate decay with warm-up lives in :mod:`spngd_ext.train.schedules`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


def damping_schedule(
    base: float,
    *,
    warmup_steps: int = 0,
    warmup_factor: float = 10.0,
    decay_steps: int = 0,
    final: float | None = None,
) -> Callable[[int], float]:
    """λ(step): base·warmup_factor at step 0, geometric to ``base`` at ``warmup_steps``, then
    geometric to ``final`` over the next ``decay_steps`` steps, constant afterwards.

    Args:
        base: the damping after the warm-up (> 0).
        warmup_steps: length of the warm-up (0: none).
        warmup_factor: the damping at step 0 is base·warmup_factor (>= 1).
        decay_steps: steps over which to move from base to final (0: none).
        final: the damping after the decay (None: base).
    """
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(f"damping_schedule: base must be a finite number > 0, got {base!r}")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError("damping_schedule: warmup_steps and decay_steps must be >= 0")
    if warmup_factor < 1:
        raise ValueError(f"damping_schedule: warmup_factor must be >= 1, got {warmup_factor}")
    if final is not None and not (final > 0 and math.isfinite(final)):
        raise ValueError(f"damping_schedule: final must be a finite number > 0, got {final!r}")
    if final is not None and decay_steps == 0:
        raise ValueError("damping_schedule: final needs decay_steps > 0 (the steps over which to reach it)")
    end = base if final is None else final

    def damping(step: int) -> float:
        if step < warmup_steps:
            return base * warmup_factor ** (1.0 - step / warmup_steps)
        t = step - warmup_steps
        if decay_steps == 0 or t >= decay_steps:
            return end
        return base * (end / base) ** (t / decay_steps)

    return damping


def rescaled_weight_norm_limit(module: nn.Module) -> float:
    """√(2·fan_out) for a Linear (fan_out = out_features) or Conv2d (out_channels·kh·kw)."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
    elif isinstance(module, nn.Linear):
        fan_out = module.out_features
    else:
        raise TypeError(f"rescaled_weight_norm_limit: Linear or Conv2d expected, got {type(module).__name__}")
    return math.sqrt(2.0 * fan_out)
