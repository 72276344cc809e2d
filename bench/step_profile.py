"""Where a step's time goes: the profiled phase breakdown and the curvature phase of bench/step_overhead.py.

Phase breakdown: after the timed rounds, SGD (20 steps), ``spngd-every-step`` (20 steps),
``spngd-10/100`` (one whole inverse period, 100 steps) and ``spngd-stale`` (20 steps, the
intervals it reached by then) run interleaved in one torch.profiler session, each step inside a
``bench::config=NAME`` range. The bench wraps its own forward and
backward in ``bench::forward`` / ``bench::backward`` (and zero_grad / step in ``bench::zero_grad``
/ ``bench::step``); the optimizer marks ``spngd::*`` ranges. Ranges nest (factor accumulation
runs inside the forward, backward and MC-backward hooks; the MC backward runs inside
``bench::backward``), so the table gives, per step, each range's INCLUSIVE time and its EXCLUSIVE
remainder (inclusive minus the ranges nested directly in it, found by time containment, which
also covers the autograd thread on CUDA). On CPU the time is the range's wall time on its thread;
on CUDA the kernel time of the ops launched inside it (and the CPU time next to it). The profiler
adds a few microseconds per op, so the profiled step total is shown next to the unprofiled mean.
With --top-ops N, the N most expensive ops (self time) inside each phase are listed as well,
together with the part of the phase spent outside any op (Python and dispatch).

Curvature phase: per profiled SP-NGD configuration, the sum of the inclusive times of factor
accumulation (all hooks), factor finalize, inversion and preconditioning, i.e. the curvature work
without the sampled-label backward itself (that is ordinary autograd, the same for every backend).
On CUDA it is kernel time. With both backend-pinned configurations profiled, "torch ÷ cuda" of it
is the kernels' speedup on the whole curvature phase.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = [
    "PHASE_ROWS",
    "TOP_LEVEL",
    "CURVATURE_ROWS",
    "CURVATURE_SPEEDUP_TARGET",
    "CONFIG_RANGE",
    "sync",
    "fmt",
    "analyse_profile",
    "profile_configs",
    "breakdown_table",
    "top_ops_text",
    "curvature_phase",
    "curvature_targets",
    "curvature_table",
]

# Rows of the breakdown table: (label, range name, parent filter). A parent filter splits a range
# by the range it is nested in directly (factor accumulation happens in three places).
PHASE_ROWS = [
    ("zero_grad", "bench::zero_grad", None),
    ("forward", "bench::forward", None),
    ("backward", "bench::backward", None),
    ("MC backward", "spngd::mc_backward", None),
    ("factor accumulation (all)", "spngd::factor_accumulation", None),
    ("  in forward hooks", "spngd::factor_accumulation", "bench::forward"),
    ("  in MC-backward hooks", "spngd::factor_accumulation", "spngd::mc_backward"),
    ("  in backward hooks", "spngd::factor_accumulation", "bench::backward"),
    ("optimizer step (all)", "bench::step", None),
    ("  gather gradients", "spngd::gather_gradients", None),
    ("  communication", "spngd::communication", None),
    ("  factor finalize", "spngd::factor_finalize", None),
    ("  inversion", "spngd::inversion", None),
    ("  preconditioning", "spngd::preconditioning", None),
    ("  update", "spngd::update", None),
]
TOP_LEVEL = ("bench::zero_grad", "bench::forward", "bench::backward", "bench::step")
# The curvature phase: these ranges never nest in one another, so their inclusive times add up.
CURVATURE_ROWS = ("factor accumulation (all)", "  factor finalize", "  inversion", "  preconditioning")
CURVATURE_SPEEDUP_TARGET = 3.0  # target: the whole curvature phase ≥ 3× faster than pure PyTorch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# profiling


@dataclass
class _Range:
    name: str
    start: float
    end: float
    parent: _Range | None = None
    self_ops_cpu: float = 0.0  # self CPU time of ops directly inside (not in a nested range)
    device: float = 0.0  # kernel time of ops launched directly inside
    children_wall: float = 0.0
    ops: dict = field(default_factory=dict)  # op name -> [self cpu us, calls, device us]


def _is_range(e) -> bool:
    return e.name.startswith(("bench::", "spngd::")) and e.device_type == torch.autograd.DeviceType.CPU


CONFIG_RANGE = "bench::config="


def analyse_profile(events, steps: dict[str, int], use_cuda: bool) -> dict[str, dict]:
    """Per configuration (the ``bench::config=NAME`` range each profiled step runs in): per-step
    inclusive / exclusive time of each range (see module docstring) and the ops inside each range."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and not e.is_async]
    ranges = [_Range(e.name, e.time_range.start, e.time_range.end) for e in cpu if _is_range(e)]
    ops = [e for e in cpu if not _is_range(e)]
    items = [(r.start, 0, -r.end, r) for r in ranges] + [(e.time_range.start, 1, 0.0, e) for e in ops]
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    stack: list[_Range] = []
    for start, is_op, _, obj in items:
        while stack and stack[-1].end <= start:
            stack.pop()
        inner = stack[-1] if stack else None
        if not is_op:
            obj.parent = inner
            if inner is not None:
                inner.children_wall += obj.end - obj.start
            stack.append(obj)
        elif inner is not None:
            self_cpu = obj.self_cpu_time_total
            dev = obj.self_device_time_total if use_cuda else 0.0
            inner.self_ops_cpu += self_cpu
            inner.device += dev
            slot = inner.ops.setdefault(obj.name, [0.0, 0, 0.0])
            slot[0] += self_cpu
            slot[1] += 1
            slot[2] += dev

    dev_incl: dict[int, float] = {id(r): r.device for r in ranges}  # own kernels + descendants'
    for r in sorted(ranges, key=lambda r: r.start, reverse=True):  # children start after parents
        if r.parent is not None:
            dev_incl[id(r.parent)] += dev_incl[id(r)]

    def root(r: _Range) -> str | None:
        while r.parent is not None:
            r = r.parent
        return r.name[len(CONFIG_RANGE) :] if r.name.startswith(CONFIG_RANGE) else None

    by_config: dict[str, list[_Range]] = {}
    for r in ranges:
        name = root(r)
        if name is not None:
            by_config.setdefault(name, []).append(r)

    results = {}
    for cname, n in steps.items():
        mine = by_config.get(cname, [])

        def agg(name: str, parent: str | None) -> dict:
            sel = [
                r
                for r in mine
                if r.name == name and (parent is None or (r.parent is not None and r.parent.name == parent))
            ]
            res = {
                "calls_per_step": len(sel) / n,
                "cpu_inclusive_ms": sum(r.end - r.start for r in sel) / n / 1e3,
                "cpu_exclusive_ms": sum(r.end - r.start - r.children_wall for r in sel) / n / 1e3,
                "cpu_exclusive_in_ops_ms": sum(r.self_ops_cpu for r in sel) / n / 1e3,
            }
            if use_cuda:
                res["cuda_inclusive_ms"] = sum(dev_incl[id(r)] for r in sel) / n / 1e3
                res["cuda_exclusive_ms"] = sum(r.device for r in sel) / n / 1e3
            return res

        top = [r for r in mine if r.name == CONFIG_RANGE + cname]
        res = {
            "steps": n,
            "profiled_step_cpu_ms": sum(r.end - r.start for r in top) / n / 1e3,
            "phases": {label: agg(name, parent) for label, name, parent in PHASE_ROWS},
        }
        if use_cuda:
            res["profiled_step_cuda_ms"] = sum(dev_incl[id(r)] for r in top) / n / 1e3
        per_range: dict[str, dict[str, list]] = {}
        for r in mine:
            d = per_range.setdefault(r.name, {})
            for op, (sc, k, dv) in r.ops.items():
                slot = d.setdefault(op, [0.0, 0, 0.0])
                slot[0] += sc
                slot[1] += k
                slot[2] += dv
        res["ops"] = {
            name: sorted(
                (
                    {"op": op, "self_cpu_ms": sc / n / 1e3, "calls_per_step": k / n, "cuda_ms": dv / n / 1e3}
                    for op, (sc, k, dv) in d.items()
                ),
                key=lambda o: -(o["cuda_ms"] if use_cuda else o["self_cpu_ms"]),
            )
            for name, d in per_range.items()
        }
        results[cname] = res
    return results


