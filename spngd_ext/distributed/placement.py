"""Which rank owns (damps, inverts, preconditions) each layer: pure logic, no processes.

Cost model per layer (relative units): inverting a d×d factor costs d³, holding it d², and
preconditioning a d_out × d_in gradient costs d_out·d_in·(d_out + d_in). Layers are placed by
greedy longest-processing-time: heaviest first, each onto the rank with the least load so far
(ties to the lowest rank), which is deterministic and within 4/3 of the optimal makespan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LayerCost:
    """What one layer asks of its owner."""

    name: str
    factor_dims: tuple[int, ...] = ()  # Kronecker factor sizes (A, G); empty for BN/plain params
    grad_shape: tuple[int, int] = (0, 0)  # (d_out, d_in) of the preconditioned gradient
    elementwise: int = 0  # elements of BN statistics or plain parameters (linear cost)

    def compute(self) -> float:
        inv = sum(float(d) ** 3 for d in self.factor_dims)
        d_out, d_in = self.grad_shape
        pre = float(d_out) * d_in * (d_out + d_in) if self.factor_dims else 0.0
        return inv + pre + float(self.elementwise)

    def memory(self) -> float:
        return sum(float(d) ** 2 for d in self.factor_dims) + float(self.elementwise)


@dataclass(frozen=True)
class OwnerAssignment:
    """The owner of each layer, plus the modelled load per rank."""

    owners: tuple[int, ...]
    compute_load: tuple[float, ...]
    memory_load: tuple[float, ...]

    @classmethod
    def balance(cls, costs: Sequence[LayerCost], world_size: int, memory_weight: float = 0.0) -> "OwnerAssignment":
        """Greedy LPT over ``compute + memory_weight·memory``; works for any number of ranks."""
        if world_size < 1:
            raise ValueError(f"OwnerAssignment.balance: world_size must be >= 1, got {world_size}")
        weights = [c.compute() + memory_weight * c.memory() for c in costs]
        order = sorted(range(len(costs)), key=lambda i: (-weights[i], i))
        load = [0.0] * world_size
        comp = [0.0] * world_size
        mem = [0.0] * world_size
        owners = [0] * len(costs)
        for i in order:
            r = min(range(world_size), key=lambda k: (load[k], k))
            owners[i] = r
            load[r] += weights[i]
            comp[r] += costs[i].compute()
            mem[r] += costs[i].memory()
        return cls(tuple(owners), tuple(comp), tuple(mem))

    def layers_of(self, rank: int) -> list[int]:
        return [i for i, o in enumerate(self.owners) if o == rank]

    @property
    def imbalance(self) -> float:
        """max load / mean load (1.0 is perfect)."""
        total = sum(self.compute_load)
        if total == 0:
            return 1.0
        return max(self.compute_load) / (total / len(self.compute_load))
