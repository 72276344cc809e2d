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
        result = bench.main(
            [
                "--quick",
                "--batch-sizes",
                "8",
                "--rounds",
                "3",
                "--warmup",
                "1",
                "--threads",
                "1",
                "--data",
                "random",
                "--n-batches",
                "2",
                "--configs",
                configs,
                "--profile-steps",
                "2",
                "--top-ops",
                "3",
                "--json",
                str(out),
            ]
        )
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
    for phase in (
        "forward",
        "backward",
        "MC backward",
        "factor accumulation (all)",
        "  inversion",
        "  preconditioning",
        "  update",
    ):
        assert every[phase]["calls_per_step"] > 0, phase
        assert every[phase]["cpu_inclusive_ms"] >= every[phase]["cpu_exclusive_ms"] >= 0
    assert every["forward"]["cpu_inclusive_ms"] > every["forward"]["cpu_exclusive_ms"]  # accumulation nested inside
    assert _positive_finite(breakdown["sgd"]["profiled_step_cpu_ms"])
    assert {t["target"] for t in entry["targets"]}


def _phases(**ms: float) -> dict:
    return {
        label: {"cpu_inclusive_ms": ms.get(label.strip(), 0.0), "cuda_inclusive_ms": 10 * ms.get(label.strip(), 0.0)}
        for label in (
            "factor accumulation (all)",
            "  factor finalize",
            "  inversion",
            "  preconditioning",
            "  update",
            "MC backward",
        )
    }


def test_curvature_phase_adds_factors_finalize_inversion_and_preconditioning_only():
    bench = _load_bench()
    breakdown = {
        "sgd": {"phases": _phases()},
        "spngd-every-step-torch": {
            "phases": _phases(
                **{
                    "factor accumulation (all)": 1.0,
                    "factor finalize": 2.0,
                    "inversion": 4.0,
                    "preconditioning": 8.0,
                    "update": 16.0,
                    "MC backward": 32.0,
                }
            )
        },
    }
    assert bench.curvature_phase(breakdown, use_cuda=False) == {"spngd-every-step-torch": 15.0}
    assert bench.curvature_phase(breakdown, use_cuda=True) == {"spngd-every-step-torch": 150.0}


@pytest.mark.parametrize("cuda_ms, met", [(10.0, True), (10.1, False)])
def test_curvature_target_is_torch_over_cuda_against_three(cuda_ms, met):
    bench = _load_bench()
    phase = {"spngd-every-step-cuda": cuda_ms, "spngd-every-step-torch": 30.0}
    (t,) = bench.curvature_targets(phase, use_cuda=True, extension_loaded=True)
    assert t["value"] == pytest.approx(30.0 / cuda_ms) and t["met"] is met
    (t,) = bench.curvature_targets(phase, use_cuda=False, extension_loaded=True)
    assert t["met"] is None and t["value"] is None and "GPU" in t["why"]
    (t,) = bench.curvature_targets(phase, use_cuda=True, extension_loaded=False)
    assert t["met"] is None
    assert bench.curvature_targets({"spngd-every-step-torch": 30.0}, use_cuda=True, extension_loaded=True) == []


