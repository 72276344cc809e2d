"""Whole-run step cost: each configuration trains the main job to the end, all of them side by side.

    python bench/step_overhead.py --whole-run [--batch-size 4096] [--epochs 10] [--threads 2] [--json PATH]
    python bench/whole_run.py --configs sgd,spngd-every-step,spngd-stale,spngd-stale-noise

The interleaved step times of bench/step_overhead.py run every configuration on frozen weights
(lr 0), which fixes how often stale statistics refresh; what stale statistics save depends on how
the statistics move during real training. Here every configuration trains the main job (small BN
CNN, Fashion-MNIST, the CLI's warm-up and decay, same initial weights and batch order) with its own
learning rate, and the runs advance in lockstep: step t of every configuration, in an order rotated
every step, before step t + 1 of any, so load drift on a shared machine hits all of them alike.

Configurations: ``sgd`` (momentum SGD), ``spngd-every-step`` (every statistic and inverse at every
step), ``spngd-stale`` (``StalePolicy(threshold)``, the paper's rule), ``spngd-stale-noise``
(``StalePolicy(threshold, rule="noise")``), ``spngd-stale-noise-aligned`` (the same with
``align=True``); ``--threshold`` sets both rules' threshold, and
``spngd-stale-noise@T`` / ``spngd-stale@T`` one with threshold T.

Reported per configuration: mean step over the whole run and its ratio to SGD's, the mean of the
steps without any refresh ÷ SGD's mean, steps and step time (evaluation excluded) to
``--target`` test accuracy, best test accuracy, and the fraction of each kind of work skipped
relative to the every-step run: statistics computed, inverse sides, sampled-label backwards, and
steps with no due statistic (no hook, no backward, no inversion, no host read of changes).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from spngd_ext import SPNGD  # noqa: E402
from spngd_ext.refresh import StalePolicy  # noqa: E402
from spngd_ext.train import evaluate  # noqa: E402
from spngd_ext.train.baselines import GradientStep, SpngdStep, TrainStep  # noqa: E402
from spngd_ext.train.data import Dataset, load_dataset  # noqa: E402
from spngd_ext.train.models import build_model  # noqa: E402
from spngd_ext.train.reporting import markdown_table  # noqa: E402
from spngd_ext.train.schedules import build_lr_scheduler  # noqa: E402

DEFAULT_CONFIGS = "sgd,spngd-every-step,spngd-stale,spngd-stale-noise"
_SIBLING_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"


@dataclass
class Run:
    """One configuration's training run and what was measured."""

    name: str
    lr: float
    step: TrainStep
    scheduler: torch.optim.lr_scheduler.LRScheduler
    times: list[float] = field(default_factory=list)
    refreshed: list[bool] = field(default_factory=list)  # whether the step computed any statistic
    evals: list[dict] = field(default_factory=list)
    diverged: bool = False

    @property
    def spngd(self) -> SPNGD | None:
        opt = self.step.optimizer
        return opt if isinstance(opt, SPNGD) else None


def build_run(name: str, model: torch.nn.Module, args: argparse.Namespace, total: int, warmup: int) -> Run:
    """The training step of configuration ``name`` (see the module docstring)."""
    base, _, threshold = name.partition("@")
    tau = float(threshold) if threshold else args.threshold
    if base == "sgd":
        lr = args.lr_sgd
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay
        )
        step: TrainStep = GradientStep(model, opt, amp=False)
    elif base in ("spngd-every-step", "spngd-stale", "spngd-stale-noise", "spngd-stale-noise-aligned"):
        lr = args.lr_spngd
        stale: bool | StalePolicy = False
        if base != "spngd-every-step":
            rule = "noise" if "noise" in base else "relative"
            stale = StalePolicy(threshold=tau, rule=rule, align=base.endswith("aligned"))
        opt = SPNGD(
            model,
            lr=lr,
            momentum=0.9,
            weight_decay=args.weight_decay,
            damping=args.damping,
            fisher=args.fisher,
            seed=args.seed,
            stale=stale,
        )
        step = SpngdStep(model, opt, amp=False)
    else:
        raise SystemExit(f"unknown configuration {name!r}; known: {DEFAULT_CONFIGS} (stale ones with @threshold)")
    return Run(name, lr, step, build_lr_scheduler(opt, total, warmup, args.schedule))


