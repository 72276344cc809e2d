"""OwnerAssignment (greedy LPT over the layer cost model) and StatisticAssignment (ownership per
statistic): pure logic, no ranks."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from spngd_ext.distributed.placement import (
    LayerCost,
    LayerStatistics,
    OwnerAssignment,
    StatisticAssignment,
    StatisticSpec,
)


def jobs(weights: list[float]) -> list[LayerCost]:
    """Layers whose compute cost is exactly the given weight (elementwise cost only)."""
    return [LayerCost(f"l{i}", elementwise=w) for i, w in enumerate(weights)]


def makespan(a: OwnerAssignment) -> float:
    return max(a.compute_load)


def optimum(weights: list[float], m: int) -> float:
    """Exact optimal makespan by enumeration (small instances only)."""
    best = float("inf")
    for assign in itertools.product(range(m), repeat=len(weights)):
        loads = [0.0] * m
        for w, r in zip(weights, assign):
            loads[r] += w
        best = min(best, max(loads))
    return best


def lower_bound(weights: list[float], m: int) -> float:
    """A lower bound on the optimal makespan: the mean load, the largest job, and the two
    smallest of the m+1 largest jobs (two of them must share a rank)."""
    s = sorted(weights, reverse=True)
    lb = max(sum(weights) / m, s[0] if s else 0.0)
    if len(s) > m:
        lb = max(lb, s[m - 1] + s[m])
    return lb


def test_cost_model() -> None:
    c = LayerCost("conv", factor_dims=(10, 4), grad_shape=(4, 10))
    assert c.compute() == 10**3 + 4**3 + 4 * 10 * (4 + 10)
    assert c.memory() == 10**2 + 4**2
    bn = LayerCost("bn", elementwise=96)
    assert bn.compute() == 96 and bn.memory() == 96


def test_deterministic() -> None:
    rng = random.Random(0)
    costs = [LayerCost(f"l{i}", (rng.randint(1, 300), rng.randint(1, 300)), (5, 5)) for i in range(40)]
    first = OwnerAssignment.balance(costs, 7)
    for _ in range(3):
        assert OwnerAssignment.balance(list(costs), 7) == first
    # every layer has exactly one owner in range, and the loads add up
    assert len(first.owners) == 40 and all(0 <= o < 7 for o in first.owners)
    assert sum(first.compute_load) == pytest.approx(sum(c.compute() for c in costs))
    assert sum(first.memory_load) == pytest.approx(sum(c.memory() for c in costs))
    assert sorted(i for r in range(7) for i in first.layers_of(r)) == list(range(40))


def test_more_ranks_than_layers() -> None:
    a = OwnerAssignment.balance(jobs([5.0, 9.0, 1.0]), 8)
    # heaviest first, each onto an empty rank, lowest rank first
    assert a.owners == (1, 0, 2)
    assert a.compute_load == (9.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert [a.layers_of(r) for r in range(4)] == [[1], [0], [2], []]
    assert makespan(a) == 9.0  # optimal: the largest layer alone
    one = OwnerAssignment.balance(jobs([3.0]), 3)
    assert one.owners == (0,)


def test_ties_go_to_the_lowest_rank_in_layer_order() -> None:
    a = OwnerAssignment.balance(jobs([2.0, 2.0, 2.0, 2.0]), 2)
    assert a.owners == (0, 1, 0, 1)
    b = OwnerAssignment.balance(jobs([0.0, 0.0, 0.0]), 2)  # zero-cost layers (e.g. empty entries)
    assert b.owners == (0, 0, 0)  # loads stay tied at 0: always the lowest rank
    c = OwnerAssignment.balance(jobs([1.0, 3.0, 1.0, 3.0]), 2)
    assert c.owners == (0, 0, 1, 1)  # 3 (l1)→0, 3 (l3)→1, 1 (l0)→0, 1 (l2)→1


def test_one_rank_owns_everything_and_bad_world_size() -> None:
    a = OwnerAssignment.balance(jobs([1.0, 2.0, 3.0]), 1)
    assert a.owners == (0, 0, 0) and a.imbalance == 1.0
    with pytest.raises(ValueError, match="world_size"):
        OwnerAssignment.balance(jobs([1.0]), 0)
    assert OwnerAssignment.balance([], 4).owners == ()


@pytest.mark.parametrize("seed", range(40))
def test_lpt_guarantee_against_the_exact_optimum(seed: int) -> None:
    """Graham's bound, LPT ≤ (4/3 − 1/(3m))·OPT, on small random instances (OPT by enumeration)."""
    rng = random.Random(seed)
    m = rng.choice([2, 3])
    n = rng.randint(m + 1, 8)
    weights = [float(rng.randint(1, 50)) for _ in range(n)]
    a = OwnerAssignment.balance(jobs(weights), m)
    opt = optimum(weights, m)
    assert makespan(a) <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9


