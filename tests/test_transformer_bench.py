"""bench/transformer.py end to end on a tiny budget: both tables, the equal-time readings, the files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_transformer_comparison(fmnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tr"
    cmd = [sys.executable, "bench/transformer.py", "--limit-train", "768", "--limit-test", "300"]
    cmd += ["--batch-size", "128", "--evals-per-epoch", "3", "--timing-rounds", "3", "--data-dir", str(fmnist_dir)]
    cmd += ["--lrs-spngd", "0.03", "--lrs-adamw", "0.003", "--lrs-sgd", "0.1,0.3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 6 and set(result["step_ms"]) == {"spngd", "adamw", "sgd"}
    assert [(t["optimizer"], t["lr"]) for t in result["trials"]] == [
        ("spngd", 0.03),
        ("adamw", 0.003),
        ("sgd", 0.1),
        ("sgd", 0.3),
    ]
    fastest = min(result["step_ms"].values())
    assert abs(result["budget_interleaved_ms"] - 6 * fastest) < 1e-6 * fastest
    for name, best in result["best"].items():
        assert best["lr"] in {t["lr"] for t in result["trials"] if t["optimizer"] == name}
        assert best["at_budget"]["wall_time"] <= result["budget_s"]
        # the optimizer with the fastest step reaches all its steps within the interleaved budget
        if result["step_ms"][name] == fastest:
            assert best["at_interleaved_budget"]["step"] == 6
        assert best["curve"][-1]["step"] == 6
    text = (out / "results.md").read_text()
    assert "equal steps" in text and "interleaved step times" in text
