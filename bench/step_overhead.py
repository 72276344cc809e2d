"""Step overhead: what a whole SP-NGD training step costs compared with momentum SGD, and where it goes.

    python bench/step_overhead.py [--batch-sizes 256,1024] [--rounds 200] [--quick] [--json PATH]
    python bench/step_overhead.py --model resnet50 --device cuda --batch-sizes 32,128
    python bench/step_overhead.py --model resnet50 --batch-sizes 32 --configs sgd,spngd-every-step-cuda,spngd-every-step-torch
    python bench/step_overhead.py --whole-run [--batch-size 4096 --threads 2]   # bench/whole_run.py
    python bench/step_overhead.py --compile [--batch-sizes 256,4096 --threads 1]   # bench/compile_step.py

``--whole-run`` hands over to bench/whole_run.py: every configuration (SGD, every step, stale
statistics with either rule) trains the whole main job, side by side, and the report gives the mean
step over the run and the fraction of each kind of work skipped.
``--compile`` hands over to bench/compile_step.py: torch.compile(model) with
SPNGD(compile_step=True) against eager SP-NGD and compiled and eager SGD, and the graphs compiled
over a 200-step stale-statistics run.

Timed configurations (all built through ``spngd_ext.train.baselines``, as the train CLI builds
them):

* ``sgd``               torch.optim.SGD with momentum
* ``spngd-every-step``  SP-NGD, curvature_interval=1, inverse_interval=1
* ``spngd-10/100``      SP-NGD, factors every 10 steps, inverses every 100
* ``spngd-stale``       SP-NGD, stale statistics (stale=True, curvature_interval=100 as the cap)
* ``spngd-every-step-cuda`` / ``spngd-every-step-torch``  every-step SP-NGD with the backend pinned:
  the CUDA kernels, or the pure-PyTorch path on the same device (not in the default list; on a GPU
  their pair gives the issue-3 target "curvature phase ≥ 3× faster than pure PyTorch")
* ``asdl-every-step``   ASDL's K-FAC (KfacGradientMaker + torch.optim.SGD), refresh every step
* ``asdl-10/100``       ASDL's K-FAC, factors every 10 steps, inverses every 100. Without a
  curvature EMA ASDL inverts whenever it refreshes the factors, so this one is built with
  intervals 100/100 and then given curvature_upd_interval=10 and ema_decay=1.0: in ASDL's
  convention (ema = ema·(1−d) + new·d) d=1 replaces the factors with the current estimate, like
  SP-NGD's ema_decay=None, and the inversion then follows preconditioner_upd_interval.

A step is the whole training step: zero_grad, forward, loss, backward (``opt.backward(loss, out)``
for SP-NGD, ASDL's ``forward_and_backward`` for ASDL), optimizer step. All configurations run in
one process, interleaved round-robin (one step of each per round, the order rotated every round),
on the same batch in a round, so load drift on a shared machine hits all of them alike. Warm-up
rounds are discarded. The interval configurations refresh rarely and expensively, so the number
that matters is the MEAN over whole periods: the timed rounds are rounded up to a multiple of 100
(the longest period) unless --quick. Reported per configuration: median, mean, p10/p90, the
ratio of its mean to SGD's mean (amortised cost, with a paired bootstrap 95% interval over rounds)
and of the medians, the ratio of mean process CPU time (all threads; less sensitive than wall time
to other jobs on a shared machine), plus the mean per kind of step (plain / factor refresh /
factor + inverse).

By default every optimizer runs with lr=0: every configuration executes exactly the ops of a
training step, but none can diverge over hundreds of steps on a few batches (a diverged SP-NGD
skips its steps, which would make it look cheap). --lr trains for real; non-finite losses and
skipped steps are reported and mark a row invalid either way.

The timing core (interleaved rounds, summary, table, targets) is :mod:`spngd_ext.bench.step`, shared
with ``python -m spngd_ext.bench``; this script adds ASDL's K-FAC, Fashion-MNIST batches and the
profiled breakdown. After the timed rounds a profiled run breaks each step into phases and sums the curvature phase
(factor accumulation, finalize, inversion, preconditioning); how, in bench/step_profile.py.

--model resnet50 is ``spngd_ext.train.models.resnet50`` (torchvision's ResNet-50 v1.5 layer shapes,
25.6M parameters) on random 3×224×224 inputs (--image-size to change), so no torchvision or
dataset is needed on the GPU machine.

--model vit and --model dwcnn are the training application's models with the newer layer types
(attention projections and LayerNorm; depthwise/grouped convolutions and GroupNorm), on the same
Fashion-MNIST batches as small_bn_cnn (Linear/Conv2d/BatchNorm). With the profile, each run also
prints the curvature phase per parameter that has curvature (ns), to compare the layer types'
statistics cost per parameter across runs of the three models.

--model mobilenet_v2 is torchvision's MobileNetV2 (10 classes) on random 3×32×32 inputs
(--image-size to change): 17 depthwise convolutions, 7,136 channels, each with its own factor pair,
so 14,396 statistics, where per-statistic work weighs the most.

--model bn_mlp is a small tabular MLP with BatchNorm (16-256-256-26: Linear, BatchNorm1d, ReLU,
twice, then Linear; the shape of the UCI letter-recognition task) on random N(0,1) rows, where
the fixed per-step costs of the optimizer weigh the most.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spngd_ext.bench.step import (  # noqa: E402  (the timing core, shared with python -m spngd_ext.bench)
    PERIOD,
    Config,
    run_rounds,
    summarise,
    targets,
    timing_table,
)
from spngd_ext.train.baselines import (  # noqa: E402
    OptimizerSettings,
    OptimizerUnavailableError,
    build_train_step,
)
from spngd_ext.train.models import count_parameters, dwcnn, resnet50, small_bn_cnn, vit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path
import step_profile  # noqa: E402,F401  (the module too: tests read its constants through this one)
from step_profile import (  # noqa: E402
    breakdown_table,
    curvature_phase,
    curvature_table,
    curvature_targets,
    profile_configs,
    top_ops_text,
)

ALL_CONFIGS = ("sgd", "spngd-every-step", "spngd-10/100", "spngd-stale", "asdl-every-step", "asdl-10/100")
BACKEND_CONFIGS = {"spngd-every-step-cuda": "cuda", "spngd-every-step-torch": "torch"}  # opt-in
KNOWN_CONFIGS = ALL_CONFIGS + tuple(BACKEND_CONFIGS)
PROFILED = ("sgd", "spngd-every-step", "spngd-10/100", "spngd-stale", *BACKEND_CONFIGS)
NEW_LAYER_MODELS = {"vit": vit, "dwcnn": dwcnn}  # attention + LayerNorm; grouped conv + GroupNorm
MODELS = ("small_bn_cnn", "resnet50", "bn_mlp", *NEW_LAYER_MODELS, "mobilenet_v2")


def bn_mlp(features: int = 16, width: int = 256, classes: int = 26) -> nn.Sequential:
    """The small tabular MLP with BatchNorm: features-width-width-classes."""
    return nn.Sequential(
        nn.Linear(features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


# ------------------------------------------------------------------------------------------------
# environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace, argv: list[str]) -> dict:
    env = {
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/step_overhead.py", *argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "device": args.device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    from spngd_ext.ops.extension import extension_error, extension_loaded

    env["extension_loaded"] = extension_loaded()
    if not env["extension_loaded"]:
        env["extension_error"] = extension_error()
    try:
        from importlib.metadata import version

        import asdl  # noqa: F401

        env["asdl"] = version("asdfghjkl")
    except Exception:  # noqa: BLE001 - only informative
        env["asdl"] = None
    return env


# ------------------------------------------------------------------------------------------------
# model and data


def build_base_model(name: str, image_size: int | None = None) -> tuple[nn.Module, tuple[int, ...], int]:
    """The model, the shape of one input example and the number of classes."""
    if name == "small_bn_cnn":
        return small_bn_cnn(), (1, 28, 28), 10
    if name == "resnet50":
        size = image_size or 224
        return resnet50(), (3, size, size), 1000
    if name == "bn_mlp":
        return bn_mlp(), (16,), 26
    if name in NEW_LAYER_MODELS:
        return NEW_LAYER_MODELS[name](), (1, 28, 28), 10
    if name == "mobilenet_v2":
        try:
            import torchvision
        except ImportError:
            raise SystemExit("--model mobilenet_v2 needs torchvision (pip install -e '.[test]')") from None
        size = image_size or 32
        return torchvision.models.mobilenet_v2(num_classes=10), (3, size, size), 10
    raise SystemExit(f"unknown --model {name!r}; choose one of {', '.join(MODELS)}")


def curvature_parameters(model: nn.Module) -> int:
    """Parameter elements that get curvature (every other one trains first-order)."""
    from spngd_ext.layers import classify

    coverage = classify(model)[1]
    return sum(p.numel for p in coverage.parameters if p.curvature != "first-order")


def _fashion_mnist_dir(explicit: str | None) -> Path | None:
    from spngd_ext.train.data import DataNotFoundError, find_data_dir, locate_files

    if explicit:
        return find_data_dir(explicit, download=False)
    sibling = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
    if not os.environ.get("SPNGD_DATA_DIR") and locate_files(sibling) is not None:
        return sibling
    try:
        return find_data_dir(None, download=False)
    except DataNotFoundError:
        return None


def make_batches(
    kind: str,
    batch: int,
    n: int,
    example_shape: tuple[int, ...],
    classes: int,
    device: torch.device,
    data_dir: str | None,
    seed: int,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """n batches, each used by every configuration in the same round (round r uses batch r mod n)."""
    if kind in ("auto", "fmnist") and example_shape == (1, 28, 28):
        directory = _fashion_mnist_dir(data_dir)
        if directory is not None:
            from spngd_ext.train.data import load_dataset

            ds = load_dataset(directory, limit_train=batch * n, limit_test=1, download=False)
            if ds.train_x.shape[0] >= batch:
                n = ds.train_x.shape[0] // batch
                xs = ds.train_x[: n * batch].to(device).split(batch)
                ys = ds.train_y[: n * batch].to(device).split(batch)
                return list(zip(xs, ys)), f"Fashion-MNIST ({directory}), {n} distinct batches of {batch}"
        if kind == "fmnist":
            raise SystemExit("--data fmnist: Fashion-MNIST not found (set SPNGD_DATA_DIR or --data-dir)")
    g = torch.Generator(device=device).manual_seed(seed)
    batches = [
        (
            torch.randn(batch, *example_shape, generator=g, device=device),
            torch.randint(0, classes, (batch,), generator=g, device=device),
        )
        for _ in range(n)
    ]
    return batches, f"random N(0,1) inputs and uniform labels, {n} distinct batches of {batch}"


# ------------------------------------------------------------------------------------------------
# configurations


def _asdl_config(name: str, step) -> Config:
    """ASDL's K-FAC as a timed configuration: its own call sequence is the whole step."""
    grad_maker = step.grad_maker

    def next_kind() -> str:
        curv = grad_maker.do_update_curvature()
        inv = curv if not grad_maker.do_accumulate else grad_maker.do_update_preconditioner()
        return "factors+inverse" if inv else ("factors" if curv else "plain")

    return Config(
        name,
        "asdl",
        step.model,
        step.optimizer,
        step_fn=lambda x, y: step(x, y)[0],
        next_kind_fn=next_kind,
        counters_fn=lambda: {"steps": grad_maker.state["step"], "factor_updates": step.curvature_updates},
    )


