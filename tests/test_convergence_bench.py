"""bench/convergence.py end to end on a tiny budget: report files, and reuse of finished trials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_convergence_study(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "conv"
    cmd = [sys.executable, "bench/convergence.py", "--batch-sizes", "512", "--epochs", "1",
           "--optimizers", "sgd", "--lrs-sgd", "0.2", "--small-batch", "256", "--lrs-small-sgd",
           "0.1", "--limit-train", "1024", "--limit-test", "500", "--device", "cpu",
           "--no-progress", "--data-dir", str(fmnist_dir), "--out", str(out)]
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
