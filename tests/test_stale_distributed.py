"""Stale statistics under torch.distributed: every rank makes the same interval decisions.

Two CPU processes (Gloo on 127.0.0.1), each on its own shard of every global batch. The relative
changes that drive the decisions are computed by each statistic's owner and all-gathered, so the
intervals — and with them which statistics are computed on which step — must agree on every
rank at every step, even where the ranks' local statistics differ (different shards, per-rank
sampled labels, per-shard BatchNorm). With fisher='emp' and no BatchNorm the reduced statistics
equal one process's on the concatenated batch up to float reordering; the scenario below keeps
every relative change far from the threshold (stationary data, then an abrupt switch), so the
single process must make exactly the same decisions.

Every spawned world is bounded: collectives time out after GROUP_TIMEOUT seconds and the parent
kills ranks still alive after DEADLINE seconds (the test then fails instead of hanging).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.layers import BatchNormCurvature, KroneckerLayer
from spngd_ext.refresh import StalePolicy

WORLD = 2
DEADLINE = 150.0  # seconds for the whole spawned world (process start is a few seconds each)
GROUP_TIMEOUT = 30.0  # seconds, per collective

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------
# scenarios (deterministic: everything derives from fixed seeds, identically in every process)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(11)
    if kind == "plain":  # no BatchNorm: W shards reduce to exactly the whole-batch statistics
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=True),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, stride=2, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 5),
        )
    elif kind == "bn":  # plain BatchNorm2d: each rank normalises its shard with its own moments
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 5 * 5, 6),
            nn.ReLU(),
            nn.Linear(6, 5),
        )
    else:
        raise ValueError(kind)
    return model.double().train()


def make_batch(seed: int, n: int, *, shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=g)
    if shifted:  # another input distribution and other labels
        x = 2.5 * x.abs() + torch.linspace(-3.0, 3.0, 25, dtype=torch.float64).view(1, 1, 5, 5)
        y = (y + 1 + torch.randint(0, 3, (n,), generator=g)) % 5
    return x, y


# "clear": stationary, then an abrupt switch; lr small enough that the stationary changes stay
# below ~0.02 and the switch's changes are above ~0.2: decisions are far from the threshold 0.1.
CLEAR = dict(
    kind="plain",
    steps=36,
    switch=18,
    global_batch=64,
    opt=dict(lr=1e-5, momentum=0.9, damping=1e-2, fisher="emp", stale=StalePolicy(threshold=0.1, max_interval=8)),
)
# "noisy": a fresh batch each step, sampled labels (different on each rank by design), per-shard
# BatchNorm, a real learning rate: changes land anywhere, decisions must still agree.
NOISY = dict(
    kind="bn",
    steps=30,
    switch=None,
    global_batch=64,
    opt=dict(
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        damping=1e-2,
        fisher="mc",
        seed=9,
        stale=StalePolicy(threshold=0.15, max_interval=8),
    ),
)


def run_scenario(sc: dict, rank: int, world: int) -> dict:
    model = make_model(sc["kind"])
    opt = SPNGD(model, **sc["opt"])
    shard = sc["global_batch"] // world
    intervals, params, due, nbytes = [], [], [], []
    for step in range(sc["steps"]):
        due.append(opt._state.accumulation.due_stats())  # this step's due statistics
        if sc["switch"] is None:
            x, y = make_batch(1000 + step, sc["global_batch"])
        else:
            x, y = make_batch(7, sc["global_batch"], shifted=step >= sc["switch"])
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
        intervals.append(opt.counters["intervals"])
        nbytes.append(opt._comm.bytes_sent()["last"])
        params.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    counters = opt.counters
    numel = {}  # (layer index, statistic) -> elements, from the module shapes
    for i, layer in enumerate(opt.layers):
        if isinstance(layer, KroneckerLayer):
            numel[(i, "A")] = layer.dim_a * (layer.dim_a + 1) // 2
            numel[(i, "G")] = layer.dim_g * (layer.dim_g + 1) // 2
        elif isinstance(layer, BatchNormCurvature):
            numel[(i, "F")] = 3 * layer.channels
        else:  # another elementwise layer: its own statistics' sizes
            numel.update({(i, sp.name): sp.numel for sp in layer.stat_specs()})
    return {
        "intervals": intervals,
        "params": params,
        "counters": counters,
        "due": due,
        "bytes": nbytes,
        "owners": list(opt.placement.stat_owners),  # per layer: {statistic: owning rank}
        "routes": list(opt.placement.inverse_routes),  # split layers: the smaller factor's inverse travels
        "numel": numel,
    }


# ---------------------------------------------------------------------------------------------
# spawn harness


def _rank_main(rank: int, world: int, port: int, outdir: str, scenarios: dict) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    report = Path(outdir) / f"rank{rank}.pt"
    try:
        timeout = datetime.timedelta(seconds=GROUP_TIMEOUT)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        results = {name: run_scenario(sc, rank, world) for name, sc in scenarios.items()}
        torch.save({"ok": True, "results": results}, report)
        dist.destroy_process_group()
    except BaseException as exc:  # report, then exit at once so that peers' collectives fail fast
        torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}, report)
        os._exit(1)
    os._exit(0)


def spawn_world(scenarios: dict, world: int = WORLD) -> list[dict]:
    """Run the scenarios on ``world`` ranks; each rank's results. The rendezvous store is hosted
    here on a port the OS picks (so there is no race for a free port)."""
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT)
    )
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, store.port, outdir, scenarios), daemon=True)
            for r in range(world)
        ]
        start = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=max(0.0, DEADLINE - (time.monotonic() - start)))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(timeout=10)
        reports = []
        for r in range(world):
            f = Path(outdir) / f"rank{r}.pt"
            reports.append(torch.load(f, weights_only=False) if f.exists() else {"ok": False, "error": "no report"})
    del store
    if hung:
        pytest.fail(f"ranks {hung} still running after {DEADLINE:.0f} s: killed (hang)")
    failed = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if not rep["ok"]]
    if failed:
        pytest.fail("\n".join(failed))
    return [rep["results"] for rep in reports]


@pytest.fixture(scope="module")
def world_results() -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with Gloo is not available in this build")
    return spawn_world({"clear": CLEAR, "noisy": NOISY})


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("name", ["clear", "noisy"])
def test_ranks_make_identical_interval_decisions(world_results, name):
    ranks = [res[name] for res in world_results]
    steps = len(ranks[0]["intervals"])
    for r in range(1, len(ranks)):
        for step in range(steps):
            assert ranks[r]["intervals"][step] == ranks[0]["intervals"][step], (
                f"{name}: rank {r} intervals differ from rank 0 after step {step}: "
                f"{ranks[r]['intervals'][step]} vs {ranks[0]['intervals'][step]}"
            )
            assert torch.equal(ranks[r]["params"][step], ranks[0]["params"][step]), (
                f"{name}: rank {r} parameters differ from rank 0 after step {step}"
            )
        for key in ("factor_work_skipped", "inverse_work_skipped", "factor_updates", "inverse_updates", "intervals"):
            assert ranks[r]["counters"][key] == ranks[0]["counters"][key], f"{name}: counters[{key!r}] differ"
    # the scenario is not vacuous: intervals grew, and some moved down again
    history = [k for snap in ranks[0]["intervals"] for layer in snap.values() for k in layer.values()]
    assert max(history) >= 4, f"{name}: intervals never grew: {ranks[0]['intervals'][-1]}"
    assert ranks[0]["counters"]["factor_work_skipped"] > 0.1


def test_ranks_match_one_process_on_the_whole_batch(world_results):
    single = run_scenario(CLEAR, rank=0, world=1)
    multi = world_results[0]["clear"]
    for step, (a, b) in enumerate(zip(multi["intervals"], single["intervals"])):
        assert a == b, f"after step {step}: {WORLD} ranks {a}, one process {b}"
    assert multi["counters"]["factor_work_skipped"] == single["counters"]["factor_work_skipped"]
    assert multi["counters"]["inverse_work_skipped"] == single["counters"]["inverse_work_skipped"]
    moved = (single["params"][-1] - single["params"][0]).abs().max()
    assert moved > 1e-3, "the parameters barely moved: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(multi["params"], single["params"])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"after step {step}: {m}")
    # the switch halved the intervals that had reached the cap
    switch = CLEAR["switch"]
    before = single["intervals"][switch - 1]
    assert all(k == 8 for layer in before.values() for k in layer.values()), before
    halved = {
        (layer, s)
        for t in range(switch, CLEAR["steps"])
        for layer, d in single["intervals"][t].items()
        for s, k in d.items()
        if k == 4
    }
    assert len(halved) == sum(len(d) for d in before.values()), f"not every statistic halved after the switch: {halved}"


def test_stale_steps_send_only_the_due_statistics(world_results):
    """The statistics reduce moves, per rank, exactly the due statistics (and their counts) of the
    other owners, counted by the communicator: a statistic that is not due sends nothing, and an
    owner none of whose statistics is due receives nothing. ("clear" refreshes all statistics
    together; "noisy" has steps where only some are due.)"""
    partial = 0
    for name in ("clear", "noisy"):
        for rank, res in enumerate(r[name] for r in world_results):
            owners, numel = res["owners"], res["numel"]
            everything = sum(n + 1 for (i, k), n in numel.items() if owners[i][k] != rank) * 8
            for step, (due, got) in enumerate(zip(res["due"], res["bytes"])):
                want = sum(numel[(i, k)] + 1 for i, k in due if owners[i][k] != rank) * 8
                assert got["stats"] == want, (
                    f"{name}, rank {rank}, step {step}: due {due}, sent {got['stats']} bytes, expected {want}"
                )
                if due and want < everything:
                    partial += 1  # some statistic of another owner was not due, and was not sent
    assert partial > 0, "no step left another owner's statistic out; the byte check would be vacuous"


def test_stale_steps_send_no_inverse_of_a_split_layer_that_is_not_due(world_results):
    """Ownership per statistic: a layer whose A and G have different owners costs, on a step where
    one of its statistics is due, a mean trace each way and the smaller factor's packed inverse
    (with a flag) from its owner to the gradient owner; on a step where neither is due, nothing.
    (In these scenarios the split layer is due whenever anything is, so the steps that send
    nothing are those where nothing is due.)"""
    quiet = 0
    for name in ("clear", "noisy"):
        for rank, res in enumerate(r[name] for r in world_results):
            routes = res["routes"]
            assert routes, f"{name}: no layer has two owners at W={WORLD}; the test would be vacuous"
            for step, (due, got) in enumerate(zip(res["due"], res["bytes"])):
                layers = {i for i, _ in due}
                active = [r for r in routes if r.layer in layers]
                want = sum((2 + r.numel) if r.src == rank else 1 if r.dst == rank else 0 for r in active) * 8
                assert got.get("inverse", 0) == want, f"{name}, rank {rank}, step {step}: due {due}, got {got}"
                quiet += not active
    assert quiet > 0, "every step inverted a split layer; the check would be vacuous"
