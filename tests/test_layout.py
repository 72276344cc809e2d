"""SegmentLayout (true-length per-owner segments, ownership per statistic): pure logic, no ranks."""

from __future__ import annotations

import random

import pytest
from test_placement import random_net

from spngd_ext.distributed.placement import LayerStatistics, StatisticAssignment, StatisticSpec
from spngd_ext.distributed.segments import SegmentLayout, coalesce
from spngd_ext.distributed.uneven import slice_segments
from spngd_ext.layout import Segment


def build(layers: list[LayerStatistics], world: int) -> SegmentLayout:
    return SegmentLayout.build(layers, StatisticAssignment.balance(layers, world))


def covered(segments: list[Segment]) -> list[int]:
    return [i for s in segments for i in range(s.offset, s.end)]


@pytest.mark.parametrize("world", [1, 2, 3, 7, 64])
def test_every_element_once_and_no_padding(world: int) -> None:
    layers = random_net(3, n=40)
    lay = build(layers, world)
    n_stats = sum(len(layer.stats) for layer in layers)
    # the statistics buffer is exactly the statistics and one count each, whatever W
    assert lay.stats_numel == sum(s.numel for layer in layers for s in layer.stats) + n_stats
    owners_with_grads = len({g for g in lay.assignment.grad_owners})
    assert lay.grad_numel == sum(layer.grad_numel for layer in layers) + n_stats + owners_with_grads
    stat_elems = covered([s for d in lay.stats for s in d.values()]) + [c for d in lay.counts for c in d.values()]
    assert sorted(stat_elems) == list(range(lay.stats_numel))
    grad_elems = (
        covered(list(lay.grads))
        + [c for d in lay.change_slots for c in d.values()]
        + [k for k in lay.kl_slots if k is not None]
    )
    assert sorted(grad_elems) == list(range(lay.grad_numel))
    # each rank's statistics, counts, gradients, change and KL slots lie in its own range
    for i, layer in enumerate(layers):
        for s in layer.stats:
            o = lay.assignment.stat_owners[i][s.name]
            r = lay.stats_ranges[o]
            seg = lay.stats[i][s.name]
            assert r.offset <= seg.offset and seg.end <= r.end and r.offset <= lay.counts[i][s.name] < r.end
            assert lay.grad_ranges[o].offset <= lay.change_slots[i][s.name] < lay.grad_ranges[o].end
        g = lay.grad_ranges[lay.assignment.grad_owners[i]]
        assert g.offset <= lay.grads[i].offset and lay.grads[i].end <= g.end
    for r in range(world):
        assert (lay.kl_slots[r] is not None) == bool(lay.owned_gradients(r))
        assert lay.stats_ranges[r].numel == sum(lay.stats[i][n].numel + 1 for i, n in lay.owned_statistics(r))


