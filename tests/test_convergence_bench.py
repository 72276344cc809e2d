"""bench/convergence.py end to end on a tiny budget: report files, and reuse of finished trials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_tiny_convergence_study(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "conv"
    cmd = [
        sys.executable,
        "bench/convergence.py",
        "--batch-sizes",
        "512",
        "--epochs",
        "1",
        "--optimizers",
        "sgd",
        "--lrs-sgd",
        "0.2",
        "--small-batch",
        "256",
        "--lrs-small-sgd",
        "0.1",
        "--limit-train",
        "1024",
        "--limit-test",
        "500",
        "--device",
        "cpu",
        "--no-progress",
        "--data-dir",
        str(fmnist_dir),
        "--out",
        str(out),
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "command: " in first.stdout and "bench/convergence.py --batch-sizes 512" in first.stdout
    results = json.loads((out / "results.json").read_text())
    groups = {(g["batch_size"], g["optimizer"]): g for g in results["groups"]}
    assert set(groups) == {(256, "sgd"), (512, "sgd")}
    assert set(groups[(512, "sgd")]["per_threshold"]) == {"0.85", "0.88", "0.90"}
    assert 0 < groups[(256, "sgd")]["best_acc"] <= 1
    assert (out / "convergence.png").stat().st_size > 10_000
    assert "| 512 | sgd | 1 |" in (out / "results.md").read_text()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stderr.count("reusing ") == 2


def _load_convergence_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convergence_bench", REPO / "bench/convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reuse_compares_trust_coefficient_for_lars_only(tmp_path: Path) -> None:
    """A finished trial logged with another LARS trust coefficient is retrained for LARS and
    reused for SGD, which never reads it."""
    import dataclasses

    from spngd_ext.train import TrainConfig

    conv = _load_convergence_module()
    for name, reused in (("sgd", True), ("lars", False)):
        cfg = TrainConfig(optimizer=name, batch_size=512, epochs=1, lr=0.1, trust_coefficient=0.1)
        logged = dataclasses.asdict(cfg) | {"trust_coefficient": 1e-3}
        trial = tmp_path / name
        trial.mkdir()
        (trial / "log.json").write_text(json.dumps({"config": logged, "rows": [], "summary": {"best_test_acc": 0.5}}))
        assert (conv._load_finished(trial, cfg) is not None) is reused, name
        assert conv._load_finished(trial, dataclasses.replace(cfg, trust_coefficient=1e-3)) is not None


def test_per_batch_lr_grids_and_asdl_batch_sizes() -> None:
    conv = _load_convergence_module()
    args = conv.build_parser().parse_args(
        [
            "--batch-sizes",
            "1024,8192",
            "--asdl-kfac-batch-sizes",
            "8192",
            "--lrs-sgd",
            "8192=0.03,0.06",
            "--lrs-sgd",
            "0.5",
            "--lrs-asdl-kfac",
            "8192=0.04",
            "--small-batch",
            "256",
            "--lrs-small-sgd",
            "0.1",
        ]
    )
    plan = conv.build_plan(args, ["sgd", "spngd", "asdl-kfac"])
    scale = (1024 / conv.REFERENCE_BATCH) ** conv.LR_SCALING_POWER
    default_spngd = [float(f"{conv.DEFAULT_LR['spngd'] * m * scale:.4g}") for m in conv.GRID_MULTIPLIERS]
    assert plan == [
        ("sgd", 1024, [0.5]),
        ("spngd", 1024, default_spngd),
        ("sgd", 8192, [0.03, 0.06]),
        ("spngd", 8192, plan[3][2]),
        ("asdl-kfac", 8192, [0.04]),
        ("sgd", 256, [0.1]),
    ]
    for bad in ("x=0.1", "0=0.1", "4096=", "4096=-1"):
        with pytest.raises(SystemExit):
            conv.build_parser().parse_args(["--lrs-sgd", bad])
    assert conv.build_parser().parse_args(["--trust-coefficient", "0.05"]).trust_coefficient == 0.05
    for bad in ("0", "-1", "0.1,0.2", "x"):
        with pytest.raises(SystemExit):
            conv.build_parser().parse_args(["--trust-coefficient", bad])
