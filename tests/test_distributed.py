"""SP-NGD under torch.distributed (CPU, Gloo on 127.0.0.1, spawned processes).

What is compared
----------------
* Equivalence: W ranks on equal shards of a batch vs one process on the concatenated batch, in
  float64, fisher="emp" (sampled labels differ by rank by design, so "mc" cannot match one
  process). After every step all ranks hold bit-identical parameters, and these equal the
  single-process ones within ``EQUIV_RTOL``/``EQUIV_ATOL`` (float reordering of sums and of the
  Cholesky inputs only).
* BatchNorm: plain BatchNorm normalises each rank's shard with that shard's statistics, which is
  not the whole-batch computation, so the equivalence tests use either BatchNorm in eval mode
  (running statistics; no BN curvature is collected, BN parameters take the plain-gradient path)
  or a SyncBatchNorm (whole-batch statistics; its unit-wise Fisher is collected). torch's
  SyncBatchNorm only runs on GPUs, so ``CpuSyncBN`` below does the same computation on CPU with
  an autograd-aware all-reduce; it is an ``nn.SyncBatchNorm``, so SP-NGD treats it as one.
* Every spawned world is bounded: the group timeout is a few seconds, and the parent kills all
  ranks after a deadline and fails the test rather than hang.
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
from steps import train_step
from torch import nn

from spngd_ext import SPNGD
from spngd_ext.layers import BatchNormCurvature, KroneckerLayer

EQUIV_RTOL = 1e-10  # float64: only float reordering separates W ranks from one process (seen: ≤ 6e-16)
EQUIV_ATOL = 1e-12
BF16_REL_TOL = 3e-2  # ‖θ_bf16 − θ_fp32‖ / ‖θ_fp32 − θ_0‖ after the steps (fp32 model)
FP16_REL_TOL = 5e-3
# Seconds for a whole spawned world. A world takes 15-55 s on 2 idle-ish cores (each process
# spends ~8 s importing torch and torch._dynamo); the margin is for a loaded machine.
SPAWN_DEADLINE = float(os.environ.get("SPNGD_TEST_SPAWN_DEADLINE", "240"))
GROUP_TIMEOUT = 60.0  # seconds, the process group's collective timeout in the ordinary tests


# ---------------------------------------------------------------------------------------------
# models and data (identical in every process: everything is derived from fixed seeds)


class CpuSyncBN(nn.SyncBatchNorm):
    """nn.SyncBatchNorm's computation on CPU (torch's own refuses CPU tensors): batch statistics
    over every rank of the world, gradients through an autograd-aware all-reduce. With one
    process (or in eval mode) it is an ordinary BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        rows = x.new_full((1,), x.numel() / c)
        tot = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), rows]))
        n = tot[-1]
        mean = tot[:c] / n
        var = tot[c : 2 * c] / n - mean * mean
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var.detach() * n / (n - 1), alpha=self.momentum)
        return y * self.weight.view(shape) + self.bias.view(shape)


def make_model(kind: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    # Built in float32 whatever the default dtype (another test module may have changed it in
    # this process; the spawned ranks start with float32), then cast: same weights everywhere.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return _make_model(kind, dtype)
    finally:
        torch.set_default_dtype(old)


def _make_model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "linear":  # one layer: fewer layers than ranks
        model = nn.Linear(6, 4)
    elif kind in ("conv_evalbn", "conv_syncbn"):
        bn = nn.BatchNorm2d(4) if kind == "conv_evalbn" else CpuSyncBN(4)
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=True),
            bn,
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 3 * 3, 8, bias=True),
            nn.LayerNorm(8),
            nn.ReLU(),  # LayerNorm: unit-wise curvature, one sample per row
            nn.Linear(8, 5, bias=False),
        )
        with torch.no_grad():  # non-trivial BN affine parameters and running statistics
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.8, 1.2)
    else:
        raise ValueError(kind)
    model = model.to(dtype)
    model.train()
    if kind == "conv_evalbn":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return model


def make_batch(kind: str, step: int, n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    if kind == "linear":
        x = torch.randn(n, 6, generator=g, dtype=torch.float32)
        y = torch.randint(0, 4, (n,), generator=g)
    else:
        x = torch.randn(n, 2, 7, 7, generator=g, dtype=torch.float32)
        y = torch.randint(0, 5, (n,), generator=g)
    return x.to(dtype), y


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


OPT_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="emp", kl_clip=1e-2)


