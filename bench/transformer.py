"""A small vision transformer on Fashion-MNIST: SP-NGD against AdamW and momentum SGD.

The model is the training application's ``vit`` (16 patches of 7×7, width 64, 2 pre-norm
encoder layers with ``nn.MultiheadAttention``, LayerNorm and a GELU MLP; 71,946 parameters), so
SP-NGD preconditions the attention projections, the LayerNorms, the patch-embedding Conv2d and the
Linears; only the positional embedding trains first-order.

Every optimizer trains the same number of steps from the same initial weights and batch order
(``--epochs``, default one = 235 steps, over the first ``--limit-train`` training images, default
all, batch ``--batch-size``, a short linear warm-up and poly decay: the training application's
defaults otherwise; the default run took 19 minutes on a 2-core CPU shared at load ~10), for each learning
rate of a small grid per optimizer; the best trial of each grid (highest final test accuracy on
the full test set) is reported. SP-NGD refreshes factors and inverses every 3 steps with damping
3e-2: one-epoch probes on 8,192 images (32 steps; commit 0d8a348, before LayerNorm counted token
rows) diverged at damping 1e-3 for lr ≥ 0.01 and reached 44% at lr 0.003, while damping 3e-2
reached 60-62% at lr 0.01-0.03 (AdamW 61%, SGD 56%).

* equal steps: final test accuracy, best accuracy, training time (evaluation excluded);
* equal wall time, two ways: (a) from the runs' own clocks, the accuracy at the last evaluation
  within the budget of the fastest run; (b) from step times measured interleaved in one process
  (one step of each optimizer per round, order rotated, frozen weights), which load drift on a
  shared machine cannot bias: the fastest optimizer's whole run sets the budget, and each one's
  accuracy is read at the last evaluation within budget / its step time steps.

    python bench/transformer.py                    # writes runs/transformer/
    python bench/transformer.py --epochs 1 --limit-train 4096 --lrs-sgd 0.1 --lrs-adamw 3e-3 --lrs-spngd 0.01

Writes results.json and results.md into ``--out`` (default ``runs/transformer/``, which git ignores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from spngd_ext.train import TrainConfig, run_training  # noqa: E402
from spngd_ext.train.baselines import OptimizerSettings, build_train_step  # noqa: E402
from spngd_ext.train.data import load_dataset  # noqa: E402
from spngd_ext.train.env import setup_env, teardown_env  # noqa: E402
from spngd_ext.train.models import build_model, count_parameters  # noqa: E402
from spngd_ext.train.reporting import markdown_table  # noqa: E402
from spngd_ext.train.run_log import EvalRow  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path
from convergence import _floats  # noqa: E402

OPTIMIZERS = ("spngd", "adamw", "sgd")
DEFAULT_GRIDS = {"spngd": [0.01, 0.03, 0.1], "adamw": [1e-3, 3e-3, 1e-2], "sgd": [0.03, 0.1, 0.3]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="vit")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (default: all 60,000)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--warmup-epochs", type=float, default=0.25)
    p.add_argument("--evals-per-epoch", type=int, default=8)
    for name in OPTIMIZERS:
        p.add_argument(f"--lrs-{name}", type=_floats, default=DEFAULT_GRIDS[name], metavar="LR,...")
    p.add_argument("--curvature-interval", type=int, default=3, help="SP-NGD: factors every k steps")
    p.add_argument("--inverse-interval", type=int, default=3, help="SP-NGD: inverses every k steps")
    p.add_argument("--damping", type=float, default=3e-2, help="SP-NGD damping")
    p.add_argument("--timing-rounds", type=int, default=30, help="interleaved rounds for the step times (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(REPO / "runs" / "transformer"))
    return p


def _spngd_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        curvature_interval=args.curvature_interval, inverse_interval=args.inverse_interval, damping=args.damping
    )


def interleaved_step_ms(args: argparse.Namespace, dataset) -> dict[str, float]:
    """Mean whole-step time of each optimizer, one step of each per round (order rotated), on the
    same real batch, with lr 0 (frozen weights: every step does the full work and cannot diverge)."""
    steps = {}
    for name in OPTIMIZERS:
        torch.manual_seed(args.seed)
        extra = _spngd_settings(args) if name == "spngd" else {}
        steps[name] = build_train_step(
            name, build_model(args.model), OptimizerSettings(lr=0.0, seed=args.seed, **extra)
        )
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    n = dataset.train_x.shape[0] // args.batch_size
    warmup = args.curvature_interval
    for r in range(warmup + args.timing_rounds):
        lo = (r % n) * args.batch_size
        x, y = dataset.train_x[lo : lo + args.batch_size], dataset.train_y[lo : lo + args.batch_size]
        for k in range(len(OPTIMIZERS)):
            name = OPTIMIZERS[(r + k) % len(OPTIMIZERS)]
            t0 = time.perf_counter()
            steps[name](x, y)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * sum(t) / len(t) for name, t in times.items()}


def accuracy_at(rows: Sequence[EvalRow], *, wall_time: float | None = None, step: float | None = None) -> dict:
    """The last evaluation within the budget (wall time or steps); None when there is none."""
    within = [r for r in rows if (wall_time is None or r.wall_time <= wall_time) and (step is None or r.step <= step)]
    if not within:
        return {"step": 0, "wall_time": 0.0, "test_acc": None}
    last = within[-1]
    return {"step": last.step, "wall_time": last.wall_time, "test_acc": last.test_acc}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def report(result: dict) -> str:
    best = result["best"]
    lines = [
        f"command: `{result['command']}`  ",
        f"{result['setting']}  ",
        f"machine: {result['machine']}; total time {result['total_s']:.0f} s",
        "",
        "Grid (final test accuracy per learning rate):",
        "",
        markdown_table(
            ["optimizer", "lr", "final acc", "best acc", "train time (s)"],
            [
                [t["optimizer"], f"{t['lr']:g}", _pct(t["final_acc"]), _pct(t["best_acc"]), f"{t['train_s']:.1f}"]
                for t in result["trials"]
            ],
        ),
        "",
        f"Best of each grid at equal steps ({result['steps']} steps), and at equal wall time:",
        "",
        markdown_table(
            [
                "optimizer",
                "lr",
                "final acc",
                "train time (s)",
                "step (ms, interleaved)",
                f"acc at {result['budget_s']:.1f} s (run clocks)",
                f"acc at {result['budget_interleaved_ms'] / 1e3:.1f} s (interleaved step times)",
            ],
            [
                [
                    name,
                    f"{b['lr']:g}",
                    _pct(b["final_acc"]),
                    f"{b['train_s']:.1f}",
                    f"{result['step_ms'].get(name, float('nan')):.1f}",
                    f"{_pct(b['at_budget']['test_acc'])} (step {b['at_budget']['step']})",
                    f"{_pct(b['at_interleaved_budget']['test_acc'])} (step {b['at_interleaved_budget']['step']})",
                ]
                for name, b in best.items()
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(
        shlex.quote(a) for a in ["python", "bench/transformer.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"command: {command}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = setup_env("cpu", args.threads)
    dataset = load_dataset(args.data_dir, args.limit_train, args.limit_test)
    n_train = dataset.train_x.shape[0]
    steps_per_epoch = -(-n_train // args.batch_size)
    trials: list[dict] = []
    try:
        step_ms = interleaved_step_ms(args, dataset) if args.timing_rounds else {}
        print(f"interleaved step times (ms): {step_ms}", flush=True)
        grids = {name: getattr(args, f"lrs_{name}") for name in OPTIMIZERS}
        # Learning rates interleaved across optimizers, so load drift spreads over all of them.
        for i in range(max(len(g) for g in grids.values())):
            for name in OPTIMIZERS:
                if i >= len(grids[name]):
                    continue
                lr = grids[name][i]
                cfg = TrainConfig(
                    model=args.model,
                    optimizer=name,
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    lr=lr,
                    warmup_epochs=args.warmup_epochs,
                    seed=args.seed,
                    device="cpu",
                    limit_train=args.limit_train,
                    limit_test=args.limit_test,
                    eval_every=max(1, steps_per_epoch // args.evals_per_epoch),
                    threads=args.threads,
                    progress=False,
                    **(_spngd_settings(args) if name == "spngd" else {}),
                )
                run = run_training(cfg, dataset, env, out / name / f"lr{lr:g}")
                rows = run.rows
                trials.append(
                    {
                        "optimizer": name,
                        "lr": lr,
                        "rows": rows,
                        "final_acc": rows[-1].test_acc if rows and not run.summary["diverged"] else None,
                        "best_acc": max((r.test_acc for r in rows), default=None),
                        "train_s": rows[-1].wall_time if rows else float("nan"),
                        "diverged": run.summary["diverged"],
                    }
                )
    finally:
        teardown_env(env)

    best: dict[str, dict] = {}
    for name in OPTIMIZERS:
        mine = [t for t in trials if t["optimizer"] == name and t["final_acc"] is not None]
        if mine:
            best[name] = max(mine, key=lambda t: t["final_acc"])
    budget = min(b["train_s"] for b in best.values())
    steps = epochs_steps = steps_per_epoch * args.epochs
    fastest_ms = min(step_ms[name] for name in best) if step_ms else float("nan")
    budget_ms = epochs_steps * fastest_ms
    for name, b in best.items():
        b["at_budget"] = accuracy_at(b["rows"], wall_time=budget)
        b["at_interleaved_budget"] = (
            accuracy_at(b["rows"], step=budget_ms / step_ms[name]) if step_ms else {"step": 0, "test_acc": None}
        )
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {args.threads} thread(s), CPU",
        "setting": (
            f"{args.model} ({count_parameters(build_model(args.model)):,} parameters), {n_train} training / "
            f"{dataset.test_x.shape[0]} test images, batch {args.batch_size}, {args.epochs} epoch(s) = {steps} steps, "
            f"warm-up {args.warmup_epochs} epoch then poly decay, SP-NGD: MC Fisher, damping {args.damping}, "
            f"factors every {args.curvature_interval} / inverses every {args.inverse_interval} steps"
        ),
        "steps": steps,
        "step_ms": step_ms,
        "budget_s": budget,
        "budget_interleaved_ms": budget_ms,
        "total_s": time.perf_counter() - start,
        "trials": [{k: v for k, v in t.items() if k != "rows"} for t in trials],
        "best": {
            name: {k: v for k, v in b.items() if k != "rows"} | {"curve": [dataclasses.asdict(r) for r in b["rows"]]}
            for name, b in best.items()
        },
    }
    text = report(result)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
