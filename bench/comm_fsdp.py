"""FSDP2 + SP-NGD beside FSDP2 + SGD and DDP + SP-NGD: bytes and time per training step.

Used by ``bench/comm.py --design fsdp`` (spawned ranks, Gloo here). The model is an MLP of
``--fsdp-layers`` Linear(``--fsdp-width``, ``--fsdp-width``) layers with ReLU (fp32), each Linear
its own FSDP2 group and the root one more; batch ``--fsdp-batch`` per rank, fisher="emp".

Per configuration: one warm-up step, then ``repeats`` timed steps, each ended by a barrier; the
time is the median over steps of the slowest rank. Bytes per rank and step:

* ``wire``: what the rank wrote to its sockets (``/proc/self/io`` wchar; FSDP2's all-gathers and
  reduce-scatters, DDP's all-reduce and SP-NGD's collectives together), the mean over the timed
  steps and ranks;
* ``spngd``: SP-NGD's own byte counter (``bytes_sent()["last"]``, contributed elements × size)
  by kind, rank 0's last step.

SP-NGD rows: ``refresh`` (statistics and inverses every step) and ``steady`` (curvature_interval
10: the timed steps refresh nothing, only gradients and updates move); ownership per statistic
(the default) except the "per layer" row (``ownership="layer"``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CONFIGS = (  # label, wrapper, curvature_interval (None: SGD), SP-NGD's ownership
    ("FSDP2 + SGD", "fsdp", None, None),
    ("FSDP2 + SP-NGD, refresh", "fsdp", 1, "statistic"),
    ("FSDP2 + SP-NGD, steady", "fsdp", 10, "statistic"),
    ("DDP + SP-NGD, refresh", "ddp", 1, "statistic"),
    ("DDP + SP-NGD per layer, refresh", "ddp", 1, "layer"),
    ("DDP + SP-NGD, steady", "ddp", 10, "statistic"),
    ("DDP + SGD", "ddp", None, None),
)


def _model(args: dict) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args["fsdp_layers"]):
        layers += [nn.Linear(args["fsdp_width"], args["fsdp_width"]), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(args["fsdp_width"], 10))


def fsdp_worker(rank: int, world: int, args: dict, wchar) -> dict:
    """Every configuration of :data:`CONFIGS` on this rank; rank 0's result is reported."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from spngd_ext import SPNGD

    out: dict = {}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args["fsdp_batch"], args["fsdp_width"], generator=g)
    y = torch.randint(0, 10, (args["fsdp_batch"],), generator=g)
    for label, wrap, interval, ownership in CONFIGS:
        model = _model(args)
        net: nn.Module = model
        if wrap == "fsdp":
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(model)
        else:
            net = DistributedDataParallel(model)
        if interval is None:
            opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = SPNGD(net, lr=0.01, fisher="emp", damping=1e-2, curvature_interval=interval, ownership=ownership)
        times, wire = [], []
        for step in range(args["repeats"] + 1):
            dist.barrier()
            w0, t0 = wchar(), time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            w1, t1 = wchar(), time.perf_counter()
            dist.barrier()
            if step == 0:
                continue
            slowest = torch.tensor([t1 - t0])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times.append(float(slowest))
            wire.append(torch.tensor([float(w1 - w0) if w0 is not None and w1 is not None else float("nan")]))
        mean_wire = torch.stack(wire).mean()
        dist.all_reduce(mean_wire, op=dist.ReduceOp.SUM)
        counted = opt._comm.bytes_sent()["last"] if isinstance(opt, SPNGD) else {}
        out[label] = {
            "time_s": statistics.median(times),
            "wire_bytes": float(mean_wire) / world,
            "spngd_bytes": counted,
            "params": sum(p.numel() for p in model.parameters()),
        }
    return out


def fsdp_table(results: dict) -> str:
    """Markdown table: per world and configuration, time, wire bytes and SP-NGD's counted bytes."""
    lines = [
        "| ranks | configuration | ms / step | wire MB / rank / step | "
        "SP-NGD counted MB (stats / grads / precond / inverse) |",
        "|---|---|---|---|---|",
    ]
    for w, res in results.items():
        for label, r in res.items():
            b = r["spngd_bytes"]
            kinds = ("stats", "grads", "precond", "inverse")
            counted = " / ".join(f"{b.get(k, 0) / 1e6:.2f}" for k in kinds) if b else "—"
            lines.append(f"| {w} | {label} | {r['time_s'] * 1e3:.1f} | {r['wire_bytes'] / 1e6:.2f} | {counted} |")
    return "\n".join(lines)
