"""Support for the tests/test_emulated_*.py modules: CUDA kernel code run on the CPU (no GPU
needed), compiled unchanged with g++.

``tests/cuda_emulation/block_emulator.h`` stands in for the CUDA runtime: one std::thread per CUDA
thread, a real barrier for ``__syncthreads``, warp shuffles through a per-warp exchange, and the
blocks of a grid one after another in a shuffled order.

* The Cholesky kernel's block (``cholesky_inverse_block`` in ``csrc/cuda/cholesky_blocked.cuh``,
  the very function the kernel calls) runs with a shared-memory pointer type that flags
  out-of-bounds accesses and unsynchronised conflicting accesses between threads.
* The SYRK kernel of ``accumulate_factor`` / ``conv_a_factor`` (``csrc/cuda/syrk_tiles.cuh``: the
  launch plan, every block, the row-split reduction) runs whole launches built with
  ``-fsanitize=thread``, which reports any unsynchronised access to its shared tiles.
* The BatchNorm kernels (``csrc/cuda/batchnorm_kernels.cuh``: the unit-wise Fisher with its warp
  shuffles, batch split and cross-block ticket; the 2x2 solve), whole launches under
  ThreadSanitizer as well.
* pack_upper / unpack_upper (``csrc/cuda/pack_kernels.cuh``: the kernels and the per-launch tables,
  in every storage dtype, strided sources, more matrices than one launch takes), under
  ThreadSanitizer too; compiled against c10's dtype headers.

Each case compares with the float64 reference, checks that every output element is written
(outputs, split workspaces and the Cholesky shared memory start as NaN; the grid kernels' static
shared arrays do not) and that the checks stayed silent. tests/test_emulation_checks.py shows the
checks fire: deleting a needed barrier is reported, a ticket that assumes the block order fails.
Divergent shuffles or barriers that would hang end the run (status 3) instead.

The SYRK and BatchNorm harnesses mirror their launch glue (workspace, reduction launch, ticket
counters) from factor.cu / batchnorm.cu; the launch plans themselves are shared.

What this does not cover: implicit warp lockstep and the real memory model (blocks never run at the
same time, so the ticket's fences are not exercised), the launch limits (grid size, shared-memory
opt-in) and speed. Those need the GPU tests in tests/test_ops_cuda.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ROOT_TORCH_INCLUDE = Path(torch.__file__).resolve().parent / "include"
HARNESS = ROOT / "tests" / "cuda_emulation" / "cholesky_block.cpp"
SYRK_HARNESS = ROOT / "tests" / "cuda_emulation" / "syrk_grid.cpp"
BN_HARNESS = ROOT / "tests" / "cuda_emulation" / "bn_grid.cpp"
PACK_HARNESS = ROOT / "tests" / "cuda_emulation" / "pack_grid.cpp"
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
LINE = re.compile(r"info=(-?\d+) threads=(\d+) races=(\d+) out_of_bounds=(\d+) barrier_mismatch=(\d+)")


def build(source: Path, exe: Path, *flags: str) -> subprocess.CompletedProcess:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the emulation")
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-pthread",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Werror=return-type",
        *flags,
        f"-I{ROOT / 'csrc'}",
        f"-I{source.parent}",
        str(source),
        "-o",
        str(exe),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def cholesky_emulator(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emu") / "cholesky_block"
    done = build(HARNESS, exe)
    assert done.returncode == 0, f"building the emulation failed:\n{done.stderr[-4000:]}"
    return exe


def build_with_tsan(source: Path, exe: Path, *flags: str) -> tuple[Path, bool]:
    """(executable, built with ThreadSanitizer). Without libtsan the kernels still run, unchecked
    for races, and test_emulation_has_threadsanitizer says so."""
    done = build(source, exe, *flags, "-g", "-fsanitize=thread")
    if done.returncode == 0:
        return exe, True
    if os.environ.get("SPNGD_REQUIRE_TSAN", "") not in ("", "0"):  # CI: the race checks must run
        raise AssertionError(f"SPNGD_REQUIRE_TSAN is set but g++ -fsanitize=thread failed:\n{done.stderr[-4000:]}")
    plain = build(source, exe, *flags)
    assert plain.returncode == 0, f"building the emulation failed:\n{plain.stderr[-4000:]}"
    return exe, False


def torch_includes() -> list[str]:
    """c10's headers, for the host definitions of c10::Half / c10::BFloat16 / c10::ScalarType."""
    return [f"-I{ROOT_TORCH_INCLUDE}"]


@pytest.fixture(scope="session")
def syrk_emulator(tmp_path_factory) -> tuple[Path, bool]:
    return build_with_tsan(SYRK_HARNESS, tmp_path_factory.mktemp("emu") / "syrk_grid", *torch_includes())


@pytest.fixture(scope="session")
def bn_emulator(tmp_path_factory) -> tuple[Path, bool]:
    return build_with_tsan(BN_HARNESS, tmp_path_factory.mktemp("emu") / "bn_grid", *torch_includes())


@pytest.fixture(scope="session")
def pack_emulator(tmp_path_factory) -> tuple[Path, bool]:
    return build_with_tsan(PACK_HARNESS, tmp_path_factory.mktemp("emu") / "pack_grid", *torch_includes())


def run_checked(exe: Path, *args: str, deadlock_s: int = 120) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        TSAN_OPTIONS="exitcode=66 halt_on_error=0 report_signal_unsafe=0",
        SPNGD_EMU_DEADLOCK_SECONDS=str(deadlock_s),
    )
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-6000:]
    return done


def spd(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    return (x.T @ x / x.shape[0] + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)
