"""Which rank owns (damps, inverts, preconditions) each layer or each statistic: pure logic.

Two placements, both deterministic functions of their arguments (every rank computes the same
one without communicating):

* :class:`OwnerAssignment`: one owner per layer (A, G and the gradient together), greedy LPT
  over the per-layer cost below.
* :class:`StatisticAssignment`: one owner per statistic (A, G and each BatchNorm Fisher may land
  on different ranks). The gradient of a Kronecker layer goes to the owner of its larger factor,
  which receives the smaller factor's packed inverse when that has another owner (see
  docs/scaling.md, "Ownership per statistic", for why this beats splitting the preconditioning).

Cost model per layer (relative units): inverting a d×d factor costs d³, holding it d², and
preconditioning a d_out × d_in gradient costs d_out·d_in·(d_out + d_in). Layers are placed by
greedy longest-processing-time: heaviest first, each onto the rank with the least load so far
(ties to the lowest rank), which is deterministic and within 4/3 of the optimal makespan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """What one layer asks of its owner.

    Args:
        name: the layer's name (only for messages).
        factor_dims: its Kronecker factor sizes (A, G); empty for BatchNorm and plain parameters.
        grad_shape: (d_out, d_in) of the preconditioned gradient.
        elementwise: elements of BatchNorm statistics or plain parameters (linear cost).
    """

    name: str
    factor_dims: tuple[int, ...] = ()  # Kronecker factor sizes (A, G); empty for BN/plain params
    grad_shape: tuple[int, int] = (0, 0)  # (d_out, d_in) of the preconditioned gradient
    elementwise: int = 0  # elements of BN statistics or plain parameters (linear cost)

    def compute(self) -> float:
        """Modelled work: d³ per factor inversion, d_out·d_in·(d_out + d_in) for preconditioning a
        Kronecker layer's gradient, plus the elementwise count."""
        inv = sum(float(d) ** 3 for d in self.factor_dims)
        d_out, d_in = self.grad_shape
        pre = float(d_out) * d_in * (d_out + d_in) if self.factor_dims else 0.0
        return inv + pre + float(self.elementwise)

    def memory(self) -> float:
        """Modelled memory: d² per factor plus the elementwise count."""
        return sum(float(d) ** 2 for d in self.factor_dims) + float(self.elementwise)


@dataclass(frozen=True)
class OwnerAssignment:
    """The owner of each layer, plus the modelled load per rank.

    Args:
        owners: per layer, its owning rank.
        compute_load: per rank, the summed :meth:`LayerCost.compute` of its layers.
        memory_load: per rank, the summed :meth:`LayerCost.memory` of its layers.
    """

    owners: tuple[int, ...]
    compute_load: tuple[float, ...]
    memory_load: tuple[float, ...]

    @classmethod
    def balance(cls, costs: Sequence[LayerCost], world_size: int, memory_weight: float = 0.0) -> OwnerAssignment:
        """Greedy LPT over ``compute + memory_weight·memory``; works for any number of ranks.

        Args:
            costs: every layer's cost, in the optimizer's order.
            world_size: number of ranks (>= 1).
            memory_weight: weight of the memory model against the compute model (0: compute only).
        """
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
        """Indices of the layers ``rank`` owns, in layer order.

        Args:
            rank: the owner.
        """
        return [i for i, o in enumerate(self.owners) if o == rank]

    @property
    def imbalance(self) -> float:
        """max load / mean load (1.0 is perfect)."""
        total = sum(self.compute_load)
        if total == 0:
            return 1.0
        return max(self.compute_load) / (total / len(self.compute_load))


# --------------------------------------------------------------------------------------------
# Ownership per statistic


@dataclass(frozen=True)
class StatisticSpec:
    """One statistic of a layer, as the placement sees it.

    Args:
        name: the statistic's name within its layer ("A", "G", "F").
        dim: the matrix size d of a Kronecker factor (its inverse costs d³); 0 for a statistic
            that is solved elementwise (BatchNorm's unit-wise Fisher).
        numel: elements it occupies in the statistics buffer (packed upper triangle, or 3·C).
    """

    name: str
    dim: int
    numel: int


