"""π-factored Tikhonov damping (Martens & Grosse 2015), computed on the device.

π = sqrt((tr A / dim A) / (tr G / dim G)); Â = A + π√λ I, Ĝ = G + (√λ/π) I. π = 1 when either
trace is zero or not finite. Moving a factor T between A and G leaves Ĝ⁻¹ ∇ Â⁻¹ unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pi_damping(trace_a: Tensor, dim_a: Tensor | int, trace_g: Tensor, dim_g: Tensor | int, damping: float) -> tuple[Tensor, Tensor]:
    """Per-layer diagonal shifts (for A, for G); all arguments may be batched 1-D tensors."""
    mean_a = trace_a / dim_a
    mean_g = trace_g / dim_g
    ok = torch.isfinite(mean_a) & torch.isfinite(mean_g) & (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(ok, mean_a, torch.ones_like(mean_a)) / torch.where(ok, mean_g, torch.ones_like(mean_g))
    pi = torch.where(ok, torch.sqrt(ratio), torch.ones_like(ratio))
    root = math.sqrt(damping)
    return pi * root, root / pi