def test_packed_factors_of_a_rank_are_one_contiguous_run() -> None:
    layers = random_net(4, n=40)
    lay = build(layers, 3)
    for r in range(3):
        offset, dims, items = lay.packed_runs[r]
        assert offset == lay.stats_ranges[r].offset
        pos = offset
        for d, (i, n) in zip(dims, items):
            assert lay.stats[i][n] == Segment(pos, d * (d + 1) // 2)
            pos += d * (d + 1) // 2
        assert sorted(items) == sorted(
            (i, n)
            for i, n in lay.owned_statistics(r)
            if lay.stats[i][n].numel and next(s for s in layers[i].stats if s.name == n).dim > 0
        )


def test_ranks_owning_nothing_have_empty_ranges() -> None:
    layers = [LayerStatistics("k", (StatisticSpec("A", 4, 10), StatisticSpec("G", 2, 3)), 8, (2, 4))]
    lay = build(layers, 5)
    assert lay.stats_numel == 10 + 3 + 2 and lay.grad_numel == 8 + 2 + 1
    empty = [r for r in range(5) if lay.stats_ranges[r].numel == 0]
    assert len(empty) == 3 and all(lay.grad_ranges[r].numel == 0 and lay.kl_slots[r] is None for r in empty)
    assert all(lay.stats_sends()[r] == [] for r in empty)
    # A (larger) and G on different ranks: G's owner sends its packed inverse to A's owner
    a, g = lay.assignment.stat_owners[0]["A"], lay.assignment.stat_owners[0]["G"]
    assert a != g and lay.assignment.grad_owners == (a,)
    (route,) = lay.inverse_routes
    assert (route.stat, route.src, route.dst, route.numel) == ("G", g, a, 3)
    assert lay.inverse_sends(g)[a] == [route] and lay.inverse_receives(a)[g] == [route]


def test_stats_sends_only_the_due_statistics() -> None:
    layers = random_net(6, n=40)
    lay = build(layers, 4)
    everything = lay.stats_sends()
    assert [covered(s) for s in everything] == [covered([r]) for r in lay.stats_ranges]
    rng = random.Random(0)
    all_stats = [(i, s.name) for i, layer in enumerate(layers) for s in layer.stats]
    due = rng.sample(all_stats, 9)
    sends = lay.stats_sends(due)
    expect = [set() for _ in range(4)]
    for i, n in due:
        o = lay.assignment.stat_owners[i][n]
        expect[o] |= set(covered([lay.stats[i][n]])) | {lay.counts[i][n]}
    assert [set(covered(s)) for s in sends] == expect
    for s in sends:  # sorted, disjoint, merged
        assert all(a.end < b.offset for a, b in zip(s, s[1:]))
    assert lay.stats_sends([]) == [[], [], [], []]  # nothing due: nothing moves
    assert lay.stats_sends(all_stats) == everything
    with pytest.raises(ValueError, match="no statistic 'Z' in layer 0"):
        lay.stats_sends([(0, "Z")])


def test_build_rejects_a_mismatched_assignment() -> None:
    layers = random_net(7, n=10)
    with pytest.raises(ValueError, match="covers"):
        SegmentLayout.build(layers[:5], StatisticAssignment.balance(layers, 2))


def test_coalesce_and_slice() -> None:
    segs = [Segment(10, 2), Segment(0, 3), Segment(3, 2), Segment(12, 0), Segment(11, 4)]
    assert coalesce(segs) == [Segment(0, 5), Segment(10, 5)]
    parts = [Segment(0, 5), Segment(10, 5), Segment(20, 1)]
    flat = covered(parts)
    for lo in range(12):
        for hi in range(lo, 12):
            assert covered(slice_segments(parts, lo, hi)) == flat[lo:hi]


def _bench_module(name: str):
    """A module of bench/ (not a package), loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_resnet50_model_meets_the_scaling_targets() -> None:
    """docs/scaling.md's targets on the ResNet-50 shapes, from the same model bench/comm.py prints:
    refresh bytes ≤ 1.1 × (W−1)/W·(S + 2P)·s and a step without factors ≤ 1.1 × a DDP
    all-reduce (busiest rank), curvature memory never above the 8-rank value, and the makespan
    within 1.1 × max(largest statistic, total / W)."""
    comm = _bench_module("comm")
    seg = _bench_module("comm_segments")
    layers = comm.resnet50_layers()
    one = comm.spngd_plan(layers, 1)
    params, stats_numel = one["params"], one["stats_numel"]
    assert (params, stats_numel) == (25_557_032, 77_046_707)
    n_stats = sum(len(st.stats) for st in seg.layer_statistics(layers))
    assert n_stats == 2 * 54 + 53  # A and G of 53 convolutions and the Linear, one Fisher per BatchNorm
    mem8 = seg.segments_model(seg.segments_plan(layers, 8), params, stats_numel)["memory_max"]
    for world in (2, 3, 4, 8, 16, 128, 1024):
        plan = seg.segments_plan(layers, world)
        m = seg.segments_model(plan, params, stats_numel)
        assert m["refresh_wire_max"] <= 1.1 * m["lower_bound"], world
        assert m["grads_only_wire_max"] <= 1.1 * m["ddp_wire"], world
        assert plan["makespan"] <= 1.1 * plan["lower_bound"], world
        if world >= 8:
            assert m["memory_max"] <= mem8, world
            assert plan["makespan"] <= 1.1 * plan["largest_item"], world
        assert plan["S"] == stats_numel + n_stats  # the statistics and one count each: no padding at any W