def test_lpt_worst_case_instance() -> None:
    # the classic tight instance for m = 2: LPT 7, optimum 6 (= 4/3 − 1/6 of it)
    a = OwnerAssignment.balance(jobs([3.0, 3.0, 2.0, 2.0, 2.0]), 2)
    assert makespan(a) == 7.0 and optimum([3.0, 3.0, 2.0, 2.0, 2.0], 2) == 6.0


@pytest.mark.parametrize("seed", range(20))
def test_lpt_within_four_thirds_of_the_lower_bound(seed: int) -> None:
    """Larger random cost sets (K-FAC-like d³ costs and uniform ones), 2..64 ranks: the LPT
    makespan stays within 4/3 of a lower bound on the optimum (so within 4/3 of the optimum)."""
    rng = random.Random(1000 + seed)
    m = rng.choice([2, 3, 4, 8, 16, 64])
    n = rng.randint(1, 200)
    if seed % 2:
        costs = [LayerCost(f"l{i}", (rng.randint(1, 2000), rng.randint(1, 512)), (3, 3)) for i in range(n)]
    else:
        costs = [LayerCost(f"l{i}", elementwise=rng.uniform(0.0, 100.0)) for i in range(n)]
    a = OwnerAssignment.balance(costs, m)
    weights = [c.compute() for c in costs]
    assert makespan(a) <= 4 / 3 * lower_bound(weights, m) * (1 + 1e-12)


def test_memory_weight() -> None:
    rng = random.Random(3)
    costs = [LayerCost(f"l{i}", (rng.randint(1, 100), rng.randint(1, 100)), (2, 2)) for i in range(30)]
    assert OwnerAssignment.balance(costs, 4, memory_weight=0.0) == OwnerAssignment.balance(costs, 4)
    # with memory dominating the objective, the memory loads are what LPT balances
    heavy = OwnerAssignment.balance(costs, 4, memory_weight=1e9)
    mems = [c.memory() for c in costs]
    assert max(heavy.memory_load) <= 4 / 3 * lower_bound(mems, 4)
    assert sum(heavy.compute_load) == pytest.approx(sum(c.compute() for c in costs))


# ---------------------------------------------------------------------------------------------
# ownership per statistic