def train(
    kind: str,
    steps: int,
    global_batch: int,
    rank: int,
    world: int,
    *,
    ddp: bool = False,
    dtype: torch.dtype = torch.float64,
    use_opt_backward: bool = True,
    **opt_kw,
) -> dict:
    """Run ``steps`` steps on this rank's shard; return per-step parameters and byte counts."""
    model = make_model(kind, dtype)
    net = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    kw = dict(OPT_KW)
    kw.update(opt_kw)
    opt = SPNGD(net, **kw)
    shard = global_batch // world
    params, nbytes = [flat_params(model)], []
    for step in range(steps):
        x, y = make_batch(kind, step, global_batch, dtype)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        train_step(net, opt, x, y, use_opt_backward)
        params.append(flat_params(model))
        nbytes.append(opt._comm.bytes_sent()["last"])
    return {
        "params": params,
        "bytes": nbytes,
        "total_bytes": opt._comm.bytes_sent()["total"],
        "owners": list(opt.assignment.owners),
        "placement": opt.placement,  # the owner of every statistic and gradient, the inverse routes
        "counters": opt.counters,
        "factors": opt.factors(),  # the owned layers' estimates after the last refresh
        "mc_seed": opt._sampler.generator_for(torch.device("cpu")).initial_seed(),
    }


def reference(kind: str, steps: int, global_batch: int, **opt_kw) -> dict:
    """One process on the concatenated batch (no process group in the test process)."""
    assert not dist.is_initialized()
    return train(kind, steps, global_batch, 0, 1, **opt_kw)


# ---------------------------------------------------------------------------------------------
# the spawn harness

_INJECTED_AT: float | None = None  # set by the fault worker in the rank that fails


def _entry(rank: int, world: int, port: int, group_timeout: float, outdir: str, worker, payload, backend: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    torch.set_num_threads(1)
    path = Path(outdir)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=group_timeout))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=group_timeout)
        )
        result = worker(rank, world, payload)
        torch.save({"ok": True, "result": result}, path / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException as exc:  # report, then leave at once (closing the sockets peers wait on)
        torch.save(
            {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
                "time": time.time(),
                "injected_at": _INJECTED_AT,
            },
            path / f"rank{rank}.pt",
        )
        os._exit(1)
    os._exit(0)


def run_world(
    world: int,
    worker,
    payload=None,
    *,
    deadline: float = SPAWN_DEADLINE,
    group_timeout: float = GROUP_TIMEOUT,
    expect_errors: bool = False,
    backend: str = "gloo",
) -> list[dict]:
    """Start ``world`` ranks running ``worker(rank, world, payload)``; every rank's outcome.

    The rendezvous store lives in this process on an OS-chosen port of 127.0.0.1 (no port races).
    Ranks still alive at ``deadline`` are killed and the test fails.
    """
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=group_timeout)
    )
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        procs = [
            ctx.Process(
                target=_entry, args=(r, world, store.port, group_timeout, outdir, worker, payload, backend), daemon=True
            )
            for r in range(world)
        ]
        start = time.time()
        for p in procs:
            p.start()
        while time.time() - start < deadline and any(p.is_alive() for p in procs):
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
        for p in procs:
            p.join(timeout=10)
        outcomes = []
        for r in range(world):
            f = Path(outdir) / f"rank{r}.pt"
            outcomes.append(
                torch.load(f, weights_only=False) if f.exists() else {"ok": False, "error": "no report", "trace": ""}
            )
        elapsed = time.time() - start
    del store
    if hung:
        pytest.fail(f"ranks {hung} of {world} still running after {deadline:.0f}s: killed (a hang)")
    for o in outcomes:
        o["elapsed"] = elapsed
    if not expect_errors:
        bad = [(r, o["trace"] or o["error"]) for r, o in enumerate(outcomes) if not o["ok"]]
        if bad:
            pytest.fail("\n".join(f"rank {r} failed:\n{t}" for r, t in bad))
        return [o["result"] for o in outcomes]
    return outcomes


def assert_ranks_identical(results: list[dict]) -> None:
    for r, res in enumerate(results[1:], start=1):
        for step, (a, b) in enumerate(zip(results[0]["params"], res["params"])):
            assert torch.equal(a, b), (
                f"rank {r} differs from rank 0 after step {step}: max |Δ| = {(a - b).abs().max():.3e}"
            )


def assert_factors_match(results: list[dict], ref: dict) -> None:
    """Every statistic (A, G; BN: F) is held by exactly its owner and equals the one-process one."""
    merged: dict = {}
    for res in results:
        for name, entry in res["factors"].items():
            merged.setdefault(name, {})
            for stat, t in entry.items():
                assert stat not in merged[name], f"{name}.{stat} estimated on two ranks"
                merged[name][stat] = t
    assert merged.keys() == ref.keys()
    for name in ref:
        assert merged[name].keys() == ref[name].keys()
        for stat in ref[name]:
            torch.testing.assert_close(
                merged[name][stat],
                ref[name][stat],
                rtol=EQUIV_RTOL,
                atol=EQUIV_ATOL,
                msg=lambda m: f"{name}.{stat}: {m}",
            )


