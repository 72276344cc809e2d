"""The one update rule every accumulating op ends with."""

from __future__ import annotations

from torch import Tensor

__all__ = ["decay_and_add"]


def decay_and_add(state: Tensor, contrib: Tensor, decay: float) -> Tensor:
    """In place ``state = decay·state + contrib``; ``decay == 0`` overwrites, so whatever ``state``
    held (NaN included) is ignored, as BLAS treats beta = 0. Returns ``state``."""
    if decay == 0:
        state.copy_(contrib)
    else:
        state.mul_(decay).add_(contrib)
    return state
