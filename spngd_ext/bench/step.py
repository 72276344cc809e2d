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

Configurations built here (:func:`build_configs`): ``sgd``, ``spngd-every-step`` (factors and
inverses every step), ``spngd-10/100`` (factors every 10 steps, inverses every 100), ``spngd-stale``
(stale statistics, curvature_interval=100 as the cap), and ``spngd-every-step-cuda`` /
``spngd-every-step-torch`` (every step with the backend pinned). bench/step_overhead.py adds ASDL's
K-FAC and a profiled phase breakdown on top of these.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

__all__ = [
    "PERIOD",
    "SPNGD_CONFIGS",
    "Config",
    "ConfigUnavailable",
    "bootstrap_ratio_ci",
    "build_configs",
    "random_batches",
    "run_rounds",
    "summarise",
    "sync",
    "targets",
    "timing_table",
]

PERIOD = 100  # longest refresh period among the configurations (inverses every 100 steps)
# name -> SPNGD keyword arguments beyond the common ones
SPNGD_CONFIGS: dict[str, dict] = {
    "spngd-every-step": {"curvature_interval": 1, "inverse_interval": 1},
    "spngd-10/100": {"curvature_interval": 10, "inverse_interval": 100},
    "spngd-stale": {"stale": True, "curvature_interval": 100, "inverse_interval": 1},
    "spngd-every-step-cuda": {"curvature_interval": 1, "inverse_interval": 1, "backend": "cuda"},
    "spngd-every-step-torch": {"curvature_interval": 1, "inverse_interval": 1, "backend": "torch"},
}


class ConfigUnavailable(Exception):
    """A configuration cannot run here (e.g. backend="cuda" without kernels); the message says why."""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Config:
    """One timed configuration: a model, its optimizer, and what was measured.

    Args:
        name: the configuration's name in tables.
        kind: "sgd", "spngd", or another optimizer family (then ``step_fn`` is required).
        model: the model it trains.
        optimizer: its optimizer.
        step_fn: the whole step for other kinds: ``step_fn(x, y)`` returns the detached loss.
        next_kind_fn: for other kinds, what the coming step will do ("plain", "factors",
            "factors+inverse").
        counters_fn: for other kinds, the work counters (``steps``, ``factor_updates``, ...).
    """

    name: str
    kind: str
    model: nn.Module
    optimizer: Any  # a torch.optim.Optimizer; SPNGD's counters and backward are used for kind "spngd"
    step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    next_kind_fn: Callable[[], str] | None = None
    counters_fn: Callable[[], dict] | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads)
    step_kinds: list[str] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    counters_start: dict = field(default_factory=dict)
    counters_end: dict = field(default_factory=dict)
    final_intervals: dict | None = None  # SP-NGD: refresh interval of every statistic at the end

    def run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One whole training step; returns the (detached) loss."""
        if self.step_fn is not None:
            with record_function(f"bench::{self.kind}_step"):
                return self.step_fn(x, y)
        opt = self.optimizer
        with record_function("bench::zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("bench::forward"):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
        with record_function("bench::backward"):
            if self.kind == "spngd":
                opt.backward(loss, out)
            else:
                loss.backward()
        with record_function("bench::step"):
            opt.step()
        return loss.detach()

    def next_step_kind(self) -> str:
        """What the coming step will do: plain, factor refresh, or factor refresh + inversion."""
        return self.next_kind_fn() if self.next_kind_fn is not None else "plain"

    def refresh_counts(self) -> tuple[int, int]:
        if self.kind != "spngd":
            return (0, 0)
        c = self.optimizer.counters
        return c["factor_updates"], c["inverse_updates"]

    @staticmethod
    def kind_from_counts(before: tuple[int, int], after: tuple[int, int]) -> str:
        if after[1] > before[1]:
            return "factors+inverse"
        return "factors" if after[0] > before[0] else "plain"

    def counters(self) -> dict:
        if self.kind == "spngd":
            c = self.optimizer.counters
            return {
                k: c[k]
                for k in (
                    "steps",
                    "factor_updates",
                    "inverse_updates",
                    "skipped_steps",
                    "mc_backwards",
                    "inversion_fallbacks",
                )
            }
        if self.counters_fn is not None:
            return self.counters_fn()
        return {}


def build_config(name: str, model: nn.Module, lr: float, seed: int) -> Config:
    """``sgd`` or one of :data:`SPNGD_CONFIGS` for ``model`` (momentum 0.9, weight decay 5e-4,
    damping 1e-3); raises :class:`ConfigUnavailable` when it cannot run here.

    Args:
        name: the configuration.
        model: the model, already on its device.
        lr: learning rate (0 by default in the benchmarks: see the module docstring).
        seed: SP-NGD's Monte-Carlo sampling seed.
    """
    from .. import SPNGD

    if name == "sgd":
        return Config(name, "sgd", model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4))
    if name not in SPNGD_CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from sgd, {', '.join(SPNGD_CONFIGS)}")
    try:
        opt = SPNGD(model, lr=lr, momentum=0.9, weight_decay=5e-4, damping=1e-3, seed=seed, **SPNGD_CONFIGS[name])
    except (RuntimeError, ValueError) as exc:  # backend="cuda" without kernels or GPU
        raise ConfigUnavailable(str(exc).splitlines()[0]) from exc
    return Config(name, "spngd", model, opt)


def build_configs(
    names: list[str], base: nn.Module, device: torch.device, lr: float, seed: int
) -> tuple[list[Config], dict]:
    """One :class:`Config` per name, each on its own copy of ``base``; (configs, {skipped name: why}).

    Args:
        names: configuration names; "sgd" must be first (it is the reference).
        base: the model to copy.
        device: where the copies live.
        lr: learning rate of every optimizer.
        seed: SP-NGD's sampling seed.
    """
    configs, skipped = [], {}
    for name in names:
        try:
            configs.append(build_config(name, copy.deepcopy(base).to(device), lr, seed))
        except ConfigUnavailable as exc:
            skipped[name] = str(exc)
    if not configs or configs[0].name != "sgd":
        raise ValueError("the sgd baseline must be the first configuration (it is the reference)")
    return configs, skipped


def random_batches(
    batch: int, n: int, example_shape: tuple[int, ...], classes: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of N(0, 1) inputs and uniform labels (round r uses batch r mod n).

    Args:
        batch: examples per batch.
        n: how many distinct batches.
        example_shape: shape of one input example.
        classes: number of labels.
        device: where the batches live.
        seed: seeds the batches' generator.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        (
            torch.randn(batch, *example_shape, generator=g, device=device),
            torch.randint(0, classes, (batch,), generator=g, device=device),
        )
        for _ in range(n)
    ]


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
