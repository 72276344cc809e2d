"""The spngd-train CLI: argument checking, clear failures, and small real training runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spngd_ext.train import build_parser, config_from_args, main, parse_compare
from spngd_ext.train.baselines import DEFAULT_LR, LARS_TRUST_COEFFICIENT, build_train_step

REPO = Path(__file__).resolve().parents[1]


def torchrun_train(args: list[str], *, timeout: float, ranks: int = 2) -> subprocess.CompletedProcess:
    """``python -m spngd_ext.train args`` on ``ranks`` Gloo processes under torchrun (1 thread each)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        + ["-m", "spngd_ext.train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def small_run_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """2 epochs of 4 steps (1024 examples, batch 256), evaluated every 2 steps on 500."""
    return [
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--limit-train",
        "1024",
        "--limit-test",
        "500",
        "--batch-size",
        "256",
        "--epochs",
        "2",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def read_log(out: Path) -> list[dict[str, float]]:
    with open(out / "log.csv") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------ parsing


def test_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.model, args.optimizer, args.batch_size, args.epochs) == ("cnn", "spngd", 4096, 10)
    assert args.target_acc == 0.88 and args.eval_every == 5 and args.schedule == "poly"
    assert args.lr is None and args.fisher == "mc" and args.stale is False
    assert args.device == "auto" and args.amp is False and args.compare is None
    assert args.augment == "none" and args.max_shift == 2 and args.weight_rescale is False


@pytest.mark.parametrize("extra, trust", [([], LARS_TRUST_COEFFICIENT), (["--trust-coefficient", "0.02"], 0.02)])
def test_trust_coefficient_reaches_lars(extra: list[str], trust: float) -> None:
    pytest.importorskip("pytorch_optimizer")
    from torch import nn

    cfg = config_from_args(build_parser().parse_args(["--optimizer", "lars", *extra]))
    step = build_train_step("lars", nn.Linear(3, 2), cfg.optimizer_settings())
    group = step.optimizer.param_groups[0]
    assert type(step.optimizer).__name__ == "LARS"
    assert group["trust_coefficient"] == trust and group["lr"] == DEFAULT_LR["lars"]


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (["--batch-size", "0"], "must be > 0"),
        (["--epochs", "-1"], "must be > 0"),
        (["--lr", "abc"], "not a valid float"),
        (["--lr", "nan"], "--lr"),
        (["--target-acc", "1.5"], "accuracy in (0, 1]"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--model", "vgg"], "invalid choice"),
        (["--fisher", "exact"], "invalid choice"),
        (["--eval-every", "-2"], ">= 0"),
        (["--compare", "sgd,rmsprop"], "unknown optimizer 'rmsprop'"),
        (["--compare", "sgd", "--lr", "0.1"], "--compare sgd:0.2"),
        (["--compare", "sgd:-1"], "must be > 0"),
        (["--label-smoothing", "1.0"], "label smoothing in [0, 1)"),
        (["--label-smoothing", "-0.1"], ">= 0"),
        (["--augment", "mixup"], "invalid choice"),
        (["--max-shift", "-1"], ">= 0"),
    ],
)
def test_bad_values_exit_with_usage_error(bad: list[str], complaint: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(bad)
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sgd", "spngd", "asdl-kfac"])
def test_label_smoothing_reaches_the_training_loss(name: str) -> None:
    """--label-smoothing 0.1: the loss every optimizer trains on is the smoothed cross-entropy."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from spngd_ext.train.baselines import OptimizerUnavailableError

    cfg = config_from_args(build_parser().parse_args(["--optimizer", name, "--label-smoothing", "0.1", "--lr", "0.01"]))
    assert cfg.label_smoothing == 0.1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(8, 3, 4), torch.randint(0, 4, (8,))
    try:
        step = build_train_step(name, model, cfg.optimizer_settings())
    except OptimizerUnavailableError as exc:
        pytest.skip(str(exc))
    with torch.no_grad():
        logits = model(x)
    loss, _ = step(x, y)  # the loss of the weights before this step
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.1)), rel=1e-5)
    assert float(loss) != pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-3)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.1"])
