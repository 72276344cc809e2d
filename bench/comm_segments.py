"""Model and measurement of ownership per statistic with true-length segments (ResNet-50 shapes).

Used by ``bench/comm.py`` (``--model-only`` prints this model next to the padded per-layer one;
``--design segments`` measures these collectives on spawned Gloo ranks). Everything is derived
from the library's own placement (``StatisticAssignment``) and layout (``SegmentLayout``).

Per rank r, with S_r / G_r the lengths of its statistics and gradient ranges, S / G the buffer
totals and I_r the packed inverses it sends (elements; × s bytes):

* design wire bytes (pipelined ring reduce / broadcast per owner, NCCL's algorithms): a refresh
  sends (S − S_r) + (G − G_r) + (G − G_{r+1}) + I_r, a step without factors (G − G_r) + (G − G_{r+1});
  I_r counts, as the optimizer sends them, each packed inverse with its flag and one π trace each
  way per split layer;
* bytes on Gloo (what ``bench/comm.py --design segments`` measures): the all-to-all reduce sends
  exactly S − S_r and G − G_r; a broadcast sends each owner's segment W − 1 times in all, so the
  mean over ranks is (W − 1)·G / W whatever the broadcast algorithm;
* curvature memory: the statistics accumulation buffer S, the owned estimates S_r, the gradient
  buffer G, the all-to-all staging of the largest round, and the dense inverses of the owned
  factors plus the received ones (d² each).
"""

from __future__ import annotations

from spngd_ext.distributed.placement import (
    LayerCost,
    LayerStatistics,
    OwnerAssignment,
    StatisticAssignment,
    StatisticSpec,
)
from spngd_ext.distributed.segments import SegmentLayout
from spngd_ext.distributed.uneven import DEFAULT_STAGING_NUMEL


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def layer_statistics(layers: list[dict]) -> list[LayerStatistics]:
    """The ResNet-50 layer dicts of ``bench/comm.py`` as placement inputs."""
    out = []
    for layer in layers:
        if layer["kind"] == "bn":
            c = layer["c"]
            out.append(LayerStatistics(layer["name"], (StatisticSpec("F", 0, 3 * c),), 2 * c))
        else:
            da, dg = layer["cin"] * layer["k"] ** 2 + int(layer["bias"]), layer["cout"]
            out.append(
                LayerStatistics(
                    layer["name"],
                    (StatisticSpec("A", da, _tri(da)), StatisticSpec("G", dg, _tri(dg))),
                    da * dg,
                    (dg, da),
                )
            )
    return out


