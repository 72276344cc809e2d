"""Step overhead: what a whole SP-NGD training step costs compared with momentum SGD, and where it goes.

    python bench/step_overhead.py [--batch-sizes 256,1024] [--rounds 200] [--quick] [--json PATH]
    python bench/step_overhead.py --model resnet50 --device cuda --batch-sizes 32,128
    python bench/step_overhead.py --model resnet50 --batch-sizes 32 --configs sgd,spngd-every-step-cuda,spngd-every-step-torch

Timed configurations (all built through ``spngd_ext.train.baselines``, as the train CLI builds
them):

* ``sgd``               torch.optim.SGD with momentum
* ``spngd-every-step``  SP-NGD, curvature_interval=1, inverse_interval=1
* ``spngd-10/100``      SP-NGD, factors every 10 steps, inverses every 100
* ``spngd-stale``       SP-NGD, stale statistics (stale=True, curvature_interval=100 as the cap)
* ``spngd-every-step-cuda`` / ``spngd-every-step-torch``  every-step SP-NGD with the backend pinned:
  the CUDA kernels, or the pure-PyTorch path on the same device (not in the default list; on a GPU
  their pair gives the issue-3 target "curvature phase ≥ 3× faster than pure PyTorch")
* ``asdl-every-step``   ASDL's K-FAC (KfacGradientMaker + torch.optim.SGD), refresh every step
* ``asdl-10/100``       ASDL's K-FAC, factors every 10 steps, inverses every 100. Without a
  curvature EMA ASDL inverts whenever it refreshes the factors, so this one is built with
  intervals 100/100 and then given curvature_upd_interval=10 and ema_decay=1.0: in ASDL's
  convention (ema = ema·(1−d) + new·d) d=1 replaces the factors with the current estimate, like
  SP-NGD's ema_decay=None, and the inversion then follows preconditioner_upd_interval.

A step is the whole training step: zero_grad, forward, loss, backward (``opt.backward(loss, out)``
for SP-NGD, ASDL's ``forward_and_backward`` for ASDL), optimizer step. All configurations run in
one process, interleaved round-robin (one step of each per round, the order rotated every round),
on the same batch in a round, so load drift on a shared machine hits all of them alike. Warm-up
rounds are discarded. The interval configurations refresh rarely and expensively, so the number
that matters is the MEAN over whole periods: the timed rounds are rounded up to a multiple of 100
(the longest period) unless --quick. Reported per configuration: median, mean, p10/p90, the
ratio of its mean to SGD's mean (amortised cost, with a paired bootstrap 95% interval over rounds)
and of the medians, the ratio of mean process CPU time (all threads; less sensitive than wall time
to other jobs on a shared machine), plus the mean per kind of step (plain / factor refresh /
factor + inverse).

By default every optimizer runs with lr=0: every configuration executes exactly the ops of a
training step, but none can diverge over hundreds of steps on a few batches (a diverged SP-NGD
skips its steps, which would make it look cheap). --lr trains for real; non-finite losses and
skipped steps are reported and mark a row invalid either way.

After the timed rounds a profiled run breaks each step into phases and sums the curvature phase
(factor accumulation, finalize, inversion, preconditioning); how, in bench/step_profile.py.

--model resnet50 is ``spngd_ext.train.models.resnet50`` (torchvision's ResNet-50 v1.5 layer shapes,
25.6M parameters) on random 3×224×224 inputs (--image-size to change), so no torchvision or
dataset is needed on the GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spngd_ext.train.models import count_parameters, resnet50, small_bn_cnn  # noqa: E402
from spngd_ext.train.baselines import (  # noqa: E402
    OptimizerSettings,
    OptimizerUnavailableError,
    build_train_step,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path
import step_profile  # noqa: E402,F401  (the module too: tests read its constants through this one)
from step_profile import (  # noqa: E402
    breakdown_table,
    curvature_phase,
    curvature_table,
    curvature_targets,
    fmt,
    profile_configs,
    sync as _sync,
    top_ops_text,
)

PERIOD = 100  # longest refresh period among the configurations (inverses every 100 steps)
ALL_CONFIGS = ("sgd", "spngd-every-step", "spngd-10/100", "spngd-stale", "asdl-every-step", "asdl-10/100")
BACKEND_CONFIGS = {"spngd-every-step-cuda": "cuda", "spngd-every-step-torch": "torch"}  # opt-in
KNOWN_CONFIGS = ALL_CONFIGS + tuple(BACKEND_CONFIGS)
PROFILED = ("sgd", "spngd-every-step", "spngd-10/100", "spngd-stale", *BACKEND_CONFIGS)


# ------------------------------------------------------------------------------------------------
# environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, argv: list[str]) -> dict:
    env = {
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/step_overhead.py", *argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "device": args.device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    from spngd_ext._extension import extension_error, extension_loaded

    env["extension_loaded"] = extension_loaded()
    if not env["extension_loaded"]:
        env["extension_error"] = extension_error()
    try:
        import asdl  # noqa: F401

        from importlib.metadata import version

        env["asdl"] = version("asdfghjkl")
    except Exception:  # noqa: BLE001 - only informative
        env["asdl"] = None
    return env


# ------------------------------------------------------------------------------------------------
# model and data


def build_base_model(name: str, image_size: int | None = None) -> tuple[nn.Module, tuple[int, ...], int]:
    """The model, the shape of one input example and the number of classes."""
    if name == "small_bn_cnn":
        return small_bn_cnn(), (1, 28, 28), 10
    if name == "resnet50":
        size = image_size or 224
        return resnet50(), (3, size, size), 1000
    raise SystemExit(f"unknown --model {name!r}; choose small_bn_cnn or resnet50")


def _fashion_mnist_dir(explicit: str | None) -> Path | None:
    from spngd_ext.train.data import DataNotFoundError, find_data_dir, locate_files

    if explicit:
        return find_data_dir(explicit, download=False)
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
    if not os.environ.get("SPNGD_DATA_DIR") and locate_files(sibling) is not None:
        return sibling
    try:
        return find_data_dir(None, download=False)
    except DataNotFoundError:
        return None


def make_batches(kind: str, batch: int, n: int, example_shape: tuple[int, ...], classes: int,
                 device: torch.device, data_dir: str | None, seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """n batches, each used by every configuration in the same round (round r uses batch r mod n)."""
    if kind in ("auto", "fmnist") and example_shape == (1, 28, 28):
        directory = _fashion_mnist_dir(data_dir)
        if directory is not None:
            from spngd_ext.train.data import load_dataset

            ds = load_dataset(directory, limit_train=batch * n, limit_test=1, download=False)
            if ds.train_x.shape[0] >= batch:
                n = ds.train_x.shape[0] // batch
                xs = ds.train_x[: n * batch].to(device).split(batch)
                ys = ds.train_y[: n * batch].to(device).split(batch)
                return list(zip(xs, ys)), f"Fashion-MNIST ({directory}), {n} distinct batches of {batch}"
        if kind == "fmnist":
            raise SystemExit("--data fmnist: Fashion-MNIST not found (set SPNGD_DATA_DIR or --data-dir)")
    g = torch.Generator(device=device).manual_seed(seed)
    batches = [
        (torch.randn(batch, *example_shape, generator=g, device=device), torch.randint(0, classes, (batch,), generator=g, device=device))
        for _ in range(n)
    ]
    return batches, f"random N(0,1) inputs and uniform labels, {n} distinct batches of {batch}"


# ------------------------------------------------------------------------------------------------
# configurations


@dataclass
class Config:
    name: str
    kind: str  # "sgd" | "spngd" | "asdl"
    train_step: object  # the registry's TrainStep
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads)
    step_kinds: list[str] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    counters_start: dict = field(default_factory=dict)
    counters_end: dict = field(default_factory=dict)
    final_intervals: dict | None = None  # SP-NGD: refresh interval of every statistic at the end

    @property
    def model(self) -> nn.Module:
        return self.train_step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    def run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One whole training step; returns the (detached) loss."""
        if self.kind == "asdl":
            with record_function("bench::asdl_step"):
                loss, _ = self.train_step(x, y)  # ASDL's own call sequence (registry)
            return loss
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
        if self.kind == "asdl":
            gm = self.train_step.grad_maker
            curv = gm.do_update_curvature()
            inv = curv if not gm.do_accumulate else gm.do_update_preconditioner()
            return "factors+inverse" if inv else ("factors" if curv else "plain")
        return "plain"

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
            return {k: c[k] for k in ("steps", "factor_updates", "inverse_updates", "skipped_steps", "mc_backwards", "inversion_fallbacks")}
        if self.kind == "asdl":
            return {"steps": self.train_step.grad_maker.state["step"], "factor_updates": self.train_step.curvature_updates}
        return {}


