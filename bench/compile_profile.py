"""Where a compiled SP-NGD step spends its time: forward, backward and optimizer step per step kind,
and how many compiled regions one plain step runs, for SGD and SP-NGD, eager and compiled, side by side.

    python bench/compile_profile.py [--model-compile torch|helper] [--batch 256] [--rounds 20] [--spngd spngd-10/100]

Configurations (each on its own copy of the main job's CNN, lr 0, interleaved round-robin in one
process, 4 discarded warm-up rounds): ``sgd``, ``sgd-compiled`` (torch.compile), ``<spngd>`` and
``<spngd>-compiled`` (SPNGD(compile_step=True) with the model compiled by torch.compile, or by
spngd_ext.compile_model with ``--model-compile helper``). After the timed rounds one more step of
each runs under torch.profiler: the number of "Torch-Compiled Region" events (compiled graphs
run) and the time in ``aten::copy_`` in that step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import make_batches  # noqa: E402

from spngd_ext import SPNGD, compile_model  # noqa: E402
from spngd_ext.bench.configs import SPNGD_CONFIGS  # noqa: E402
from spngd_ext.train.models import small_bn_cnn  # noqa: E402

COMMON = dict(momentum=0.9, weight_decay=5e-4)


def build(name: str, base: torch.nn.Module, how: str) -> dict:
    model = copy.deepcopy(base)
    compiled = name.endswith("-compiled")
    kind = name.removesuffix("-compiled")
    if kind == "sgd":
        return dict(
            name=name,
            sgd=True,
            run=torch.compile(model) if compiled else model,
            opt=torch.optim.SGD(model.parameters(), lr=0.0, **COMMON),
        )
    opt = SPNGD(model, lr=0.0, damping=1e-3, seed=0, compile_step=compiled, **COMMON, **SPNGD_CONFIGS[kind])
    run = model if not compiled else (compile_model(model, opt) if how == "helper" else torch.compile(model))
    return dict(name=name, sgd=False, run=run, opt=opt)


def step(c: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[str, tuple[float, float, float]]:
    """One training step: its kind (plain or refresh) and its forward, backward and step seconds."""
    opt = c["opt"]
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = c["run"](x)
    loss = F.cross_entropy(out, y)
    t1 = time.perf_counter()
    before = 0 if c["sgd"] else opt.counters["factor_updates"]
    if c["sgd"]:
        loss.backward()
    else:
        opt.backward(loss, out)
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    refreshed = not c["sgd"] and opt.counters["factor_updates"] > before
    return ("refresh" if refreshed else "plain"), (t1 - t0, t2 - t1, t3 - t2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-compile", default="torch", choices=["torch", "helper"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--spngd", default="spngd-10/100")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    base = small_bn_cnn()
    batches, desc = make_batches("auto", args.batch, 8, (1, 28, 28), 10, torch.device("cpu"), None, 0)
    names = ["sgd", "sgd-compiled", args.spngd, f"{args.spngd}-compiled"]
    configs = [build(n, base, args.model_compile) for n in names]
    times: dict[str, dict[str, list]] = {n: {} for n in names}
    warmup = 4
    for r in range(warmup + args.rounds):
        x, y = batches[r % len(batches)]
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            kind, phases = step(c, x, y)
            if r >= warmup:
                times[c["name"]].setdefault(kind, []).append(phases)
    print(f"command: `python bench/compile_profile.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"{desc}; torch {torch.__version__}, 1 thread; model compiled by {args.model_compile}\n")
    print("| configuration | step kind | forward (ms) | backward (ms) | step (ms) | total (ms) | steps |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n in names:
        for kind, rows in sorted(times[n].items()):
            f, b, s = (1000 * statistics.mean(row[i] for row in rows) for i in range(3))
            print(f"| {n} | {kind} | {f:.1f} | {b:.1f} | {s:.1f} | {f + b + s:.1f} | {len(rows)} |")
    print("\n| configuration | step kind | compiled regions run | aten::copy_ (ms) |")
    print("|---|---|---:|---:|")
    for c in configs:
        x, y = batches[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            kind, _ = step(c, x, y)
        events = prof.key_averages()
        regions = sum(e.count for e in events if e.key.startswith("Torch-Compiled Region"))
        copy_ms = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_") / 1000
        print(f"| {c['name']} | {kind} | {regions} | {copy_ms:.1f} |")


if __name__ == "__main__":
    main()
