"""Communication of SP-NGD vs a DDP-style gradient all-reduce on a ResNet-50-sized parameter set.

The layer list is torchvision's ResNet-50 (v1.5) written out by hand (53 Conv2d without bias,
53 BatchNorm2d, one Linear 2048→1000 with bias: 25,557,032 parameters); torchvision is not needed.
SP-NGD's buffers are sized exactly as the optimizer sizes them: the same cost model and LPT
ownership (``OwnerAssignment``) and the same layout (``build_layouts``: packed A of
C_in·kh·kw(+1 bias), packed G of C_out, BN 3·C, one count per statistic; gradients plus one
change slot per statistic plus the KL slot; every chunk padded to the largest).

Measured per world size (spawned ranks, Gloo on 127.0.0.1 here; NCCL with one GPU per rank):

* ``ddp_allreduce``: one all-reduce of the 25.6 M gradients (what DDP does per step, bucketing aside)
* ``spngd_refresh``: reduce-scatter(stats) + reduce-scatter(grads) + all-gather(preconditioned)
* ``spngd_grads_only``: a step without factors (curvature_interval > 1, non-refresh step)
* each in fp32 and bf16 on the wire;
* the Gloo choice: the stats reduce-scatter with each ``reduce_impl`` (reduce_scatter,
  all_reduce, reduce, all_to_all; fp32 and bf16);
* overlap: a ResNet-50 backward pass (hand-built module, small input) alone, the stats
  reduce-scatter alone, and the reduce-scatter issued with ``async_op=True`` before the backward
  and waited on after it.

Times are the median over ``--repeats`` of the slowest rank (a barrier before each repeat).
Bytes are per rank per step: ``contributed`` (what the optimizer's byte counter reports: numel ×
element size handed to each collective) and ``wire`` (what a ring algorithm sends: (W−1)/W of a
reduce-scatter or all-reduce contribution, twice for the all-reduce, (W−1)× an all-gather
contribution).

    python bench/comm.py --worlds 2,4 --repeats 3     # writes runs/comm/results.json
    python bench/comm.py --design segments --worlds 2,4,8 --repeats 1   # ownership per statistic
    python bench/comm.py --model-only          # both 1..1024-rank models of docs/scaling.md
    python bench/comm.py --design fsdp --worlds 2,4 --repeats 5   # FSDP2 + SP-NGD (bench/comm_fsdp.py)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # the package, and comm_segments next to this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from comm_fsdp import fsdp_table, fsdp_worker  # noqa: E402
from comm_segments import segments_measured_table, segments_table, segments_worker, split_table  # noqa: E402
from torch import nn  # noqa: E402

from spngd_ext.distributed.placement import LayerCost, OwnerAssignment  # noqa: E402
from spngd_ext.layout import build_layouts  # noqa: E402
from spngd_ext.train.models import resnet50  # noqa: E402

# ------------------------------------------------------------------------------------ shapes


def resnet50_layers(num_classes: int = 1000) -> list[dict]:
    """torchvision ResNet-50 (v1.5, stride in the 3×3 conv) in ``named_modules`` order."""
    layers: list[dict] = []

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        layers.append(dict(name=name, kind="conv", cin=cin, cout=cout, k=k, bias=False))

    def bn(name: str, c: int) -> None:
        layers.append(dict(name=name, kind="bn", c=c))

    conv("conv1", 3, 64, 7)
    bn("bn1", 64)
    cin = 64
    for li, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            conv(f"{p}.conv1", cin, planes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes, planes * 4, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", cin, planes * 4, 1)
                bn(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    layers.append(dict(name="fc", kind="fc", cin=2048, cout=num_classes, k=1, bias=True))
    return layers


def _dims(layer: dict) -> tuple[int, int]:
    return layer["cin"] * layer["k"] ** 2 + int(layer["bias"]), layer["cout"]


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def spngd_plan(layers: list[dict], world: int) -> dict:
    """Ownership and buffer sizes as SPNGD builds them (same cost model as the optimizer)."""
    costs, specs, grads = [], [], []
    for layer in layers:
        if layer["kind"] == "bn":
            c = layer["c"]
            costs.append(LayerCost(layer["name"], elementwise=2 * c * 3))
            specs.append([("F", 3 * c, 0)])
            grads.append(2 * c)
        else:
            da, dg = _dims(layer)
            costs.append(LayerCost(layer["name"], (da, dg), (dg, da)))
            specs.append([("A", _tri(da), da), ("G", _tri(dg), dg)])
            grads.append(da * dg)
    assignment = OwnerAssignment.balance(costs, world)
    stats_layout, grad_layout = build_layouts(specs, grads, assignment.owners, world)
    owned_dense = [0] * world  # dense inverses (and the transient dense factors) of the owned layers
    owned_packed = [0] * world
    for layer, owner, spec in zip(layers, assignment.owners, specs):
        owned_packed[owner] += sum(n for _, n, _ in spec)
        if layer["kind"] != "bn":
            da, dg = _dims(layer)
            owned_dense[owner] += da * da + dg * dg
    return {
        "world": world,
        "params": sum(grads),
        "stats_numel": sum(n for spec in specs for _, n, _ in spec),
        "stats_chunk": stats_layout.chunk_numel,
        "grad_chunk": grad_layout.chunk_numel,
        "owners": list(assignment.owners),
        "imbalance": assignment.imbalance,
        "max_owned_dense": max(owned_dense),
        "max_owned_packed": max(owned_packed),
        "ranks_owning_nothing": sum(1 for r in range(world) if r not in set(assignment.owners)),
    }


def byte_model(plan: dict, elem: int = 4) -> dict:
    """Per-rank bytes per step (contributed to collectives / sent on the wire by ring algorithms)."""
    w, p, cs, cg = plan["world"], plan["params"], plan["stats_chunk"], plan["grad_chunk"]
    frac = (w - 1) / w
    if w == 1:  # one process: LocalCommunicator, nothing moves
        zero = {"contributed": 0, "wire": 0}
        return {
            "ddp_allreduce": dict(zero),
            "spngd_refresh": dict(zero),
            "spngd_grads_only": dict(zero),
            "spngd_refresh_unpadded": {"wire": 0},
        }
    return {
        "ddp_allreduce": {"contributed": p * elem, "wire": 2 * frac * p * elem},
        "spngd_refresh": {
            "contributed": (w * cs + w * cg + cg) * elem,
            "wire": ((w - 1) * cs + (w - 1) * cg + (w - 1) * cg) * elem,
        },
        "spngd_grads_only": {"contributed": (w * cg + cg) * elem, "wire": 2 * (w - 1) * cg * elem},
        # the same statistics without padding (variable-size chunks): the lower bound of this design
        "spngd_refresh_unpadded": {"wire": (frac * plan["stats_numel"] + 2 * frac * p) * elem},
    }


def memory_model(plan: dict, elem: int = 4) -> dict:
    """Per-rank bytes the optimizer holds for curvature (momentum buffers, as in SGD, excluded)."""
    w, cs, cg = plan["world"], plan["stats_chunk"], plan["grad_chunk"]
    return {
        "stats_buffer": w * cs * elem,  # the accumulation buffer every rank reduces from
        "estimates": cs * elem,  # the owned, packed running estimates
        "grad_buffer": w * cg * elem,
        "owned_inverses": plan["max_owned_dense"] * elem,  # dense Â⁻¹, Ĝ⁻¹ of the owned layers
        "total": (w * cs + cs + w * cg + plan["max_owned_dense"]) * elem,
    }


# ------------------------------------------------------------------------------------ measurement


def _wchar() -> int | None:
    """Bytes this process wrote through write()/writev() so far (Gloo's TCP sends included)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_SENT: dict[str, float] = {}


def _timed(fn, repeats: int, group, key: str | None = None) -> float:
    """Median over repeats of the slowest rank's time (seconds). With ``key``, also the median
    bytes each rank wrote to its sockets per call (mean over ranks) into ``_SENT[key]``."""
    times, sent = [], []
    for _ in range(repeats):
        dist.barrier(group=group)
        w0 = _wchar()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        w1 = _wchar()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times.append(float(t))
        if w0 is not None and w1 is not None:
            sent.append(w1 - w0)
    if key is not None and sent:
        b = torch.tensor([statistics.median(sent)], dtype=torch.float64)
        dist.all_reduce(b, group=group)
        _SENT[key] = float(b) / dist.get_world_size(group)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args["threads"])
    backend = args["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    group = dist.group.WORLD
    if args.get("design") in ("segments", "fsdp"):  # true-length segments; FSDP2 training steps
        if args["design"] == "fsdp":
            res = fsdp_worker(rank, world, args, _wchar)
        else:
            res = segments_worker(rank, world, resnet50_layers(), args)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
        dist.destroy_process_group()
        return
    plan = spngd_plan(resnet50_layers(), world)
    cs, cg, p = plan["stats_chunk"], plan["grad_chunk"], plan["params"]
    gen = torch.Generator().manual_seed(rank)
    stats = torch.randn(world * cs, generator=gen).to(device)
    grads = torch.randn(world * cg, generator=gen).to(device)
    flat = torch.randn(p, generator=gen).to(device)
    reps = args["repeats"]
    res: dict = {"plan": {k: v for k, v in plan.items() if k != "owners"}, "time_s": {}, "bytes": {}}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for wire in ("fp32", "bf16"):
        cdt = torch.bfloat16 if wire == "bf16" else None
        comm = TorchDistributedCommunicator(group, comm_dtype=cdt)

        def ddp():
            if cdt is None:
                dist.all_reduce(flat, group=group)
            else:
                low = flat.to(cdt)
                dist.all_reduce(low, group=group)
                flat.copy_(low)
            sync()

        def refresh():
            comm.begin_step()
            comm.reduce_scatter(stats, cs, kind="stats")
            comm.reduce_scatter(grads, cg, kind="grads")
            comm.all_gather(grads, cg, kind="precond")
            sync()

        def grads_only():
            comm.begin_step()
            comm.reduce_scatter(grads, cg, kind="grads")
            comm.all_gather(grads, cg, kind="precond")
            sync()

        res["time_s"][f"ddp_allreduce_{wire}"] = _timed(ddp, reps, group, f"ddp_allreduce_{wire}")
        res["time_s"][f"spngd_refresh_{wire}"] = _timed(refresh, reps, group, f"spngd_refresh_{wire}")
        res["bytes"][f"spngd_refresh_{wire}"] = comm.bytes_sent()["last"]
        res["time_s"][f"spngd_grads_only_{wire}"] = _timed(grads_only, reps, group, f"spngd_grads_only_{wire}")
        res["bytes"][f"spngd_grads_only_{wire}"] = comm.bytes_sent()["last"]
        res["bytes"][f"ddp_allreduce_{wire}"] = {"grads": p * (2 if cdt else 4)}

    # the backend choice: one stats reduce-scatter per implementation, one gradient all-gather per implementation
    impls = {}
    for impl in ("reduce_scatter", "all_reduce", "reduce", "all_to_all"):
        for wire, cdt in (("fp32", None), ("bf16", torch.bfloat16)):
            comm = TorchDistributedCommunicator(group, comm_dtype=cdt, reduce_impl=impl)
            impls[f"{impl}_{wire}"] = _timed(
                lambda: (comm.reduce_scatter(stats, cs, kind="stats"), sync()), reps, group, f"rs_{impl}_{wire}"
            )
    res["reduce_impl_stats_s"] = impls
    gathers = {}
    for impl in ("all_gather", "broadcast"):
        comm = TorchDistributedCommunicator(group, gather_impl=impl)
        gathers[impl] = _timed(lambda: (comm.all_gather(grads, cg, kind="precond"), sync()), reps, group, f"ag_{impl}")
    res["gather_impl_grads_s"] = gathers
    res["auto_choice"] = {
        "reduce": TorchDistributedCommunicator(group).reduce_impl_for(stats),
        "gather": TorchDistributedCommunicator(group).gather_impl_for(stats),
    }

    # overlap: backward alone, stats reduce-scatter alone, both (async collective issued first)
    if args["overlap"]:
        torch.manual_seed(0)
        model = resnet50().to(device)
        x = torch.randn(args["overlap_batch"], 3, args["overlap_size"], args["overlap_size"], device=device)
        y = torch.randint(0, 1000, (args["overlap_batch"],), device=device)

        def loss():
            return nn.functional.cross_entropy(model(x), y)

        def backward_only():
            model.zero_grad(set_to_none=True)
            loss().backward()
            sync()

        out_buf = torch.empty(cs, device=device)
        from spngd_ext.distributed.collectives import _reduce_scatter_single

        impl = TorchDistributedCommunicator(group).reduce_impl_for(stats)  # what SPNGD uses here

        def start_rs():
            if impl == "reduce":  # Gloo: per-owner reduces
                return [
                    dist.reduce(stats[s * cs : (s + 1) * cs], dst=s, group=group, async_op=True) for s in range(world)
                ]
            if impl == "all_reduce":  # Gloo at W=2
                return [dist.all_reduce(stats, group=group, async_op=True)]
            return [_reduce_scatter_single(out_buf, stats, group=group, async_op=True)]

        def rs_only():
            for work in start_rs():
                work.wait()
            sync()

        def overlapped():
            model.zero_grad(set_to_none=True)
            value = loss()  # forward first: its activations' factors (A) are what could be in flight
            works = start_rs()
            value.backward()
            for work in works:
                work.wait()
            sync()

        def forward_only():
            with torch.no_grad():
                loss()
            sync()

        backward_only()  # warm-up
        t_fwd = _timed(forward_only, reps, group)
        t_fb = _timed(backward_only, reps, group)
        t_rs = _timed(rs_only, reps, group)
        t_ov = _timed(overlapped, reps, group)
        res["overlap_s"] = {
            "forward": t_fwd,
            "forward_backward": t_fb,
            "stats_reduce_scatter": t_rs,
            "forward_backward_with_async_reduce_scatter": t_ov,
            "sequential_sum": t_fb + t_rs,
            "ideal_max": max(t_fb, t_rs),
            "saved_fraction_of_comm": (t_fb + t_rs - t_ov) / t_rs if t_rs > 0 else 0.0,
            "batch": args["overlap_batch"],
            "image_size": args["overlap_size"],
            "collective": impl,
        }
    res["sent_bytes_measured"] = dict(_SENT)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def measure(world: int, args: dict) -> dict:
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=600)
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, store.port, args, out)) for r in range(world)]
        for pr in procs:
            pr.start()
        deadline = time.time() + args["deadline"]
        for pr in procs:
            pr.join(timeout=max(1.0, deadline - time.time()))
        alive = [pr for pr in procs if pr.is_alive()]
        for pr in alive:
            pr.kill()
        if alive or any(pr.exitcode != 0 for pr in procs):
            raise RuntimeError(f"world {world}: ranks failed or timed out (exit codes {[pr.exitcode for pr in procs]})")
        return json.loads(Path(out).read_text())


