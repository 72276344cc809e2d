"""The optimizer's curvature state, one concept per module.

* :mod:`.buffers` — the flat accumulator, estimate and gradient buffers, and views into them;
* :mod:`.accumulation` — which statistics are due this step and what the hooks collected;
* :mod:`.estimates` — finalising a refresh (EMA), bias correction, change measurement, export;
* :mod:`.inverses` — π-damping, batched inversion with retries, the inverse cache;
* :mod:`.preconditioner` — preconditioning the owned gradients and the KL-clip sum.

Each part checkpoints and validates its own piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..distributed.segments import SegmentLayout
from ..layers import CurvatureLayer
from ..options import SPNGDOptions
from .accumulation import Accumulation
from .buffers import FlatBuffers
from .estimates import Estimates
from .inverses import InverseCache, InversionEvents
from .preconditioner import Preconditioner

__all__ = [
    "CurvatureState",
    "FlatBuffers",
    "Accumulation",
    "Estimates",
    "InverseCache",
    "InversionEvents",
    "Preconditioner",
]


@dataclass
class CurvatureState:
    """The parts of one rank's curvature state, wired together."""

    buffers: FlatBuffers
    accumulation: Accumulation
    estimates: Estimates
    inverses: InverseCache
    preconditioner: Preconditioner

    @classmethod
    def build(
        cls,
        layers: Sequence[CurvatureLayer],
        layout: SegmentLayout,
        rank: int,
        options: SPNGDOptions,
        plain_params: Sequence[nn.Parameter],
    ) -> CurvatureState:
        """The state of rank ``rank``.

        Args:
            layers: the curvature layers.
            layout: both buffers' segments and the owner of every statistic and gradient (one
                entry per layer, then one for the plain parameters if any); the two factors of a
                Kronecker layer may have different owners (the smaller one's inverse then travels
                to the gradient owner, see :class:`InverseCache`).
            rank: this process's rank.
            options: the optimizer's options (EMA decay, inversion retries).
            plain_params: parameters outside curvature layers.
        """
        grad_owners = layout.assignment.grad_owners
        owned = [i for i in range(len(layers)) if grad_owners[i] == rank]
        owned_stats = [(i, n) for i, n in layout.owned_statistics(rank) if i < len(layers)]
        plain_owned = bool(plain_params) and grad_owners[len(layers)] == rank
        buffers = FlatBuffers(layers, layout, rank, plain_params)
        accumulation = Accumulation(layers, buffers)
        estimates = Estimates(layers, buffers, owned_stats, options.ema_decay)
        policy = options.stale_policy
        accumulation.split_halves = estimates.noise_aware = policy is not None and policy.rule == "noise"
        inverses = InverseCache(layers, buffers, estimates, owned, options.max_inverse_retries)
        preconditioner = Preconditioner(layers, buffers, estimates, inverses, owned, plain_owned)
        return cls(buffers, accumulation, estimates, inverses, preconditioner)