def _config(name: str, kind: str, step) -> Config:
    return Config(name, kind, step.model, step.optimizer)


def build_configs(
    names: list[str], base: nn.Module, device: torch.device, lr: float, seed: int
) -> tuple[list[Config], dict]:
    configs, skipped = [], {}
    for name in names:
        model = copy.deepcopy(base).to(device)
        common = dict(lr=lr, momentum=0.9, weight_decay=5e-4, damping=1e-3, seed=seed)
        try:
            if name == "sgd":
                cfg = _config(name, "sgd", build_train_step("sgd", model, OptimizerSettings(**common)))
            elif name == "spngd-every-step":
                cfg = _config(
                    name,
                    "spngd",
                    build_train_step(
                        "spngd", model, OptimizerSettings(**common, curvature_interval=1, inverse_interval=1)
                    ),
                )
            elif name == "spngd-10/100":
                cfg = _config(
                    name,
                    "spngd",
                    build_train_step(
                        "spngd", model, OptimizerSettings(**common, curvature_interval=10, inverse_interval=100)
                    ),
                )
            elif name in BACKEND_CONFIGS:
                settings = OptimizerSettings(
                    **common, curvature_interval=1, inverse_interval=1, backend=BACKEND_CONFIGS[name]
                )
                try:
                    cfg = _config(name, "spngd", build_train_step("spngd", model, settings))
                except (RuntimeError, ValueError) as exc:  # backend="cuda" without kernels or GPU
                    raise OptimizerUnavailableError(str(exc).splitlines()[0]) from exc
            elif name == "spngd-stale":
                settings = OptimizerSettings(**common, stale=True, curvature_interval=100, inverse_interval=1)
                cfg = _config(name, "spngd", build_train_step("spngd", model, settings))
            elif name == "asdl-every-step":
                cfg = _asdl_config(
                    name,
                    build_train_step(
                        "asdl-kfac", model, OptimizerSettings(**common, curvature_interval=1, inverse_interval=1)
                    ),
                )
            elif name == "asdl-10/100":
                step = build_train_step(
                    "asdl-kfac", model, OptimizerSettings(**common, curvature_interval=100, inverse_interval=100)
                )
                step.config.curvature_upd_interval = 10
                step.config.ema_decay = 1.0  # replace (no averaging); inversion every preconditioner_upd_interval
                cfg = _asdl_config(name, step)
            else:
                raise SystemExit(f"unknown config {name!r}; choose from {', '.join(KNOWN_CONFIGS)}")
        except OptimizerUnavailableError as exc:
            skipped[name] = str(exc)
            continue
        configs.append(cfg)
    if not configs or configs[0].name != "sgd":
        raise SystemExit("the sgd baseline must be among the configurations (it is the reference)")
    return configs, skipped