@dataclass(frozen=True)
class LayerStatistics:
    """What one layer contributes to the placement.

    Args:
        name: the layer's name (only for messages).
        stats: its statistics; empty for parameters that take the plain-gradient path.
        grad_numel: elements of its gradient segment.
        grad_shape: (d_out, d_in) of a Kronecker layer's gradient matrix; (0, 0) otherwise.
        splittable: whether its statistics may have different owners (a layer that caches one
            inverse per factor); False places all of them, and the gradient, as one item.
    """

    name: str
    stats: tuple[StatisticSpec, ...]
    grad_numel: int
    grad_shape: tuple[int, int] = (0, 0)
    splittable: bool = True

    def anchor(self) -> str | None:
        """The statistic whose owner also owns (and preconditions) the gradient: the larger
        Kronecker factor (A on a tie), or the only statistic; None without statistics."""
        if not self.stats:
            return None
        return max(self.stats, key=lambda s: s.dim).name if len(self.stats) > 1 else self.stats[0].name

    def item_costs(self) -> list[tuple[str | None, float, float]]:
        """(statistic or None for a stat-less gradient, compute, bytes) of each placement item.

        Compute: d³ for inverting a d×d factor; the anchor adds d_out·d_in·(d_out + d_in) for
        both multiplications of the preconditioning; elementwise statistics cost 2·numel.
        Bytes (elements moved per refresh): the statistic and its count, and for the anchor the
        gradient twice (reduced to, then gathered from its owner). A layer that is not
        :attr:`splittable` is one item: the sum of its statistics' items, named by its anchor."""
        anchor = self.anchor()
        d_out, d_in = self.grad_shape
        items: list[tuple[str | None, float, float]] = []
        for s in self.stats:
            compute = float(s.dim) ** 3 if s.dim > 0 else 2.0 * s.numel
            nbytes = float(s.numel + 1)
            if s.name == anchor:
                compute += float(d_out) * d_in * (d_out + d_in) if s.dim > 0 else float(self.grad_numel)
                nbytes += 2.0 * self.grad_numel
            items.append((s.name, compute, nbytes))
        if anchor is None:
            items.append((None, float(self.grad_numel), 2.0 * self.grad_numel))
        if not self.splittable and len(items) > 1:
            return [(anchor, sum(c for _, c, _ in items), sum(b for _, _, b in items))]
        return items


def _vector_score(compute: float, nbytes: float, total_c: float, total_b: float, rank: int) -> tuple[float, float, int]:
    nc, nb = compute / total_c, nbytes / total_b
    return (max(nc, nb), nc + nb, rank)


@dataclass(frozen=True)
class InverseRoute:
    """A Kronecker layer whose two factors have different owners: ``src`` (owner of ``stat``, the
    smaller factor) sends its packed inverse (``numel`` elements) to ``dst``, the gradient owner.

    Args:
        layer: the layer's index.
        stat: the name of the statistic whose inverse travels.
        src: the rank that owns ``stat`` and computes the inverse.
        dst: the rank that owns the layer's gradient.
        numel: elements of the packed inverse.
    """

    layer: int
    stat: str
    src: int
    dst: int
    numel: int


