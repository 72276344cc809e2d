"""``python -m spngd_ext.selftest``: check this install's kernels on this machine's GPU.

On a machine with a CUDA GPU and the built extension it runs every kernel check of
:mod:`spngd_ext.selftest.kernel_checks` (each op against the float64 PyTorch path over shapes that
reach every tiling, split and panel path; the raw ops' argument checks; host synchronisation; the
first-use guard), then the CPU checks of :mod:`spngd_ext.selftest.cpu_checks` and an end-to-end
optimizer step against the PyTorch path, and prints a short report with a ready-to-paste row for
docs/results.md. Without a GPU it says so and runs the CPU checks only. The exit status is 1 when a
check failed (or a GPU is visible but the extension is not loaded), else 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .cpu_checks import cpu_checks, end_to_end_check
from .machine import TABLE_HEADER, describe, environment, table_row
from .runner import Check, Outcome, format_outcomes, run_checks

__all__ = ["Check", "Outcome", "build_checks", "main", "run"]

BUDGET_S = 110.0  # the whole run stays under two minutes


def build_checks(gpu: bool) -> list[Check]:
    """The checks for this machine: the kernel checks first when ``gpu``, then the CPU checks and
    the end-to-end step (on the GPU when there is one).

    Args:
        gpu: whether a CUDA GPU is visible.
    """
    checks: list[Check] = []
    if gpu:
        from .kernel_checks import kernel_checks

        checks += kernel_checks()
    checks += cpu_checks()
    device = "cuda" if gpu else "cpu"
    checks.append(
        Check(
            f"end-to-end: 3 SP-NGD steps on {device}, kernels vs PyTorch path",
            lambda: end_to_end_check(device),
            "end-to-end",
        )
    )
    return checks


def run(argv: list[str] | None = None, budget_s: float = BUDGET_S) -> tuple[dict, list[Outcome], int]:
    """Run the self-test; returns (environment, outcomes, exit status).

    Args:
        argv: the command's arguments, for the report.
        budget_s: time budget of all checks together.
    """
    env = environment(argv, "spngd_ext.selftest")
    print("spngd_ext self-test\n" + describe(env), flush=True)
    gpu = env["gpu"]
    status = 0
    if not gpu:
        print(
            "\nNo CUDA GPU is visible: the kernel checks need one and are not run. Running the CPU checks.", flush=True
        )
    elif not env["extension_loaded"]:
        print(
            f"\nA GPU is visible but the compiled extension is not loaded ({env['extension_error']}): "
            "every op would run its PyTorch path. Rebuild with nvcc available.",
            flush=True,
        )
        status = 1
    checks = build_checks(gpu and env["extension_loaded"])
    print(f"\n{len(checks)} checks:", flush=True)
    outcomes = run_checks(checks, budget_s, lambda line: print(line, flush=True))
    seconds = sum(o.seconds for o in outcomes)
    if any(o.status == "failed" for o in outcomes):
        status = 1
    summary = format_outcomes(outcomes)
    if gpu and env["extension_loaded"]:
        result = f"selftest {'PASS' if status == 0 else 'FAIL'}: {summary} in {seconds:.0f} s"
    elif gpu:
        result = f"selftest FAIL: extension not loaded; CPU checks {summary}"
    else:
        result = f"no GPU: CPU checks only, {summary} in {seconds:.0f} s"
    print(f"\nresult: {result}")
    print('\nrow for the "Reported runs" table of docs/results.md:\n' + TABLE_HEADER + "\n" + table_row(env, result))
    return env, outcomes, status


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: arguments (default ``sys.argv[1:]``): ``--json PATH`` writes the report as JSON,
            ``--budget SECONDS`` changes the time budget (default 110).
    """
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m spngd_ext.selftest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="time budget of all checks, seconds")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 GEMMs on both sides of every comparison
    env, outcomes, status = run(argv, args.budget)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"environment": env, "exit_status": status, "checks": [vars(o) for o in outcomes]}, indent=1)
        )
        print(f"wrote {args.json}")
    return status
