"""Where a check or benchmark ran: card, driver, torch and CUDA versions, commit, date; and the
ready-to-paste row for the "Reported runs" table of docs/results.md.

Shared by ``python -m spngd_ext.selftest`` and ``python -m spngd_ext.bench``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["TABLE_HEADER", "describe", "environment", "table_row"]

TABLE_HEADER = "| card | driver | torch / CUDA | date | commit | command | result |\n|---|---|---|---|---|---|---|"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _commit() -> str:
    """Short commit of the checkout this package runs from, "+ local changes" when it differs;
    the package version for an installed copy."""
    from .. import __version__

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        return f"version {__version__} (not a git checkout)"
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return head + (" + local changes" if dirty else "")


def _driver() -> str:
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if out:
            return out.splitlines()[0].strip()
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv: list[str] | None = None, module: str = "spngd_ext.selftest") -> dict:
    """Card (or CPU), driver, versions, commit, date and the command line of this run.

    Args:
        argv: the command's arguments (default: ``sys.argv[1:]``).
        module: the ``python -m`` module the command ran.
    """
    from ..ops.extension import extension_error, extension_loaded

    argv = list(sys.argv[1:] if argv is None else argv)
    gpu = torch.cuda.is_available()
    env = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", module, *argv]),
        "gpu": gpu,
        "card": torch.cuda.get_device_name(0) if gpu else None,
        "driver": _driver() if gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": f"{os.cpu_count()}-core {platform.machine()} ({_cpu_model()})",
        "commit": _commit(),
        "extension_loaded": extension_loaded(),
        "extension_error": None if extension_loaded() else extension_error(),
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
    return env


def describe(env: dict) -> str:
    """A few lines for the top of a report."""
    card = (
        f"{env['card']} (sm_{env['compute_capability'].replace('.', '')}, {env['sm_count']} SMs), driver {env['driver']}"
        if env["gpu"]
        else f"no GPU: {env['cpu']}"
    )
    ext = "loaded" if env["extension_loaded"] else f"not loaded ({env['extension_error']})"
    return (
        f"card:      {card}\n"
        f"torch:     {env['torch']} (CUDA {env['cuda'] or 'none'}), Python {env['python']}\n"
        f"extension: {ext}\n"
        f"commit:    {env['commit']}\n"
        f"date:      {env['date']}\n"
        f"command:   {env['command']}"
    )


def table_row(env: dict, result: str) -> str:
    """One row for the "Reported runs" table (columns: :data:`TABLE_HEADER`).

    Args:
        env: from :func:`environment`.
        result: the run's outcome in a few words.
    """
    card = env["card"] or f"no GPU ({env['cpu'].split(' (')[0]})"
    cells = [
        card,
        env["driver"] or "-",
        f"{env['torch']} / {env['cuda'] or 'none'}",
        env["date"],
        env["commit"],
        f"`{env['command']}`",
        result,
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