@pytest.mark.timeout(120)
def test_backend_pinned_configs_report_the_curvature_phase(tmp_path, capsys):
    bench = _load_bench()
    from spngd_ext import cuda_ops_available

    threads = torch.get_num_threads()
    try:
        result = bench.main(
            [
                "--quick",
                "--batch-sizes",
                "8",
                "--rounds",
                "2",
                "--warmup",
                "1",
                "--threads",
                "1",
                "--data",
                "random",
                "--n-batches",
                "1",
                "--configs",
                "sgd,spngd-every-step-cuda,spngd-every-step-torch",
                "--profile-steps",
                "1",
                "--top-ops",
                "0",
                "--json",
                str(tmp_path / "out.json"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    entry = result["batch_sizes"]["8"]
    assert "spngd-every-step-torch" in entry["timing"]
    assert entry["breakdown"]["spngd-every-step-torch"]["counters"]["inverse_updates"] == 1
    phases = entry["breakdown"]["spngd-every-step-torch"]["phases"]
    total = sum(phases[label]["cpu_inclusive_ms"] for label in bench.step_profile.CURVATURE_ROWS)
    assert entry["curvature_phase_ms"]["spngd-every-step-torch"] == pytest.approx(total) and total > 0
    assert "Curvature phase (CPU (wall) ms/step" in printed
    if not cuda_ops_available():  # the CUDA-pinned config cannot run here: skipped, with the reason
        assert "backend='cuda'" in entry["skipped_configs"]["spngd-every-step-cuda"]
        assert "spngd-every-step-cuda" not in entry["timing"]
        assert not [t for t in entry["targets"] if t["target"].startswith("curvature phase")]


def test_image_size_is_for_resnet50_only():
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--image-size", "64"])
    assert bench.parse_args(["--model", "resnet50", "--device", "cpu", "--image-size", "64"]).image_size == 64
    model, shape, classes = bench.build_base_model("resnet50", 64)
    assert shape == (3, 64, 64) and classes == 1000


@pytest.mark.parametrize("name,first_order", [("vit", 1024), ("dwcnn", 0)])
def test_new_layer_models_run_on_fashion_mnist_shapes(name, first_order):
    """--model vit / dwcnn: 1×28×28 inputs (the Fashion-MNIST batches), and the per-parameter
    curvature cost divides by the parameters with curvature (vit: all but the positional embedding)."""
    bench = _load_bench()
    assert bench.parse_args(["--model", name]).device == "cpu"
    model, shape, classes = bench.build_base_model(name)
    assert shape == (1, 28, 28) and classes == 10
    total = sum(p.numel() for p in model.parameters())
    assert bench.curvature_parameters(model) == total - first_order


def test_bn_mlp_model_is_the_tabular_mlp_with_full_curvature():
    """--model bn_mlp: 16 features, 26 classes, 16-256-256-26 with BatchNorm1d; every parameter has
    curvature, and its batches are random rows (no image dataset fits)."""
    bench = _load_bench()
    assert bench.parse_args(["--model", "bn_mlp"]).device == "cpu"
    model, shape, classes = bench.build_base_model("bn_mlp")
    assert shape == (16,) and classes == 26
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 256, 26] and sum(isinstance(m, torch.nn.BatchNorm1d) for m in model) == 2
    assert bench.curvature_parameters(model) == sum(p.numel() for p in model.parameters())
    batches, source = bench.make_batches("auto", 8, 2, shape, classes, torch.device("cpu"), None, 0)
    assert source.startswith("random") and batches[0][0].shape == (8, 16) and int(batches[0][1].max()) < 26


@pytest.mark.timeout(180)
def test_whole_run_mode_reports_mean_steps_and_skipped_work(tmp_path, capsys):
    """--whole-run: every configuration trains side by side; per configuration the mean step over
    the run, its ratio to SGD's and the fraction of each kind of work skipped."""
    bench = _load_bench()
    out = tmp_path / "whole.json"
    threads = torch.get_num_threads()
    configs = "sgd,spngd-every-step,spngd-stale,spngd-stale-noise-aligned@0.3,spngd-stale@1e9"
    try:
        result = bench.main(
            ["--whole-run", "--data", "random", "--batch-size", "32", "--limit-train", "96", "--limit-test", "32"]
            + ["--epochs", "3", "--eval-every", "4", "--threads", "1", "--configs", configs, "--json", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["command"].startswith("python bench/step_overhead.py --whole-run")
    rows = {r["name"]: r for r in result["runs"]}
    assert list(rows) == configs.split(",")
    for r in rows.values():
        assert r["steps"] == 9 and len(r["step_times_s"]) == 9 and _positive_finite(r["mean_step_s"])
        assert r["evals"][-1]["step"] == 9
    assert rows["sgd"]["mean_ratio"] == 1.0 and "factor_work_skipped" not in rows["sgd"]
    every = rows["spngd-every-step"]
    assert every["factor_work_skipped"] == every["mc_backward_skipped"] == every["refresh_steps_skipped"] == 0.0
    assert every["plain_steps"] == 0 and every["plain_ratio"] is None
    # every change is below 1e9: intervals 1, 2, 4, 8 — refreshes at steps 0, 1, 3, 7 of 9
    always_similar = rows["spngd-stale@1e9"]
    assert always_similar["plain_steps"] == 5 and always_similar["refresh_steps_skipped"] == pytest.approx(5 / 9)
    assert always_similar["mc_backward_skipped"] == pytest.approx(5 / 9)
    for name in ("spngd-stale", "spngd-stale-noise-aligned@0.3", "spngd-stale@1e9"):
        r = rows[name]
        for key in ("factor_work_skipped", "inverse_work_skipped", "mc_backward_skipped", "refresh_steps_skipped"):
            assert 0.0 <= r[key] < 1.0, (name, key)
        assert r["plain_steps"] == round(r["refresh_steps_skipped"] * 9)
    assert "mean step ÷ SGD's" in capsys.readouterr().out
