"""Every hyperparameter of SPNGD, defined once: :class:`SPNGDOptions`, and the enums for its strategies.

``SPNGD(model, **options)`` builds an :class:`SPNGDOptions` from its keyword arguments, so the
field list below is the optimizer's keyword API (names, defaults, validation and the ``ValueError``
messages naming the argument). The training CLI generates its SP-NGD flags from the same fields
(``--<name-with-dashes>``, type from the annotation, help from ``metadata["help"]``).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .refresh import StalePolicy

__all__ = ["Backend", "DampingSchedule", "FisherType", "Ownership", "SPNGDOptions", "options_doc"]

DampingSchedule = float | Callable[[int], float]


class FisherType(str, enum.Enum):
    """Which labels the curvature backward uses."""

    MC = "mc"  # labels sampled from the model: an unbiased estimate of the true Fisher
    EMP = "emp"  # the training labels: the empirical Fisher


class Backend(str, enum.Enum):
    """Where the curvature ops run; every op accepts the enum or its string value.

    AUTO: the CUDA kernels when the extension is built and the tensors are on a GPU, else PyTorch.
    CUDA: the kernels or an error. TORCH: always the pure-PyTorch path.
    """

    AUTO = "auto"
    CUDA = "cuda"
    TORCH = "torch"


class Ownership(str, enum.Enum):
    """How the curvature work is placed on ranks (docs/design.md, "Distributed design").

    STATISTIC: each statistic (A, G, each unit-wise Fisher) has its own owner; the owner of a
    layer's larger factor preconditions its gradient and receives the smaller factor's inverse.
    LAYER: one owner per layer (its statistics and its gradient), no inverse travels.
    """

    STATISTIC = "statistic"
    LAYER = "layer"


_COMM_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SPNGD: {name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"SPNGD: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"SPNGD: {name} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def _check_group_value(name: str, value: object, high: float | None) -> float:
    """lr, momentum, weight_decay: a finite number >= 0 (and < high)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0.0
        or (high is not None and value >= high)
    ):
        bound = ">= 0.0" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"SPNGD: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_interval(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SPNGD: {name} must be an integer >= 1, got {value!r}")
    return value


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class SPNGDOptions:
    """The hyperparameters of one SPNGD run, validated on construction (``ValueError`` naming the field).

    lr, momentum and weight_decay become the param_groups' defaults (schedulers change them there);
    everything else is fixed for the run.
    """

    lr: float = field(default=0.1, metadata=_help("learning rate (param_groups default)"))
    momentum: float = field(default=0.9, metadata=_help("momentum of the torch-SGD update (param_groups default)"))
    weight_decay: float = field(
        default=0.0, metadata=_help("L2 weight decay added to the update (param_groups default)")
    )
    damping: DampingSchedule = field(
        default=1e-3,
        metadata=_help("Tikhonov damping λ > 0, split between the Kronecker factors by π; or a callable step -> λ"),
    )
    fisher: FisherType = field(
        default=FisherType.MC,
        metadata=_help(
            "curvature labels: 'mc' samples them from the model (true Fisher), 'emp' uses the training labels"
        ),
    )
    mc_samples: int = field(default=1, metadata=_help("sampled-label backwards per refresh (fisher='mc')"))
    ema_decay: float | None = field(
        default=None,
        metadata=_help("factor EMA decay b in [0, 1) (estimate = b·old + (1−b)·new, bias-corrected); None: replace"),
    )
    curvature_interval: int = field(
        default=1,
        metadata=_help("refresh the curvature statistics every k steps (with stale: the default interval cap)"),
    )
    inverse_interval: int = field(
        default=1, metadata=_help("invert the factors every k steps (a multiple of curvature_interval, or smaller)")
    )
    kl_clip: float | None = field(
        default=None, metadata=_help("scale the update so that Σ lr²·⟨U, ∇⟩ <= kl_clip; None: no clipping")
    )
    backend: Backend = field(
        default=Backend.AUTO,
        metadata=_help("curvature ops: 'auto' (kernels on GPU), 'cuda' (kernels or error), 'torch' (pure PyTorch)"),
    )
    stale: bool | StalePolicy = field(
        default=False,
        metadata=_help("adaptive stale statistics: True (default StalePolicy) or a StalePolicy; False: fixed schedule"),
    )
    momentum_correction: bool = field(
        default=False,
        metadata=_help(
            "the recipe's momentum correction m·η_t/η_{t−1}: torch's update form already applies it, so the "
            "update is the same either way (docs/design.md, 'Momentum correction')"
        ),
    )
    weight_rescale: bool = field(
        default=False,
        metadata=_help("rescale Linear/Conv2d weights whose norm exceeds sqrt(2·fan_out) after each step"),
    )
    check_finite: bool = field(
        default=True,
        metadata=_help("skip a step whose gradients or statistics are not finite (one host sync per step)"),
    )
    max_inverse_retries: int = field(
        default=3, metadata=_help("retries of a failed factor inversion, each with 10x the damping")
    )
    seed: int | None = field(
        default=None, metadata=_help("seed of the sampled labels; None: from torch.initial_seed()")
    )
    compile_step: bool | str = field(
        default=False,
        metadata=_help(
            "run the step's tensor work (gradient gather; preconditioning, KL clip, weight decay, momentum, "
            "update) as torch.compile'd regions: True (Inductor) or a torch.compile backend name; False: eager"
        ),
    )
    ownership: Ownership = field(
        default=Ownership.STATISTIC,
        metadata=_help(
            "placement of the curvature work on ranks: 'statistic' (A, G and each norm Fisher owned "
            "separately) or 'layer' (one owner per layer)"
        ),
    )
    comm_dtype: torch.dtype | None = field(
        default=None,
        metadata=_help(
            "dtype of the curvature statistics on the wire (float32, bfloat16, float16); None: float32", cli=False
        ),
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "lr", _check_group_value("lr", self.lr, None))
        set_(self, "momentum", _check_group_value("momentum", self.momentum, 1.0))
        set_(self, "weight_decay", _check_group_value("weight_decay", self.weight_decay, None))
        if self.comm_dtype not in _COMM_DTYPES:
            raise ValueError(
                f"SPNGD: comm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {self.comm_dtype!r}"
            )
        if not callable(self.damping):
            _check_number("damping", self.damping, low=0.0, low_open=True)
        try:
            set_(self, "fisher", FisherType(self.fisher))
        except ValueError:
            raise ValueError(f"SPNGD: fisher must be 'mc' or 'emp', got {self.fisher!r}") from None
        try:
            set_(self, "ownership", Ownership(self.ownership))
        except ValueError:
            raise ValueError(f"SPNGD: ownership must be 'statistic' or 'layer', got {self.ownership!r}") from None
        try:
            set_(self, "backend", Backend(self.backend))
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
        if not isinstance(self.stale, (bool, StalePolicy)):
            raise ValueError(f"SPNGD: stale must be a bool or a StalePolicy, got {self.stale!r}")
        set_(self, "momentum_correction", bool(self.momentum_correction))
        set_(self, "weight_rescale", bool(self.weight_rescale))
        if self.seed is not None:
            set_(self, "seed", int(self.seed))
        if not isinstance(self.compile_step, (bool, str)):
            raise ValueError(
                f"SPNGD: compile_step must be a bool or a torch.compile backend name, got {self.compile_step!r}"
            )
        if isinstance(self.compile_step, str):
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_step not in known:
                raise ValueError(
                    f"SPNGD: compile_step must be a bool or a torch.compile backend ({', '.join(known)}), "
                    f"got {self.compile_step!r}"
                )

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> SPNGDOptions:
        """Options from keyword arguments; ``TypeError`` naming an unknown one (as a signature would).

        Args:
            options: keyword arguments, each the name of a field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"SPNGD got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(sorted(names))}"
            )
        return cls(**options)

    @property
    def stale_policy(self) -> StalePolicy | None:
        """The adaptive refresh policy, or None for the fixed schedule."""
        if self.stale is True:
            return StalePolicy()
        return self.stale or None

    @property
    def compile_backend(self) -> str | None:
        """The ``torch.compile`` backend of the step's regions (None: the step runs eagerly)."""
        if self.compile_step is False:
            return None
        return "inductor" if self.compile_step is True else self.compile_step

    def damping_at(self, step: int) -> float:
        """λ for a step (schedules are called with the 0-based step index)."""
        value = self.damping(step) if callable(self.damping) else self.damping
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"SPNGD: damping schedule returned {value!r} at step {step}; expected a finite number > 0")
        return float(value)


def options_doc(indent: str = "        ") -> str:
    """The ``Args:`` lines of every option (name, default, help), for docstrings.

    Args:
        indent: the indentation of each line.
    """
    lines = []
    for f in dataclasses.fields(SPNGDOptions):
        default = f.default.value if isinstance(f.default, enum.Enum) else f.default
        lines.append(f"{indent}{f.name} (default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
