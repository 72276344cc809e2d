"""``python -m spngd_ext.selftest`` and ``python -m spngd_ext.bench`` on a machine without a GPU, and
the GPU self-test's own machinery exercised on the CPU: its check list, its shape choices against
the launch plans, its checks run against the PyTorch path posing as the kernels (correct kernels
pass, a wrong one fails), and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from fake_kernels import CORRECT, install_fake_gpu, wrong

from spngd_ext.selftest import build_checks, kernel_cases, kernel_checks, machine, seam_checks
from spngd_ext.selftest.runner import Check, Skip, format_outcomes, run_checks

NO_GPU = not torch.cuda.is_available()
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.skipif(not NO_GPU, reason="the no-GPU report")
@pytest.mark.timeout(300)
def test_selftest_without_gpu_runs_the_cpu_checks_and_exits_0(tmp_path):
    out = tmp_path / "selftest.json"
    proc = _run("spngd_ext.selftest", "--json", str(out), timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "No CUDA GPU is visible" in text and "[FAIL]" not in text
    assert "| card | driver | torch / CUDA | date | commit | command | result |" in text
    row = [line for line in text.splitlines() if line.startswith("| no GPU")]
    assert len(row) == 1 and "`python -m spngd_ext.selftest --json" in row[0] and "0 failed" in row[0]
    report = json.loads(out.read_text())
    assert report["exit_status"] == 0 and report["environment"]["gpu"] is False
    names = [c["name"] for c in report["checks"]]
    assert len(names) == len(build_checks(gpu=False)) == 4 and names[-1].startswith("end-to-end")
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses[names[0]] == statuses[names[-1]] == "passed"


@pytest.mark.skipif(not NO_GPU, reason="the no-GPU report")
@pytest.mark.timeout(300)
def test_bench_without_gpu_times_the_cnn_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        "spngd_ext.bench",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--json",
        str(out),
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No CUDA GPU is visible: the kernel microbenchmarks need one and are skipped." in proc.stdout
    assert "| measurement | case | ms | baseline ms | ratio |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["kernels"] is None and data["step"]["model"] == "small_bn_cnn"
    timing = data["step"]["timing"]
    assert list(timing) == ["sgd", "spngd-every-step", "spngd-stale"]
    assert all(t["steps"] == 2 and t["valid"] and t["mean_ms"] > 0 for t in timing.values())
    assert timing["spngd-every-step"]["counters_in_window"]["factor_updates"] == 2
    assert any(line.startswith("| no GPU") and "bench: no GPU" in line for line in proc.stdout.splitlines())


def test_bench_scripts_keep_their_flags():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "bench", "kernels.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--json" in proc.stdout


def test_gpu_check_list_builds():
    checks = build_checks(gpu=True)
    groups = [c.group for c in checks]
    assert groups.count("kernels") == len(kernel_checks.kernel_checks()) == 11
    assert groups[-1] == "end-to-end" and "cuda" in checks[-1].name
    assert len({c.name for c in checks}) == len(checks)


@pytest.mark.parametrize("sm_count", [46, 80, 108, 132])
def test_gpu_shapes_reach_every_launch_path(sm_count):
    """The factor cases reach 64- and 128-wide tiles with and without row splits, the conv cases
    the split path, the BatchNorm shapes one and several blocks per channel, on common SM counts."""
    factor = {
        (large, splits > 1)
        for rows, d in kernel_checks.FACTOR_CASES
        for large, splits in [kernel_checks.syrk_plan(d, rows, sm_count, rows * d)]
    }
    assert factor == {(False, False), (False, True), (True, False), (True, True)}
    conv = set()
    for n, c, h, w, k, s, p, dil, bias in kernel_checks.CONV_CASES:
        oh = (h + 2 * p[0] - dil[0] * (k[0] - 1) - 1) // s[0] + 1
        ow = (w + 2 * p[1] - dil[1] * (k[1] - 1) - 1) // s[1] + 1
        large, splits = kernel_checks.syrk_plan(
            c * k[0] * k[1] + int(bias), n * oh * ow, sm_count, n * oh * ow * c // 2
        )
        conv.add((large, splits > 1))
    assert (False, True) in conv and any(large for large, _ in conv)
    blocks = set()
    for shape in kernel_checks.BN_SHAPES:
        hw = 1
        for extent in shape[2:]:
            hw *= extent
        blocks.add(kernel_checks.bn_plan(shape[0], shape[1], hw, sm_count)[1] > 1)
    assert blocks == {False, True}
    assert {n // 32 for n in kernel_checks.CHOLESKY_SIZES} >= {0, 1, 2, 4, 8}  # one to several 32-wide panels


def test_syrk_plan_mirror_matches_the_header():
    """Spot values of plan_syrk (csrc/cuda/syrk_tiles.cuh) on 132 SMs, worked by hand."""
    assert kernel_checks.syrk_plan(65, 20000, 132, 20000 * 65) == (False, 157)
    assert kernel_checks.syrk_plan(600, 257, 132, 257 * 600) == (True, 1)
    assert kernel_checks.syrk_plan(520, 40000, 132, 40000 * 520) == (True, 18)
    assert kernel_checks.syrk_plan(17, 0, 132, 0) == (False, 1)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The GPU checks pointed at the CPU, with the PyTorch path posing as the compiled ops."""
    install = next(install_fake_gpu(monkeypatch))
    monkeypatch.setattr(kernel_cases, "DEV", "cpu")
    monkeypatch.setattr(kernel_cases, "sm_count", lambda: 132)
    monkeypatch.setattr(
        kernel_cases,
        "FACTOR_CASES",
        [c for c in kernel_cases.FACTOR_CASES if c[0] * c[1] < 10**6] + [(2000, 65), (600, 520)],
    )  # CPU-sized; the split and no-split paths still reached
    limit = {"n": 256}

    def max_n(n=-1):
        old = limit["n"]
        if n >= 0:
            limit["n"] = n
        return old

    def cholesky(mats, damping):  # the kernel also flags a non-finite lower triangle (an infinite pivot)
        inv, info = CORRECT["cholesky_inverse_damped"](mats, damping)
        bad = ~torch.isfinite(mats.tril()).all(-1).all(-1)
        return inv, torch.where(bad, torch.ones_like(info), info)

    namespace = SimpleNamespace(**{**CORRECT, "cholesky_inverse_damped": cholesky}, cholesky_kernel_max_n=max_n)
    return namespace, install


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "check",
    [
        "check_pack_upper",
        "check_unpack_upper",
        "check_pack_many",
        "check_accumulate_factor",
        "check_conv_a_factor",
        "check_cholesky",
        "check_bn",
    ],
)
def test_gpu_checks_pass_correct_kernels_and_fail_a_wrong_one(cpu_kernels, check):
    namespace, _ = cpu_kernels
    fn = getattr(kernel_checks, check)
    assert fn(namespace)
    op = {
        "check_pack_upper": "pack_upper",
        "check_unpack_upper": "unpack_upper",
        "check_pack_many": "pack_upper",
        "check_accumulate_factor": "accumulate_factor",
        "check_conv_a_factor": "conv_a_factor",
        "check_cholesky": "cholesky_inverse_damped",
        "check_bn": "bn_unitwise_fisher",
    }[check]
    broken = SimpleNamespace(**{**vars(namespace), op: wrong(op)})
    with pytest.raises(AssertionError):
        fn(broken)


