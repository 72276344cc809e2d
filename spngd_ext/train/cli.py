"""``spngd-train``: train a small model on Fashion-MNIST with SP-NGD or a baseline optimizer.

    python -m spngd_ext.train --optimizer spngd --batch-size 4096 --epochs 10
    python -m spngd_ext.train --compare sgd,lars,spngd --epochs 5 --out runs/cmp
    torchrun --nproc-per-node 2 -m spngd_ext.train --optimizer sgd

Each run writes ``log.csv``/``log.json`` (one row per evaluation), ``summary.json`` and
``summary.txt`` (steps and training time to the target accuracy, best accuracy) into ``--out``.
``--compare`` runs several optimizers on the same data, initial weights, batch order and epoch
budget, and adds ``compare.png``, ``compare.md`` and ``compare.json``.

The dataset is held in memory as tensors; each epoch is a seeded permutation cut into global
batches of ``--batch-size`` (the last one smaller, not dropped). Under torchrun each rank takes
its slice of every global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .augment import Augmentation, apply_shift_flip, check_max_shift, draw_shift_flip
from .baselines import (
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    LARS_TRUST_COEFFICIENT,
    OPTIMIZERS,
    OptimizerSettings,
    OptimizerUnavailableError,
    build_train_step,
)
from .data import DataNotFoundError, Dataset, IdxFormatError, load_dataset
from .env import TrainEnv, setup_env, teardown_env
from .models import MODEL_BUILDERS, build_model, count_parameters
from .reporting import format_reach, markdown_table, plot_accuracy_curves
from .run_log import EvalRow, RunLog, format_summary, summarize
from .schedules import SCHEDULES, build_lr_scheduler
from .spngd_settings import SpngdSettings, add_spngd_flags, spngd_kwargs

__all__ = [
    "TrainConfig",
    "RunResult",
    "build_parser",
    "config_from_args",
    "evaluate",
    "run_training",
    "run_compare",
    "parse_compare",
    "main",
]


@dataclass
class TrainConfig(SpngdSettings):
    """Everything one run depends on; the CLI options map one to one onto these fields.

    The SP-NGD options (damping, fisher, stale, ...) are inherited from
    :class:`~spngd_ext.train.spngd_settings.SpngdSettings`, generated from
    :class:`spngd_ext.options.SPNGDOptions` like their flags.
    """

    model: str = "cnn"
    optimizer: str = "spngd"
    batch_size: int = 4096
    epochs: int = 10
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    warmup_epochs: float = 1.0
    schedule: str = "poly"
    momentum: float = 0.9
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    label_smoothing: float = 0.0
    augment: str = Augmentation.NONE.value
    max_shift: int = 2
    trust_coefficient: float = LARS_TRUST_COEFFICIENT
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    target_acc: float = 0.88
    data_dir: str | None = None
    out: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    eval_every: int = 5
    eval_batch_size: int = 2048
    threads: int | None = None
    progress: bool = True
    fsdp: bool = False

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY[self.optimizer]

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(
            lr=self.resolved_lr,
            momentum=self.momentum,
            weight_decay=self.resolved_weight_decay,
            trust_coefficient=self.trust_coefficient,
            amp=self.amp,
            seed=self.seed,
            label_smoothing=self.label_smoothing,
            **spngd_kwargs(self),
        )


@dataclass
class RunResult:
    name: str
    rows: list[EvalRow]
    summary: dict[str, Any]
    out_dir: Path | None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _checked(kind: type, low: float, inclusive: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        ok = value >= low if inclusive else value > low
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value

    return parse


_positive_int = _checked(int, 0)
_nonneg_int = _checked(int, 0, inclusive=True)
_positive_float = _checked(float, 0.0)
_nonneg_float = _checked(float, 0.0, inclusive=True)


def _accuracy(text: str) -> float:
    value = _positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"an accuracy in (0, 1], got {text}")
    return value


def _label_smoothing(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"a label smoothing in [0, 1), got {text}")
    return value


def _lr_help() -> str:
    table = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
    return (
        f"base learning rate; the default depends on the optimizer ({table}): the best of a "
        "small grid at batch 4096, 10 epochs, 1 warm-up epoch, poly decay, cnn model"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spngd-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODEL_BUILDERS), default="cnn")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="spngd")
    p.add_argument(
        "--compare",
        default=None,
        metavar="OPT[:LR],...",
        help="run several optimizers (e.g. sgd,lars,spngd or sgd:0.2,lars:0.2) on the "
        "same data and budget; writes compare.png/.md/.json",
    )
    p.add_argument("--batch-size", type=_positive_int, default=4096, help="global batch size")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--lr", type=_positive_float, default=None, help=_lr_help())
    p.add_argument(
        "--warmup-epochs",
        type=_nonneg_float,
        default=1.0,
        help="linear LR warm-up length in epochs (converted to steps)",
    )
    p.add_argument(
        "--schedule", choices=SCHEDULES, default="poly", help="LR decay after warm-up, per step (poly: power 2 to zero)"
    )
    p.add_argument("--momentum", type=_nonneg_float, default=0.9)
    p.add_argument("--weight-decay", type=_nonneg_float, default=None, help="default: 5e-4, or 5e-2 for adamw")
    p.add_argument(
        "--label-smoothing",
        type=_label_smoothing,
        default=0.0,
        help="label smoothing of the training loss (every optimizer; test loss is plain)",
    )
    p.add_argument(
        "--augment",
        choices=[a.value for a in Augmentation],
        default=Augmentation.NONE.value,
        help="training-batch augmentation (shift-flip: random shifts of up to "
        "--max-shift pixels, then a left-right flip of half the images)",
    )
    p.add_argument("--max-shift", type=_nonneg_int, default=2, help="shift-flip's largest shift")
    p.add_argument("--trust-coefficient", type=_positive_float, default=LARS_TRUST_COEFFICIENT, help="lars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA or CPU)")
    p.add_argument("--target-acc", type=_accuracy, default=0.88)
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory with the IDX files (else $SPNGD_DATA_DIR, Debian's "
        "/usr/share/datasets/fashion-mnist, ~/.cache/spngd/fashion-mnist)",
    )
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--limit-train", type=_positive_int, default=None, help="use the first N")
    p.add_argument("--limit-test", type=_positive_int, default=None, help="use the first N")
    p.add_argument(
        "--eval-every",
        type=_nonneg_int,
        default=5,
        help="evaluate every N steps (0: epoch ends only); also at each epoch end",
    )
    p.add_argument("--eval-batch-size", type=_positive_int, default=2048)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar per epoch"
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP2 fully_shard (under torchrun; spngd, sgd or adamw)",
    )
    add_spngd_flags(p)  # --damping, --fisher, --stale, --curvature-interval, --kl-clip, ...
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def parse_compare(text: str) -> list[tuple[str, float | None]]:
    """``"sgd,lars:4,spngd"`` -> [("sgd", None), ("lars", 4.0), ("spngd", None)]."""
    entries: list[tuple[str, float | None]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, lr_text = item.partition(":")
        if name not in OPTIMIZERS:
            raise ValueError(f"--compare: unknown optimizer {name!r}; choose from {OPTIMIZERS}")
        try:
            lr = _positive_float(lr_text) if lr_text else None
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--compare: learning rate of {name}: {exc}") from None
        entries.append((name, lr))
    if not entries:
        raise ValueError("--compare: no optimizer given")
    return entries


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048, amp: bool = False
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm uses running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(xb)
        loss_sum += float(F.cross_entropy(out.float(), yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return loss_sum / x.shape[0], correct / x.shape[0]


def _fully_shard(model: nn.Module, distributed: bool, optimizer: str) -> None:
    """--fsdp: each top-level child with parameters its own FSDP2 group, then the root."""
    if not distributed:
        raise ValueError("--fsdp needs torchrun with more than one rank (WORLD_SIZE > 1)")
    if optimizer not in ("spngd", "sgd", "adamw"):
        raise ValueError(f"--fsdp supports --optimizer spngd, sgd or adamw, not {optimizer}")
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def run_training(
    cfg: TrainConfig, dataset: Dataset | None = None, env: TrainEnv | None = None, out_dir: Path | None = None
) -> RunResult:
    """Train one model with one optimizer; log, summarise, and return the evaluation rows.

    ``dataset`` and ``env`` may be shared between runs (compare mode, the convergence bench);
    when omitted they are created here.
    """
    own_env = env is None
    env = env if env is not None else setup_env(cfg.device, cfg.threads)
    try:
        if dataset is None:
            dataset = load_dataset(cfg.data_dir, cfg.limit_train, cfg.limit_test)
        return _train(cfg, dataset, env, Path(out_dir or cfg.out or _default_out_dir()))
    finally:
        if own_env:
            teardown_env(env)


def _train(cfg: TrainConfig, data: Dataset, env: TrainEnv, out_dir: Path) -> RunResult:
    device, world, rank = env.device, env.world_size, env.rank
    if cfg.batch_size < world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {world} ranks")
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    n_train = train_x.shape[0]
    if Augmentation(cfg.augment) is Augmentation.SHIFT_FLIP:  # up front, so every rank fails alike
        check_max_shift(cfg.max_shift, cfg.max_shift, train_x.shape[-2], train_x.shape[-1])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs

    torch.manual_seed(cfg.seed)  # same initial weights for every optimizer
    model = build_model(cfg.model, num_classes=data.num_classes).to(device)
    ddp_model = None
    if cfg.fsdp:
        _fully_shard(model, env.distributed, cfg.optimizer)
    elif env.distributed and cfg.optimizer in ("sgd", "lars", "adamw"):
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    step_fn = build_train_step(
        cfg.optimizer, model, cfg.optimizer_settings(), distributed=env.distributed, ddp_model=ddp_model
    )
    scheduler = build_lr_scheduler(
        step_fn.optimizer, total_steps, round(cfg.warmup_epochs * steps_per_epoch), cfg.schedule
    )
    lr = cfg.resolved_lr
    config_record = dict(
        dataclasses.asdict(cfg),
        lr=lr,
        weight_decay=cfg.resolved_weight_decay,
        world_size=world,
        device=str(device),
        parameters=count_parameters(model),
        steps_per_epoch=steps_per_epoch,
        data_dir=str(data.directory),
        n_train=n_train,
        n_test=test_x.shape[0],
    )
    log = RunLog(out_dir, config_record) if env.is_main else None
    if env.is_main and cfg.progress:
        print(
            f"[{cfg.optimizer}] {cfg.model} ({count_parameters(model):,} params), lr {lr:g}, "
            f"batch {cfg.batch_size} x {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
            f"{device}, world {world} -> {out_dir}",
            file=sys.stderr,
        )

    from tqdm import tqdm

    shuffle_gen = torch.Generator().manual_seed(cfg.seed)  # same batch order for every optimizer
    augment = Augmentation(cfg.augment)
    augment_gen = torch.Generator().manual_seed(cfg.seed + 1)  # same shifts for every optimizer
    blank = (0.0 - data.mean) / data.std  # a black pixel, normalised
    rows: list[EvalRow] = []
    train_time, step, diverged, divergence = 0.0, 0, False, None
    # Train-set statistics since the last evaluation, as [loss*n, correct, n] summed over ranks.
    window = torch.zeros(3, dtype=torch.float64)
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_train, generator=shuffle_gen).to(device)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{cfg.optimizer} epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not (cfg.progress and env.is_main),
            file=sys.stderr,
        )
        epoch_examples, epoch_time = 0, 0.0
        epoch_stats = torch.zeros(3, dtype=torch.float64)
        _sync(device)
        segment_start = time.perf_counter()
        for i in range(steps_per_epoch):
            batch = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            local = batch.tensor_split(world)[rank]
            x, y = train_x[local], train_y[local]
            if augment is Augmentation.SHIFT_FLIP:
                # Drawn for the whole global batch, so a rank's slice does not depend on the world size.
                params = draw_shift_flip(len(batch), max_shift=cfg.max_shift, generator=augment_gen)
                mine = torch.arange(len(batch)).tensor_split(world)[rank]  # the same cut as `local`
                x = apply_shift_flip(x, params.select(mine), fill=blank)
            try:
                loss, out = step_fn(x, y)
            except torch.linalg.LinAlgError as exc:  # e.g. ASDL's Cholesky on a blown-up factor
                diverged, divergence = True, f"step {step + 1}: {exc}"
                break
            scheduler.step()
            step += 1
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                diverged, divergence = True, f"step {step}: training loss {loss_value}"
                break
            stats = torch.tensor([loss_value * len(y), float((out.argmax(1) == y).sum()), len(y)], dtype=torch.float64)
            window += stats
            epoch_stats += stats
            epoch_examples += len(batch)
            if env.is_main and cfg.progress:
                elapsed = epoch_time + time.perf_counter() - segment_start
                bar.set_postfix(
                    loss=f"{epoch_stats[0] / epoch_stats[2]:.3f}",
                    acc=f"{epoch_stats[1] / epoch_stats[2]:.3f}",
                    ex_s=f"{epoch_examples / max(elapsed, 1e-9):.0f}",
                )
                bar.update(1)
            epoch_end = i == steps_per_epoch - 1
            if epoch_end or (cfg.eval_every and step % cfg.eval_every == 0):
                _sync(device)
                segment = time.perf_counter() - segment_start
                train_time += segment
                epoch_time += segment
                if env.distributed:  # NCCL reduces device tensors only, Gloo either
                    reduced = window.to(device)
                    dist.all_reduce(reduced)
                    window.copy_(reduced.cpu())
                if env.is_main or cfg.fsdp:  # an FSDP2 forward is collective: every rank evaluates
                    test_loss, test_acc = evaluate(model, test_x, test_y, cfg.eval_batch_size, cfg.amp)
                if env.is_main:
                    row = EvalRow(
                        step=step,
                        epoch=round(epoch + (i + 1) / steps_per_epoch, 4),
                        wall_time=round(train_time, 4),
                        train_loss=float(window[0] / window[2]),
                        train_acc=float(window[1] / window[2]),
                        test_loss=test_loss,
                        test_acc=test_acc,
                        lr=step_fn.optimizer.param_groups[0]["lr"],
                    )
                    rows.append(row)
                    log.append(row)
                    bar.set_description(f"{cfg.optimizer} epoch {epoch + 1}/{cfg.epochs} test {test_acc:.3f}")
                window.zero_()
                if env.distributed:
                    dist.barrier()  # ranks resume together, so rank 0's eval is not train time
                _sync(device)
                segment_start = time.perf_counter()
        bar.close()
        if diverged:
            break

    summary = summarize(
        rows,
        cfg.target_acc,
        extra=dict(
            optimizer=cfg.optimizer,
            model=cfg.model,
            lr=lr,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            world_size=world,
            device=str(device),
            diverged=diverged,
            divergence=divergence,
            counters=step_fn.counters,
            out_dir=str(out_dir),
        ),
    )
    if env.is_main:
        log.finish(summary)
        print(format_summary(summary))
    return RunResult(cfg.optimizer, rows, summary, out_dir if env.is_main else None)


# --------------------------------------------------------------------------------------------
# Compare mode
# --------------------------------------------------------------------------------------------


def run_compare(
    cfg: TrainConfig, entries: Sequence[tuple[str, float | None]], dataset: Dataset, env: TrainEnv, out_dir: Path
) -> tuple[list[RunResult], dict[str, str]]:
    """Run each (optimizer, lr) with the same data, seed and budget; write the comparison.

    Returns the results and {optimizer: error} for those that could not run.
    """
    results: list[RunResult] = []
    failures: dict[str, str] = {}
    names = [name for name, _ in entries]
    for name, lr in entries:
        run_cfg = dataclasses.replace(cfg, optimizer=name, lr=lr)
        # An optimizer listed more than once (an LR sweep) gets one directory per rate.
        label = name if names.count(name) == 1 else f"{name}@{run_cfg.resolved_lr:g}"
        subdir = label.replace("-", "_").replace("@", "_lr")
        try:
            results.append(run_training(run_cfg, dataset, env, out_dir / subdir))
        except OptimizerUnavailableError as exc:
            failures[label] = str(exc)
            print(f"spngd-train: skipping {label}: {exc}", file=sys.stderr)
    if env.is_main:
        write_comparison(results, failures, cfg, out_dir)
    return results, failures


def write_comparison(results: Sequence[RunResult], failures: dict[str, str], cfg: TrainConfig, out_dir: Path) -> None:
    title = f"{cfg.model}, batch {cfg.batch_size}, {cfg.epochs} epoch(s), seed {cfg.seed}"
    curves = [(f"{r.name} (lr {r.summary['lr']:g})", r.rows) for r in results]
    plot_accuracy_curves([(title, curves)], out_dir / "compare.png", target_acc=cfg.target_acc)
    header = [
        "optimizer",
        "lr",
        f"steps / time to {cfg.target_acc:.0%}",
        "best acc",
        "final acc",
        "steps",
        "train time (s)",
        "ms/step",
    ]
    table = [
        [
            r.name,
            r.summary["lr"],
            format_reach(r.summary["target"]),
            r.summary["best_test_acc"],
            r.summary["final_test_acc"],
            r.summary["steps"],
            r.summary["train_time"],
            r.summary["time_per_step"] * 1000,
        ]
        for r in results
    ]
    text = [f"# Optimizer comparison: {title}", "", markdown_table(header, table), ""]
    text += [f"- {name} did not run: {err}" for name, err in failures.items()]
    text.append("\nTimes are training time only (evaluation excluded); see compare.png.")
    (out_dir / "compare.md").write_text("\n".join(text) + "\n")
    (out_dir / "compare.json").write_text(
        json.dumps(
            {"config": dataclasses.asdict(cfg), "runs": [r.summary for r in results], "failures": failures},
            indent=2,
            default=str,
        )
    )
    print("\n".join(text[:3]))


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        entries = parse_compare(args.compare) if args.compare else None
        if entries and cfg.lr is not None:
            raise ValueError("--lr does not apply to --compare; give per-optimizer rates as --compare sgd:0.2,lars:0.2")
        env = setup_env(cfg.device, cfg.threads)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))  # exits with status 2
    out_dir = Path(cfg.out) if cfg.out else _default_out_dir()
    try:
        dataset = load_dataset(cfg.data_dir, cfg.limit_train, cfg.limit_test)
        if entries:
            _, failures = run_compare(cfg, entries, dataset, env, out_dir)
            return 1 if failures else 0
        run_training(cfg, dataset, env, out_dir)
        return 0
    except (DataNotFoundError, IdxFormatError, OptimizerUnavailableError, ValueError) as exc:
        print(f"spngd-train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        teardown_env(env)