def build_configs(names: list[str], base: nn.Module, device: torch.device, lr: float, seed: int) -> tuple[list[Config], dict]:
    configs, skipped = [], {}
    for name in names:
        model = copy.deepcopy(base).to(device)
        common = dict(lr=lr, momentum=0.9, weight_decay=5e-4, damping=1e-3, seed=seed)
        try:
            if name == "sgd":
                cfg = Config(name, "sgd", build_train_step("sgd", model, OptimizerSettings(**common)))
            elif name == "spngd-every-step":
                cfg = Config(name, "spngd", build_train_step("spngd", model, OptimizerSettings(**common, curvature_interval=1, inverse_interval=1)))
            elif name == "spngd-10/100":
                cfg = Config(name, "spngd", build_train_step("spngd", model, OptimizerSettings(**common, curvature_interval=10, inverse_interval=100)))
            elif name in BACKEND_CONFIGS:
                settings = OptimizerSettings(**common, curvature_interval=1, inverse_interval=1, backend=BACKEND_CONFIGS[name])
                try:
                    cfg = Config(name, "spngd", build_train_step("spngd", model, settings))
                except (RuntimeError, ValueError) as exc:  # backend="cuda" without kernels or GPU
                    raise OptimizerUnavailableError(str(exc).splitlines()[0]) from exc
            elif name == "spngd-stale":
                cfg = Config(name, "spngd", build_train_step("spngd", model, OptimizerSettings(**common, stale=True, curvature_interval=100, inverse_interval=1)))
            elif name == "asdl-every-step":
                cfg = Config(name, "asdl", build_train_step("asdl-kfac", model, OptimizerSettings(**common, curvature_interval=1, inverse_interval=1)))
            elif name == "asdl-10/100":
                step = build_train_step("asdl-kfac", model, OptimizerSettings(**common, curvature_interval=100, inverse_interval=100))
                step.config.curvature_upd_interval = 10
                step.config.ema_decay = 1.0  # replace (no averaging); inversion every preconditioner_upd_interval
                cfg = Config(name, "asdl", step)
            else:
                raise SystemExit(f"unknown config {name!r}; choose from {', '.join(KNOWN_CONFIGS)}")
        except OptimizerUnavailableError as exc:
            skipped[name] = str(exc)
            continue
        configs.append(cfg)
    if not configs or configs[0].name != "sgd":
        raise SystemExit("the sgd baseline must be among the configurations (it is the reference)")
    return configs, skipped


