"""What a depthwise model's many groups cost SP-NGD per step: unpacking each group's factors and
inverting them when the layer is preconditioned.

A grouped convolution keeps one packed A_k and G_k per group and has no inverse sides in the
inverse cache: at every step all groups' estimates are unpacked (one gather per layer through a
cached index, ``estimates_from_run``) and the 2G damped factors inverted in one batched Cholesky
per side
(docs/design.md, "Grouped, depthwise and 1-D convolutions"). This times those two parts inside
whole SP-NGD steps of the training application's ``dwcnn`` (three depthwise 3×3 convolutions,
32 + 32 + 64 = 128 groups), next to momentum SGD steps on the same batches, interleaved (one step
of each per round, order alternated), with lr 0 (frozen weights).

    python bench/grouped_unpack.py [--batch-size 256] [--rounds 60] [--curvature-interval 10]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spngd_ext.layers import GroupedConvCurvature  # noqa: E402
from spngd_ext.train.baselines import OptimizerSettings, build_train_step  # noqa: E402
from spngd_ext.train.data import load_dataset  # noqa: E402
from spngd_ext.train.models import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path
from layer_cost import parse_cpu_bench, write_json  # noqa: E402


def _timed(store: list[float], fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store.append(time.perf_counter() - t0)

    return wrapper


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="dwcnn")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--curvature-interval", type=int, default=10, help="factors (and Kronecker inverses) every k steps")
    args, command = parse_cpu_bench(p, argv, "bench/grouped_unpack.py")
    data = load_dataset(args.data_dir, limit_train=args.batch_size * 8, limit_test=1, download=False)
    batches = list(zip(data.train_x.split(args.batch_size), data.train_y.split(args.batch_size)))

    torch.manual_seed(0)
    sgd = build_train_step("sgd", build_model(args.model), OptimizerSettings(lr=0.0))
    k = args.curvature_interval
    settings = OptimizerSettings(lr=0.0, seed=0, curvature_interval=k, inverse_interval=k)
    spngd = build_train_step("spngd", build_model(args.model), settings)
    layers = [layer for layer in spngd.optimizer.layers if isinstance(layer, GroupedConvCurvature)]
    groups = sum(layer.groups for layer in layers)

    unpack: list[float] = []
    precondition: list[float] = []
    for layer in layers:  # instance attributes shadow the class methods
        layer.estimates_from_run = _timed(unpack, layer.estimates_from_run)  # type: ignore[method-assign]
        layer.precondition = _timed(precondition, layer.precondition)  # type: ignore[method-assign]

    step_s: dict[str, list[float]] = {"sgd": [], "spngd": []}
    unpack_per_step, precondition_per_step = [], []
    for r in range(args.warmup + args.rounds):
        x, y = batches[r % len(batches)]
        order = [("sgd", sgd), ("spngd", spngd)] if r % 2 == 0 else [("spngd", spngd), ("sgd", sgd)]
        for name, step in order:
            unpack.clear()
            precondition.clear()
            t0 = time.perf_counter()
            step(x, y)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                step_s[name].append(dt)
                if name == "spngd":
                    unpack_per_step.append(sum(unpack))
                    precondition_per_step.append(sum(precondition))

    ms = {name: 1e3 * statistics.mean(t) for name, t in step_s.items()}
    unpack_ms = 1e3 * statistics.mean(unpack_per_step)
    precondition_ms = 1e3 * statistics.mean(precondition_per_step)  # the estimates are unpacked before it
    result = {
        "command": command,
        "model": args.model,
        "batch_size": args.batch_size,
        "grouped_layers": len(layers),
        "groups": groups,
        "statistics_unpacked_per_step": 2 * groups,
        "sgd_step_ms": ms["sgd"],
        "spngd_step_ms": ms["spngd"],
        "grouped_unpack_ms_per_step": unpack_ms,
        "grouped_unpack_us_per_group": 1e3 * unpack_ms / groups,
        "grouped_precondition_ms_per_step": precondition_ms,
        "unpack_share_of_spngd_step": unpack_ms / ms["spngd"],
        "unpack_share_of_overhead": unpack_ms / (ms["spngd"] - ms["sgd"]),
    }
    print(f"command: {command}")
    print(
        f"{args.model}: {len(layers)} grouped convolutions, {groups} groups ({2 * groups} factors unpacked per step), "
        f"batch {args.batch_size}, {args.rounds} interleaved rounds, factors every {k} steps"
    )
    print(f"step: SGD {ms['sgd']:.1f} ms, SP-NGD {ms['spngd']:.1f} ms")
    print(
        f"grouped-conv unpack: {unpack_ms:.2f} ms/step ({result['grouped_unpack_us_per_group']:.1f} µs per group), "
        f"{100 * result['unpack_share_of_spngd_step']:.1f}% of the SP-NGD step, "
        f"{100 * result['unpack_share_of_overhead']:.1f}% of its overhead over SGD"
    )
    print(
        f"grouped-conv precondition (batched Cholesky of 2G factors + the two products): {precondition_ms:.2f} ms/step"
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