def _refresh_count(run: Run) -> int:
    opt = run.spngd
    return opt.counters["factor_updates"] if opt is not None else 0


def train_side_by_side(runs: list[Run], data: Dataset, args: argparse.Namespace, log, checkpoint=None) -> None:
    """Every run trains ``args.epochs`` epochs, one step of each per round, order rotated."""
    n = data.train_x.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    shuffle = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=shuffle)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = data.train_x[idx], data.train_y[idx]
            t = epoch * steps_per_epoch + i
            for k in range(len(runs)):
                run = runs[(t + k) % len(runs)]
                if run.diverged:
                    continue
                before = _refresh_count(run)
                t0 = time.perf_counter()
                loss, _ = run.step(x, y)
                run.times.append(time.perf_counter() - t0)
                run.refreshed.append(_refresh_count(run) > before)
                run.scheduler.step()
                run.diverged = not math.isfinite(float(loss))
            last = t + 1 == steps_per_epoch * args.epochs
            if (t + 1) % args.eval_every == 0 or last:
                for run in runs:
                    if len(run.times) == t + 1:
                        _, acc = evaluate(run.step.model, data.test_x, data.test_y)
                        run.step.model.train()
                        run.evals.append({"step": t + 1, "test_acc": acc, "train_time": sum(run.times)})
                log(
                    f"  step {t + 1}/{steps_per_epoch * args.epochs} ({time.perf_counter() - t_start:.0f} s): "
                    + ", ".join(f"{r.name} {r.evals[-1]['test_acc']:.4f}" for r in runs if r.evals)
                )
                if checkpoint is not None:  # what has been measured so far, in case the run is cut short
                    checkpoint()


def summarise(runs: list[Run], target: float) -> list[dict]:
    """Per run: mean step, ratios to SGD, time and steps to ``target``, best accuracy, work skipped."""
    sgd_mean = statistics.fmean(runs[0].times)
    rows = []
    for run in runs:
        reached = next((e for e in run.evals if e["test_acc"] >= target), None)
        plain = [t for t, r in zip(run.times, run.refreshed) if not r]
        row = {
            "name": run.name,
            "lr": run.lr,
            "steps": len(run.times),
            "mean_step_s": statistics.fmean(run.times),
            "mean_ratio": statistics.fmean(run.times) / sgd_mean,
            "plain_steps": len(plain),
            "plain_ratio": statistics.fmean(plain) / sgd_mean if plain else None,
            "steps_to_target": reached["step"] if reached else None,
            "time_to_target_s": reached["train_time"] if reached else None,
            "best_acc": max((e["test_acc"] for e in run.evals), default=float("nan")),
            "diverged": run.diverged,
            "evals": run.evals,
            "step_times_s": run.times,
        }
        opt = run.spngd
        if opt is not None:
            c = opt.counters
            row |= {
                "factor_work_skipped": c["factor_work_skipped"],
                "inverse_work_skipped": c["inverse_work_skipped"],
                "mc_backward_skipped": 1.0 - c["mc_backwards"] / max(1, c["steps"]),  # mc_samples = 1
                "refresh_steps_skipped": 1.0 - c["factor_updates"] / max(1, c["steps"]),
                "final_intervals": c["intervals"],
            }
        rows.append(row)
    sgd_time = rows[0]["time_to_target_s"]
    for row in rows:
        t = row["time_to_target_s"]
        row["time_to_target_ratio"] = t / sgd_time if t is not None and sgd_time else None
    return rows