# ------------------------------------------------------------------------------------ reporting


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def model_table(worlds: list[int]) -> tuple[str, list[dict]]:
    layers = resnet50_layers()
    rows, lines = [], []
    lines.append(
        "| ranks | ranks owning nothing | LPT imbalance | DDP all-reduce wire MB | SP-NGD refresh wire MB | "
        "SP-NGD no-factor step wire MB | refresh unpadded wire MB | refresh contributed MB | "
        "stats buffer MB/rank | owned inverses MB/rank | curvature memory MB/rank |"
    )
    lines.append("|" + "---|" * 11)
    for w in worlds:
        plan = spngd_plan(layers, w)
        b, m = byte_model(plan), memory_model(plan)
        rows.append({"world": w, "plan": {k: v for k, v in plan.items() if k != "owners"}, "bytes": b, "memory": m})
        lines.append(
            f"| {w} | {plan['ranks_owning_nothing']} | {plan['imbalance']:.2f} | {_mb(b['ddp_allreduce']['wire'])} | "
            f"{_mb(b['spngd_refresh']['wire'])} | {_mb(b['spngd_grads_only']['wire'])} | "
            f"{_mb(b['spngd_refresh_unpadded']['wire'])} | {_mb(b['spngd_refresh']['contributed'])} | "
            f"{_mb(m['stats_buffer'])} | {_mb(m['owned_inverses'])} | {_mb(m['total'])} |"
        )
    return "\n".join(lines), rows