def assert_close_to_reference(results: list[dict], ref: list[torch.Tensor], rtol=EQUIV_RTOL, atol=EQUIV_ATOL) -> None:
    assert len(results[0]["params"]) == len(ref)
    moved = (ref[-1] - ref[0]).abs().max()
    assert moved > 1e-3, "the reference run did not move the parameters: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(results[0]["params"], ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")


# ---------------------------------------------------------------------------------------------
# workers (module level so the spawned processes can import them)


def _w_equivalence(rank: int, world: int, payload: dict) -> dict:
    out = {}
    for name, cfg in payload.items():
        out[name] = train(rank=rank, world=world, **cfg)
    return out


def _w_collectives(rank: int, world: int, payload) -> dict:
    """Raw communicator checks: every reduce implementation and wire dtype on one buffer."""
    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    c = 5
    g = torch.Generator().manual_seed(7)
    base = torch.randn(world, world * c, generator=g, dtype=torch.float64).float()
    base[:, 3] = 1e6  # a large entry: fp16 must scale, not overflow
    base[:, 4] = 2.0**-8  # 1 + (W−1)·2^-8: exact in fp32, each term exact in bf16,
    base[0, 4] = 1.0  # but 1 + 2^-8 rounds back to 1 when bf16 values are added in bf16
    exact = base.double().sum(0)[rank * c : (rank + 1) * c]
    res = {}
    for impl in ("reduce_scatter", "all_reduce", "reduce", "all_to_all"):
        for dtype in (None, torch.bfloat16, torch.float16):
            comm = TorchDistributedCommunicator(None, comm_dtype=dtype, reduce_impl=impl)
            buf = base[rank].clone()
            mine = comm.reduce_scatter(buf, c, kind="stats")
            first = buf.clone()
            for _ in range(3):  # nothing rewritten in between: the result must not change
                comm.reduce_scatter(buf, c, kind="stats")
            # The returned chunk is this rank's part of the buffer itself, not a copy.
            returns_view = mine.numel() == c and mine.data_ptr() == buf[rank * c :].data_ptr()
            res[(impl, str(dtype))] = {
                "got": first[rank * c : (rank + 1) * c],
                "exact": exact.float(),
                "returns_view": returns_view,
                "bytes": comm.bytes_sent(),
                "first": first,
                "again": buf.clone(),
            }
    for gather_impl in ("all_gather", "broadcast"):
        for dtype in (None, torch.bfloat16, torch.float16):
            comm = TorchDistributedCommunicator(None, comm_dtype=dtype, gather_impl=gather_impl)
            buf = torch.full((world * c,), float("nan"))
            buf[rank * c : (rank + 1) * c] = base[rank, rank * c : (rank + 1) * c]
            comm.all_gather(buf, c, kind="precond")
            res[("gather", str(dtype), gather_impl)] = buf.clone()
    auto = TorchDistributedCommunicator(None)
    res["auto"] = (
        auto.reduce_impl_for(base[rank]),
        auto.gather_impl_for(base[rank]),
        TorchDistributedCommunicator(None, comm_dtype=torch.bfloat16).reduce_impl_for(base[rank]),
    )
    res["chunks"] = [base[r, r * c : (r + 1) * c] for r in range(world)]
    comm = TorchDistributedCommunicator(None)
    res["flag_none"] = bool(comm.any_flag(torch.tensor(False)))
    res["flag_one"] = bool(comm.any_flag(torch.tensor(rank == world - 1)))
    return res


def _w_fault(rank: int, world: int, payload: dict) -> dict:
    """Train a few steps; on ``payload['rank']`` at ``payload['step']`` raise or stall."""
    model = make_model("linear")
    opt = SPNGD(model, **OPT_KW)
    for step in range(4):
        x, y = make_batch("linear", step, 4 * world)
        x, y = x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]
        if rank == payload["rank"] and step == payload["step"]:
            global _INJECTED_AT
            _INJECTED_AT = time.time()
            if payload["mode"] == "raise":

                def boom(*a, **k):
                    raise ValueError("injected failure on the owner")

                opt._state.preconditioner.precondition_owned = boom  # after the reduce-scatters, before the all-gather
            else:
                time.sleep(payload["sleep"])
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
    return {}


# ---------------------------------------------------------------------------------------------
# the tests


