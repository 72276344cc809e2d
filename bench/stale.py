"""Stale statistics vs fixed refresh intervals: work done, step time, accuracy.

SP-NGD trains the small BN CNN (``spngd_ext.train.models``, the CLI's ``cnn``) on Fashion-MNIST under
the same budget, initial weights and batch order in several refresh configurations:

* ``every``          — every statistic and every inverse refreshed at every step;
* ``fixed-10-10``    — factors and inverses every 10 steps;
* ``fixed-10-100``   — factors every 10 steps, inverses every 100 (the common K-FAC setting);
* ``stale-<τ>``      — stale statistics (``StalePolicy(threshold=τ)``), intervals capped by
  ``curvature_interval = --cap`` (default 100), one configuration per ``--thresholds`` entry.

Per configuration: the statistic refreshes and inverse sides actually computed (from
``opt.counters``: ``factor_work_skipped``/``inverse_work_skipped`` are the fractions skipped
relative to refreshing everything at every step), the sampled-label backward passes, the median
and mean time of one training step (forward, backward(s), ``opt.step()``; evaluation excluded),
and the test accuracy at the end of the budget. Every other setting is the training CLI's
default for SP-NGD (lr 0.1, momentum 0.9, weight decay 5e-4, damping 1e-3, MC Fisher, 1 warm-up
epoch, polynomial decay).

    python bench/stale.py                                   # batch 4096, 10 epochs, full data
    python bench/stale.py --epochs 2 --batch-size 512 --limit-train 8192 --lr 0.03 --threads 1 \\
        --results-md runs/stale/results.md                  # the short CPU run of bench/results/stale

Writes ``--out`` (JSON: settings, machine, per-configuration results and step times; default
``runs/stale/results.json`` in the checkout, which git ignores), prints a markdown table and the
exact command; ``--results-md`` also writes the table into that file under the heading
"Stale statistics" (replacing a section of that name if the file has one).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from spngd_ext import SPNGD  # noqa: E402
from spngd_ext.layers import KroneckerLayer  # noqa: E402
from spngd_ext.refresh import StalePolicy  # noqa: E402
from spngd_ext.train import TrainConfig, evaluate  # noqa: E402
from spngd_ext.train.baselines import SpngdStep  # noqa: E402
from spngd_ext.train.data import Dataset, load_dataset  # noqa: E402
from spngd_ext.train.env import resolve_device  # noqa: E402
from spngd_ext.train.models import build_model  # noqa: E402
from spngd_ext.train.reporting import markdown_table  # noqa: E402
from spngd_ext.train.schedules import build_lr_scheduler  # noqa: E402

SECTION = "## Stale statistics"
_SIBLING_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"


@dataclass(frozen=True)
class RefreshConfig:
    name: str
    curvature_interval: int
    inverse_interval: int
    threshold: float | None = None  # None: fixed intervals; else stale statistics

    @property
    def label(self) -> str:
        if self.threshold is None:
            if self.curvature_interval == self.inverse_interval == 1:
                return "every step"
            return f"fixed: factors every {self.curvature_interval}, inverses every {self.inverse_interval}"
        return f"stale τ={self.threshold:g} (cap {self.curvature_interval})"


def default_configs(cap: int, thresholds: list[float]) -> list[RefreshConfig]:
    configs = [
        RefreshConfig("every", 1, 1),
        RefreshConfig("fixed-10-10", 10, 10),
        RefreshConfig("fixed-10-100", 10, 100),
    ]
    configs += [RefreshConfig(f"stale-{t:g}", cap, cap, t) for t in thresholds]
    return configs


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()  # the CLI's defaults
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=_positive_int, default=d.epochs)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N training examples")
    p.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N test examples")
    p.add_argument("--cap", type=_positive_int, default=100, help="interval cap of the stale configurations")
    p.add_argument("--thresholds", type=_floats, default=[0.1, 0.3], help="one stale configuration per threshold")
    p.add_argument("--only", default=None, help="comma-separated configuration names to run (default: all)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--lr", type=float, default=None, help="default: the CLI's SP-NGD rate")
    p.add_argument("--damping", type=float, default=d.damping)
    p.add_argument("--fisher", choices=("mc", "emp"), default=d.fisher)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--schedule", default=d.schedule)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "cuda", "torch"), default="auto")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="default: $SPNGD_DATA_DIR, else ../shared/data/fashion-mnist beside the "
        "checkout, else the loader's own search",
    )
    p.add_argument("--out", default=str(REPO / "runs" / "stale" / "results.json"))
    p.add_argument("--results-md", default=None, help="also write the section into this markdown file")
    return p


def _data_dir(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("SPNGD_DATA_DIR"):
        return None  # the loader reads it
    return str(_SIBLING_DATA) if _SIBLING_DATA.is_dir() else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(rc: RefreshConfig, data: Dataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    d = TrainConfig(optimizer="spngd", lr=args.lr)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs

    torch.manual_seed(args.seed)  # same initial weights for every configuration
    model = build_model(args.model, num_classes=data.num_classes).to(device)
    opt = SPNGD(
        model,
        lr=d.resolved_lr,
        momentum=d.momentum,
        weight_decay=d.resolved_weight_decay,
        damping=args.damping,
        fisher=args.fisher,
        curvature_interval=rc.curvature_interval,
        inverse_interval=rc.inverse_interval,
        backend=args.backend,
        seed=args.seed,
        stale=StalePolicy(threshold=rc.threshold) if rc.threshold is not None else False,
    )
    step_fn = SpngdStep(model, opt, amp=False)
    scheduler = build_lr_scheduler(opt, total, round(args.warmup_epochs * steps_per_epoch), args.schedule)

    shuffle = torch.Generator().manual_seed(args.seed)  # same batch order for every configuration
    step_times: list[float] = []
    evals: list[dict[str, float]] = []
    diverged = False
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=shuffle).to(device)
        seen = loss_sum = correct = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = train_x[idx], train_y[idx]
            _sync(device)
            t0 = time.perf_counter()
            loss, out = step_fn(x, y)
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            scheduler.step()
            seen += len(y)
            loss_sum += float(loss) * len(y)
            correct += float((out.argmax(1) == y).sum())
            if not math.isfinite(float(loss)):
                diverged = True
                break
        test_loss, test_acc = evaluate(model, test_x, test_y)
        evals.append(
            {
                "epoch": epoch + 1,
                "step": len(step_times),
                "test_loss": test_loss,
                "test_acc": test_acc,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "train_time": sum(step_times),
            }
        )
        print(
            f"  {rc.name}: epoch {epoch + 1}/{args.epochs}  train loss {loss_sum / seen:.3f}  test acc {test_acc:.4f}  "
            f"median step {1e3 * statistics.median(step_times):.0f} ms",
            file=sys.stderr,
            flush=True,
        )
        if diverged:
            break

    c = opt.counters
    steps = c["steps"]
    n_stats = sum(len(v) for v in c["intervals"].values())
    kron_sides = 2 * sum(isinstance(layer, KroneckerLayer) for layer in opt.layers)
    intervals = sorted(k for v in c["intervals"].values() for k in v.values())
    return {
        "name": rc.name,
        "label": rc.label,
        "curvature_interval": rc.curvature_interval,
        "inverse_interval": rc.inverse_interval,
        "threshold": rc.threshold,
        "steps": steps,
        "steps_run": len(step_times),
        "statistics": n_stats,
        "kron_sides": kron_sides,
        "stat_refreshes": round((1.0 - c["factor_work_skipped"]) * n_stats * steps),
        "inverse_sides": round((1.0 - c["inverse_work_skipped"]) * kron_sides * steps),
        "factor_work_skipped": c["factor_work_skipped"],
        "inverse_work_skipped": c["inverse_work_skipped"],
        "refresh_steps": c["factor_updates"],
        "inverse_steps": c["inverse_updates"],
        "mc_backwards": c["mc_backwards"],
        "skipped_steps": c["skipped_steps"],
        "final_intervals": c["intervals"],
        "interval_range": [intervals[0], intervals[-1]] if intervals else None,
        "median_step_ms": 1e3 * statistics.median(step_times),
        "mean_step_ms": 1e3 * statistics.fmean(step_times),
        "train_time_s": sum(step_times),
        "final_test_acc": evals[-1]["test_acc"] if evals else float("nan"),
        "final_test_loss": evals[-1]["test_loss"] if evals else float("nan"),
        "last_epoch_train_loss": evals[-1]["train_loss"] if evals else float("nan"),
        "evals": evals,
        "step_times_s": step_times,
        "diverged": diverged,
    }


def results_table(results: list[dict[str, Any]]) -> str:
    header = [
        "configuration",
        "statistic refreshes",
        "factor work skipped",
        "inverse sides",
        "inverse work skipped",
        "MC backwards",
        "median step (ms)",
        "mean step (ms)",
        "final intervals",
        "last-epoch train loss",
        "final test acc",
    ]
    rows = []
    for r in results:
        lo, hi = r["interval_range"] or (None, None)
        rows.append(
            [
                r["label"],
                f"{r['stat_refreshes']} / {r['statistics'] * r['steps']}",
                f"{r['factor_work_skipped']:.1%}",
                f"{r['inverse_sides']} / {r['kron_sides'] * r['steps']}",
                f"{r['inverse_work_skipped']:.1%}",
                r["mc_backwards"],
                f"{r['median_step_ms']:.0f}",
                f"{r['mean_step_ms']:.0f}",
                "—" if r["threshold"] is None else (f"{lo}" if lo == hi else f"{lo}–{hi}"),
                f"{r['last_epoch_train_loss']:.3f}",
                f"{r['final_test_acc']:.4f}"
                + (f" (loss non-finite at step {r['steps_run']}: stopped)" if r["diverged"] else ""),
            ]
        )
    return markdown_table(header, rows)


def machine_description(device: torch.device) -> dict[str, Any]:
    info = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_section(path: Path, section: str) -> None:
    """Replace the existing "Stale statistics" section of ``path`` or append one."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = (
            "\n".join(
                lines[:start] + section.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else [])
            )
            + "\n"
        )
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "bench/stale.py", *(argv if argv is not None else sys.argv[1:])])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configs = default_configs(args.cap, args.thresholds)
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {c.name for c in configs})
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {unknown}; choose from {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in wanted]
    data = load_dataset(_data_dir(args.data_dir), args.limit_train, args.limit_test)
    machine = machine_description(device)
    steps_per_epoch = math.ceil(data.train_x.shape[0] / args.batch_size)
    print(
        f"{len(configs)} configurations: {args.model}, batch {args.batch_size} x {steps_per_epoch} steps/epoch x "
        f"{args.epochs} epochs, {data.train_x.shape[0]} train / {data.test_x.shape[0]} test, {device}, "
        f"{torch.get_num_threads()} thread(s)",
        file=sys.stderr,
    )
    start = time.perf_counter()
    results = []
    for rc in configs:
        print(f"[{rc.name}] {rc.label}", file=sys.stderr, flush=True)
        results.append(run_config(rc, data, args, device))
    wall = time.perf_counter() - start

    table = results_table(results)
    d = TrainConfig(optimizer="spngd", lr=args.lr)
    settings = (
        f"{args.model} (small BN CNN), batch {args.batch_size}, {args.epochs} epoch(s) "
        f"({steps_per_epoch} steps/epoch, {data.train_x.shape[0]} training / {data.test_x.shape[0]} test "
        f"examples), lr {d.resolved_lr:g} with {args.warmup_epochs:g} warm-up epoch(s) and {args.schedule} "
        f"decay, damping {args.damping:g}, fisher={args.fisher}, seed {args.seed}"
    )
    where = (
        f"{machine['date']}, {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else f", {machine['cpu_count']}-core CPU")
        + f", {machine['torch_threads']} torch thread(s), torch {machine['torch']}"
        + (
            f", load average {machine['load_average_at_start'][0]:g} at the start"
            if "load_average_at_start" in machine
            else ""
        )
    )
    print(f"\n{table}\n\n{settings}\nMachine: {where}. Whole run: {wall:.0f} s.\nCommand: {command}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "settings": vars(args) | {"lr": d.resolved_lr},
                "machine": machine,
                "wall_time_s": wall,
                "configs": [dataclasses.asdict(c) for c in configs],
                "results": results,
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}", file=sys.stderr)
    if args.results_md:
        section = "\n".join(
            [
                SECTION,
                "",
                f"Command: `{command}`",
                "",
                f"Machine: {where}. Whole run {wall / 60:.1f} min.",
                "",
                f"Setting: {settings}.",
                "",
                table,
                "",
                "Statistic refreshes: A, G and BatchNorm Fishers computed, out of (statistics × steps); "
                "inverse sides: Kronecker factors inverted, out of (2 × Kronecker layers × steps) — both from "
                "`opt.counters` (`factor_work_skipped`, `inverse_work_skipped`). Step time: one training step "
                "(forward, backward(s), `opt.step()`), evaluation excluded. Final intervals: range over all "
                "statistics at the end (stale configurations). Train loss: mean over the last epoch's "
                "batches (train mode); test accuracy: the CLI's `evaluate` (eval mode, BatchNorm running "
                "statistics) after the last epoch.",
            ]
        )
        write_section(Path(args.results_md), section)
        print(f"wrote the section into {args.results_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
