"""Whole-step comparison: what a training step costs with SP-NGD compared with momentum SGD.

A step is the whole training step: zero_grad, forward, loss, backward (``opt.backward(loss, out)``
for SP-NGD), optimizer step. All configurations run in one process, interleaved round-robin (one
step of each per round, the order rotated every round), on the same batch in a round, so load drift
on a shared machine hits all of them alike. Warm-up rounds are discarded. Reported per
configuration: median, mean, p10/p90, the ratio of its mean to SGD's mean (with a paired bootstrap
95% interval over rounds) and of the medians, the ratio of mean process CPU time, and the mean per
kind of step (plain / factor refresh / factor + inverse).

Every optimizer runs with lr=0 by default: each configuration executes exactly the ops of a
training step, but none can diverge over many steps on a few batches (a diverged SP-NGD skips its
steps, which would make it look cheap).

The configurations (:func:`spngd_ext.bench.configs.build_configs`): ``sgd``, ``spngd-every-step`` (factors and
inverses every step), ``spngd-10/100`` (factors every 10 steps, inverses every 100), ``spngd-stale``
(stale statistics, curvature_interval=100 as the cap), and ``spngd-every-step-cuda`` /
``spngd-every-step-torch`` (every step with the backend pinned). bench/step_overhead.py adds ASDL's
K-FAC and a profiled phase breakdown on top of these.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np
import torch

from .configs import PERIOD, Config

__all__ = [
    "PERIOD",
    "Config",
    "bootstrap_ratio_ci",
    "run_rounds",
    "summarise",
    "sync",
    "targets",
    "timing_table",
]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# timing


def run_rounds(
    configs: list[Config], batches, rounds: int, warmup: int, device: torch.device, log: Callable[[str], None]
) -> float:
    """Round-robin: one step of each configuration per round, order rotated each round; returns
    the wall time in seconds.

    Args:
        configs: the configurations (their ``times`` etc. are filled in).
        batches: (x, y) pairs; round r uses batch r mod len(batches).
        rounds: timed rounds.
        warmup: rounds run first and discarded.
        device: synchronised around every step.
        log: receives progress lines.
    """
    n = len(configs)
    t_start = time.perf_counter()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # collections at random points would land on random configurations
    try:
        for r in range(warmup + rounds):
            if r == warmup:
                for c in configs:
                    c.counters_start = c.counters()
            x, y = batches[r % len(batches)]
            for k in range(n):
                c = configs[(r + k) % n]
                kind = c.next_step_kind()
                before = c.refresh_counts()
                sync(device)
                c0 = time.process_time()
                t0 = time.perf_counter()
                loss = c.run(x, y)
                sync(device)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                if c.kind == "spngd":
                    kind = c.kind_from_counts(before, c.refresh_counts())
                if r >= warmup:
                    c.times.append(dt)
                    c.cpu_times.append(dc)
                    c.step_kinds.append(kind)
                    c.losses.append(loss)
            if r % 10 == 9:
                gc.collect()
            if (r + 1) % max(1, (warmup + rounds) // 10) == 0:
                log(f"    round {r + 1}/{warmup + rounds}  ({time.perf_counter() - t_start:.0f} s)")
    finally:
        if gc_was_enabled:
            gc.enable()
    for c in configs:
        c.counters_end = c.counters()
        if c.kind == "spngd":
            c.final_intervals = c.optimizer.counters["intervals"]
    return time.perf_counter() - t_start


def bootstrap_ratio_ci(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a)/mean(b), resampling rounds (pairs) with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n, len(a)))
    r = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    return float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))


def summarise(configs: list[Config]) -> dict:
    """Per configuration: times (ms), ratios to SGD (the first configuration), counters, validity."""
    sgd = np.asarray(configs[0].times) * 1e3
    sgd_cpu = np.asarray(configs[0].cpu_times) * 1e3
    out = {}
    for c in configs:
        t = np.asarray(c.times) * 1e3
        tc = np.asarray(c.cpu_times) * 1e3
        losses = torch.stack(c.losses).float().cpu() if c.losses else torch.zeros(0)
        finite = bool(torch.isfinite(losses).all())
        start, end = c.counters_start, c.counters_end
        window = {k: end[k] - start.get(k, 0) for k in end}
        skipped = window.get("skipped_steps", 0)
        by_kind = {}
        for kind in sorted(set(c.step_kinds)):
            sel = np.asarray([k == kind for k in c.step_kinds])
            by_kind[kind] = {
                "steps": int(sel.sum()),
                "mean_ms": float(t[sel].mean()),
                "median_ms": float(np.median(t[sel])),
            }
        lo, hi = bootstrap_ratio_ci(t, sgd)
        out[c.name] = {
            "steps": len(t),
            "median_ms": float(np.median(t)),
            "mean_ms": float(t.mean()),
            "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)),
            "min_ms": float(t.min()),
            "max_ms": float(t.max()),
            "ratio_mean": float(t.mean() / sgd.mean()),
            "ratio_mean_ci95": [lo, hi],
            "ratio_median": float(np.median(t) / np.median(sgd)),
            "cpu_mean_ms": float(tc.mean()),
            "cpu_ratio_mean": float(tc.mean() / sgd_cpu.mean()) if sgd_cpu.mean() > 0 else float("nan"),
            "by_step_kind": by_kind,
            "counters_in_window": window,
            "final_intervals": c.final_intervals,
            "final_loss": float(losses[-1]) if len(losses) else None,
            "valid": finite and skipped == 0,
            "times_ms": [round(float(v), 4) for v in t],
        }
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def timing_table(summary: dict, batch: int) -> str:
    """The whole-step table (markdown) of one batch size."""
    lines = [
        f"#### Batch {batch}: whole training step (ms), interleaved, {next(iter(summary.values()))['steps']} timed steps each",
        "",
        "| config | median | mean | p10–p90 | mean / SGD mean (95% CI) | median / SGD median | CPU-time mean / SGD | mean by step kind | refreshes in window |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, s in summary.items():
        kinds = ", ".join(f"{k} {v['mean_ms']:.1f}×{v['steps']}" for k, v in s["by_step_kind"].items())
        w = s["counters_in_window"]
        refreshes = ""
        if "factor_updates" in w:
            refreshes = f"f {w['factor_updates']}" + (f", inv {w['inverse_updates']}" if "inverse_updates" in w else "")
        if w.get("skipped_steps"):
            refreshes += f", SKIPPED {w['skipped_steps']}"
        flag = "" if s["valid"] else " (INVALID: non-finite loss or skipped steps)"
        lo, hi = s["ratio_mean_ci95"]
        lines.append(
            f"| {name}{flag} | {_fmt(s['median_ms'])} | {_fmt(s['mean_ms'])} | {_fmt(s['p10_ms'])}–{_fmt(s['p90_ms'])} | "
            f"**{s['ratio_mean']:.3f}×** ({lo:.3f}–{hi:.3f}) | {s['ratio_median']:.3f}× | {s['cpu_ratio_mean']:.3f}× | {kinds} | {refreshes} |"
        )
    return "\n".join(lines)


def targets(summary: dict) -> list[dict]:
    """The step-overhead targets: every-step SP-NGD ≤ 2× SGD, 10/100 or stale ≤ 1.03× SGD, and
    SP-NGD ≥ 1.5× faster than ASDL where both ran."""

    def ratio(name):
        return summary[name]["ratio_mean"] if name in summary else None

    res = []
    if ratio("spngd-every-step") is not None:
        res.append(
            {
                "target": "spngd every-step mean ≤ 2.0× SGD",
                "value": ratio("spngd-every-step"),
                "met": ratio("spngd-every-step") <= 2.0,
            }
        )
    cand = [(n, ratio(n)) for n in ("spngd-10/100", "spngd-stale") if ratio(n) is not None]
    if cand:
        best = min(cand, key=lambda t: t[1])
        res.append(
            {
                "target": "spngd 10/100 or stale mean ≤ 1.03× SGD",
                "value": best[1],
                "which": best[0],
                "met": best[1] <= 1.03,
            }
        )
    for sp, asdl in (("spngd-every-step", "asdl-every-step"), ("spngd-10/100", "asdl-10/100")):
        if sp in summary and asdl in summary:
            speed = summary[asdl]["mean_ms"] / summary[sp]["mean_ms"]
            res.append({"target": f"{asdl} / {sp} mean ≥ 1.5 (SP-NGD faster)", "value": speed, "met": speed >= 1.5})
    return res
