"""Compiled training steps: torch.compile(model) with SPNGD(compile_step=True) against eager SP-NGD
and against momentum SGD, compiled and eager, side by side.

    python bench/step_overhead.py --compile [--batch-sizes 256,4096] [--rounds 100] [--threads 1]
    python bench/compile_step.py ...   (the same)

Configurations (each on its own copy of the main job's CNN, lr 0 as in bench/step_overhead.py):

* ``sgd-compiled``  torch.compile(model) + torch.optim.SGD (momentum 0.9, weight decay 5e-4): the reference
* ``sgd``           the eager model + torch.optim.SGD
* ``<spngd>``       the eager model + SPNGD (``--spngd``, default ``spngd-10/100`` and ``spngd-stale``)
* ``<spngd>-compiled``  spngd_ext.compile_model(model, opt) + SPNGD(compile_step=True) (Inductor for
  both): the compiled model on plain steps, the eager model on refresh steps. ``--model-compile
  torch`` uses torch.compile(model) instead, whose graph breaks at the hooked layers on refresh
  steps make Dynamo skip nn.Sequential.forward for every model of the process (the compiled SGD
  reference included), so that run's compiled models all run as one small graph per module.

``--mode`` passes a torch.compile mode to the model's compilation (e.g. max-autotune-no-cudagraphs).
Every configuration runs its compilations in the warm-up rounds (``--warmup``, default 5); the
timed rounds are interleaved round-robin (spngd_ext.bench.step). Reported: the timing table (ratios
to ``sgd-compiled``), each compiled SP-NGD's mean against its eager twin, and the graphs Dynamo
compiled during warm-up and during the timed rounds (a recompilation per step would show there).
Then ``--recompile-steps`` (default 200) steps of the compiled stale-statistics configuration
alone, from a fresh compiler state: the number of graphs compiled over the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import environment, make_batches  # noqa: E402

from spngd_ext import SPNGD, compile_model  # noqa: E402
from spngd_ext.bench.configs import SPNGD_CONFIGS, Config  # noqa: E402
from spngd_ext.bench.step import bootstrap_ratio_ci, run_rounds, summarise, timing_table  # noqa: E402
from spngd_ext.train.models import small_bn_cnn  # noqa: E402

COMMON = dict(momentum=0.9, weight_decay=5e-4)


def build(name: str, base: torch.nn.Module, args: argparse.Namespace) -> Config:
    model = copy.deepcopy(base)
    compiled = name.endswith("-compiled")
    if name.startswith("sgd"):
        run = torch.compile(model, mode=args.mode) if compiled else model
        return Config(name, "sgd", run, torch.optim.SGD(model.parameters(), lr=args.lr, **COMMON))
    spngd = name.removesuffix("-compiled")
    opt = SPNGD(
        model, lr=args.lr, damping=1e-3, seed=args.seed, compile_step=compiled, **COMMON, **SPNGD_CONFIGS[spngd]
    )
    if compiled and args.model_compile == "helper":
        run = compile_model(model, opt, mode=args.mode)
    else:
        run = torch.compile(model, mode=args.mode) if compiled else model
    return Config(name, "spngd", run, opt)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def recompile_run(base: torch.nn.Module, batches, steps: int, args: argparse.Namespace) -> dict:
    """``steps`` steps of the compiled stale configuration alone: graphs compiled, per phase."""
    torch._dynamo.reset()
    counters.clear()
    cfg = build("spngd-stale-compiled", base, args)
    per_step = []
    for s in range(steps):
        before = graphs()
        cfg.run(*batches[s % len(batches)])
        per_step.append(graphs() - before)
    c = cfg.optimizer.counters
    return {
        "steps": steps,
        "graphs_compiled": graphs(),
        "steps_that_compiled": [s for s, n in enumerate(per_step) if n],
        "graphs_after_step_10": sum(per_step[10:]),
        "graph_breaks": sum(counters["graph_break"].values()),
        "factor_updates": c["factor_updates"],
        "inverse_updates": c["inverse_updates"],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="256,4096")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--spngd", default="spngd-10/100,spngd-stale", help="comma list of SP-NGD configurations")
    p.add_argument("--mode", default=None, help="torch.compile mode for the models")
    p.add_argument(
        "--model-compile",
        default="helper",
        choices=["helper", "torch"],
        help="SP-NGD's compiled model: spngd_ext.compile_model (eager on refresh steps) or torch.compile",
    )
    p.add_argument("--recompile-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-batches", type=int, default=8)
    p.add_argument("--data", default="auto", choices=["auto", "fmnist", "random"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.device = "cpu"
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=FutureWarning)
    env = environment(args, ["--compile", *argv])
    device = torch.device("cpu")
    print(f"# compiled step: torch.compile(model) + SPNGD(compile_step=True)\n\ncommand: `{env['command']}`  ")
    print(
        f"torch {env['torch']}, threads {env['threads']}, {env['cpu_count']} cores: {env['cpu_model']}, load {env['load_average']}\n"
    )
    base = small_bn_cnn()
    names = ["sgd-compiled", "sgd"]
    for s in args.spngd.split(","):
        names += [s, f"{s}-compiled"]
    result: dict = {"environment": env, "batch_sizes": {}}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        batches, desc = make_batches(
            args.data, batch, args.n_batches, (1, 28, 28), 10, device, args.data_dir, args.seed
        )
        torch._dynamo.reset()
        counters.clear()
        configs = [build(n, base, args) for n in names]
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        run_rounds(configs, batches, 0, args.warmup, device, log)  # compilations happen here
        warm_graphs = graphs()
        wall = run_rounds(configs, batches, args.rounds, 0, device, log)
        summary = summarise(configs)
        entry = {
            "data": desc,
            "timing": summary,
            "wall_s": wall,
            "graphs_warmup": warm_graphs,
            "graphs_timed": graphs() - warm_graphs,
        }
        print(timing_table(summary, batch).replace("SGD", "compiled SGD"))
        print(f"\n({desc}; {args.rounds} timed rounds in {wall:.0f} s; ratios are to sgd-compiled)\n")
        by_name = {c.name: c for c in configs}
        for s in args.spngd.split(","):
            eager, comp = summary[s]["mean_ms"], summary[f"{s}-compiled"]["mean_ms"]
            lo, hi = bootstrap_ratio_ci(np.asarray(by_name[f"{s}-compiled"].times), np.asarray(by_name[s].times))
            entry[f"{s}: compiled/eager"] = {"ratio": comp / eager, "ci95": [lo, hi]}
            print(
                f"- {s}: compiled {comp:.1f} ms vs eager {eager:.1f} ms: {comp / eager:.3f}× ({lo:.3f}–{hi:.3f}); "
                f"target ≤ 1: {'met' if comp <= eager else 'NOT MET'}"
            )
        print(f"- graphs compiled: {warm_graphs} in the warm-up, {entry['graphs_timed']} in the timed rounds\n")
        result["batch_sizes"][str(batch)] = entry
    if args.recompile_steps:
        batches, _ = make_batches(args.data, 256, args.n_batches, (1, 28, 28), 10, device, args.data_dir, args.seed)
        rec = recompile_run(base, batches, args.recompile_steps, args)
        result["recompile_run"] = rec
        print(f"recompilations, spngd-stale-compiled alone, batch 256, {rec['steps']} steps: {json.dumps(rec)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