@dataclass(frozen=True)
class StatisticAssignment:
    """The owner of every statistic and of every layer's gradient, plus the modelled load.

    Built by :meth:`balance`; a pure function of its arguments, so every rank computes the same
    assignment without communicating.

    Args:
        world_size: number of ranks.
        stat_owners: per layer, {statistic name: owning rank}.
        grad_owners: per layer, the rank that preconditions its gradient.
        inverse_routes: the inverses that travel from a statistic's owner to the gradient owner.
        compute_load: per rank, the modelled compute of the items it owns.
        byte_load: per rank, the modelled elements moved for the items it owns.
        largest_item: the largest modelled compute of a single item.
    """

    world_size: int
    stat_owners: tuple[dict[str, int], ...]  # per layer: {statistic name: rank}
    grad_owners: tuple[int, ...]  # per layer: the rank that preconditions its gradient
    inverse_routes: tuple[InverseRoute, ...]
    compute_load: tuple[float, ...]
    byte_load: tuple[float, ...]
    largest_item: float

    @classmethod
    def balance(cls, layers: Sequence[LayerStatistics], world_size: int) -> StatisticAssignment:
        """Greedy vector placement of the items of :meth:`LayerStatistics.item_costs`.

        Items go heaviest first (by the larger of their shares of total compute and total
        bytes), each onto the rank where the larger of its normalised compute and byte loads
        stays smallest (ties: smaller sum of both, then the lower rank). Balancing compute alone
        lets byte loads drift (per-rank traffic at small W is (S + 2P) minus what a rank owns);
        balancing bytes alone lets a rank collect several large inversions.

        Args:
            layers: every layer in the optimizer's order.
            world_size: number of ranks (>= 1).
        """
        if world_size < 1:
            raise ValueError(f"StatisticAssignment.balance: world_size must be >= 1, got {world_size}")
        items = [(li, name, c, b) for li, layer in enumerate(layers) for name, c, b in layer.item_costs()]
        total_c = sum(c for _, _, c, _ in items) or 1.0
        total_b = sum(b for _, _, _, b in items) or 1.0
        order = sorted(range(len(items)), key=lambda k: (-max(items[k][2] / total_c, items[k][3] / total_b), k))
        comp = [0.0] * world_size
        byts = [0.0] * world_size
        owner_of: dict[tuple[int, str | None], int] = {}
        for k in order:
            li, name, c, b = items[k]
            scores = [_vector_score(comp[q] + c, byts[q] + b, total_c, total_b, q) for q in range(world_size)]
            r = min(range(world_size), key=scores.__getitem__)
            owner_of[(li, name)] = r
            comp[r] += c
            byts[r] += b
        stat_owners = []
        grad_owners = []
        routes = []
        for li, layer in enumerate(layers):
            anchor = layer.anchor()
            owners = {s.name: owner_of[(li, s.name if layer.splittable else anchor)] for s in layer.stats}
            g = owners[anchor] if anchor is not None else owner_of[(li, None)]
            stat_owners.append(owners)
            grad_owners.append(g)
            for s in layer.stats:
                if s.dim > 0 and owners[s.name] != g:
                    routes.append(InverseRoute(li, s.name, owners[s.name], g, s.numel))
        largest = max((c for _, _, c, _ in items), default=0.0)
        return cls(world_size, tuple(stat_owners), tuple(grad_owners), tuple(routes), tuple(comp), tuple(byts), largest)

    @classmethod
    def per_layer(
        cls, layers: Sequence[LayerStatistics], owners: Sequence[int], world_size: int
    ) -> StatisticAssignment:
        """Every statistic and the gradient of layer i on ``owners[i]`` (no inverse travels).

        Args:
            layers: every layer in the optimizer's order.
            owners: the owning rank of each layer (e.g. :attr:`OwnerAssignment.owners`).
            world_size: number of ranks (>= 1).
        """
        if world_size < 1:
            raise ValueError(f"StatisticAssignment.per_layer: world_size must be >= 1, got {world_size}")
        if len(owners) != len(layers) or any(not 0 <= o < world_size for o in owners):
            raise ValueError(
                f"StatisticAssignment.per_layer: owners needs one rank in [0, {world_size}) per layer "
                f"({len(layers)}), got {list(owners)}"
            )
        comp = [0.0] * world_size
        byts = [0.0] * world_size
        largest = 0.0
        for layer, o in zip(layers, owners):
            for _, c, b in layer.item_costs():
                comp[o] += c
                byts[o] += b
                largest = max(largest, c)
        stat_owners = tuple({s.name: o for s in layer.stats} for layer, o in zip(layers, owners))
        return cls(world_size, stat_owners, tuple(owners), (), tuple(comp), tuple(byts), largest)

    def statistics_of(self, rank: int) -> list[tuple[int, str]]:
        """(layer index, statistic name) of every statistic ``rank`` owns, in layer order.

        Args:
            rank: the owner.
        """
        return [(li, n) for li, owners in enumerate(self.stat_owners) for n, o in owners.items() if o == rank]

    @property
    def makespan(self) -> float:
        """The largest modelled compute load of any rank."""
        return max(self.compute_load) if self.compute_load else 0.0

    @property
    def makespan_lower_bound(self) -> float:
        """No placement of whole statistics does better: max(largest item, total / W)."""
        return max(self.largest_item, sum(self.compute_load) / self.world_size)
