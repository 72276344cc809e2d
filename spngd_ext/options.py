"""Hyperparameters of SPNGD as a frozen, validated dataclass, and the enums for its strategies."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Union

DampingSchedule = Union[float, Callable[[int], float]]


class FisherType(str, enum.Enum):
    """Which labels the curvature backward uses."""

    MC = "mc"  # labels sampled from the model: an unbiased estimate of the true Fisher
    EMP = "emp"  # the training labels: the empirical Fisher


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    TORCH = "torch"


def _check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SPNGD: {name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"SPNGD: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"SPNGD: {name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def _check_interval(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SPNGD: {name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class CurvatureOptions:
    """Everything about the curvature estimate that is fixed for a run (lr & co. live in param_groups)."""

    damping: DampingSchedule = 1e-3
    fisher: FisherType = FisherType.MC
    mc_samples: int = 1
    ema_decay: float | None = None
    curvature_interval: int = 1
    inverse_interval: int = 1
    kl_clip: float | None = None
    backend: Backend = Backend.AUTO
    check_finite: bool = True
    max_inverse_retries: int = 3

    def __post_init__(self) -> None:
        if callable(self.damping):
            pass
        else:
            _check_number("damping", self.damping, low=0.0, low_open=True)
        try:
            object.__setattr__(self, "fisher", FisherType(self.fisher))
        except ValueError:
            raise ValueError(f"SPNGD: fisher must be 'mc' or 'emp', got {self.fisher!r}") from None
        try:
            object.__setattr__(self, "backend", Backend(self.backend))
        except ValueError:
            raise ValueError(f"SPNGD: backend must be 'auto', 'cuda' or 'torch', got {self.backend!r}") from None
        _check_interval("mc_samples", self.mc_samples)
        _check_interval("curvature_interval", self.curvature_interval)
        _check_interval("inverse_interval", self.inverse_interval)
        if self.inverse_interval % self.curvature_interval != 0 and self.inverse_interval > self.curvature_interval:
            # Inverting stale factors again would waste work; say what is meant instead.
            raise ValueError(
                "SPNGD: inverse_interval must be a multiple of curvature_interval (or smaller), got "
                f"inverse_interval={self.inverse_interval}, curvature_interval={self.curvature_interval}"
            )
        if self.ema_decay is not None:
            _check_number("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        if self.kl_clip is not None:
            _check_number("kl_clip", self.kl_clip, low=0.0, low_open=True)
        if not isinstance(self.max_inverse_retries, int) or self.max_inverse_retries < 0:
            raise ValueError(f"SPNGD: max_inverse_retries must be an integer >= 0, got {self.max_inverse_retries!r}")

    def damping_at(self, step: int) -> float:
        """λ for a step (schedules are called with the 0-based step index)."""
        value = self.damping(step) if callable(self.damping) else self.damping
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"SPNGD: damping schedule returned {value!r} at step {step}; expected a finite number > 0")
        return float(value)
