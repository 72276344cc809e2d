"""Side-by-side reports of several runs: accuracy curves (PNG) and markdown tables.

Shared by ``spngd-train --compare`` and ``bench/convergence.py``. Matplotlib runs on the Agg
backend, so no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .run_log import EvalRow

__all__ = ["Curve", "optimizer_colours", "plot_accuracy_curves", "markdown_table", "format_reach"]

# A curve is (label, rows of one run).
Curve = tuple[str, Sequence[EvalRow]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def optimizer_colours(panels: Sequence[tuple[str, Sequence[Curve]]], palette: Sequence[str]) -> dict[str, str]:
    """One colour per optimizer (a curve label's first word) across all panels, in order of first
    appearance, so that every panel of a study reads alike."""
    colour: dict[str, str] = {}
    for _, curves in panels:
        for label, _ in curves:
            colour.setdefault(label.split()[0], palette[len(colour) % len(palette)])
    return colour


def plot_accuracy_curves(
    panels: Sequence[tuple[str, Sequence[Curve]]],
    path: Path,
    target_acc: float | None = None,
    ylim: tuple[float, float] = (0.5, 1.0),
) -> Path:
    """One row per panel: test accuracy vs optimizer steps (left) and vs training time (right).

    ``panels`` is a list of (title, curves); a single compare run is one panel. The y range is
    ``ylim``, extended downwards when a curve never gets that high (short or failed runs).
    """
    plt = _pyplot()
    accs = [r.test_acc for _, curves in panels for _, rows in curves for r in rows]
    if accs and max(accs) < ylim[0] + 0.1:
        ylim = (math.floor(min(accs) * 20) / 20, ylim[1])
    colour = optimizer_colours(panels, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    fig, axes = plt.subplots(len(panels), 2, figsize=(14, 4 * len(panels)), squeeze=False)
    for (title, curves), (ax_steps, ax_time) in zip(panels, axes):
        for label, rows in curves:
            if not rows:
                continue
            style = {"marker": ".", "label": label, "color": colour[label.split()[0]]}
            ax_steps.plot([r.step for r in rows], [r.test_acc for r in rows], **style)
            ax_time.plot([r.wall_time for r in rows], [r.test_acc for r in rows], **style)
        for ax, xlabel in ((ax_steps, "optimizer steps"), (ax_time, "training time (s, eval excluded)")):
            if target_acc is not None:
                ax.axhline(target_acc, color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(*ylim)
            ax.grid(True, alpha=0.3)
            ax.set_title(title)
        if any(rows for _, rows in curves):  # one legend per row, outside, so it hides no curve
            ax_time.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_reach(hit: dict[str, float] | None) -> str:
    """``"12 / 34.5 s"`` (steps / training time) or ``"not reached"``."""
    if not hit:
        return "not reached"
    return f"{hit['steps']} / {hit['wall_time']:.1f} s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