def profile_configs(configs: list, steps: dict[str, int], batches, device: torch.device) -> dict[str, dict]:
    """One profiler session over all profiled configurations, interleaved like the timed rounds:
    the configuration with the most steps runs every round, the others every k-th round. Any
    `steps` consecutive steps of an interval configuration hold the same number of refreshes when
    `steps` is a multiple of its period, so no alignment is needed."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rounds = max(steps.values())
    every = {c.name: max(1, rounds // steps[c.name]) for c in configs}
    done = {c.name: 0 for c in configs}
    start = {c.name: c.counters() for c in configs}
    gc.collect()
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        for r in range(rounds):
            x, y = batches[r % len(batches)]
            for c in configs:
                if r % every[c.name] == 0 and done[c.name] < steps[c.name]:
                    with record_function(CONFIG_RANGE + c.name):
                        c.run(x, y)
                        sync(device)
                    done[c.name] += 1
    results = analyse_profile(prof.events(), done, device.type == "cuda")
    for c in configs:
        end = c.counters()
        results[c.name]["counters"] = {k: end[k] - start[c.name].get(k, 0) for k in end}
    return results


# ------------------------------------------------------------------------------------------------
# printing


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def breakdown_table(breakdown: dict, timing: dict, batch: int, use_cuda: bool) -> str:
    names = list(breakdown)
    unit = "CUDA kernel ms/step" if use_cuda else "CPU (wall) ms/step"
    head = "| phase | " + " | ".join(f"{n} incl | {n} excl" for n in names) + " |"
    lines = [
        f"#### Batch {batch}: phase breakdown ({unit}, profiled; incl = inclusive, excl = minus nested ranges)",
        "",
        head,
        "|---|" + "---:|---:|" * len(names),
    ]
    key_i, key_e = ("cuda_inclusive_ms", "cuda_exclusive_ms") if use_cuda else ("cpu_inclusive_ms", "cpu_exclusive_ms")
    labels = [label for label, _, _ in PHASE_ROWS]
    for label in labels:
        cells = []
        for n in names:
            p = breakdown[n]["phases"][label]
            if p["calls_per_step"] == 0:
                cells += ["", ""]
            else:
                cells += [fmt(p[key_i], 2), fmt(p[key_e], 2)]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tot_key = "profiled_step_cuda_ms" if use_cuda else "profiled_step_cpu_ms"
    lines.append(
        "| **profiled step total** | " + " | ".join(f"**{fmt(breakdown[n][tot_key], 2)}** | " for n in names) + " |"
    )
    lines.append(
        "| unprofiled mean (timed rounds) | "
        + " | ".join(f"{fmt(timing[n]['mean_ms'], 2)} | " for n in names if n in timing)
        + " |"
    )
    base = breakdown[names[0]][tot_key]
    lines.append(
        "| overhead vs SGD (profiled) | "
        + " | ".join(f"{fmt(breakdown[n][tot_key] - base, 2)} | " for n in names)
        + " |"
    )
    return "\n".join(lines)


def top_ops_text(breakdown: dict, n: int, use_cuda: bool) -> str:
    out = []
    for cname, b in breakdown.items():
        if not cname.startswith("spngd"):
            continue
        out.append(
            f"Top ops per phase, {cname} (self time per step, exclusive of nested ranges; 'outside ops' = Python/dispatch):"
        )
        key = "cuda_ms" if use_cuda else "self_cpu_ms"
        for label, rname, parent in PHASE_ROWS:
            if parent is not None or rname not in b["ops"]:
                continue
            p = b["phases"][label]
            if p["calls_per_step"] == 0:
                continue
            ops = b["ops"][rname][:n]
            outside = p["cpu_exclusive_ms"] - p["cpu_exclusive_in_ops_ms"]
            nops = sum(o["calls_per_step"] for o in b["ops"][rname])
            parts = "; ".join(f"{o['op']} {o[key]:.2f} ms ×{o['calls_per_step']:.3g}" for o in ops)
            out.append(
                f"  {label.strip():<22} excl {p['cpu_exclusive_ms']:.2f} ms, outside ops {outside:.2f} ms, {nops:.0f} op calls/step: {parts}"
            )
    return "\n".join(out)


def curvature_phase(breakdown: dict, use_cuda: bool) -> dict[str, float]:
    """Per profiled SP-NGD configuration: ms per step in the curvature phase (CURVATURE_ROWS)."""
    key = "cuda_inclusive_ms" if use_cuda else "cpu_inclusive_ms"
    return {
        name: sum(b["phases"][label][key] for label in CURVATURE_ROWS)
        for name, b in breakdown.items()
        if name.startswith("spngd")
    }


def curvature_targets(phase_ms: dict[str, float], use_cuda: bool, extension_loaded: bool) -> list[dict]:
    """Target: the CUDA kernels' curvature phase ≥ 3× faster than the pure-PyTorch path on the
    same GPU. Only meaningful on CUDA with the kernels loaded; otherwise reported as not measured."""
    cuda, torch_ms = phase_ms.get("spngd-every-step-cuda"), phase_ms.get("spngd-every-step-torch")
    if cuda is None or torch_ms is None:
        return []
    target = f"curvature phase (factors + inverses + preconditioning): torch ÷ cuda ≥ {CURVATURE_SPEEDUP_TARGET:g}"
    if not (use_cuda and extension_loaded) or cuda <= 0:
        return [{"target": target, "value": None, "met": None, "why": "needs a GPU and the built CUDA kernels"}]
    speedup = torch_ms / cuda
    return [
        {
            "target": target,
            "value": speedup,
            "met": speedup >= CURVATURE_SPEEDUP_TARGET,
            "detail": f"{torch_ms:.2f} ms (torch) vs {cuda:.2f} ms (cuda) of kernel time per step",
        }
    ]


def curvature_table(phase_ms: dict[str, float], breakdown: dict, use_cuda: bool) -> str:
    unit = "CUDA kernel ms/step" if use_cuda else "CPU (wall) ms/step"
    key = "cuda_inclusive_ms" if use_cuda else "cpu_inclusive_ms"
    names = list(phase_ms)
    lines = [
        f"Curvature phase ({unit}, inclusive):",
        "",
        "| part | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label in CURVATURE_ROWS:
        lines.append(
            f"| {label.strip()} | " + " | ".join(fmt(breakdown[n]["phases"][label][key], 2) for n in names) + " |"
        )
    lines.append("| **curvature phase** | " + " | ".join(f"**{fmt(phase_ms[n], 2)}**" for n in names) + " |")
    return "\n".join(lines)
