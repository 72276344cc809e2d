"""What every curvature layer provides: its statistics, how a forward/backward feeds them, and how
its gradient is laid out for preconditioning.

A layer type knows only its own math (which rows go into A, G or the BN Fisher). It accumulates
into views of a flat statistics buffer that the optimizer owns, so the buffer can be reduced and
communicated in one piece.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StatSpec:
    """One statistic of a layer: its name ("A", "G", "F"), element count and matrix size (0 for BN)."""

    name: str
    numel: int
    dim: int


class CurvatureLayer(abc.ABC):
    """Per-layer-type curvature math. Subclasses: Kronecker-factored (Linear, Conv2d) and BN."""

    kind: ClassVar[str]

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    # ---- description ----------------------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this layer preconditions (weight first)."""
        return [p for p in (self.module.weight, getattr(self.module, "bias", None)) if p is not None]

    @abc.abstractmethod
    def stat_specs(self) -> list[StatSpec]:
        """The statistics this layer accumulates, in buffer order."""

    @property
    def grad_numel(self) -> int:
        return sum(p.numel() for p in self.params)

    # ---- accumulation (called from hooks) ----------------------------------------------------
    @abc.abstractmethod
    def accumulate_forward(self, inputs: Tensor, output: Tensor, stats: dict[str, Tensor], first: bool, backend: str) -> tuple[object, int]:
        """Fold one call's input into the forward statistic; returns (context for the backward, count).

        ``first`` says this is the first contribution of the refresh (overwrite, decay 0).
        The count is the number of examples (or rows) the statistic is normalised by.
        """

    @abc.abstractmethod
    def accumulate_backward(self, grad_out: Tensor, context: object, stats: dict[str, Tensor], scale: float, first: bool, backend: str) -> int:
        """Fold one output gradient (times ``scale``) into the backward statistic; returns its count."""

    @abc.abstractmethod
    def forward_stat_names(self) -> tuple[str, ...]:
        """Statistics updated by the forward hook."""

    @abc.abstractmethod
    def backward_stat_names(self) -> tuple[str, ...]:
        """Statistics updated by the output-gradient hook."""


class KroneckerLayer(CurvatureLayer):
    """A layer whose Fisher block is approximated by A ⊗ G (bias folded into A)."""

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    @abc.abstractmethod
    def dim_a(self) -> int: ...

    @property
    @abc.abstractmethod
    def dim_g(self) -> int: ...

    def stat_specs(self) -> list[StatSpec]:
        return [
            StatSpec("A", self.dim_a * (self.dim_a + 1) // 2, self.dim_a),
            StatSpec("G", self.dim_g * (self.dim_g + 1) // 2, self.dim_g),
        ]

    def forward_stat_names(self) -> tuple[str, ...]:
        return ("A",)

    def backward_stat_names(self) -> tuple[str, ...]:
        return ("G",)

    def gradient_matrix(self, out: Tensor | None = None) -> Tensor:
        """[∇W | ∇b] as a (dim_g × dim_a) matrix; a missing grad (frozen parameter) reads as zero."""
        w = self.module.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        mat = gw.reshape(self.dim_g, -1)
        if self.has_bias:
            b = self.module.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            mat = torch.cat([mat, gb.reshape(-1, 1)], dim=1)
        return mat

    def split_update(self, u: Tensor) -> list[Tensor]:
        """The (dim_g × dim_a) update as per-parameter tensors shaped like ``params``."""
        w = self.module.weight
        if self.has_bias:
            return [u[:, :-1].reshape(w.shape), u[:, -1].reshape(self.module.bias.shape)]
        return [u.reshape(w.shape)]