def test_gpu_seam_and_guard_checks_on_fake_kernels(cpu_kernels):
    namespace, install = cpu_kernels
    assert "accumulate_factor" in seam_checks.check_python_seam(namespace)
    assert "checks" in seam_checks.check_first_use_guard(namespace)
    install("cholesky_inverse_damped", wrong("cholesky_inverse_damped"))
    with pytest.raises(AssertionError, match="cholesky_inverse_damped"):
        seam_checks.check_first_use_guard(namespace)


def test_runner_reports_pass_fail_skip_and_the_budget():
    def fails():
        raise AssertionError("relative error 1e-1 > 2e-5")

    def skips():
        raise Skip("skipped: no extension")

    lines: list[str] = []
    checks = [Check("ok", lambda: "3 cases", "cpu"), Check("bad", fails, "cpu"), Check("skip", skips, "cpu")]
    outcomes = run_checks(checks, budget_s=60, log=lines.append)
    assert [o.status for o in outcomes] == ["passed", "failed", "skipped"]
    assert "relative error 1e-1" in outcomes[1].detail and "test_selftest.py" in outcomes[1].detail
    assert lines[1].startswith("  [FAIL] bad") and format_outcomes(outcomes) == "1 passed, 1 failed, 1 skipped"
    late = run_checks([Check("never", lambda: "x", "cpu")], budget_s=-1, log=lines.append)
    assert late[0].status == "failed" and "budget" in late[0].detail


def test_table_row_of_a_gpu_run():
    env = {
        **machine.environment([]),
        "gpu": True,
        "card": "NVIDIA H200",
        "driver": "570.1",
        "compute_capability": "9.0",
        "sm_count": 132,
    }
    row = machine.table_row(env, "selftest PASS: 13 passed, 0 failed, 0 skipped in 80 s")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["NVIDIA H200", "570.1"] and cells[2].startswith(torch.__version__)
    assert cells[5] == "`python -m spngd_ext.selftest`" and cells[6].startswith("selftest PASS")
    assert len(cells) == machine.TABLE_HEADER.splitlines()[0].count("|") - 1
    assert "NVIDIA H200 (sm_90, 132 SMs), driver 570.1" in machine.describe(env)