def staging_numel(sends: list[int], rank: int, budget: int = DEFAULT_STAGING_NUMEL) -> int:
    """Largest all-to-all round's receive + send staging of ``rank`` (elements), as
    ``uneven.reduce_segments`` cuts the transfer (same round count and piece boundaries)."""
    w = len(sends)
    rounds = max(1, -(-w * max(sends, default=0) // max(1, budget)))
    worst = 0
    for j in range(rounds):
        pieces = [(j + 1) * n // rounds - j * n // rounds for n in sends]
        worst = max(worst, w * pieces[rank] + sum(pieces))
        if rounds > 64 and j > 2:  # pieces differ by at most one element between rounds
            break
    return worst


def segments_plan(layers: list[dict], world: int) -> dict:
    """Per-rank element counts of the per-statistic design for ``world`` ranks."""
    stats = layer_statistics(layers)
    a = StatisticAssignment.balance(stats, world)
    lay = SegmentLayout.build(stats, a)
    s_r = [r.numel for r in lay.stats_ranges]
    g_r = [r.numel for r in lay.grad_ranges]
    inv_send = [0] * world
    dense = [0] * world
    split_products = 0  # the alternative: split preconditioning sends ∇W·Â⁻¹ (d_out × d_in) per split layer
    for route in a.inverse_routes:
        # the optimizer's exchanges (spngd_ext/state/routes.py): a mean trace each way, then the
        # packed inverse with a one-element flag
        inv_send[route.src] += route.numel + 2
        inv_send[route.dst] += 1
        split_products += stats[route.layer].grad_numel
        dim = next(s.dim for s in stats[route.layer].stats if s.name == route.stat)
        dense[route.dst] += dim * dim  # the received inverse, unpacked
    for li, owners in enumerate(a.stat_owners):
        for s in stats[li].stats:
            dense[owners[s.name]] += s.dim * s.dim
    return {
        "world": world,
        "S": lay.stats_numel,
        "G": lay.grad_numel,
        "S_r": s_r,
        "G_r": g_r,
        "inv_send": inv_send,
        "split_layers": len(a.inverse_routes),
        "inverse_numel": sum(r.numel for r in a.inverse_routes),
        "split_product_numel": split_products,
        "dense_inverses": dense,
        "makespan": a.makespan,
        "largest_item": a.largest_item,
        "lower_bound": a.makespan_lower_bound,
        "total_compute": sum(a.compute_load),
        "items_above_mean": sum(
            1 for layer in stats for _, c, _ in layer.item_costs() if c > sum(a.compute_load) / world
        ),
        "ranks_owning_nothing": sum(1 for r in range(world) if s_r[r] == 0 and g_r[r] == 0),
        "staging": [staging_numel(s_r, r) for r in range(world)] if world > 1 else [0],
    }


def segments_model(plan: dict, params: int, stats_numel: int, elem: int = 4) -> dict:
    """Bytes per rank per step (max over ranks, and mean) and memory per rank, from :func:`segments_plan`."""
    w, s, g = plan["world"], plan["S"], plan["G"]
    s_r, g_r, inv = plan["S_r"], plan["G_r"], plan["inv_send"]
    if w == 1:
        refresh = grads_only = [0]
    else:
        refresh = [(s - s_r[r]) + (g - g_r[r]) + (g - g_r[(r + 1) % w]) + inv[r] for r in range(w)]
        grads_only = [(g - g_r[r]) + (g - g_r[(r + 1) % w]) for r in range(w)]
    frac = (w - 1) / w
    memory = [s + s_r[r] + g + plan["staging"][r] + plan["dense_inverses"][r] for r in range(w)]
    return {
        "refresh_wire_max": max(refresh) * elem,
        "refresh_wire_mean": sum(refresh) / w * elem,
        "grads_only_wire_max": max(grads_only) * elem,
        "lower_bound": frac * (stats_numel + 2 * params) * elem,
        "ddp_wire": 2 * frac * params * elem,
        "memory_max": max(memory) * elem,
        "stats_buffer": s * elem,
        "owned_inverses_max": max(plan["dense_inverses"]) * elem,
        "staging_max": max(plan["staging"]) * elem,
        # the Gloo implementation (all-to-all reduce, broadcast gather), mean over ranks
        "gloo_refresh_mean": ((w - 1) * s + 2 * (w - 1) * g + sum(inv)) / w * elem,
        "gloo_grads_only_mean": 2 * (w - 1) * g / w * elem,
        "gloo_stats_reduce_per_rank": [(s - s_r[r]) * elem for r in range(w)],
    }


def padded_makespan(layers: list[dict], world: int) -> float:
    """The per-layer design's curvature makespan (same compute units as the per-statistic items)."""
    costs = []
    for st in layer_statistics(layers):
        if len(st.stats) == 2:
            costs.append(LayerCost(st.name, (st.stats[0].dim, st.stats[1].dim), st.grad_shape))
        else:
            costs.append(LayerCost(st.name, elementwise=sum(c for _, c, _ in st.item_costs())))
    return max(OwnerAssignment.balance(costs, world).compute_load)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def segments_table(layers: list[dict], worlds: list[int], params: int, stats_numel: int) -> tuple[str, list[dict]]:
    """The per-statistic design from 1 to 1,024 ranks, with the target ratios."""
    lines = [
        "| ranks | ranks owning nothing | refresh wire MB (max rank) | unpadded bound MB | refresh / bound | "
        "no-factor step wire MB (max rank) | DDP all-reduce MB | no-factor / DDP | stats buffer MB | staging MB | "
        "owned + received inverses MB (max rank) | curvature memory MB (max rank) | memory / 8-rank | "
        "makespan / largest statistic | makespan / lower bound | padded per-layer makespan / largest statistic |",
        "|" + "---|" * 16,
    ]
    rows = []
    plans = {w: segments_plan(layers, w) for w in sorted(set(worlds) | {8})}
    mem8 = segments_model(plans[8], params, stats_numel)["memory_max"]
    for w in worlds:
        plan = plans[w]
        m = segments_model(plan, params, stats_numel)
        rows.append({"world": w, "plan": {k: v for k, v in plan.items() if not isinstance(v, list)}, "model": m})
        ratio = m["refresh_wire_max"] / m["lower_bound"] if w > 1 else 0.0
        nf = m["grads_only_wire_max"] / m["ddp_wire"] if w > 1 else 0.0
        lines.append(
            f"| {w} | {plan['ranks_owning_nothing']} | {_mb(m['refresh_wire_max'])} | {_mb(m['lower_bound'])} | {ratio:.3f} | "
            f"{_mb(m['grads_only_wire_max'])} | {_mb(m['ddp_wire'])} | {nf:.3f} | {_mb(m['stats_buffer'])} | "
            f"{_mb(m['staging_max'])} | {_mb(m['owned_inverses_max'])} | {_mb(m['memory_max'])} | {m['memory_max'] / mem8:.3f} | "
            f"{plan['makespan'] / plan['largest_item']:.3f} | {plan['makespan'] / plan['lower_bound']:.3f} | "
            f"{padded_makespan(layers, w) / plan['largest_item']:.3f} |"
        )
    return "\n".join(lines), rows


def split_table(layers: list[dict], worlds: list[int]) -> str:
    """Inverse exchange against split preconditioning, for the layers the placement splits.

    Sending the smaller factor's packed inverse (plus its flag and a π trace each way) to the
    gradient owner moves d(d+1)/2 + 3 elements per split layer and only at inversions; splitting
    the preconditioning instead (the other owner multiplies by its inverse and sends the d_out ×
    d_in product) moves the gradient's size at every step."""
    lines = [
        "| ranks | split layers | inverse exchange MB per inversion (all ranks) | split-preconditioning MB per step "
        "(all ranks) | exchange / split |",
        "|---|---|---|---|---|",
    ]
    for w in worlds:
        plan = segments_plan(layers, w)
        inv = sum(plan["inv_send"]) * 4
        prod = plan["split_product_numel"] * 4
        lines.append(f"| {w} | {plan['split_layers']} | {_mb(inv)} | {_mb(prod)} | {inv / prod if prod else 0.0:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ measurement


def _timed_per_rank(fn, repeats: int, group) -> tuple[float, list[float]]:
    """Median over repeats of the slowest rank's seconds, and each rank's median socket bytes."""
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from comm import _wchar  # bench/comm.py, on the path of every spawned rank

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
        sent.append(float(w1 - w0) if w0 is not None and w1 is not None else float("nan"))
    mine = torch.tensor([statistics.median(sent)], dtype=torch.float64)
    every = torch.zeros(dist.get_world_size(group), dtype=torch.float64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(every, mine, group=group)
    return statistics.median(times), every.tolist()


def segments_worker(rank: int, world: int, layers: list[dict], args: dict) -> dict:
    """One rank of the per-statistic measurement: refresh, no-factor and stale steps, fp32 and
    bf16, and the two reduce algorithms; returns times, per-rank socket bytes and byte counters."""
    import torch
    import torch.distributed as dist

    from spngd_ext.distributed.collectives import TorchDistributedCommunicator

    group = dist.group.WORLD
    stats_spec = layer_statistics(layers)
    a = StatisticAssignment.balance(stats_spec, world)
    lay = SegmentLayout.build(stats_spec, a)
    gen = torch.Generator().manual_seed(rank)
    stats = torch.randn(lay.stats_numel, generator=gen)
    grads = torch.randn(lay.grad_numel, generator=gen)
    params = sum(st.grad_numel for st in stats_spec)
    flat = torch.randn(params, generator=gen)
    # as the optimizer sends them (spngd_ext/state/routes.py): one mean trace each way per split
    # layer, then the packed inverse behind a one-element flag from its owner to the gradient owner
    inv_out = [[torch.randn(rt.numel + 1, generator=gen) for rt in routes] for routes in lay.inverse_sends(rank)]
    inv_in = [[torch.empty(rt.numel + 1) for rt in routes] for routes in lay.inverse_receives(rank)]
    tr_out = [
        [torch.randn(1) for _ in a] + [torch.randn(1) for _ in b] for a, b in zip(inv_out, lay.inverse_receives(rank))
    ]
    tr_in = [[torch.empty(1) for _ in a] + [torch.empty(1) for _ in b] for a, b in zip(inv_in, lay.inverse_sends(rank))]
    not_a = [(i, s.name) for i, st in enumerate(stats_spec) for s in st.stats if s.name != "A"]
    reps = args["repeats"]
    res: dict = {"time_s": {}, "sent_per_rank": {}, "counted": {}, "due_not_a": not_a}

    def run(key: str, fn, comm=None) -> None:
        t, sent = _timed_per_rank(fn, reps, group)
        res["time_s"][key], res["sent_per_rank"][key] = t, sent
        if comm is not None:
            res["counted"][key] = comm.bytes_sent()["last"]

    run("ddp_allreduce_fp32", lambda: dist.all_reduce(flat, group=group))
    for wire, cdt in (("fp32", None), ("bf16", torch.bfloat16)):
        comm = TorchDistributedCommunicator(group, comm_dtype=cdt, staging_numel=args["staging"])

        def refresh(comm=comm, due=None):
            comm.begin_step()
            comm.reduce_segments(stats, lay.stats_sends(due), kind="stats")
            comm.reduce_segments(grads, lay.grad_sends(), kind="grads")
            if lay.inverse_routes:
                cpu = torch.device("cpu")
                comm.exchange(tr_out, tr_in, kind="inverse", dtype=torch.float32, device=cpu)
                comm.exchange(inv_out, inv_in, kind="inverse", dtype=torch.float32, device=cpu)
            comm.gather_segments(grads, lay.grad_sends(), kind="precond")

        def grads_only(comm=comm):
            comm.begin_step()
            comm.reduce_segments(grads, lay.grad_sends(), kind="grads")
            comm.gather_segments(grads, lay.grad_sends(), kind="precond")

        run(f"refresh_{wire}", refresh, comm)
        run(f"grads_only_{wire}", grads_only, comm)
        if wire == "fp32":
            run("refresh_no_A_due_fp32", lambda comm=comm: refresh(comm, not_a), comm)
    for impl in ("all_to_all", "reduce"):
        comm = TorchDistributedCommunicator(group, segment_reduce_impl=impl, staging_numel=args["staging"])
        run(
            f"stats_reduce_{impl}_fp32",
            lambda comm=comm: comm.reduce_segments(stats, lay.stats_sends(), kind="stats"),
            comm,
        )
    res["auto"] = TorchDistributedCommunicator(group).segment_reduce_impl_for(stats)
    return res


def segments_measured_table(results: dict, layers: list[dict], params: int, stats_numel: int) -> str:
    """Measured socket bytes (mean over ranks) against the Gloo byte model, and times."""
    lines = [
        "| ranks | operation | time ms | sent MB/rank (measured, mean) | model MB/rank (mean) | measured / model | "
        "max rank sent MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, res in sorted(results.items(), key=lambda kv: int(kv[0])):
        w = int(w)
        plan = segments_plan(layers, w)
        m = segments_model(plan, params, stats_numel)
        s, s_r = plan["S"], plan["S_r"]
        due = set(map(tuple, res["due_not_a"]))
        stats = layer_statistics(layers)
        a_bytes = sum(st.stats[0].numel + 1 for st in stats if len(st.stats) == 2)  # the A factors and their counts
        a_own = [0] * w  # A bytes each rank owns
        for li, owners in enumerate(StatisticAssignment.balance(stats, w).stat_owners):
            if "A" in owners and (li, "A") not in due:
                a_own[owners["A"]] += stats[li].stats[0].numel + 1
        # what the due-only reduce sends, mean over ranks: the other owners' due statistics
        no_a_stats = sum((s - a_bytes) - (s_r[r] - a_own[r]) for r in range(w)) / w
        models = {
            "ddp_allreduce_fp32": 2 * (w - 1) / w * params * 4,
            "refresh_fp32": m["gloo_refresh_mean"],
            "refresh_bf16": None,
            "grads_only_fp32": m["gloo_grads_only_mean"],
            "grads_only_bf16": m["gloo_grads_only_mean"] / 2,
            "refresh_no_A_due_fp32": m["gloo_refresh_mean"] - (w - 1) * s / w * 4 + no_a_stats * 4,
            "stats_reduce_all_to_all_fp32": (w - 1) * s / w * 4,
            "stats_reduce_reduce_fp32": (w - 1) * s / w * 4,
        }
        inv = sum(plan["inv_send"]) / w * 4
        models["refresh_bf16"] = (m["gloo_refresh_mean"] - inv) / 2 + inv  # inverses travel at full precision
        for key, model in models.items():
            sent = res["sent_per_rank"][key]
            mean = sum(sent) / len(sent)
            lines.append(
                f"| {w} | {key} | {1e3 * res['time_s'][key]:,.0f} | {_mb(mean)} | {_mb(model)} | "
                f"{mean / model:.3f} | {_mb(max(sent))} |"
            )
    return "\n".join(lines)
