"""A training run's record: one row per evaluation, written as CSV and JSON, and its summary.

The wall time in each row excludes evaluation, so "time to X% accuracy" measures training
alone and does not depend on how often the run stopped to evaluate.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["EvalRow", "RunLog", "reach", "summarize", "format_summary", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = (0.85, 0.88, 0.90)


@dataclass
class EvalRow:
    step: int  # optimizer steps done
    epoch: float  # epochs done (fractional between epoch ends)
    wall_time: float  # seconds of training so far, evaluation excluded
    train_loss: float  # mean over the steps since the previous row
    train_acc: float  # likewise, on the training batches (model in train mode)
    test_loss: float
    test_acc: float
    lr: float  # learning rate of the last step


class RunLog:
    """Appends rows to ``log.csv`` as they come (a crashed run keeps its rows), and writes
    ``log.json`` (config, rows, summary) on :meth:`finish`."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rows: list[EvalRow] = []
        self._csv_path = self.out_dir / "log.csv"
        self._columns = [f.name for f in fields(EvalRow)]
        with open(self._csv_path, "w", newline="") as handle:
            csv.writer(handle).writerow(self._columns)

    def append(self, row: EvalRow) -> None:
        self.rows.append(row)
        with open(self._csv_path, "a", newline="") as handle:
            csv.writer(handle).writerow([getattr(row, c) for c in self._columns])

    def finish(self, summary: dict[str, Any]) -> None:
        payload = {"config": self.config, "rows": [asdict(r) for r in self.rows], "summary": summary}
        (self.out_dir / "log.json").write_text(json.dumps(payload, indent=2, default=str))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (self.out_dir / "summary.txt").write_text(format_summary(summary) + "\n")


def reach(rows: Sequence[EvalRow], threshold: float) -> dict[str, float] | None:
    """The first evaluation at or above ``threshold`` test accuracy: steps, wall time, epochs."""
    for row in rows:
        if row.test_acc >= threshold:
            return {"steps": row.step, "wall_time": row.wall_time, "epoch": row.epoch}
    return None


def summarize(
    rows: Sequence[EvalRow],
    target_acc: float,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Steps/time to the target and to each threshold (None: not reached), best and final
    accuracy, and whatever ``extra`` adds (optimizer name, counters, ...)."""
    summary: dict[str, Any] = dict(extra or {})
    best = max(rows, key=lambda r: r.test_acc) if rows else None
    last = rows[-1] if rows else None
    summary.update(
        target_acc=target_acc,
        target=reach(rows, target_acc),
        thresholds={f"{t:.2f}": reach(rows, t) for t in sorted(set(thresholds) | {target_acc})},
        best_test_acc=best.test_acc if best else float("nan"),
        best_step=best.step if best else None,
        final_test_acc=last.test_acc if last else float("nan"),
        final_test_loss=last.test_loss if last else float("nan"),
        steps=last.step if last else 0,
        train_time=last.wall_time if last else 0.0,
        time_per_step=(last.wall_time / last.step) if last and last.step else float("nan"),
    )
    return summary


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary: one line per fact."""
    name = summary.get("optimizer", "run")
    lines = [f"== {name} summary =="]
    target = summary["target"]
    acc = summary["target_acc"]
    if target:
        lines.append(
            f"target {acc:.2%} reached at step {target['steps']} "
            f"(epoch {target['epoch']:.2f}) after {_fmt_time(target['wall_time'])} of training"
        )
    else:
        lines.append(f"target {acc:.2%}: not reached")
    for thr, hit in summary["thresholds"].items():
        text = f"step {hit['steps']}, {_fmt_time(hit['wall_time'])}" if hit else "not reached"
        lines.append(f"  {float(thr):.0%}: {text}")
    best = summary["best_test_acc"]
    lines.append(
        f"best test accuracy {best:.2%} (step {summary['best_step']}); final "
        f"{summary['final_test_acc']:.2%}, test loss {summary['final_test_loss']:.4f}"
    )
    tps = summary["time_per_step"]
    lines.append(
        f"{summary['steps']} steps, {_fmt_time(summary['train_time'])} of training"
        + (f" ({tps * 1000:.0f} ms/step)" if not math.isnan(tps) else "")
    )
    if summary.get("diverged"):
        lines.append(f"stopped early, diverged: {summary.get('divergence') or 'non-finite loss'}")
    if summary.get("counters"):
        lines.append(f"optimizer counters: {summary['counters']}")
    return "\n".join(lines)
