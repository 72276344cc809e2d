"""The configurations the whole-step benchmark times: SGD and SP-NGD variants, each on its own model.

:class:`Config` is one timed configuration (a model, its optimizer, its measurements);
:func:`build_configs` builds the named ones (:data:`SPNGD_CONFIGS`) on copies of one model, and
:func:`random_batches` the inputs. The timing core that runs them is :mod:`spngd_ext.bench.step`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

__all__ = [
    "PERIOD",
    "SPNGD_CONFIGS",
    "Config",
    "ConfigUnavailable",
    "build_config",
    "build_configs",
    "random_batches",
]

PERIOD = 100  # longest refresh period among the configurations (inverses every 100 steps)
# name -> SPNGD keyword arguments beyond the common ones
SPNGD_CONFIGS: dict[str, dict] = {
    "spngd-every-step": {"curvature_interval": 1, "inverse_interval": 1},
    "spngd-10/100": {"curvature_interval": 10, "inverse_interval": 100},
    "spngd-stale": {"stale": True, "curvature_interval": 100, "inverse_interval": 1},
    "spngd-every-step-cuda": {"curvature_interval": 1, "inverse_interval": 1, "backend": "cuda"},
    "spngd-every-step-torch": {"curvature_interval": 1, "inverse_interval": 1, "backend": "torch"},
}


class ConfigUnavailable(Exception):
    """A configuration cannot run here (e.g. backend="cuda" without kernels); the message says why."""


@dataclass
class Config:
    """One timed configuration: a model, its optimizer, and what was measured.

    Args:
        name: the configuration's name in tables.
        kind: "sgd", "spngd", or another optimizer family (then ``step_fn`` is required).
        model: the model it trains.
        optimizer: its optimizer.
        step_fn: the whole step for other kinds: ``step_fn(x, y)`` returns the detached loss.
        next_kind_fn: for other kinds, what the coming step will do ("plain", "factors",
            "factors+inverse").
        counters_fn: for other kinds, the work counters (``steps``, ``factor_updates``, ...).
    """

    name: str
    kind: str
    model: nn.Module
    optimizer: Any  # a torch.optim.Optimizer; SPNGD's counters and backward are used for kind "spngd"
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    next_kind_fn: Callable[[], str] | None = None
    counters_fn: Callable[[], dict] | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads)
    step_kinds: list[str] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    counters_start: dict = field(default_factory=dict)
    counters_end: dict = field(default_factory=dict)
    final_intervals: dict | None = None  # SP-NGD: refresh interval of every statistic at the end

    def run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One whole training step; returns the (detached) loss."""
        if self.step_fn is not None:
            with record_function(f"bench::{self.kind}_step"):
                return self.step_fn(x, y)
        opt = self.optimizer
        with record_function("bench::zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("bench::forward"):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        with record_function("bench::backward"):
            if self.kind == "spngd":
                opt.backward(loss, out)
            else:
                loss.backward()
        with record_function("bench::step"):
            opt.step()
        return loss.detach()

    def next_step_kind(self) -> str:
        """What the coming step will do: plain, factor refresh, or factor refresh + inversion."""
        return self.next_kind_fn() if self.next_kind_fn is not None else "plain"

    def refresh_counts(self) -> tuple[int, int]:
        if self.kind != "spngd":
            return (0, 0)
        c = self.optimizer.counters
        return c["factor_updates"], c["inverse_updates"]

    @staticmethod
    def kind_from_counts(before: tuple[int, int], after: tuple[int, int]) -> str:
        if after[1] > before[1]:
            return "factors+inverse"
        return "factors" if after[0] > before[0] else "plain"

    def counters(self) -> dict:
        if self.kind == "spngd":
            c = self.optimizer.counters
            return {
                k: c[k]
                for k in (
                    "steps",
                    "factor_updates",
                    "inverse_updates",
                    "skipped_steps",
                    "mc_backwards",
                    "inversion_fallbacks",
                )
            }
        if self.counters_fn is not None:
            return self.counters_fn()
        return {}


def build_config(name: str, model: nn.Module, lr: float, seed: int) -> Config:
    """``sgd`` or one of :data:`SPNGD_CONFIGS` for ``model`` (momentum 0.9, weight decay 5e-4,
    damping 1e-3); raises :class:`ConfigUnavailable` when it cannot run here.

    Args:
        name: the configuration.
        model: the model, already on its device.
        lr: learning rate (0 by default in the benchmarks: see the module docstring).
        seed: SP-NGD's Monte-Carlo sampling seed.
    """
    from .. import SPNGD

    if name == "sgd":
        return Config(name, "sgd", model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4))
    if name not in SPNGD_CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from sgd, {', '.join(SPNGD_CONFIGS)}")
    try:
        opt = SPNGD(model, lr=lr, momentum=0.9, weight_decay=5e-4, damping=1e-3, seed=seed, **SPNGD_CONFIGS[name])
    except (RuntimeError, ValueError) as exc:  # backend="cuda" without kernels or GPU
        raise ConfigUnavailable(str(exc).splitlines()[0]) from exc
    return Config(name, "spngd", model, opt)


def build_configs(
    names: list[str], base: nn.Module, device: torch.device, lr: float, seed: int
) -> tuple[list[Config], dict]:
    """One :class:`Config` per name, each on its own copy of ``base``; (configs, {skipped name: why}).

    Args:
        names: configuration names; "sgd" must be first (it is the reference).
        base: the model to copy.
        device: where the copies live.
        lr: learning rate of every optimizer.
        seed: SP-NGD's sampling seed.
    """
    configs, skipped = [], {}
    for name in names:
        try:
            configs.append(build_config(name, copy.deepcopy(base).to(device), lr, seed))
        except ConfigUnavailable as exc:
            skipped[name] = str(exc)
    if not configs or configs[0].name != "sgd":
        raise ValueError("the sgd baseline must be the first configuration (it is the reference)")
    return configs, skipped


def random_batches(
    batch: int, n: int, example_shape: tuple[int, ...], classes: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of N(0, 1) inputs and uniform labels (round r uses batch r mod n).

    Args:
        batch: examples per batch.
        n: how many distinct batches.
        example_shape: shape of one input example.
        classes: number of labels.
        device: where the batches live.
        seed: seeds the batches' generator.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        (
            torch.randn(batch, *example_shape, generator=g, device=device),
            torch.randint(0, classes, (batch,), generator=g, device=device),
        )
        for _ in range(n)
    ]