# ------------------------------------------------------------------------------------------------
# timing


def run_rounds(configs: list[Config], batches, rounds: int, warmup: int, device: torch.device, log: Callable[[str], None]) -> float:
    """Round-robin: one step of each configuration per round, order rotated each round."""
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
                _sync(device)
                c0 = time.process_time()
                t0 = time.perf_counter()
                loss = c.run(x, y)
                _sync(device)
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
            by_kind[kind] = {"steps": int(sel.sum()), "mean_ms": float(t[sel].mean()), "median_ms": float(np.median(t[sel]))}
        lo, hi = bootstrap_ratio_ci(t, sgd)
        out[c.name] = {
            "steps": int(len(t)),
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


# ------------------------------------------------------------------------------------------------
# printing



def timing_table(summary: dict, batch: int) -> str:
    lines = [
        f"#### Batch {batch}: whole training step (ms), interleaved, {next(iter(summary.values()))['steps']} timed steps each",
        "",
        "| config | median | mean | p10–p90 | mean / SGD mean (95% CI) | median / SGD median | CPU-time mean / SGD | mean by step kind | refreshes in window |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, s in summary.items():
        kinds = ", ".join(f"{k} {v['mean_ms']:.1f}×{v['steps']}" for k, v in s["by_step_kind"].items())
        w = s["counters_in_window"]
        ref = f"f {w['factor_updates']}" + (f", inv {w['inverse_updates']}" if "inverse_updates" in w else "") if "factor_updates" in w else ""
        if w.get("skipped_steps"):
            ref += f", SKIPPED {w['skipped_steps']}"
        flag = "" if s["valid"] else " (INVALID: non-finite loss or skipped steps)"
        lo, hi = s["ratio_mean_ci95"]
        lines.append(
            f"| {name}{flag} | {fmt(s['median_ms'])} | {fmt(s['mean_ms'])} | {fmt(s['p10_ms'])}–{fmt(s['p90_ms'])} | "
            f"**{s['ratio_mean']:.3f}×** ({lo:.3f}–{hi:.3f}) | {s['ratio_median']:.3f}× | {s['cpu_ratio_mean']:.3f}× | {kinds} | {ref} |"
        )
    return "\n".join(lines)



def targets(summary: dict) -> list[dict]:
    def r(name):
        return summary[name]["ratio_mean"] if name in summary else None

    res = []
    if r("spngd-every-step") is not None:
        res.append({"target": "spngd every-step mean ≤ 2.0× SGD", "value": r("spngd-every-step"), "met": r("spngd-every-step") <= 2.0})
    cand = [(n, r(n)) for n in ("spngd-10/100", "spngd-stale") if r(n) is not None]
    if cand:
        best = min(cand, key=lambda t: t[1])
        res.append({"target": "spngd 10/100 or stale mean ≤ 1.03× SGD", "value": best[1], "which": best[0], "met": best[1] <= 1.03})
    for sp, asdl in (("spngd-every-step", "asdl-every-step"), ("spngd-10/100", "asdl-10/100")):
        if sp in summary and asdl in summary:
            speed = summary[asdl]["mean_ms"] / summary[sp]["mean_ms"]
            res.append({"target": f"{asdl} / {sp} mean ≥ 1.5 (SP-NGD faster)", "value": speed, "met": speed >= 1.5})
    return res



# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_bn_cnn", choices=["small_bn_cnn", "resnet50"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cpu for small_bn_cnn, cuda for resnet50")
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--image-size", type=int, default=None, help="--model resnet50: input height and width (default 224)")
    p.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default 300; rounded up to a multiple of {PERIOD} unless --quick)")
    p.add_argument("--warmup", type=int, default=None, help="discarded rounds first (default 10; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 rounds, short profiles, no period rounding")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma list; sgd must be first")
    p.add_argument("--no-asdl", action="store_true", help="drop the ASDL configurations")
    p.add_argument("--no-profile", action="store_true", help="skip the phase breakdown")
    p.add_argument("--profile-steps", type=int, default=None, help=f"steps per profiled config (default: 20, and {PERIOD} for interval configs)")
    p.add_argument("--top-ops", type=int, default=5, help="list the N most expensive ops per SP-NGD phase (0: off)")
    p.add_argument("--data", default="auto", choices=["auto", "fmnist", "random"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-batches", type=int, default=8, help="distinct batches cycled through (round r uses batch r mod n)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate of every optimizer (default 0: frozen weights, see docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write everything (incl. per-step times) here")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if args.model == "resnet50" else "cpu"
    if args.image_size is not None and (args.model != "resnet50" or args.image_size < 32):
        p.error("--image-size applies to --model resnet50 only and must be at least 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.no_asdl:
        names = [n for n in names if not n.startswith("asdl")]
    args.config_names = names
    if args.warmup is None:
        args.warmup = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 20 if args.quick else 300
    if not args.quick and args.rounds % PERIOD:
        args.rounds = (args.rounds // PERIOD + 1) * PERIOD
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=FutureWarning)  # ASDL: non-full backward hooks, jit
    device = torch.device(args.device)
    env = environment(args, argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"# step overhead: SP-NGD vs SGD vs ASDL K-FAC\n\ncommand: `{env['command']}`  ")
    print(f"torch {env['torch']}, threads {env['threads']} (interop {env['interop_threads']}), {env['cpu_count']} cores: {env['cpu_model']}"
          + (f", GPU {env['gpu']}" if "gpu" in env else "") + f", asdl {env['asdl']}, load average at start {env['load_average']}  ")

    base, example_shape, classes = build_base_model(args.model, args.image_size)
    result: dict = {"environment": env, "settings": {k: v for k, v in vars(args).items()}, "model": {
        "name": args.model, "parameters": count_parameters(base), "input": list(example_shape), "classes": classes}, "batch_sizes": {}}
    print(f"model {args.model} ({count_parameters(base):,} parameters), input {example_shape}, device {args.device}, lr {args.lr}, "
          f"{args.rounds} timed rounds after {args.warmup} warm-up rounds\n")

    for batch in args.batch_sizes:
        entry: dict = {}
        result["batch_sizes"][str(batch)] = entry
        try:
            batches, data_desc = make_batches(args.data, batch, args.n_batches, example_shape, classes, device, args.data_dir, args.seed)
            entry["data"] = data_desc
            configs, skipped = build_configs(args.config_names, base, device, args.lr, args.seed)
            entry["skipped_configs"] = skipped
            for name, why in skipped.items():
                print(f"(skipping {name}: {why})")
            log(f"batch {batch}: {len(configs)} configs, data: {data_desc}")
            wall = run_rounds(configs, batches, args.rounds, args.warmup, device, log)
            summary = summarise(configs)
            entry["timing"] = summary
            entry["timing_wall_s"] = wall
            entry["targets"] = targets(summary)
            print(timing_table(summary, batch))
            print(f"\n({data_desc}; timing took {wall:.0f} s)\n")
            for t in entry["targets"]:
                print(f"- target {t['target']}: {t['value']:.3f} → {'met' if t['met'] else 'NOT MET'}"
                      + (f" ({t['which']})" if "which" in t else ""))
            print()

            if not args.no_profile:
                steps = {}
                for c in configs:
                    if c.name not in PROFILED:
                        continue
                    if args.profile_steps is not None:
                        steps[c.name] = args.profile_steps
                    elif c.name == "spngd-10/100":
                        steps[c.name] = 10 if args.quick else PERIOD
                    else:
                        steps[c.name] = 3 if args.quick else 20
                log(f"  profiling (interleaved): {steps}")
                chosen = [c for c in configs if c.name in steps]
                breakdown = profile_configs(chosen, steps, batches, device)
                entry["breakdown"] = breakdown
                print(breakdown_table(breakdown, summary, batch, device.type == "cuda"))
                print()
                phase_ms = curvature_phase(breakdown, device.type == "cuda")
                entry["curvature_phase_ms"] = phase_ms
                if phase_ms:
                    print(curvature_table(phase_ms, breakdown, device.type == "cuda"))
                    print()
                extra = curvature_targets(phase_ms, device.type == "cuda", env["extension_loaded"])
                entry["targets"] += extra
                for t in extra:
                    verdict = "not measured: " + t["why"] if t["met"] is None else ("met" if t["met"] else "NOT MET")
                    value = "" if t["value"] is None else f"{t['value']:.2f}× → "
                    print(f"- target {t['target']}: {value}{verdict}" + (f" ({t['detail']})" if "detail" in t else ""))
                if extra:
                    print()
                if args.top_ops > 0:
                    print(top_ops_text(breakdown, args.top_ops, device.type == "cuda"))
                    print()
                    for b in breakdown.values():
                        for name in b["ops"]:
                            b["ops"][name] = b["ops"][name][: max(args.top_ops, 10)]
        except torch.cuda.OutOfMemoryError as exc:  # one batch size too big must not lose the others
            entry["error"] = f"out of memory: {exc}".splitlines()[0]
            print(f"batch {batch}: {entry['error']}\n")
            torch.cuda.empty_cache()

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