# ------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="small_bn_cnn", choices=list(MODELS))
    p.add_argument(
        "--device", default=None, choices=["cpu", "cuda"], help="default: cpu for small_bn_cnn, cuda for resnet50"
    )
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="--model resnet50 / mobilenet_v2: input height and width (default 224 / 32)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds (default 300; rounded up to a multiple of {PERIOD} unless --quick)",
    )
    p.add_argument("--warmup", type=int, default=None, help="discarded rounds first (default 10; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 rounds, short profiles, no period rounding")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma list; sgd must be first")
    p.add_argument("--no-asdl", action="store_true", help="drop the ASDL configurations")
    p.add_argument("--no-profile", action="store_true", help="skip the phase breakdown")
    p.add_argument(
        "--profile-steps",
        type=int,
        default=None,
        help=f"steps per profiled config (default: 20, and {PERIOD} for interval configs)",
    )
    p.add_argument("--top-ops", type=int, default=5, help="list the N most expensive ops per SP-NGD phase (0: off)")
    p.add_argument("--data", default="auto", choices=["auto", "fmnist", "random"])
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--n-batches", type=int, default=8, help="distinct batches cycled through (round r uses batch r mod n)"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=0.0,
        help="learning rate of every optimizer (default 0: frozen weights, see docstring)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write everything (incl. per-step times) here")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if args.model == "resnet50" else "cpu"
    if args.image_size is not None and (args.model not in ("resnet50", "mobilenet_v2") or args.image_size < 32):
        p.error("--image-size applies to --model resnet50 only and must be at least 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.no_asdl:
        names = [n for n in names if not n.startswith("asdl")]
    args.config_names = names
    if args.warmup is None:
        args.warmup = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 20 if args.quick else 300
    if not args.quick and args.rounds % PERIOD:
        args.rounds = (args.rounds // PERIOD + 1) * PERIOD
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--whole-run" in argv:  # whole training runs side by side (bench/whole_run.py)
        import whole_run

        return whole_run.main([a for a in argv if a != "--whole-run"])
    if "--compile" in argv:  # torch.compile(model) + SPNGD(compile_step=True) (bench/compile_step.py)
        import compile_step

        return compile_step.main([a for a in argv if a != "--compile"])
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", category=FutureWarning)  # ASDL: non-full backward hooks, jit
    device = torch.device(args.device)
    env = environment(args, argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"# step overhead: SP-NGD vs SGD vs ASDL K-FAC\n\ncommand: `{env['command']}`  ")
    print(
        f"torch {env['torch']}, threads {env['threads']} (interop {env['interop_threads']}), {env['cpu_count']} cores: {env['cpu_model']}"
        + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + f", asdl {env['asdl']}, load average at start {env['load_average']}  "
    )

    base, example_shape, classes = build_base_model(args.model, args.image_size)
    result: dict = {
        "environment": env,
        "settings": {k: v for k, v in vars(args).items()},
        "model": {
            "name": args.model,
            "parameters": count_parameters(base),
            "input": list(example_shape),
            "classes": classes,
        },
        "batch_sizes": {},
    }
    print(
        f"model {args.model} ({count_parameters(base):,} parameters), input {example_shape}, device {args.device}, lr {args.lr}, "
        f"{args.rounds} timed rounds after {args.warmup} warm-up rounds\n"
    )

    for batch in args.batch_sizes:
        entry: dict = {}
        result["batch_sizes"][str(batch)] = entry
        try:
            batches, data_desc = make_batches(
                args.data, batch, args.n_batches, example_shape, classes, device, args.data_dir, args.seed
            )
            entry["data"] = data_desc
            configs, skipped = build_configs(args.config_names, base, device, args.lr, args.seed)
            entry["skipped_configs"] = skipped
            for name, why in skipped.items():
                print(f"(skipping {name}: {why})")
            log(f"batch {batch}: {len(configs)} configs, data: {data_desc}")
            wall = run_rounds(configs, batches, args.rounds, args.warmup, device, log)
            summary = summarise(configs)
            entry["timing"] = summary
            entry["timing_wall_s"] = wall
            entry["targets"] = targets(summary)
            print(timing_table(summary, batch))
            print(f"\n({data_desc}; timing took {wall:.0f} s)\n")
            for t in entry["targets"]:
                print(
                    f"- target {t['target']}: {t['value']:.3f} → {'met' if t['met'] else 'NOT MET'}"
                    + (f" ({t['which']})" if "which" in t else "")
                )
            print()

            if not args.no_profile:
                steps = {}
                for c in configs:
                    if c.name not in PROFILED:
                        continue
                    if args.profile_steps is not None:
                        steps[c.name] = args.profile_steps
                    elif c.name == "spngd-10/100":
                        steps[c.name] = 10 if args.quick else PERIOD
                    else:
                        steps[c.name] = 3 if args.quick else 20
                log(f"  profiling (interleaved): {steps}")
                chosen = [c for c in configs if c.name in steps]
                breakdown = profile_configs(chosen, steps, batches, device)
                entry["breakdown"] = breakdown
                print(breakdown_table(breakdown, summary, batch, device.type == "cuda"))
                print()
                phase_ms = curvature_phase(breakdown, device.type == "cuda")
                entry["curvature_phase_ms"] = phase_ms
                if phase_ms:
                    print(curvature_table(phase_ms, breakdown, device.type == "cuda"))
                    covered = curvature_parameters(base)
                    entry["curvature_ns_per_parameter"] = {n: 1e6 * ms / covered for n, ms in phase_ms.items()}
                    per_param = ", ".join(f"{n} {v:.1f}" for n, v in entry["curvature_ns_per_parameter"].items())
                    print(f"\ncurvature phase per parameter with curvature ({covered:,}), ns: {per_param}")
                    print()
                extra = curvature_targets(phase_ms, device.type == "cuda", env["extension_loaded"])
                entry["targets"] += extra
                for t in extra:
                    verdict = "not measured: " + t["why"] if t["met"] is None else ("met" if t["met"] else "NOT MET")
                    value = "" if t["value"] is None else f"{t['value']:.2f}× → "
                    print(f"- target {t['target']}: {value}{verdict}" + (f" ({t['detail']})" if "detail" in t else ""))
                if extra:
                    print()
                if args.top_ops > 0:
                    print(top_ops_text(breakdown, args.top_ops, device.type == "cuda"))
                    print()
                    for b in breakdown.values():
                        for name in b["ops"]:
                            b["ops"][name] = b["ops"][name][: max(args.top_ops, 10)]
        except torch.cuda.OutOfMemoryError as exc:  # one batch size too big must not lose the others
            entry["error"] = f"out of memory: {exc}".splitlines()[0]
            print(f"batch {batch}: {entry['error']}\n")
            torch.cuda.empty_cache()

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