def test_build_train_step_rejects_bad_label_smoothing(bad) -> None:
    from torch import nn

    from spngd_ext.train.baselines import OptimizerSettings

    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        build_train_step("sgd", nn.Linear(3, 2), OptimizerSettings(lr=0.1, label_smoothing=bad))


def test_parse_compare() -> None:
    assert parse_compare("sgd, lars:4,spngd") == [("sgd", None), ("lars", 4.0), ("spngd", None)]


def test_bad_data_dir_is_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert (
        main(["--data-dir", str(missing), "--optimizer", "sgd", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    )
    err = capsys.readouterr().err
    assert f"--data-dir: {missing} is not a directory" in err
    assert "dataset-fashion-mnist" in err and "SPNGD_DATA_DIR" in err


def test_bad_data_dir_exit_status_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "spngd_ext.train", "--data-dir", str(tmp_path), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lacks train-images-idx3-ubyte[.gz]" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ training runs


def check_run_outputs(out: Path, optimizer: str) -> dict:
    for name in ("log.csv", "log.json", "summary.json", "summary.txt"):
        assert (out / name).is_file(), name
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]  # every 2 steps; epoch ends coincide
    assert all(r["wall_time"] > 0 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"], "training loss did not decrease"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == optimizer and summary["steps"] == 8 and not summary["diverged"]
    assert 0.1 < summary["best_test_acc"] <= 1
    assert set(summary["thresholds"]) == {"0.85", "0.88", "0.90"}
    logged = json.loads((out / "log.json").read_text())
    assert len(logged["rows"]) == 4 and logged["config"]["optimizer"] == optimizer
    assert "best test accuracy" in (out / "summary.txt").read_text()
    return summary


def test_sgd_smoke_run(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sgd"
    assert main(small_run_args(fmnist_dir, out, "--optimizer", "sgd", "--lr", "0.4")) == 0
    check_run_outputs(out, "sgd")
    assert "== sgd summary ==" in capsys.readouterr().out


def test_spngd_smoke_run(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "spngd"
    assert main(small_run_args(fmnist_dir, out, "--optimizer", "spngd")) == 0
    summary = check_run_outputs(out, "spngd")
    assert summary["counters"]["steps"] == 8
    assert summary["counters"]["factor_updates"] >= 1


def test_spngd_trains_the_vision_transformer(fmnist_dir: Path, tmp_path: Path) -> None:
    """python -m spngd_ext.train --model vit: attention projections and LayerNorm on real data
    (dwcnn's grouped convolutions and GroupNorm train in tests/test_models.py)."""
    model = "vit"
    out = tmp_path / model
    assert main(small_run_args(fmnist_dir, out, "--optimizer", "spngd", "--model", model, "--damping", "0.03")) == 0
    summary = check_run_outputs(out, "spngd")
    assert summary["model"] == model and summary["counters"]["skipped_steps"] == 0


def test_spngd_stale_flag(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "stale"
    assert main(small_run_args(fmnist_dir, out, "--optimizer", "spngd", "--stale", "--epochs", "1")) == 0
    assert json.loads((out / "log.json").read_text())["config"]["stale"] is True


def test_augment_reaches_every_training_batch(fmnist_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--augment shift-flip: each step trains on shifted/flipped images, the blank pixel as fill."""
    import torch

    import spngd_ext.train.cli as train_module

    calls = []
    real = train_module.apply_shift_flip

    def recording(x, params, *, fill):
        out = real(x, params, fill=fill)
        calls.append((x.clone(), out, fill))
        return out

    monkeypatch.setattr(train_module, "apply_shift_flip", recording)
    out = tmp_path / "augment"
    assert (
        main(small_run_args(fmnist_dir, out, "--optimizer", "sgd", "--augment", "shift-flip", "--max-shift", "3")) == 0
    )
    assert len(calls) == 8  # 2 epochs x 4 steps
    assert all(x.shape == y.shape == (256, 1, 28, 28) for x, y, _ in calls)
    assert sum(not torch.equal(x, y) for x, y, _ in calls) == 8
    data = train_module.load_dataset(fmnist_dir, limit_train=8, limit_test=8)
    assert calls[0][2] == pytest.approx(-data.mean / data.std)  # a black pixel, normalised
    config = json.loads((out / "log.json").read_text())["config"]
    assert (config["augment"], config["max_shift"]) == ("shift-flip", 3)


def test_a_max_shift_that_empties_the_image_fails_before_training(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(small_run_args(fmnist_dir, tmp_path / "big", "--augment", "shift-flip", "--max-shift", "28")) != 0
    assert "empties a 28x28 image; use a smaller --max-shift" in capsys.readouterr().err
    assert not (tmp_path / "big" / "log.csv").exists()  # nothing ran


def test_no_augmentation_by_default(fmnist_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import spngd_ext.train.cli as train_module

    def fail(*args, **kwargs):
        raise AssertionError("augmentation ran without --augment")

    monkeypatch.setattr(train_module, "apply_shift_flip", fail)
    assert main(small_run_args(fmnist_dir, tmp_path / "plain", "--optimizer", "sgd", "--epochs", "1")) == 0


def test_weight_rescale_reaches_spngd() -> None:
    """--weight-rescale: after a step every Linear weight norm is at most sqrt(2 * fan_out)."""
    import math

    import torch
    from torch import nn

    cfg = config_from_args(build_parser().parse_args(["--optimizer", "spngd", "--weight-rescale"]))
    assert cfg.weight_rescale is True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50.0)  # both weights far above their limits
    step = build_train_step("spngd", model, cfg.optimizer_settings())
    step(torch.randn(8, 3, 4), torch.randint(0, 4, (8,)))
    for layer in (model[1], model[3]):
        assert float(layer.weight.detach().norm()) == pytest.approx(math.sqrt(2 * layer.out_features), rel=1e-5)


def test_asdl_kfac_smoke_run(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kfac"
    args = small_run_args(fmnist_dir, out, "--optimizer", "asdl-kfac", "--epochs", "1")
    assert main(args) == 0
    rows = read_log(out)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert json.loads((out / "summary.json").read_text())["counters"]["curvature_updates"] == 4


def test_compare_sgd_lars(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [
        "--compare",
        "sgd:0.4,lars",
        "--data-dir",
        str(fmnist_dir),
        "--out",
        str(out),
        "--limit-train",
        "1024",
        "--limit-test",
        "500",
        "--batch-size",
        "256",
        "--epochs",
        "1",
        "--eval-every",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| sgd | 0.4 |" in table and f"| lars | {DEFAULT_LR['lars']:g} |" in table  # lars at its default
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == ["sgd", "lars"]
    for name in ("sgd", "lars"):
        assert (out / name / "log.csv").is_file()
    # Same data, seed and batch order: both runs log the same steps.
    assert [r["steps"] for r in runs] == [4, 4]


@pytest.mark.parametrize("augment", ["none", "shift-flip"])
def test_torchrun_two_ranks_sgd(fmnist_dir: Path, tmp_path: Path, augment: str) -> None:
    """Two Gloo ranks on CPU: each takes half of every global batch; rank 0 alone writes."""
    out = tmp_path / "ddp"
    proc = torchrun_train(
        ["--optimizer", "sgd", "--lr", "0.4", *small_run_args(fmnist_dir, out, "--epochs", "1", "--augment", augment)],
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert proc.stdout.count("== sgd summary ==") == 1  # rank 0 alone reports


@pytest.mark.parametrize("optimizer", ["sgd", "spngd", "asdl-kfac"])
def test_bf16_autocast_on_cpu(fmnist_dir: Path, tmp_path: Path, optimizer: str) -> None:
    out = tmp_path / optimizer
    args = small_run_args(fmnist_dir, out, "--optimizer", optimizer, "--amp", "--epochs", "1")
    assert main(args) == 0
    assert all(r["train_loss"] == r["train_loss"] for r in read_log(out))  # finite, not NaN


def test_divergence_stops_the_run(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "diverge"
    args = small_run_args(fmnist_dir, out, "--optimizer", "sgd", "--lr", "1e12", "--warmup-epochs", "0")
    assert main(args) == 0  # a diverged trial is a result, not a crash
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] and summary["steps"] < 8
    assert "stopped early, diverged: step" in capsys.readouterr().out
