"""Large-batch convergence study: how fast SP-NGD, SGD and LARS reach 85/88/90% on Fashion-MNIST.

For each global batch size (default 1024, 4096, 8192) and optimizer, a small learning-rate grid
(the same number of trials for every optimizer, default 3) is trained for a fixed epoch budget
(default 10) from the same initial weights and batch order. SGD at batch 256 is the small-batch
reference. Reported per batch size and optimizer, best over the grid: steps and training time
(evaluation excluded) to each accuracy threshold, and the best test accuracy.

Learning-rate grid (unless ``--lrs-<opt>`` gives absolute rates, for every batch size or, as
``--lrs-sgd 8192=0.035,0.07``, for one): each optimizer's CLI default
rate (``spngd_ext.train.baselines.DEFAULT_LR``, the best of a grid at batch 4096) times
{0.5, 1, 2}, scaled to batch B by sqrt(B/4096). The square-root rule is used for every
optimizer, SGD included: measured optima for SGD here (best accuracy at lr 0.1 at both batch 256
and 4096) grow far more slowly than the linear scaling rule would say. Every trial uses the CLI defaults otherwise
(1 warm-up epoch, poly decay, momentum 0.9, weight decay 5e-4 (AdamW 5e-2), damping 1e-3, MC
Fisher, LARS trust coefficient 0.1).

The full study is ~30 runs of 10 epochs (hours on a 2-core CPU, minutes on a GPU):

    python bench/convergence.py                       # writes runs/convergence/
    python bench/convergence.py --batch-sizes 4096 --epochs 2 --limit-train 8192 --out /tmp/conv

Finished trials are reused when their summary exists with the same settings (``--no-resume``
retrains). Writes results.json, results.md and convergence.png into ``--out`` (default
``runs/convergence/`` in the checkout, which git ignores; the curated study is in
``bench/results/convergence/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from spngd_ext.train import TrainConfig, run_training  # noqa: E402
from spngd_ext.train.baselines import DEFAULT_LR, LARS_TRUST_COEFFICIENT, OPTIMIZERS  # noqa: E402
from spngd_ext.train.data import load_dataset  # noqa: E402
from spngd_ext.train.env import setup_env, teardown_env  # noqa: E402
from spngd_ext.train.reporting import markdown_table, plot_accuracy_curves  # noqa: E402
from spngd_ext.train.run_log import EvalRow, reach  # noqa: E402

REFERENCE_BATCH = 4096
GRID_MULTIPLIERS = (0.5, 1.0, 2.0)
LR_SCALING_POWER = 0.5  # lr(B) = lr(4096) * (B / 4096) ** LR_SCALING_POWER
# Fields that must match for a finished trial to be reused.
_RESUME_KEYS = (
    "optimizer",
    "model",
    "batch_size",
    "epochs",
    "lr",
    "seed",
    "limit_train",
    "limit_test",
    "warmup_epochs",
    "schedule",
    "eval_every",
    "damping",
    "fisher",
)
_RESUME_KEYS_OF = {"lars": ("trust_coefficient",)}  # settings only that optimizer reads


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    values = _floats(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive number, got {text!r}")
    return values[0]


def _ints(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}")
    return [int(v) for v in values]


LrSpec = tuple[int | None, list[float]]  # (batch size or None for every batch size, grid)


def _lr_spec(text: str) -> LrSpec:
    """``"0.1,0.2"`` (every batch size) or ``"8192=0.05,0.1"`` (batch size 8192 only)."""
    batch_text, sep, lrs_text = text.rpartition("=")
    if not sep:
        return None, _floats(text)
    try:
        batch = int(batch_text)
    except ValueError:
        batch = 0
    if batch <= 0:
        raise argparse.ArgumentTypeError(f"expected BATCH=LR,LR,... with a positive integer batch size, got {text!r}")
    return batch, _floats(lrs_text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--batch-sizes", type=_ints, default=[1024, 4096, 8192])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--optimizers", default="sgd,lars,spngd", help=f"comma-separated, from {OPTIMIZERS}")
    p.add_argument("--asdl-kfac", action="store_true", help="add ASDL's K-FAC to --optimizers")
    p.add_argument(
        "--asdl-kfac-batch-sizes",
        type=_ints,
        default=None,
        help="run ASDL's K-FAC at these of --batch-sizes only (default: all)",
    )
    for name in OPTIMIZERS:
        p.add_argument(
            f"--lrs-{name}",
            type=_lr_spec,
            action="append",
            default=None,
            metavar="[BATCH=]LR,...",
            help=f"absolute LR grid for {name}, at every batch size or (repeatable) "
            f"at BATCH only (default: {DEFAULT_LR[name]:g} x {GRID_MULTIPLIERS} "
            f"at batch {REFERENCE_BATCH}, scaled by "
            f"(B/{REFERENCE_BATCH})^{LR_SCALING_POWER})",
        )
    p.add_argument(
        "--trust-coefficient", type=_positive_float, default=LARS_TRUST_COEFFICIENT, help="LARS trust coefficient"
    )
    p.add_argument("--small-batch", type=int, default=256, help="batch size of the SGD reference (0: none)")
    p.add_argument(
        "--lrs-small-sgd",
        type=_floats,
        default=None,
        help="LR grid of the small-batch SGD reference (default: the sgd grid "
        "scaled to --small-batch by the same rule)",
    )
    p.add_argument("--thresholds", type=_floats, default=[0.85, 0.88, 0.90])
    p.add_argument(
        "--target-acc",
        type=float,
        default=0.88,
        help="picks the plotted trial of each grid: fewest steps to this accuracy",
    )
    p.add_argument(
        "--evals-per-epoch",
        type=int,
        default=8,
        help="evaluation points per epoch (equal epoch resolution at every batch size)",
    )
    p.add_argument("--out", default=str(REPO / "runs" / "convergence"), help="output folder (runs/ is git-ignored)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="cnn")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def lr_grid(name: str, batch_size: int, specs: Sequence[LrSpec] | None) -> list[float]:
    """The grid given for this batch size, else the one given for every batch size, else the
    default rule."""
    given = dict(specs or ())
    if batch_size in given:
        return list(given[batch_size])
    if None in given:
        return list(given[None])
    scale = (batch_size / REFERENCE_BATCH) ** LR_SCALING_POWER
    return [float(f"{DEFAULT_LR[name] * m * scale:.4g}") for m in GRID_MULTIPLIERS]


def build_plan(args: argparse.Namespace, names: Sequence[str]) -> list[tuple[str, int, list[float]]]:
    """(optimizer, batch size, LR grid) for every group of trials, in run order."""
    plan = [
        (name, batch, lr_grid(name, batch, getattr(args, f"lrs_{name.replace('-', '_')}")))
        for batch in args.batch_sizes
        for name in names
        if not (name == "asdl-kfac" and args.asdl_kfac_batch_sizes and batch not in args.asdl_kfac_batch_sizes)
    ]
    if args.small_batch:
        small_grid = [(None, args.lrs_small_sgd)] if args.lrs_small_sgd else None
        plan.append(("sgd", args.small_batch, lr_grid("sgd", args.small_batch, small_grid)))
    return plan


def _load_finished(out_dir: Path, cfg: TrainConfig) -> tuple[list[EvalRow], dict] | None:
    log_path = out_dir / "log.json"
    if not log_path.is_file():
        return None
    logged = json.loads(log_path.read_text())
    want = dataclasses.asdict(cfg)
    want["lr"] = cfg.resolved_lr
    keys = _RESUME_KEYS + _RESUME_KEYS_OF.get(cfg.optimizer, ())
    if any(logged["config"].get(k) != want[k] for k in keys):
        return None
    return [EvalRow(**r) for r in logged["rows"]], logged["summary"]


def run_trial(cfg: TrainConfig, dataset, env, out_dir: Path, resume: bool) -> dict[str, Any]:
    finished = _load_finished(out_dir, cfg) if resume else None
    if finished is not None:
        rows, summary = finished
        print(f"reusing {out_dir}", file=sys.stderr)
    else:
        result = run_training(cfg, dataset, env, out_dir)
        rows, summary = result.rows, result.summary
    return {
        "optimizer": cfg.optimizer,
        "batch_size": cfg.batch_size,
        "lr": cfg.resolved_lr,
        "rows": rows,
        "summary": summary,
        "out_dir": str(out_dir),
    }


def best_of_grid(trials: list[dict], thresholds: Sequence[float], target: float) -> dict[str, Any]:
    """Per threshold the trial with the fewest steps to it; the best accuracy over the grid; and
    the trial to plot (fewest steps to ``target``, else highest accuracy)."""
    per_threshold = {}
    for thr in thresholds:
        hits = [(reach(t["rows"], thr), t["lr"]) for t in trials]
        hits = [(h, lr) for h, lr in hits if h]
        per_threshold[f"{thr:.2f}"] = min(hits, key=lambda h: h[0]["steps"]) if hits else None
    best_acc_trial = max(trials, key=lambda t: t["summary"]["best_test_acc"])

    def plot_key(t: dict) -> tuple:
        hit = reach(t["rows"], target)
        return (0, hit["steps"], 0.0) if hit else (1, 0, -t["summary"]["best_test_acc"])

    return {
        "per_threshold": per_threshold,
        "best_acc": best_acc_trial["summary"]["best_test_acc"],
        "best_acc_lr": best_acc_trial["lr"],
        "plotted": min(trials, key=plot_key),
        "diverged_lrs": [t["lr"] for t in trials if t["summary"].get("diverged")],
    }


def _cell(entry) -> str:
    if not entry:
        return "not reached"
    hit, lr = entry
    return f"{hit['steps']} / {hit['wall_time']:.1f} s (lr {lr:g})"


def write_report(
    groups: dict[tuple[int, str], list[dict]], args, command: str, out: Path, elapsed: float, device: str
) -> None:
    thresholds = args.thresholds
    header = (
        ["batch", "optimizer", "trials"]
        + [f"steps / time to {t:.0%}" for t in thresholds]
        + ["best acc (lr)", "diverged lrs"]
    )
    table, panels, json_groups = [], {}, []
    for (batch, name), trials in sorted(groups.items()):
        best = best_of_grid(trials, thresholds, args.target_acc)
        table.append(
            [batch, name, len(trials)]
            + [_cell(best["per_threshold"][f"{t:.2f}"]) for t in thresholds]
            + [
                f"{best['best_acc']:.4f} (lr {best['best_acc_lr']:g})",
                ", ".join(f"{lr:g}" for lr in best["diverged_lrs"]) or "-",
            ]
        )
        plotted = best["plotted"]
        panels.setdefault(batch, []).append((f"{name} (lr {plotted['lr']:g})", plotted["rows"]))
        json_groups.append(
            {
                "batch_size": batch,
                "optimizer": name,
                "per_threshold": best["per_threshold"],
                "best_acc": best["best_acc"],
                "best_acc_lr": best["best_acc_lr"],
                "plotted_lr": plotted["lr"],
                "trials": [{"lr": t["lr"], "summary": t["summary"], "out_dir": t["out_dir"]} for t in trials],
            }
        )
    plot_accuracy_curves(
        [(f"batch {b}, {args.epochs} epoch(s)", curves) for b, curves in sorted(panels.items())],
        out / "convergence.png",
        target_acc=args.target_acc,
    )
    md = [
        "# Large-batch convergence on Fashion-MNIST",
        "",
        f"Command: `{command}`",
        "",
        f"Model {args.model}, {args.epochs} epoch(s) per trial, seed {args.seed}, device {device}; "
        f"{elapsed / 60:.1f} min wall clock for this invocation (reused trials excluded).",
        "",
        "Each cell is the best over that optimizer's learning-rate grid: steps / training time "
        "(evaluation excluded) of the first evaluation at or above the threshold, and the LR "
        f"that got there first. Evaluations happen {args.evals_per_epoch} times per epoch.",
        "",
        markdown_table(header, table),
        "",
        "convergence.png: test accuracy vs steps and vs training time, one panel per batch size, "
        f"the trial of each grid that reached {args.target_acc:.0%} in the fewest steps.",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(
        json.dumps(
            {"command": command, "args": vars(args), "device": device, "groups": json_groups}, indent=2, default=str
        )
    )
    print("\n".join(md))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if args.asdl_kfac and "asdl-kfac" not in names:
        names.append("asdl-kfac")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"convergence.py: unknown optimizer(s) {unknown}; choose from {OPTIMIZERS}")
    command = (
        " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        if argv is None
        else " ".join(shlex.quote(a) for a in ["python", "bench/convergence.py", *argv])
    )
    print(f"command: {command}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    plan = build_plan(args, names)
    total = sum(len(lrs) for _, _, lrs in plan)
    print(f"{total} trials: " + "; ".join(f"{n}@{b}: {lrs}" for n, b, lrs in plan))

    env = setup_env(args.device, args.threads)
    dataset = load_dataset(args.data_dir, args.limit_train, args.limit_test)
    n_train = dataset.train_x.shape[0]
    start = time.perf_counter()
    groups: dict[tuple[int, str], list[dict]] = {}
    try:
        for name, batch, lrs in plan:
            steps_per_epoch = -(-n_train // batch)
            for lr in lrs:
                cfg = TrainConfig(
                    model=args.model,
                    optimizer=name,
                    batch_size=batch,
                    epochs=args.epochs,
                    lr=lr,
                    seed=args.seed,
                    device=args.device,
                    target_acc=args.target_acc,
                    trust_coefficient=args.trust_coefficient,
                    limit_train=args.limit_train,
                    limit_test=args.limit_test,
                    eval_every=max(1, steps_per_epoch // args.evals_per_epoch),
                    progress=args.progress,
                )
                trial_dir = out / f"bs{batch}" / name.replace("-", "_") / f"lr{lr:g}"
                groups.setdefault((batch, name), []).append(run_trial(cfg, dataset, env, trial_dir, args.resume))
    finally:
        teardown_env(env)
    write_report(groups, args, command, out, time.perf_counter() - start, str(env.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
