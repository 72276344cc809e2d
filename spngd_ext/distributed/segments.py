"""Buffers laid out as true-length segments per owner, for ownership per statistic.

The statistics buffer holds every statistic once (S elements, whatever the number of ranks):
rank 0's statistics, then rank 1's, …; within a rank, its packed Kronecker factors first
(contiguous, so one unpack call serves all of them), then its elementwise statistics (BatchNorm
Fishers), then one count per statistic. A rank that owns nothing has an empty range. Nothing
is padded: no rank allocates or sends anything proportional to the number of ranks.

The gradient buffer holds, per rank in rank order: the gradients it preconditions (layers whose
anchor statistic it owns, see :class:`~spngd_ext.distributed.placement.LayerStatistics`), one
change slot per statistic it owns (where it returns the statistic's relative change for stale
statistics), and a KL slot if it preconditions any gradient.

:meth:`SegmentLayout.stats_sends` lists, per owner, the segments a reduce must move: all of the
owner's range, or only the statistics that are due (and their counts), so an owner none of
whose statistics is due receives nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ..layout import Segment
from .placement import InverseRoute, LayerStatistics, StatisticAssignment

__all__ = ["Segment", "SegmentLayout", "coalesce"]


def coalesce(segments: Sequence[Segment]) -> list[Segment]:
    """Sorted, with adjacent or overlapping segments merged and empty ones dropped.

    Args:
        segments: segments of one buffer, in any order.
    """
    out: list[Segment] = []
    for s in sorted((s for s in segments if s.numel > 0), key=lambda s: s.offset):
        if out and s.offset <= out[-1].end:
            last = out[-1]
            out[-1] = Segment(last.offset, max(last.end, s.end) - last.offset)
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class SegmentLayout:
    """Offsets of every statistic and gradient, grouped by owner at their true lengths.

    Build with :meth:`build`. Absolute offsets index the full buffers (which every rank holds:
    the statistics are accumulated locally before the reduce, the gradients exist everywhere);
    ``stats_ranges[r]`` / ``grad_ranges[r]`` are rank r's own contiguous parts.

    Args:
        world_size: the number of ranks.
        assignment: the owners of statistics and gradients the layout was built for.
        stats: per layer, {statistic name: its segment of the statistics buffer}.
        counts: per layer, {statistic name: the absolute index of its count}.
        stats_ranges: per rank, its contiguous range of the statistics buffer.
        packed_runs: per rank, (offset, matrix dims, (layer index, statistic name) per matrix) of
            its packed Kronecker factors, which lie contiguously.
        grads: per layer, its segment of the gradient buffer.
        change_slots: per layer, {statistic name: the absolute index of its change slot in the
            gradient buffer}.
        kl_slots: per rank, the absolute index of its KL partial sum (None: it owns no gradient).
        grad_ranges: per rank, its contiguous range of the gradient buffer.
    """

    world_size: int
    assignment: StatisticAssignment
    stats: tuple[dict[str, Segment], ...]  # per layer: {statistic: its segment}
    counts: tuple[dict[str, int], ...]  # per layer: {statistic: absolute index of its count}
    stats_ranges: tuple[Segment, ...]  # per rank
    packed_runs: tuple[tuple[int, tuple[int, ...], tuple[tuple[int, str], ...]], ...]  # per rank: offset, dims, items
    grads: tuple[Segment, ...]  # per layer
    change_slots: tuple[dict[str, int], ...]  # per layer: {statistic: absolute index in the gradient buffer}
    kl_slots: tuple[int | None, ...]  # per rank: absolute index of its KL partial sum (None: owns no gradient)
    grad_ranges: tuple[Segment, ...]  # per rank

    @property
    def stats_numel(self) -> int:
        """The statistics buffer's length (every statistic once, with its count)."""
        return self.stats_ranges[-1].end if self.stats_ranges else 0

    @property
    def grad_numel(self) -> int:
        """The gradient buffer's length (gradients, change slots and KL slots of every rank)."""
        return self.grad_ranges[-1].end if self.grad_ranges else 0

    @property
    def inverse_routes(self) -> tuple[InverseRoute, ...]:
        """Every inverse that moves from its statistic's owner to the gradient owner (the assignment's routes)."""
        return self.assignment.inverse_routes

    @classmethod
    def build(cls, layers: Sequence[LayerStatistics], assignment: StatisticAssignment) -> SegmentLayout:
        """Lay out both buffers for ``assignment`` (computed from the same ``layers``).

        Args:
            layers: every layer, in the optimizer's order.
            assignment: the owners of statistics and gradients (``StatisticAssignment.balance``).
        """
        n, w = len(layers), assignment.world_size
        if len(assignment.stat_owners) != n or len(assignment.grad_owners) != n:
            raise ValueError(
                f"SegmentLayout.build: assignment covers {len(assignment.stat_owners)} layers, layers has {n}"
            )
        for li, layer in enumerate(layers):
            if set(assignment.stat_owners[li]) != {s.name for s in layer.stats}:
                raise ValueError(
                    f"SegmentLayout.build: layer {li} ({layer.name}): assignment has statistics "
                    f"{sorted(assignment.stat_owners[li])}, layer has {[s.name for s in layer.stats]}"
                )
        stats: list[dict[str, Segment]] = [dict() for _ in range(n)]
        counts: list[dict[str, int]] = [dict() for _ in range(n)]
        changes: list[dict[str, int]] = [dict() for _ in range(n)]
        grads: list[Segment] = [Segment(0, 0)] * n
        stats_ranges: list[Segment] = []
        grad_ranges: list[Segment] = []
        runs: list[tuple[int, tuple[int, ...], tuple[tuple[int, str], ...]]] = []
        kl_slots: list[int | None] = []
        pos = gpos = 0
        for rank in range(w):
            mine = [
                (li, s)
                for li, layer in enumerate(layers)
                for s in layer.stats
                if assignment.stat_owners[li][s.name] == rank
            ]
            start, run_start = pos, pos
            dims: list[int] = []
            items: list[tuple[int, str]] = []
            for li, s in mine:  # packed factors, contiguous
                if s.dim > 0:
                    stats[li][s.name] = Segment(pos, s.numel)
                    dims.append(s.dim)
                    items.append((li, s.name))
                    pos += s.numel
            for li, s in mine:  # elementwise statistics
                if s.dim == 0:
                    stats[li][s.name] = Segment(pos, s.numel)
                    pos += s.numel
            for li, s in mine:  # one count per statistic
                counts[li][s.name] = pos
                pos += 1
            stats_ranges.append(Segment(start, pos - start))
            runs.append((run_start, tuple(dims), tuple(items)))
            gstart = gpos
            owned_grads = [li for li in range(n) if assignment.grad_owners[li] == rank]
            for li in owned_grads:
                grads[li] = Segment(gpos, layers[li].grad_numel)
                gpos += layers[li].grad_numel
            for li, s in mine:
                changes[li][s.name] = gpos
                gpos += 1
            if owned_grads:
                kl_slots.append(gpos)
                gpos += 1
            else:
                kl_slots.append(None)
            grad_ranges.append(Segment(gstart, gpos - gstart))
        return cls(
            w,
            assignment,
            tuple(stats),
            tuple(counts),
            tuple(stats_ranges),
            tuple(runs),
            tuple(grads),
            tuple(changes),
            tuple(kl_slots),
            tuple(grad_ranges),
        )

    def stats_sends(self, due: Collection[tuple[int, str]] | None = None) -> list[list[Segment]]:
        """Per owner, the statistics-buffer segments a reduce moves.

        Args:
            due: (layer index, statistic name) of the statistics collected this step; None for
                all. A statistic that is not due is not sent, and neither is its count.
        """
        if due is None:
            return [[r] if r.numel else [] for r in self.stats_ranges]
        sends: list[list[Segment]] = [[] for _ in range(self.world_size)]
        for li, name in due:
            if not (0 <= li < len(self.stats) and name in self.stats[li]):
                raise ValueError(f"SegmentLayout.stats_sends: no statistic {name!r} in layer {li}")
            owner = self.assignment.stat_owners[li][name]
            sends[owner] += [self.stats[li][name], Segment(self.counts[li][name], 1)]
        return [coalesce(s) for s in sends]

    def grad_sends(self) -> list[list[Segment]]:
        """Per owner, its whole gradient range (gradients, change slots, KL slot)."""
        return [[r] if r.numel else [] for r in self.grad_ranges]

    def owned_statistics(self, rank: int) -> list[tuple[int, str]]:
        """(layer index, statistic name) of every statistic ``rank`` owns.

        Args:
            rank: the owner.
        """
        return self.assignment.statistics_of(rank)

    def owned_gradients(self, rank: int) -> list[int]:
        """Indices of the layers whose gradient ``rank`` preconditions.

        Args:
            rank: the owner.
        """
        return [li for li, g in enumerate(self.assignment.grad_owners) if g == rank]

    def inverse_sends(self, rank: int) -> list[list[InverseRoute]]:
        """Per destination rank, the inverses ``rank`` sends (in route order).

        Args:
            rank: the sending rank.
        """
        out: list[list[InverseRoute]] = [[] for _ in range(self.world_size)]
        for route in self.inverse_routes:
            if route.src == rank:
                out[route.dst].append(route)
        return out

    def inverse_receives(self, rank: int) -> list[list[InverseRoute]]:
        """Per source rank, the inverses ``rank`` receives (in route order).

        Args:
            rank: the receiving rank.
        """
        out: list[list[InverseRoute]] = [[] for _ in range(self.world_size)]
        for route in self.inverse_routes:
            if route.dst == rank:
                out[route.src].append(route)
        return out
