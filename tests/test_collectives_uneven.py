"""Collectives over true-length per-owner segments, on 2, 3 and 4 Gloo ranks (spawned processes).

Every rank fills the same buffer layout with its own values; the parent process compares what
each rank holds afterwards with sums and copies computed here in float64. Values are small
integers times powers of two, so every sum is exact in fp32 and every contribution is exact in
bf16/fp16 (after fp16's power-of-two scaling): the comparisons are ``torch.equal``, whatever the
order of addition. One column holds 1 on rank 0 and 2⁻⁸ elsewhere: each term is exact in bf16,
but 1 + 2⁻⁸ rounds back to 1 if bf16 values are added in bf16, so it fails unless the sum is
taken in fp32.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_distributed import run_world

from spngd_ext.layout import Segment

NUMEL = 64
# Segments per owner for 4 ranks (fewer ranks use the first W lists, extra segments unowned):
# rank 1 owns nothing, rank 2 owns two separate pieces; 60..63 belong to nobody.
OWNED = [[Segment(0, 13)], [], [Segment(13, 5), Segment(30, 17)], [Segment(18, 12), Segment(47, 13)]]
DUE = [[Segment(2, 4), Segment(9, 1)], [], [Segment(30, 17)], []]  # a subset: statistics due this step
STAGING = [1 << 20, 7]  # one round, and many rounds with pieces that cut segments


def owned_for(world: int) -> list[list[Segment]]:
    lists = [list(s) for s in OWNED[:world]]
    for extra in OWNED[world:]:  # with fewer ranks, the last rank takes the remaining segments
        lists[-1] += extra
    return lists


def contribution(rank: int, world: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    x = (
        torch.randint(-50, 50, (NUMEL,), generator=g).double()
        * 2.0 ** torch.randint(-4, 4, (NUMEL,), generator=g).double()
    )
    x[0] = 1.0 if rank == 0 else 2.0**-8  # fp32 accumulation check (module docstring)
    x[13] = 3.0 * 2.0**20  # large for fp16 (max 65504): must be scaled, not overflow
    return x.to(dtype)


def _w_uneven(rank: int, world: int, payload) -> dict:
    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    owned = owned_for(world)
    due = DUE[:world]
    res: dict = {}
    for impl in ("all_to_all", "reduce"):
        for wire in (None, torch.bfloat16, torch.float16):
            if impl == "reduce" and wire is not None:
                continue
            for staging in STAGING:
                for name, sends in (("all", owned), ("due", due)):
                    comm = TorchDistributedCommunicator(
                        None, comm_dtype=wire, segment_reduce_impl=impl, staging_numel=staging
                    )
                    buf = contribution(rank, world)
                    comm.begin_step()
                    comm.reduce_segments(buf, sends, kind="stats")
                    res[("reduce", impl, str(wire), staging, name)] = (buf.clone(), comm.bytes_sent()["last"]["stats"])
    for wire in (None, torch.bfloat16, torch.float16):
        comm = TorchDistributedCommunicator(None, comm_dtype=wire)
        buf = torch.full((NUMEL,), float("nan"))
        mine = contribution(rank, world)
        for s in owned[rank]:
            buf[s.offset : s.end] = mine[s.offset : s.end]
        comm.gather_segments(buf, owned, kind="precond")
        rough = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))  # not representable in bf16/fp16
        comm.gather_segments(rough, owned, kind="precond")
        res[("gather", str(wire))] = (buf, rough)
    comm = TorchDistributedCommunicator(None)
    res["auto"] = (
        comm.segment_reduce_impl_for(torch.zeros(1)),
        TorchDistributedCommunicator(None, comm_dtype=torch.bfloat16).segment_reduce_impl_for(torch.zeros(1)),
    )
    # nothing due anywhere: no collective, no bytes
    comm.begin_step()
    before = contribution(rank, world)
    buf = before.clone()
    comm.reduce_segments(buf, [[] for _ in range(world)], kind="stats")
    res["nothing_due"] = (torch.equal(buf, before), comm.bytes_sent()["last"]["stats"])
    # point to point: rank s sends (s+1)·[1, 2, ..] of length s+2 to every rank d > s (rank 0 receives nothing)
    sends = [[torch.arange(1.0, rank + 3) * (rank + 1)] if d > rank else [] for d in range(world)]
    receives = [[torch.zeros(s + 2)] if rank > s else [] for s in range(world)]
    comm.exchange(sends, receives, kind="inverses", dtype=torch.float32, device=torch.device("cpu"))
    res["exchange"] = [t[0] if t else None for t in receives]
    return res


@pytest.mark.parametrize("world", [2, 3, 4])
def test_uneven_reduce_gather_exchange(world: int) -> None:
    results = run_world(world, _w_uneven)
    owned = owned_for(world)
    total = sum(contribution(r, world, torch.float64) for r in range(world))
    for key, (got, sent) in ((k, v) for k, v in results[0].items() if k[0] == "reduce"):
        _, impl, wire, staging, name = key
        sends = owned if name == "all" else DUE[:world]
        elem = 4 if wire == "None" else 2
        for rank, res in enumerate(results):
            got, sent = res[key]
            mine = contribution(rank, world, torch.float64)
            expected = mine.clone()  # segments of no list: untouched
            for o, segs in enumerate(sends):
                for s in segs:
                    expected[s.offset : s.end] = total[s.offset : s.end] if o == rank else 0.0
            assert torch.equal(got.double(), expected), (key, rank, (got.double() - expected).abs().max())
            # bytes: exactly the other owners' segments (fp16 adds one 4-byte scale per peer and round)
            moved = sum(s.numel for o, segs in enumerate(sends) if o != rank for s in segs) * elem
            if impl == "reduce" or wire != "torch.float16":
                assert sent == moved, (key, rank, sent, moved)
            else:
                assert moved < sent <= moved + 4 * (world - 1) * 64, (key, rank, sent)
    for wire in ("None", "torch.bfloat16", "torch.float16"):
        exact = torch.full((NUMEL,), float("nan"), dtype=torch.float64)
        for o, segs in enumerate(owned):
            for s in segs:
                exact[s.offset : s.end] = contribution(o, world, torch.float64)[s.offset : s.end]
        for rank, res in enumerate(results):
            buf, rough = res[("gather", wire)]
            torch.testing.assert_close(buf.double(), exact, rtol=0, atol=0, equal_nan=True)
            covered = ~exact.isnan()  # positions nobody owns keep each rank's own value
            assert torch.equal(rough[covered], results[0][("gather", wire)][1][covered]), (wire, rank)  # bit-identical
        if wire == "None":
            for o, segs in enumerate(owned):  # full precision: the owner's exact values
                source = torch.randn(NUMEL, generator=torch.Generator().manual_seed(o))
                for s in segs:
                    assert torch.equal(results[0][("gather", wire)][1][s.offset : s.end], source[s.offset : s.end])
    for rank, res in enumerate(results):
        assert res["auto"] == ("all_to_all", "all_to_all")
        assert res["nothing_due"] == (True, 0)
        for s, got in enumerate(res["exchange"]):
            if rank > s:
                assert torch.equal(got, torch.arange(1.0, s + 3) * (s + 1))
            else:
                assert got is None


def _w_uneven_fault(rank: int, world: int, payload) -> dict:
    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    comm = TorchDistributedCommunicator(None)
    buf = contribution(rank, world)
    comm.reduce_segments(buf, owned_for(world), kind="stats")  # a working round first
    if rank == 1:
        if payload == "stall":  # longer than the group timeout: rank 0 must give up on its own
            time.sleep(12)
        raise RuntimeError("injected failure")
    comm.reduce_segments(buf, owned_for(world), kind="stats")
    comm.gather_segments(buf, owned_for(world), kind="grads")
    return {}


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_rank_ends_the_uneven_reduce_with_an_error(mode: str) -> None:
    group_timeout = 5.0
    t0 = time.time()
    outcomes = run_world(2, _w_uneven_fault, mode, deadline=90.0, group_timeout=group_timeout, expect_errors=True)
    assert all(not o["ok"] for o in outcomes)
    if mode == "stall":  # rank 0 gave up within the group timeout (+ scheduling slack), before rank 1 woke
        assert outcomes[0]["time"] < outcomes[1]["time"], (outcomes[0]["time"] - t0, outcomes[1]["time"] - t0)
    err = outcomes[0]["error"]
    assert "SPNGD: reduce_segments of the stats buffer failed on rank 0 of 2" in err, err


def test_one_process_segment_operations_are_the_identity() -> None:
    from spngd_ext.distributed.communicator import LocalCommunicator

    comm = LocalCommunicator()
    buf = contribution(0, 1)
    before = buf.clone()
    comm.reduce_segments(buf, [OWNED[0]], kind="stats")
    comm.gather_segments(buf, [OWNED[0]], kind="grads")
    assert torch.equal(buf, before)
    comm.exchange([[]], [[]], kind="inverses", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="itself"):
        comm.exchange([[torch.ones(2)]], [[]], kind="inverses", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="one segment list per rank"):
        comm.reduce_segments(buf, [OWNED[0], []], kind="stats")