def table(rows: list[dict], target: float) -> str:
    def pct(v) -> str:
        return "—" if v is None else f"{v:.1%}"

    header = [
        "configuration",
        "lr",
        "mean step (ms)",
        "mean step ÷ SGD's",
        "no-refresh step ÷ SGD's",
        f"steps to {target:.0%}",
        f"time to {target:.0%} (s)",
        "best accuracy",
        "statistics skipped",
        "inverse sides skipped",
        "MC backwards skipped",
        "steps with nothing due",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["name"] + (" (diverged)" if r["diverged"] else ""),
                f"{r['lr']:g}",
                f"{1e3 * r['mean_step_s']:.0f}",
                f"{r['mean_ratio']:.2f}",
                "—" if r["plain_ratio"] is None else f"{r['plain_ratio']:.2f} ({r['plain_steps']} steps)",
                "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"]),
                "—"
                if r["time_to_target_s"] is None
                else f"{r['time_to_target_s']:.0f} ({r['time_to_target_ratio']:.2f}× SGD's)"
                if r["time_to_target_ratio"] is not None
                else f"{r['time_to_target_s']:.0f}",
                f"{r['best_acc']:.2%}",
                pct(r.get("factor_work_skipped")),
                pct(r.get("inverse_work_skipped")),
                pct(r.get("mc_backward_skipped")),
                pct(r.get("refresh_steps_skipped")),
            ]
        )
    return markdown_table(header, body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list; the first must be sgd")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr-sgd", type=float, default=0.2)
    p.add_argument("--lr-spngd", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.1, help="stale statistics' threshold (both rules)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--fisher", choices=("mc", "emp"), default="mc")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--schedule", default="cosine", choices=("poly", "cosine", "constant"))
    p.add_argument("--target", type=float, default=0.88, help="test accuracy to time")
    p.add_argument("--eval-every", type=int, default=5, help="steps between test evaluations")
    p.add_argument("--model", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", choices=("fmnist", "random"), default="fmnist")
    p.add_argument("--data-dir", default=None, help="default: $SPNGD_DATA_DIR or ../shared/data/fashion-mnist")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--json", default=None, help="write settings, machine, per-run results and step times here")
    return p


def _random_dataset(n_train: int, n_test: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        torch.randn(n_train, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randn(n_test, 1, 28, 28, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        mean=0.0,
        std=1.0,
        directory=Path("random"),
    )


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not names or names[0] != "sgd":
        raise SystemExit("--configs: the first configuration must be sgd (the reference)")
    if args.data == "random":
        data = _random_dataset(args.limit_train or 2 * args.batch_size, args.limit_test or 256, args.seed)
    else:
        default_dir = str(_SIBLING_DATA) if _SIBLING_DATA.is_dir() and not os.environ.get("SPNGD_DATA_DIR") else None
        data = load_dataset(args.data_dir or default_dir, args.limit_train, args.limit_test, download=False)
    steps_per_epoch = math.ceil(data.train_x.shape[0] / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = round(args.warmup_epochs * steps_per_epoch)
    torch.manual_seed(args.seed)
    base = build_model(args.model, num_classes=data.num_classes)
    runs = [build_run(n, copy.deepcopy(base), args, total, warmup) for n in names]
    command = shlex.join(["python", "bench/step_overhead.py", "--whole-run", *argv])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(
        f"whole runs side by side: {names}, {total} steps of batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }

    def partial() -> None:
        if args.json:
            rows = summarise(runs, args.target)
            partial = {"command": command, "settings": vars(args), "machine": machine, "partial": True, "runs": rows}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(partial, indent=2, default=str))

    wall = time.perf_counter()
    train_side_by_side(runs, data, args, log, partial)
    wall = time.perf_counter() - wall
    rows = summarise(runs, args.target)
    text = table(rows, args.target)
    print(f"# whole-run step cost\n\ncommand: `{command}`  \n{machine}  \nwall {wall:.0f} s\n\n{text}\n")
    result = {"command": command, "settings": vars(args), "machine": machine, "wall_s": wall, "runs": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
