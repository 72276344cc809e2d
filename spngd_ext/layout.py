"""Where each layer's gradient and statistics live in the flat buffers the optimizer communicates.

Two buffers, each cut into one equal, padded chunk per rank (so a single reduce-scatter delivers a
rank exactly the layers it owns, and a single all-gather returns every chunk):

* the **gradient buffer**: per owner, the gradients of its layers in ``named_modules`` order
  (Kronecker layers as the d_out × d_in[+1] matrix [∇W | ∇b], BatchNorm as [∇γ, ∇β], other
  parameters flattened); a trailing slot per chunk carries the owner's share of the KL-clip sum
  on the way back.
* the **statistics buffer**: per owner, the packed upper triangles of its Kronecker factors
  (A before G within a layer), then its BatchNorm Fishers (C × 3), then one count per statistic.
  (The gradient chunk also ends with one slot per owned statistic, where the owner returns the
  statistic's relative change for stale-statistics decisions, then the KL slot.)
  Packed factors of a chunk are contiguous, so one unpack call serves all of an owner's factors.

With one process there is one chunk and no padding; the order is then named_modules order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """A contiguous run ``[offset, offset + numel)`` of a flat buffer."""

    offset: int
    numel: int

    @property
    def end(self) -> int:
        """One past the segment's last index."""
        return self.offset + self.numel


@dataclass
class StatsLayout:
    """Offsets of every statistic, per layer, in the statistics buffer."""

    chunk_numel: int
    world_size: int
    # per layer: {"A": Segment, "G": Segment} or {"F": Segment}; empty for parameter-only entries
    stats: list[dict[str, Segment]]
    # per layer: {stat name: absolute index of its count}
    counts: list[dict[str, int]]
    # per rank: (offset of the packed run, [matrix sizes], [(layer index, stat name)])
    packed_runs: list[tuple[int, list[int], list[tuple[int, str]]]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Elements of the whole buffer (every rank's chunk)."""
        return self.chunk_numel * self.world_size


@dataclass
class GradLayout:
    """Offsets of every layer's gradient in the gradient buffer (and the KL slot per chunk)."""

    chunk_numel: int
    world_size: int
    grads: list[Segment]
    kl_slots: list[int]  # absolute index of each rank's KL partial sum
    change_slots: list[dict[str, int]]  # per layer: {stat name: absolute index of its relative change}

    @property
    def numel(self) -> int:
        """Elements of the whole buffer (every rank's chunk)."""
        return self.chunk_numel * self.world_size


def build_layouts(
    stat_specs: Sequence[Sequence[tuple[str, int, int]]],
    grad_numels: Sequence[int],
    owners: Sequence[int],
    world_size: int,
) -> tuple[StatsLayout, GradLayout]:
    """Lay out both buffers.

    Args:
        stat_specs: per layer, (name, numel, matrix dim; 0 for non-matrix stats) of its statistics.
        grad_numels: per layer, its gradient size.
        owners: per layer, the rank that owns it.
        world_size: number of ranks (chunks per buffer).
    """
    n = len(grad_numels)
    if not (len(stat_specs) == len(owners) == n):
        raise ValueError("build_layouts: stat_specs, grad_numels and owners need one entry per layer")
    if any(not 0 <= o < world_size for o in owners):
        raise ValueError(f"build_layouts: owners must be in [0, {world_size}), got {sorted(set(owners))}")

    stat_rel: list[dict[str, Segment]] = [dict() for _ in range(n)]
    count_rel: list[dict[str, int]] = [dict() for _ in range(n)]
    grad_rel: list[Segment] = [Segment(0, 0)] * n
    change_rel: list[dict[str, int]] = [dict() for _ in range(n)]
    runs_rel: list[tuple[int, list[int], list[tuple[int, str]]]] = []
    stat_sizes, grad_sizes = [], []
    for rank in range(world_size):
        mine = [i for i in range(n) if owners[i] == rank]
        pos = 0
        run_sizes, run_items = [], []
        for i in mine:  # packed matrices first, contiguous
            for name, numel, dim in stat_specs[i]:
                if dim > 0:
                    stat_rel[i][name] = Segment(pos, numel)
                    run_sizes.append(dim)
                    run_items.append((i, name))
                    pos += numel
        runs_rel.append((0, run_sizes, run_items))
        for i in mine:  # then non-matrix statistics (BatchNorm)
            for name, numel, dim in stat_specs[i]:
                if dim == 0:
                    stat_rel[i][name] = Segment(pos, numel)
                    pos += numel
        for i in mine:  # then one count per statistic
            for name, _, _ in stat_specs[i]:
                count_rel[i][name] = pos
                pos += 1
        stat_sizes.append(pos)
        gpos = 0
        for i in mine:
            grad_rel[i] = Segment(gpos, grad_numels[i])
            gpos += grad_numels[i]
        for i in mine:
            for name, _, _ in stat_specs[i]:
                change_rel[i][name] = gpos
                gpos += 1
        grad_sizes.append(gpos + 1)  # + KL slot

    stat_chunk = max(stat_sizes) if stat_sizes else 0
    grad_chunk = max(grad_sizes) if grad_sizes else 1

    stats: list[dict[str, Segment]] = [dict() for _ in range(n)]
    counts: list[dict[str, int]] = [dict() for _ in range(n)]
    grads = [Segment(0, 0)] * n
    changes: list[dict[str, int]] = [dict() for _ in range(n)]
    for i in range(n):
        base_s = owners[i] * stat_chunk
        base_g = owners[i] * grad_chunk
        stats[i] = {k: Segment(base_s + s.offset, s.numel) for k, s in stat_rel[i].items()}
        counts[i] = {k: base_s + c for k, c in count_rel[i].items()}
        grads[i] = Segment(base_g + grad_rel[i].offset, grad_rel[i].numel)
        changes[i] = {k: base_g + c for k, c in change_rel[i].items()}
    runs = [(r * stat_chunk, sizes, items) for r, (_, sizes, items) in enumerate(runs_rel)]
    kl_slots = [r * grad_chunk + grad_sizes[r] - 1 for r in range(world_size)]
    return (
        StatsLayout(stat_chunk, world_size, stats, counts, runs),
        GradLayout(grad_chunk, world_size, grads, kl_slots, changes),
    )
