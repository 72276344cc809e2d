"""``python -m spngd_ext.bench``: the kernel microbenchmarks and a whole-step comparison.

With a CUDA GPU and the built extension: every kernel against its best PyTorch composition
(:mod:`spngd_ext.bench.kernels`; the quick sweep unless ``--full``), then whole training steps of a
ResNet-50 (batch 32, 224x224 random inputs) with momentum SGD, SP-NGD refreshing every step and
SP-NGD with stale statistics (:mod:`spngd_ext.bench.step`). Without a GPU it says so, skips the
kernels and times the main job's CNN (batch 64, 28x28 random inputs) on the CPU, in under a
minute by default. It prints one table, writes everything as JSON and prints a ready-to-paste row
for the "Reported runs" table of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["main", "parse_args", "summary_table"]

STEP_CONFIGS = ("sgd", "spngd-every-step", "spngd-stale")


def parse_args(argv: list[str], gpu: bool) -> argparse.Namespace:
    """The command line; defaults depend on whether a GPU is present.

    Args:
        argv: the arguments.
        gpu: whether a CUDA GPU is visible (the defaults for a GPU run, else for a short CPU run).
    """
    p = argparse.ArgumentParser(prog="python -m spngd_ext.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["small_bn_cnn", "resnet50"], default="resnet50" if gpu else "small_bn_cnn")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if gpu else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 for resnet50, 64 for small_bn_cnn")
    p.add_argument("--image-size", type=int, default=224, help="resnet50 input height and width")
    p.add_argument("--rounds", type=int, default=30 if gpu else 6, help="timed rounds (one step of every config each)")
    p.add_argument("--warmup", type=int, default=3 if gpu else 1, help="rounds run first and discarded")
    p.add_argument(
        "--configs",
        default=",".join(STEP_CONFIGS),
        help="comma list, sgd first; also spngd-10/100, spngd-every-step-cuda, spngd-every-step-torch",
    )
    p.add_argument("--full", action="store_true", help="the full kernel sweep (a few minutes) instead of the quick one")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmarks")
    p.add_argument("--no-step", action="store_true", help="skip the whole-step comparison")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        type=Path,
        default=Path("runs/bench/results.json"),
        help="where to write the results (default: runs/bench/results.json)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not gpu:
        p.error("--device cuda: no CUDA GPU is visible")
    if args.batch_size is None:
        args.batch_size = 32 if args.model == "resnet50" else 64
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--rounds and --batch-size must be at least 1, --warmup at least 0")
    args.config_names = [n.strip() for n in args.configs.split(",") if n.strip()]
    return args


def _kernel_rows(kernels: dict) -> list[tuple[str, str, float | None, float | None, str]]:
    out = []
    for r in kernels["rows"]:
        ratio = f"{r['speedup']:.2f}x faster" if r["speedup"] else "-"
        out.append((f"kernel {r['op']}", r["case"], r["ours_ms"], r["base_ms"], ratio))
    return out


def summary_table(kernels: dict | None, step: dict | None) -> str:
    """One markdown table: each kernel against its PyTorch composition, each step configuration
    against SGD (mean ms)."""
    lines = ["| measurement | case | ms | baseline ms | ratio |", "|---|---|---:|---:|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"  # noqa: E731
    for what, case, ours, base, ratio in _kernel_rows(kernels) if kernels else []:
        lines.append(f"| {what} | {case} | {fmt(ours)} | {fmt(base)} (PyTorch) | {ratio} |")
    if step:
        sgd = step["timing"]["sgd"]["mean_ms"]
        for name, s in step["timing"].items():
            lo, hi = s["ratio_mean_ci95"]
            flag = "" if s["valid"] else " (INVALID)"
            lines.append(
                f"| step {name}{flag} | {step['case']} | {fmt(s['mean_ms'])} | {fmt(sgd)} (SGD) | "
                f"{s['ratio_mean']:.2f}x SGD (95% CI {lo:.2f}-{hi:.2f}) |"
            )
    return "\n".join(lines)


def _run_step(args: argparse.Namespace, log) -> dict:
    from .configs import build_configs, random_batches
    from .models import count_parameters, resnet50, small_bn_cnn
    from .step import run_rounds, summarise, targets

    device = torch.device(args.device)
    if args.model == "resnet50":
        base, shape, classes = resnet50(), (3, args.image_size, args.image_size), 1000
    else:
        base, shape, classes = small_bn_cnn(), (1, 28, 28), 10
    configs, skipped = build_configs(args.config_names, base, device, 0.0, args.seed)
    for name, why in skipped.items():
        log(f"(skipping {name}: {why})")
    batches = random_batches(args.batch_size, 2, shape, classes, device, args.seed)
    log(
        f"whole step: {args.model} ({count_parameters(base):,} parameters), batch {args.batch_size}, {args.device}, "
        f"{args.rounds} timed rounds after {args.warmup} warm-up rounds, configs {[c.name for c in configs]}"
    )
    wall = run_rounds(configs, batches, args.rounds, args.warmup, device, log)
    summary = summarise(configs)
    case = f"{args.model} batch {args.batch_size} {args.device}"
    return {
        "case": case,
        "model": args.model,
        "parameters": count_parameters(base),
        "batch": args.batch_size,
        "input": list(shape),
        "device": args.device,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "skipped_configs": skipped,
        "timing": summary,
        "targets": targets(summary),
        "wall_s": wall,
    }


def _result_line(env: dict, kernels: dict | None, step: dict | None) -> str:
    parts = []
    if kernels:
        met = [t for t in kernels["targets"] if t["met"] is not None]
        parts.append(f"kernel targets {sum(t['met'] for t in met)}/{len(met)} met")
    elif not env["gpu"]:
        parts.append("no GPU: kernels not timed")
    if step:
        ratios = ", ".join(f"{n} {s['ratio_mean']:.2f}x" for n, s in step["timing"].items() if n != "sgd")
        parts.append(f"step ({step['case']}) vs SGD: {ratios}")
    return "bench: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 unless a benchmark failed, or a GPU is
    visible without the compiled extension).

    Args:
        argv: arguments (default ``sys.argv[1:]``); see ``--help``.
    """
    from ..ops.extension import extension_loaded
    from ..selftest.machine import TABLE_HEADER, describe, environment, table_row

    argv = list(sys.argv[1:] if argv is None else argv)
    gpu = torch.cuda.is_available()
    args = parse_args(argv, gpu)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    env = environment(argv, "spngd_ext.bench")
    print("spngd_ext benchmarks\n" + describe(env), flush=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    status = 0
    kernels, kernel_error = None, None
    start = time.perf_counter()
    if args.no_kernels:
        log("\nkernel microbenchmarks: skipped (--no-kernels)")
    elif not gpu:
        log("\nNo CUDA GPU is visible: the kernel microbenchmarks need one and are skipped.")
    elif not extension_loaded():
        log(f"\nkernel microbenchmarks: the compiled extension is not loaded ({env['extension_error']})")
        status = 1
    else:
        from .kernels import run_kernel_bench

        log(f"\nkernel microbenchmarks ({'full' if args.full else 'quick'} sweep):")
        try:
            kernels = run_kernel_bench(quick=not args.full, log=log)
        except Exception as exc:  # noqa: BLE001  (the step comparison still runs)
            log(f"kernel microbenchmarks failed: {type(exc).__name__}: {exc}")
            kernel_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            status = 1
    step, step_error = None, None
    if not args.no_step:
        log("")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                step = _run_step(args, log)
        except Exception as exc:  # noqa: BLE001  (reported in the table row and the exit status)
            log(f"whole-step comparison failed: {type(exc).__name__}: {exc}")
            step_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            status = 1
    table = summary_table(kernels, step)
    print("\n" + table)
    if kernels:
        print("\nkernel targets:")
        for t in kernels["targets"]:
            mark = "   info" if t["met"] is None else ("    met" if t["met"] else "NOT MET")
            print(f"  [{mark}] {t['target']}: {t['detail']}")
    if step and step["targets"]:
        print("\nstep targets (set for full-length runs; a short run only indicates):")
        for t in step["targets"]:
            print(f"  [{'    met' if t['met'] else 'NOT MET'}] {t['target']}: {t['value']:.3f}")
    result = _result_line(env, kernels, step)
    for what, error in (("kernel microbenchmarks", kernel_error), ("step comparison", step_error)):
        if error:
            result += f"; {what} FAILED: {error}"
    print(f"\nresult: {result} ({time.perf_counter() - start:.0f} s)")
    print('\nrow for the "Reported runs" table of docs/results.md:\n' + TABLE_HEADER + "\n" + table_row(env, result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "environment": env,
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "kernels": kernels,
                "step": step,
                "result": result,
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return status