def _expected_bytes(
    kind: str, placement, elem: int, *, rank: int, refresh: bool, ddp: bool = False, inverse_elem: int | None = None
) -> dict:
    """The byte-counter formula, from the layer shapes and the owners alone (independent of the
    layout code): every statistic and gradient travels at its true length. Rank r owns S_r
    statistics elements (a packed factor d(d+1)/2, a BN Fisher 3C, + 1 count per statistic) and
    G_r gradient elements (the gradients it preconditions, 1 change slot per statistic it owns,
    + 1 KL slot if it preconditions any gradient). The reduces send every other owner's part
    (S − S_r, G − G_r), the gather sends the own part G_r. A layer whose factors have two owners
    costs, at each inversion after a refresh, a mean trace each way and the smaller factor's packed
    inverse with its flag (full precision)."""
    model = make_model(kind)
    opt = SPNGD(model, **OPT_KW)  # only to walk the same layers in the same order
    stats: list[dict[str, int]] = []
    grads: list[int] = []
    for layer in opt.layers:
        if isinstance(layer, KroneckerLayer):
            da, dg = layer.dim_a, layer.dim_g
            stats.append({"A": da * (da + 1) // 2, "G": dg * (dg + 1) // 2})
            grads.append(dg * da)
        elif isinstance(layer, BatchNormCurvature):
            stats.append({"F": 3 * layer.channels})
            grads.append(2 * layer.channels)
        else:  # another elementwise layer: its own statistics' sizes
            stats.append({sp.name: sp.numel for sp in layer.stat_specs()})
            grads.append(sum(p.numel() for p in layer.params))
    plain = [p for p in model.parameters() if all(p is not q for layer in opt.layers for q in layer.params)]
    if plain:
        stats.append({})
        grads.append(sum(p.numel() for p in plain))
    stat_owners, grad_owners = placement.stat_owners, placement.grad_owners
    assert len(stat_owners) == len(stats) == len(grad_owners)
    s_all = sum(n + 1 for st in stats for n in st.values())
    s_own = sum(n + 1 for st, own in zip(stats, stat_owners) for k, n in st.items() if own[k] == rank)
    n_stat = sum(len(st) for st in stats)
    g_all = sum(grads) + n_stat + len(set(grad_owners))
    g_own = (
        sum(g for g, o in zip(grads, grad_owners) if o == rank)
        + sum(1 for own in stat_owners for o in own.values() if o == rank)
        + (1 if rank in grad_owners else 0)
    )
    out = {
        "stats": (s_all - s_own) * elem if refresh else 0,
        "grads": 0 if ddp else (g_all - g_own) * elem,
        "precond": g_own * elem,
        "flag": 4,
    }
    routes = placement.inverse_routes
    if routes and refresh:  # every rank takes part in the exchanges; a split layer whose factors
        # were not refreshed (and λ is constant) keeps its inverses: nothing to send
        ie = inverse_elem if inverse_elem is not None else elem
        out["inverse"] = ie * sum((2 + r.numel) if r.src == rank else 1 if r.dst == rank else 0 for r in routes)
    return out


def _splits(placement) -> list[int]:
    """Indices of the layers whose statistics have more than one owner."""
    return [i for i, own in enumerate(placement.stat_owners) if len(set(own.values())) > 1]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_equivalence_with_one_process(world: int) -> None:
    """Ownership per statistic (the default): A and G of a layer on different ranks, the smaller
    factor's inverse sent to the gradient owner; and one owner per layer (``ownership="layer"``)."""
    steps, batch = 4, 12
    payload = {
        "evalbn": dict(kind="conv_evalbn", steps=steps, global_batch=batch),
        "syncbn": dict(kind="conv_syncbn", steps=steps, global_batch=batch),
        "linear": dict(kind="linear", steps=steps, global_batch=batch),
        "interval2": dict(
            kind="conv_syncbn", steps=steps, global_batch=batch, curvature_interval=2, use_opt_backward=False
        ),
        "per_layer": dict(kind="conv_syncbn", steps=steps, global_batch=batch, ownership="layer"),
    }
    results = run_world(world, _w_equivalence, payload)
    for name, cfg in payload.items():
        per_rank = [r[name] for r in results]
        assert_ranks_identical(per_rank)
        ref = reference(**cfg)
        assert_close_to_reference(per_rank, ref["params"])
        assert_factors_match(per_rank, ref["factors"])  # emp G (and A, BN F) = the whole-batch ones
        assert per_rank[0]["counters"]["factor_updates"] == (steps if name != "interval2" else steps // 2)
        placement = per_rank[0]["placement"]
        if name == "per_layer":
            assert not _splits(placement) and not placement.inverse_routes
        elif name != "linear":  # not vacuous: some layer's A and G are on different ranks
            assert _splits(placement), f"{name}: no layer split at W={world}: {placement.stat_owners}"
            assert {r.layer for r in placement.inverse_routes} == set(_splits(placement))
        # byte counter = formula, on refresh and non-refresh steps, and the total is their sum
        interval = cfg.get("curvature_interval", 1)
        for r, res in enumerate(per_rank):
            for step, got in enumerate(res["bytes"]):
                want = _expected_bytes(cfg["kind"], res["placement"], 8, rank=r, refresh=step % interval == 0)
                assert got == want, f"{name}, rank {r}, step {step}: {got} != {want}"
            total = {k: sum(b.get(k, 0) for b in res["bytes"]) for k in res["total_bytes"]}
            assert total == res["total_bytes"]
    # more ranks than statistics: ranks that own nothing still take part and agree
    linear = results[0]["linear"]["placement"]
    if world > 2:
        assert any(r not in [o for own in linear.stat_owners for o in own.values()] for r in range(world))


def test_ddp_wrapped_model_matches_and_skips_gradient_reduction() -> None:
    world, steps, batch = 2, 3, 8
    payload = {
        "ddp": dict(kind="conv_evalbn", steps=steps, global_batch=batch, ddp=True),
        "plain": dict(kind="conv_evalbn", steps=steps, global_batch=batch),
        "ddp_mc": dict(kind="conv_evalbn", steps=steps, global_batch=batch, ddp=True, fisher="mc", seed=3),
    }
    results = run_world(world, _w_equivalence, payload)
    assert_ranks_identical([r["ddp_mc"] for r in results])  # sampled-label backward under DDP
    ddp = [r["ddp"] for r in results]
    plain = [r["plain"] for r in results]
    assert_ranks_identical(ddp)
    ref = reference(kind="conv_evalbn", steps=steps, global_batch=batch)
    assert_close_to_reference(ddp, ref["params"])
    assert_factors_match(ddp, ref["factors"])
    for a, b in zip(ddp[0]["params"], plain[0]["params"]):
        torch.testing.assert_close(a, b, rtol=EQUIV_RTOL, atol=EQUIV_ATOL)
    for r, res in enumerate(ddp):
        for got in res["bytes"]:
            assert got["grads"] == 0, "DDP already averaged the gradients: SP-NGD must not send them again"
            assert got == _expected_bytes("conv_evalbn", res["placement"], 8, rank=r, refresh=True, ddp=True)


def _w_checkpoint(rank: int, world: int, payload: dict) -> dict:
    """Two steps, state_dict, two more steps; a fresh model and optimizer loaded from the
    state_dict run the same two steps."""
    import copy

    kind, batch, shard = payload["kind"], payload["global_batch"], payload["global_batch"] // world

    def step(model: nn.Module, opt: SPNGD, k: int) -> None:
        x, y = make_batch(kind, k, batch)
        train_step(model, opt, x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard])

    model = make_model(kind)
    opt = SPNGD(model, **OPT_KW)
    for k in range(2):
        step(model, opt, k)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for k in range(2, 4):
        step(model, opt, k)
    resumed = make_model(kind)
    resumed.load_state_dict(weights)
    opt2 = SPNGD(resumed, **OPT_KW)
    opt2.load_state_dict(saved)
    for k in range(2, 4):
        step(resumed, opt2, k)
    return {
        "straight": flat_params(model),
        "resumed": flat_params(resumed),
        "placement": opt.placement,
        "inverses": {n: [t is not None for t in inv] for n, inv in opt2.inverses().items()},
        "names": [layer.name for layer in opt.layers],
    }


@pytest.mark.parametrize("world", [2, 3])
def test_checkpoint_round_trip_with_split_layers(world: int) -> None:
    """state_dict / load_state_dict under ownership per statistic: the resumed run equals the
    uninterrupted one bit for bit; a split layer's inverse pair is held (and saved) by its
    gradient owner only."""
    results = run_world(world, _w_checkpoint, dict(kind="conv_syncbn", global_batch=12))
    for r, res in enumerate(results):
        assert torch.equal(res["straight"], res["resumed"]), f"rank {r}: the resumed run differs"
    assert torch.equal(results[0]["straight"], results[-1]["straight"])
    placement = results[0]["placement"]
    assert _splits(placement), f"no layer split at W={world}: {placement.stat_owners}"
    for route in placement.inverse_routes:
        name = results[0]["names"][route.layer]
        assert results[route.dst]["inverses"][name] == [True, True]
        assert name not in results[route.src]["inverses"]


def _w_split_not_due(rank: int, world: int, payload: dict) -> dict:
    """Stale statistics with the split layers' statistics held back after step 0 (their next due
    step moved past the run), so later refreshes collect only the other layers'."""
    from spngd_ext.refresh import StalePolicy

    kind, batch, steps = "conv_syncbn", 12, 4
    model = make_model(kind)
    opt = SPNGD(model, **dict(OPT_KW, stale=StalePolicy(threshold=1e9, max_interval=1)))
    shard = batch // world
    held = set(payload["held"])  # layer indices whose statistics are held back
    ids = opt._state.accumulation.stat_ids
    params, nbytes, due = [flat_params(model)], [], []
    for step in range(steps):
        if step == 1:
            for s, (i, _) in enumerate(ids):
                if i in held:
                    opt._schedule.next_due[s] = 10**9
            opt._runner.set_due()
        due.append(opt._state.accumulation.due_stats())
        x, y = make_batch(kind, step, batch)
        train_step(model, opt, x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard])
        params.append(flat_params(model))
        nbytes.append(opt._comm.bytes_sent()["last"])
    return {"params": params, "bytes": nbytes, "due": due, "placement": opt.placement}


def test_a_split_layer_whose_statistics_are_not_due_sends_nothing() -> None:
    """Refreshes in which the statistics of the split layers are not due while the other layers'
    are: no trace or inverse moves (kind ``inverse``: 0 bytes), the statistics reduce moves exactly
    the other owners' due statistics (an owner with nothing due receives nothing), and the
    parameters still equal one process doing the same on the whole batch (float64)."""
    world = 2
    probe = run_world(world, _w_split_not_due, {"held": []})[0]
    held = sorted({r.layer for r in probe["placement"].inverse_routes})
    assert held, "no layer is split at W=2; the test would be vacuous"
    results = run_world(world, _w_split_not_due, {"held": held})
    ref = _w_split_not_due(0, 1, {"held": held})
    assert_ranks_identical(results)
    assert_close_to_reference(results, ref["params"])
    model = make_model("conv_syncbn")
    layers = SPNGD(model, **OPT_KW).layers
    numel = {
        (i, sp.name): sp.numel for i, layer in enumerate(layers) for sp in layer.stat_specs()
    }  # packed triangle, or 3C
    for rank, res in enumerate(results):
        owners = res["placement"].stat_owners
        for step, (due, got) in enumerate(zip(res["due"], res["bytes"])):
            assert due, f"step {step}: nothing due; the check would be vacuous"
            if step >= 1:
                assert all(i not in held for i, _ in due), due
                assert got.get("inverse", 0) == 0, f"rank {rank}, step {step}: {got}"
            want = sum(numel[(i, n)] + 1 for i, n in due if owners[i][n] != rank) * 8
            assert got["stats"] == want, f"rank {rank}, step {step}: due {due}, {got['stats']} != {want}"
        assert res["bytes"][0].get("inverse", 0) > 0 or all(
            r.src != rank and r.dst != rank for r in res["placement"].inverse_routes
        )


def test_reduced_precision_communication_and_mc_seeds() -> None:
    world, steps, batch = 2, 3, 16
    f32 = torch.float32
    payload = {
        "fp32": dict(kind="conv_syncbn", steps=steps, global_batch=batch, dtype=f32),
        "bf16": dict(kind="conv_syncbn", steps=steps, global_batch=batch, dtype=f32, comm_dtype=torch.bfloat16),
        "fp16": dict(kind="conv_syncbn", steps=steps, global_batch=batch, dtype=f32, comm_dtype=torch.float16),
        "mc": dict(kind="conv_syncbn", steps=steps, global_batch=batch, dtype=f32, fisher="mc", seed=5),
    }
    results = run_world(world, _w_equivalence, payload)
    for name in payload:
        assert_ranks_identical([r[name] for r in results])
    p0 = results[0]["fp32"]["params"][0]
    p32 = results[0]["fp32"]["params"][-1]
    moved = (p32 - p0).norm()
    for name, tol in (("bf16", BF16_REL_TOL), ("fp16", FP16_REL_TOL)):
        rel = float((results[0][name]["params"][-1] - p32).norm() / moved)
        assert rel < tol, f"{name} communication: relative deviation {rel:.2e} from fp32 (tolerance {tol})"
        for r, res in enumerate(results):
            for step, got in enumerate(res[name]["bytes"]):
                want32 = results[r]["fp32"]["bytes"][step]
                # half the bytes (+ the fp16 power-of-two scales: W − 1 floats per reduce, 1 per gather)
                extra = (
                    {"stats": 4 * (world - 1), "grads": 4 * (world - 1), "precond": 4, "flag": 0}
                    if name == "fp16"
                    else dict.fromkeys(want32, 0)
                )
                # the inverses and π traces travel at full precision
                assert got == {
                    k: (v // 2 if k not in ("flag", "inverse") else v) + extra.get(k, 0) for k, v in want32.items()
                }
    # fp32 distributed equals one process in fp32 up to float32 reordering
    ref = reference(kind="conv_syncbn", steps=steps, global_batch=batch, dtype=f32)
    assert_close_to_reference([results[0]["fp32"]], ref["params"], rtol=1e-4, atol=1e-5)
    # MC sampling: per-rank generators seeded seed + 1_000_003·rank
    seeds = [r["mc"]["mc_seed"] for r in results]
    assert seeds == [5 + 1_000_003 * r for r in range(world)]


def test_collectives_all_implementations() -> None:
    world = 3
    results = run_world(world, _w_collectives)
    for rank, res in enumerate(results):
        for (impl, dtype), v in ((k, v) for k, v in res.items() if isinstance(k, tuple) and k[0] != "gather"):
            got, exact = v["got"], v["exact"]
            assert v["returns_view"], f"{impl}/{dtype}: reduce_scatter must return a view of its chunk"
            if dtype == "None":
                torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
                elem = 4
            else:
                assert torch.isfinite(got).all(), f"{impl}/{dtype}: overflow"
                torch.testing.assert_close(got, exact, rtol=2e-2, atol=3e-2)
                elem = 2
            extra = 0
            if dtype == "torch.float16":
                extra = 4 * world if impl == "all_to_all" else 4
            assert v["bytes"]["total"]["stats"] == 4 * (world * 5 * elem + extra)
            # the other chunks are zero, and repeating the call without rewriting changes nothing
            others = torch.cat([v["first"][: rank * 5], v["first"][(rank + 1) * 5 :]])
            assert torch.equal(others, torch.zeros_like(others)), (impl, dtype)
            if dtype == "None":
                assert torch.equal(v["again"], v["first"]), (impl, dtype)
            else:  # the owned sum is re-rounded once per call, never re-summed
                torch.testing.assert_close(v["again"], v["first"], rtol=1e-2, atol=0)
        # all_to_all keeps fp32 accumulation: 1 + 3·2^-8 survives (each 2^-8 is exact in bf16,
        # the fp32 sum is exact); in-wire bf16 addition may round it away
        if rank == 0:
            a2a = res[("all_to_all", "torch.bfloat16")]["got"][4]
            assert float(a2a) == 1.0 + (world - 1) * 2.0**-8
        truth = torch.cat([base_chunk for base_chunk in results[0]["chunks"]])
        for gather_impl in ("all_gather", "broadcast"):
            for dtype in ("None", "torch.bfloat16", "torch.float16"):
                gathered = res[("gather", dtype, gather_impl)]
                assert torch.equal(gathered, results[0][("gather", dtype, "all_gather")]), (gather_impl, dtype)
                if dtype == "None":
                    assert torch.equal(gathered, truth)
                else:
                    torch.testing.assert_close(gathered, truth, rtol=1e-2, atol=0)
        assert res["auto"] == ("reduce", "broadcast", "all_to_all")  # Gloo choices at W=3 (see collectives.py)
        assert res["flag_none"] is False and res["flag_one"] is True


@pytest.mark.parametrize("mode", ["raise", "stall"])
def test_a_failing_rank_ends_every_rank_with_an_error(mode: str) -> None:
    group_timeout = 6.0
    payload = {"rank": 1, "step": 2, "mode": mode, "sleep": 3 * group_timeout}
    t0 = time.time()
    outcomes = run_world(2, _w_fault, payload, deadline=120.0, group_timeout=group_timeout, expect_errors=True)
    elapsed = time.time() - t0
    assert all(not o["ok"] for o in outcomes), [o.get("error") for o in outcomes]
    assert "SPNGD" in outcomes[0]["error"] and "rank 0 of 2" in outcomes[0]["error"], outcomes[0]["error"]
    injected = outcomes[1]["injected_at"]
    assert injected is not None, outcomes[1]["trace"]
    slack = 10.0  # process scheduling on a loaded 2-core machine
    # the healthy rank errors within the group timeout of the fault (at once when the peer exits)
    assert outcomes[0]["time"] - injected < group_timeout + slack
    if mode == "raise":
        assert "injected failure" in outcomes[1]["error"]
    else:  # the stalled rank errors within the timeout of waking up (its peer is gone)
        assert "SPNGD" in outcomes[1]["error"], outcomes[1]["error"]
        assert outcomes[1]["time"] - (injected + payload["sleep"]) < group_timeout + slack
    assert elapsed < 120.0


def _w_subgroup(rank: int, world: int, payload: dict) -> dict:
    """SPNGD on the process group {1, 2} of a 3-rank world (group ranks ≠ global ranks)."""
    group = dist.new_group([1, 2])  # every rank takes part in creating it
    if rank == 0:
        return {}
    return train(rank=rank - 1, world=2, process_group=group, **payload)


def test_process_group_argument_with_a_subgroup() -> None:
    cfg = dict(kind="conv_evalbn", steps=3, global_batch=8)
    results = run_world(3, _w_subgroup, cfg)
    assert results[0] == {}
    assert_ranks_identical(results[1:])
    ref = reference(**cfg)
    assert_close_to_reference(results[1:], ref["params"])
    assert_factors_match(results[1:], ref["factors"])


def _w_hang(rank: int, world: int, payload) -> dict:
    time.sleep(3600)  # no collective at all: only the harness deadline can end this
    return {}


def test_harness_kills_a_hung_world_and_fails() -> None:
    t0 = time.time()
    with pytest.raises(pytest.fail.Exception, match="killed"):
        run_world(2, _w_hang, deadline=20.0)
    assert time.time() - t0 < 40.0


def _w_nccl_single(rank: int, world: int, payload) -> dict:
    """One NCCL rank: every collective path on CUDA tensors, and SPNGD through the NCCL communicator."""
    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    dev = torch.device("cuda", rank)
    out: dict = {}
    buf = torch.randn(12, device=dev)
    buf[3] = 1e6
    for impl in ("reduce_scatter", "all_reduce", "reduce", "all_to_all"):
        for dtype in (None, torch.bfloat16, torch.float16):
            comm = TorchDistributedCommunicator(None, comm_dtype=dtype, reduce_impl=impl)
            got = comm.reduce_scatter(buf.clone(), 12, kind="stats")
            out[("rs", impl, str(dtype))] = float(((got - buf).abs() / buf.abs().clamp(min=1)).max())
    for impl in ("all_gather", "broadcast"):
        for dtype in (None, torch.bfloat16, torch.float16):
            comm = TorchDistributedCommunicator(None, comm_dtype=dtype, gather_impl=impl)
            b = buf.clone()
            comm.all_gather(b, 12, kind="precond")
            out[("ag", impl, str(dtype))] = float(((b - buf).abs() / buf.abs().clamp(min=1)).max())
    comm = TorchDistributedCommunicator(None)
    out["auto"] = (comm.reduce_impl_for(buf), comm.gather_impl_for(buf), comm.backend)
    out["flag"] = (
        bool(comm.any_flag(torch.tensor(True, device=dev))),
        bool(comm.any_flag(torch.tensor(False, device=dev))),
    )
    runs = {}
    for name, make in (
        ("local", lambda: None),
        ("nccl", lambda: TorchDistributedCommunicator(None)),
        ("nccl_bf16", lambda: TorchDistributedCommunicator(None, comm_dtype=torch.bfloat16)),
    ):
        model = make_model("conv_evalbn", torch.float32).to(dev)
        kw = dict(OPT_KW)
        opt = SPNGD(model, communicator=make(), **kw)
        for step in range(3):
            x, y = make_batch("conv_evalbn", step, 8, torch.float32)
            opt.zero_grad()
            o = model(x.to(dev))
            loss = F.cross_entropy(o, y.to(dev))
            opt.backward(loss, o)
            opt.step()
        runs[name] = flat_params(model).cpu()
        if name != "local":
            runs[name + "_bytes"] = opt._comm.bytes_sent()["last"]
    out["runs"] = runs
    out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU and NCCL")
def test_nccl_single_rank_paths() -> None:
    """What one GPU can check of the NCCL path: every algorithm and wire dtype runs on CUDA
    tensors, and SPNGD through the NCCL communicator equals SPNGD with the local one."""
    (res,) = run_world(1, _w_nccl_single, backend="nccl")
    for key, err in res.items():
        if isinstance(key, tuple):
            tol = 0.0 if key[2] == "None" else 2.0**-8
            assert err <= tol, (key, err)
    assert res["auto"][:2] == ("reduce_scatter", "all_gather") and "nccl" in res["auto"][2]
    assert res["flag"] == (True, False)
    runs = res["runs"]
    torch.testing.assert_close(runs["nccl"], runs["local"], rtol=1e-5, atol=1e-6)
    assert (runs["nccl_bf16"] - runs["local"]).abs().max() < 5e-2
    print("NCCL", res["nccl_version"], {k: v for k, v in runs.items() if k.endswith("_bytes")})