def measured_table(results: dict) -> str:
    lines = [
        "| ranks | operation | wire | time ms | contributed MB/rank | ring wire MB/rank (model) | sent MB/rank (measured) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        plan = res["plan"]
        bm = byte_model(dict(plan, world=int(w)))
        for op in ("ddp_allreduce", "spngd_refresh", "spngd_grads_only"):
            for wire in ("fp32", "bf16"):
                key = f"{op}_{wire}"
                contributed = sum(v for k, v in res["bytes"][key].items() if k != "flag")
                scale = 0.5 if wire == "bf16" else 1.0
                sent = res.get("sent_bytes_measured", {}).get(key)
                lines.append(
                    f"| {w} | {op} | {wire} | {1e3 * res['time_s'][key]:,.0f} | {_mb(contributed)} | "
                    f"{_mb(bm[op]['wire'] * scale)} | {'-' if sent is None else _mb(sent)} |"
                )
    return "\n".join(lines)


def impl_table(results: dict) -> str:
    impls = ("reduce_scatter", "all_reduce", "reduce", "all_to_all")
    lines = [
        "| ranks | stats buffer MB | wire | " + " | ".join(f"{i} ms (sent MB)" for i in impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    for w, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        sent = res.get("sent_bytes_measured", {})
        mb = 4 * int(w) * res["plan"]["stats_chunk"]
        for wire in ("fp32", "bf16"):
            cells = " | ".join(
                f"{1e3 * res['reduce_impl_stats_s'][f'{i}_{wire}']:,.0f} ({_mb(sent.get(f'rs_{i}_{wire}', float('nan')))})"
                for i in impls
            )
            lines.append(f"| {w} | {_mb(mb)} | {wire} | {cells} |")
    lines += ["", "| ranks | grad buffer MB | all_gather ms (sent MB) | broadcast ms (sent MB) |", "|---|---|---|---|"]
    for w, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        sent = res.get("sent_bytes_measured", {})
        g = res["gather_impl_grads_s"]
        lines.append(
            f"| {w} | {_mb(4 * int(w) * res['plan']['grad_chunk'])} | {1e3 * g['all_gather']:,.0f} ({_mb(sent.get('ag_all_gather', float('nan')))}) | "
            f"{1e3 * g['broadcast']:,.0f} ({_mb(sent.get('ag_broadcast', float('nan')))}) |"
        )
    return "\n".join(lines)


def overlap_table(results: dict) -> str:
    lines = [
        "| ranks | fwd ms | fwd+bwd ms | stats reduce-scatter ms | fwd+bwd with async RS ms | sum ms | "
        "max ms | comm time hidden |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        o = res.get("overlap_s")
        if not o:
            continue
        lines.append(
            f"| {w} | {1e3 * o['forward']:,.0f} | {1e3 * o['forward_backward']:,.0f} | {1e3 * o['stats_reduce_scatter']:,.0f} | "
            f"{1e3 * o['forward_backward_with_async_reduce_scatter']:,.0f} | {1e3 * o['sequential_sum']:,.0f} | "
            f"{1e3 * o['ideal_max']:,.0f} | {100 * o['saved_fraction_of_comm']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--overlap-batch", type=int, default=4)
    ap.add_argument("--overlap-size", type=int, default=64, help="input image side for the overlap backward")
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds per world before the ranks are killed")
    ap.add_argument("--model-only", action="store_true", help="print the 1..1024-rank models and exit")
    ap.add_argument(
        "--design",
        default="padded",
        choices=["padded", "segments", "fsdp"],
        help="what to measure: the padded per-layer chunks, ownership per statistic with true-length segments, "
        "or FSDP2 + SP-NGD training steps beside FSDP2 + SGD and DDP + SP-NGD (bench/comm_fsdp.py)",
    )
    ap.add_argument("--fsdp-layers", type=int, default=8, help="Linear layers of the --design fsdp MLP")
    ap.add_argument("--fsdp-width", type=int, default=512, help="width of the --design fsdp MLP")
    ap.add_argument("--fsdp-batch", type=int, default=32, help="examples per rank (--design fsdp)")
    ap.add_argument(
        "--staging", type=int, default=1 << 24, help="all-to-all staging budget in elements (segments design)"
    )
    ap.add_argument(
        "--out",
        default=str(REPO / "runs" / "comm" / "results.json"),
        help="JSON output path (default: runs/comm/results.json in the checkout)",
    )
    a = ap.parse_args(argv)
    model_worlds = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    table, rows = model_table(model_worlds)
    one = spngd_plan(resnet50_layers(), 1)
    seg_table, seg_rows = segments_table(resnet50_layers(), model_worlds, one["params"], one["stats_numel"])
    if a.model_only:
        print("Padded per-layer chunks (MODEL, fp32, MB per rank):\n" + table)
        print("\nOwnership per statistic, true-length segments (MODEL, fp32, MB per rank):\n" + seg_table)
        print(
            "\nSplit layers: inverse exchange vs split preconditioning (MODEL, fp32):\n"
            + split_table(resnet50_layers(), model_worlds[1:])
        )
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"model": rows, "model_segments": seg_rows}, indent=1))
        return 0
    backend = a.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    args = dict(
        backend=backend,
        repeats=a.repeats,
        threads=a.threads,
        overlap=not a.no_overlap,
        overlap_batch=a.overlap_batch,
        overlap_size=a.overlap_size,
        deadline=a.deadline,
        design=a.design,
        staging=a.staging,
        fsdp_layers=a.fsdp_layers,
        fsdp_width=a.fsdp_width,
        fsdp_batch=a.fsdp_batch,
    )
    results = {}
    for w in [int(x) for x in a.worlds.split(",")]:
        if backend == "nccl" and w > torch.cuda.device_count():
            print(f"skip world {w}: {torch.cuda.device_count()} GPU(s) (NCCL needs one per rank)")
            continue
        t0 = time.time()
        results[str(w)] = measure(w, args)
        print(f"world {w}: measured in {time.time() - t0:.0f}s", flush=True)
    info = {
        "backend": backend,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "args": args,
        "command": " ".join(sys.argv),
    }
    if a.design == "fsdp":
        print(f"\n{info}\n\nMeasured (median of {a.repeats} steps, slowest rank):\n" + fsdp_table(results))
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"info": info, "measured": results}, indent=1))
        return 0
    if a.design == "segments":
        print(
            f"\n{info}\n\nMeasured (median of {a.repeats}, slowest rank; bytes from /proc/self/io):\n"
            + segments_measured_table(results, resnet50_layers(), one["params"], one["stats_numel"])
        )
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(
                json.dumps({"info": info, "measured": results, "model_segments": seg_rows}, indent=1)
            )
        return 0
    print(f"\n{info}\n\nMeasured (median of {a.repeats}, slowest rank):\n" + measured_table(results))
    print("\nStats reduce-scatter by implementation:\n" + impl_table(results))
    if args["overlap"]:
        print("\nOverlap:\n" + overlap_table(results))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"info": info, "measured": results, "model": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