def kfac_layer(name: str, d_in: int, d_out: int) -> LayerStatistics:
    return LayerStatistics(
        name,
        (StatisticSpec("A", d_in, d_in * (d_in + 1) // 2), StatisticSpec("G", d_out, d_out * (d_out + 1) // 2)),
        d_in * d_out,
        (d_out, d_in),
    )


def bn_layer(name: str, c: int) -> LayerStatistics:
    return LayerStatistics(name, (StatisticSpec("F", 0, 3 * c),), 2 * c)


def random_net(seed: int, n: int = 30) -> list[LayerStatistics]:
    rng = random.Random(seed)
    layers: list[LayerStatistics] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.6:
            layers.append(kfac_layer(f"k{i}", rng.randint(1, 600), rng.randint(1, 300)))
        elif kind < 0.9:
            layers.append(bn_layer(f"bn{i}", rng.randint(1, 256)))
        else:
            layers.append(LayerStatistics(f"plain{i}", (), rng.randint(1, 1000)))
    return layers


def test_statistic_costs_and_anchor() -> None:
    layer = kfac_layer("fc", 10, 4)  # A 10×10 (d_in incl. bias), G 4×4
    assert layer.anchor() == "A"
    (a, ca, ba), (g, cg, bg) = layer.item_costs()
    assert (a, g) == ("A", "G")
    assert ca == 10**3 + 4 * 10 * (4 + 10) and ba == 55 + 1 + 2 * 40  # inversion + both products; A, count, grad twice
    assert cg == 4**3 and bg == 10 + 1
    assert kfac_layer("wide", 3, 8).anchor() == "G" and kfac_layer("square", 5, 5).anchor() == "A"
    assert bn_layer("bn", 4).item_costs() == [("F", 2 * 12 + 8, 12 + 1 + 16)]
    assert LayerStatistics("p", (), 7).item_costs() == [(None, 7.0, 14.0)]


def test_statistic_assignment_covers_every_statistic_and_routes_inverses() -> None:
    layers = random_net(0)
    for world in (1, 2, 3, 5, 16, 200):
        a = StatisticAssignment.balance(layers, world)
        assert a == StatisticAssignment.balance(list(layers), world)  # deterministic
        assert len(a.stat_owners) == len(layers) and all(0 <= g < world for g in a.grad_owners)
        owned = sorted(x for r in range(world) for x in a.statistics_of(r))
        assert owned == sorted((i, s.name) for i, layer in enumerate(layers) for s in layer.stats)
        routes = {(rt.layer, rt.stat) for rt in a.inverse_routes}
        for i, layer in enumerate(layers):
            if layer.stats:
                assert a.grad_owners[i] == a.stat_owners[i][layer.anchor()]
            for s in layer.stats:  # a factor away from its gradient's owner travels there, and only then
                away = s.dim > 0 and a.stat_owners[i][s.name] != a.grad_owners[i]
                assert ((i, s.name) in routes) == away
        for rt in a.inverse_routes:
            assert rt.src == a.stat_owners[rt.layer][rt.stat] and rt.dst == a.grad_owners[rt.layer] and rt.src != rt.dst
        total_c = sum(c for layer in layers for _, c, _ in layer.item_costs())
        assert sum(a.compute_load) == pytest.approx(total_c)
        if world == 1:
            assert a.inverse_routes == () and a.makespan == pytest.approx(total_c)


def test_statistic_assignment_is_the_same_in_every_process() -> None:
    """Every rank computes the assignment on its own: the result must not depend on anything
    process-specific (hash seeds, dict order)."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_placement import random_net; "
        "from spngd_ext.distributed.placement import StatisticAssignment as S; "
        "a = S.balance(random_net(5), 7); print(a.stat_owners, a.grad_owners, a.inverse_routes)"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout
        )
    assert len(outs) == 1


@pytest.mark.parametrize("seed", range(10))
def test_statistic_assignment_makespan_and_byte_balance(seed: int) -> None:
    """Compute and bytes both within 4/3 of their lower bound max(largest item, mean load), and
    the makespan equal to the largest item once every item can have a rank of its own."""
    layers = random_net(100 + seed, n=60)
    items = [item for layer in layers for item in layer.item_costs()]
    largest_bytes = max(b for _, _, b in items)
    for world in (2, 3, 4, 8, 64, 512):
        a = StatisticAssignment.balance(layers, world)
        assert a.makespan >= a.makespan_lower_bound * (1 - 1e-12)
        assert a.makespan <= 4 / 3 * a.makespan_lower_bound * (1 + 1e-12)
        assert max(a.byte_load) <= 4 / 3 * max(largest_bytes, sum(a.byte_load) / world) * (1 + 1e-12)
        if world >= len(items):
            assert a.makespan == pytest.approx(a.largest_item)


def test_statistic_assignment_rejects_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        StatisticAssignment.balance(random_net(1), 0)
    assert StatisticAssignment.balance([], 3).grad_owners == ()


def test_per_layer_assignment_keeps_each_layer_on_its_owner() -> None:
    layers = random_net(2, n=12)
    owners = [i % 3 for i in range(len(layers))]
    a = StatisticAssignment.per_layer(layers, owners, 3)
    assert a.grad_owners == tuple(owners) and a.inverse_routes == ()
    for i, layer in enumerate(layers):
        assert a.stat_owners[i] == {s.name: owners[i] for s in layer.stats}
    for r in range(3):  # each rank's load is the sum of its layers' items
        want_c = sum(c for i, layer in enumerate(layers) if owners[i] == r for _, c, _ in layer.item_costs())
        want_b = sum(b for i, layer in enumerate(layers) if owners[i] == r for _, _, b in layer.item_costs())
        assert a.compute_load[r] == pytest.approx(want_c) and a.byte_load[r] == pytest.approx(want_b)
    assert a.largest_item == max(c for layer in layers for _, c, _ in layer.item_costs())
    with pytest.raises(ValueError, match="owners"):
        StatisticAssignment.per_layer(layers, owners[:-1], 3)
    with pytest.raises(ValueError, match="owners"):
        StatisticAssignment.per_layer(layers, [3] * len(layers), 3)
    with pytest.raises(ValueError, match="world_size"):
        StatisticAssignment.per_layer(layers, owners, 0)


def test_curvature_state_with_a_layer_split_over_two_ranks() -> None:
    """Each rank's state holds the statistics it owns and the gradients it preconditions: with
    A on rank 0 (with the gradient) and G on rank 1, rank 0 estimates A and preconditions, rank 1
    only estimates G; with one owner per layer a rank may own nothing."""
    from torch import nn

    from spngd_ext.distributed.segments import SegmentLayout
    from spngd_ext.layers import find_curvature_layers
    from spngd_ext.options import SPNGDOptions
    from spngd_ext.state import CurvatureState

    layers = find_curvature_layers(nn.Sequential(nn.Linear(4, 3)))
    stats = [
        LayerStatistics(
            layer.name, tuple(StatisticSpec(s.name, s.dim, s.numel) for s in layer.stat_specs()), layer.grad_numel
        )
        for layer in layers
    ]
    split = StatisticAssignment(2, ({"A": 0, "G": 1},), (0,), (), (0.0, 0.0), (0.0, 0.0), 0.0)
    layout = SegmentLayout.build(stats, split)
    rank0 = CurvatureState.build(layers, layout, 0, SPNGDOptions(), [])
    rank1 = CurvatureState.build(layers, layout, 1, SPNGDOptions(), [])
    assert rank0.estimates.owned == [(0, "A")] and rank0.preconditioner.owned == [0]
    assert rank1.estimates.owned == [(0, "G")] and rank1.preconditioner.owned == []
    assert rank0.buffers.chunk_numel == 5 * 6 // 2 + 1 and rank1.buffers.chunk_numel == 3 * 4 // 2 + 1
    together = StatisticAssignment.per_layer(stats, [1], 2)
    state = CurvatureState.build(layers, SegmentLayout.build(stats, together), 0, SPNGDOptions(), [])
    assert state.buffers.chunk_numel == 0 and state.preconditioner.owned == []  # rank 0 owns nothing


def test_unsplittable_layers_keep_their_statistics_together() -> None:
    """A layer that does not cache one inverse per factor (grouped convolution, Embedding) is one
    placement item: all its statistics and its gradient on one rank, no inverse route."""
    grouped = LayerStatistics(
        "g", (StatisticSpec("A0", 9, 45), StatisticSpec("A1", 9, 45), StatisticSpec("G0", 4, 10)), 72, splittable=False
    )
    kron = LayerStatistics("k", (StatisticSpec("A", 50, 1275), StatisticSpec("G", 40, 820)), 2000, (40, 50))
    for world in (2, 3, 4):
        a = StatisticAssignment.balance([grouped, kron, grouped], world)
        for li in (0, 2):
            assert len(set(a.stat_owners[li].values())) == 1
            assert a.grad_owners[li] == a.stat_owners[li]["A0"]
        assert all(r.layer == 1 for r in a.inverse_routes)
    assert len(grouped.item_costs()) == 1
    assert grouped.item_costs()[0][1] == sum(c for _, c, _ in LayerStatistics("g", grouped.stats, 72).item_costs())


def test_state_dict_of_another_ownership_is_refused_at_two_ranks() -> None:
    """A distributed state_dict holds the statistics its rank owned under its placement: one saved
    with one owner per layer cannot be loaded under ownership per statistic (and the reverse)."""
    import torch
    from torch import nn

    from spngd_ext import SPNGD
    from spngd_ext.distributed.communicator import LocalCommunicator

    class TwoRanks(LocalCommunicator):  # the placement sees two ranks; nothing is sent before a step
        world_size = 2

    def make(ownership: str) -> SPNGD:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        return SPNGD(model, communicator=TwoRanks(), ownership=ownership)

    saved = make("layer").state_dict()
    with pytest.raises(ValueError, match="ownership='layer'"):
        make("statistic").load_state_dict(saved)
    make("layer").load_state_dict(saved)
    old = dict(saved, spngd={k: v for k, v in saved["spngd"].items() if k != "ownership"})  # before the key
    with pytest.raises(ValueError, match="ownership"):
        make("statistic").load_state_dict(old)
