"""Smoke test of bench/step_overhead.py: a few rounds on a tiny batch, checking the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_overhead.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(120)
def test_step_overhead_quick(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "step_overhead.json"
    configs = "sgd,spngd-every-step,spngd-10/100,spngd-stale"
    if importlib.util.find_spec("asdl") is not None:
        configs += ",asdl-every-step"
    threads = torch.get_num_threads()
    try:
        result = bench.main([
            "--quick", "--batch-sizes", "8", "--rounds", "3", "--warmup", "1", "--threads", "1",
            "--data", "random", "--n-batches", "2", "--configs", configs,
            "--profile-steps", "2", "--top-ops", "3", "--json", str(out),
        ])
    finally:
        torch.set_num_threads(threads)  # main() sets it process-wide
    printed = capsys.readouterr().out
    assert "| config | median | mean |" in printed and "phase breakdown" in printed

    data = json.loads(out.read_text())
    assert data["batch_sizes"].keys() == result["batch_sizes"].keys() == {"8"}
    for key in ("command", "torch", "threads", "cpu_model"):
        assert key in data["environment"]
    entry = data["batch_sizes"]["8"]
    timing = entry["timing"]
    assert set(timing) == set(configs.split(","))
    for name, row in timing.items():
        for key in ("median_ms", "mean_ms", "p10_ms", "p90_ms", "ratio_mean", "ratio_median"):
            assert _positive_finite(row[key]), (name, key, row[key])
        assert row["steps"] == 3 and len(row["times_ms"]) == 3
        assert row["valid"], name
    assert timing["sgd"]["ratio_mean"] == pytest.approx(1.0)
    assert timing["spngd-every-step"]["counters_in_window"]["factor_updates"] == 3

    breakdown = entry["breakdown"]
    assert set(breakdown) == {"sgd", "spngd-every-step", "spngd-10/100", "spngd-stale"}
    every = breakdown["spngd-every-step"]["phases"]
    for phase in ("forward", "backward", "MC backward", "factor accumulation (all)", "  inversion", "  preconditioning", "  update"):
        assert every[phase]["calls_per_step"] > 0, phase
        assert every[phase]["cpu_inclusive_ms"] >= every[phase]["cpu_exclusive_ms"] >= 0
    assert every["forward"]["cpu_inclusive_ms"] > every["forward"]["cpu_exclusive_ms"]  # accumulation nested inside
    assert _positive_finite(breakdown["sgd"]["profiled_step_cpu_ms"])
    assert {t["target"] for t in entry["targets"]}
