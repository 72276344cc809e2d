"""The Cholesky kernel's block-level code, run on the CPU (no GPU needed).

``csrc/cuda/cholesky_blocked.cuh`` (phases A, B, C of ``cholesky_inverse_damped``'s shared-memory
kernel) is compiled unchanged with g++ against ``tests/cuda_emulation/block_emulator.h``: one
std::thread per CUDA thread, a real barrier for ``__syncthreads``, and a shared-memory pointer that
flags out-of-bounds accesses and unsynchronised conflicting accesses between threads. Each case
checks the inverse against the float64 reference, the failure flag, that every output element is
written (outputs and shared memory start as NaN) and that the checks stayed silent; the self-tests
show each check fires on a deliberately broken block.

What this does not cover: warp-level behaviour and the real memory model (the code under test only
synchronises through ``__syncthreads``), the launch (grid, shared-memory opt-in) and speed. Those
need the GPU tests in tests/test_ops_cuda.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from spngd_ext import reference

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_emulation" / "cholesky_block.cpp"
LINE = re.compile(r"info=(-?\d+) threads=(\d+) races=(\d+) out_of_bounds=(\d+) barrier_mismatch=(\d+)")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the emulation")
    exe = tmp_path_factory.mktemp("emu") / "cholesky_block"
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Werror=return-type",
           f"-I{ROOT / 'csrc'}", f"-I{HARNESS.parent}", str(HARNESS), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"building the emulation failed:\n{done.stderr[-4000:]}"
    return exe


def _run(exe: Path, *args: str) -> dict:
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = LINE.search(done.stdout)
    assert m, done.stdout
    keys = ("info", "threads", "races", "out_of_bounds", "barrier_mismatch")
    return dict(zip(keys, map(int, m.groups()))) | {"stderr": done.stderr}


def _spd(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    return (x.T @ x / x.shape[0] + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)


def _invert(exe: Path, tmp_path: Path, a: torch.Tensor, damping: float, threads: int = 0) -> tuple[dict, torch.Tensor]:
    n = a.shape[0]
    tag = {torch.float32: "f32", torch.float64: "f64"}[a.dtype]
    (tmp_path / "in.bin").write_bytes(torch.cat([a.reshape(-1), torch.tensor([damping], dtype=a.dtype)]).numpy().tobytes())
    res = _run(exe, "cholesky", tag, str(n), str(threads), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=a.dtype).reshape(n, n)
    return res, out


def _clean(res: dict) -> None:
    assert (res["races"], res["out_of_bounds"], res["barrier_mismatch"]) == (0, 0, 0), res["stderr"]


# n: 1, below/at/above the 32-wide panel and the 4-wide tiles, several panels, the thread-count
# steps of threads_for (32/64/128), and the fp32 limit; threads 32: a single warp does every loop.
CASES = [(n, torch.float32, 0) for n in (1, 2, 3, 5, 17, 31, 32, 33, 63, 64, 65, 97, 128, 129, 130, 200, 256)]
CASES += [(n, torch.float64, 0) for n in (1, 4, 33, 66, 131, 209)]
CASES += [(70, torch.float32, 32), (45, torch.float64, 96), (257, torch.float32, 0)]


@pytest.mark.parametrize("n, dtype, threads", CASES, ids=[f"{str(d)[6:]}-n{n}-t{t}" for n, d, t in CASES])
def test_block_inverse_matches_float64_reference(emulator, tmp_path, n, dtype, threads):
    m = _spd(n, seed=1000 + n, dtype=dtype)
    damping = 0.03
    a = m.clone()
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    a[upper] = float("nan")  # the kernel reads only the lower triangle
    res, out = _invert(emulator, tmp_path, a, damping, threads)
    _clean(res)
    assert res["info"] == 0
    assert torch.isfinite(out).all(), "an output element was never written (it is still NaN)"
    assert torch.equal(out, out.T), "the two triangles must be written with the same values"
    lower = torch.tril(m.to(torch.float64))
    sym = lower + torch.tril(lower, -1).T
    expected, info = reference.cholesky_inverse_damped(sym[None], torch.tensor([float(torch.tensor(damping, dtype=dtype))], dtype=torch.float64))
    assert int(info[0]) == 0
    rel = float(torch.linalg.norm(out.double() - expected[0]) / torch.linalg.norm(expected[0]))
    assert rel < (2e-6 if dtype == torch.float32 else 1e-13), rel


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("fault", ["negative definite", "nan below the diagonal", "inf on the last pivot"])
def test_block_inverse_flags_the_failed_pivot(emulator, tmp_path, n, fault):
    a = _spd(n, seed=n, dtype=torch.float32)
    if fault == "negative definite":
        a = -torch.eye(n)
        expected = 1  # the first pivot, -1 + damping, is not positive
    elif fault == "nan below the diagonal":
        a[n // 2, 0] = float("nan")  # (0, 0) itself when n == 1
        expected = n // 2 + 1  # NaN enters S(n/2, n/2) through the update from column 0
    else:
        a[n - 1, n - 1] = float("inf")
        expected = n
    res, _ = _invert(emulator, tmp_path, a, 0.5)
    _clean(res)
    assert res["info"] == expected


@pytest.mark.parametrize("broken, check", [("race", "races"), ("oob", "out_of_bounds"), ("barrier", "barrier_mismatch")])
def test_emulator_checks_fire_on_a_broken_block(emulator, broken, check):
    res = _run(emulator, "selftest", broken)
    assert res[check] > 0, f"the {check} check did not fire on the {broken!r} self-test"
