"""The batched Cholesky kernel's block algorithm (csrc/cuda/cholesky_blocked.cuh) run on the CPU,
with the emulator's bounds and race checks on every shared-memory access (see tests/emulation.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from emulation import LINE, spd

from spngd_ext.ops import torch_path


def _run(exe: Path, *args: str) -> dict:
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    m = LINE.search(done.stdout)
    assert m, done.stdout
    keys = ("info", "threads", "races", "out_of_bounds", "barrier_mismatch")
    return dict(zip(keys, map(int, m.groups()))) | {"stderr": done.stderr}


def _invert(exe: Path, tmp_path: Path, a: torch.Tensor, damping: float, threads: int = 0) -> tuple[dict, torch.Tensor]:
    n = a.shape[0]
    tag = {torch.float32: "f32", torch.float64: "f64"}[a.dtype]
    (tmp_path / "in.bin").write_bytes(
        torch.cat([a.reshape(-1), torch.tensor([damping], dtype=a.dtype)]).numpy().tobytes()
    )
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
def test_block_inverse_matches_float64_reference(cholesky_emulator, tmp_path, n, dtype, threads):
    m = spd(n, seed=1000 + n, dtype=dtype)
    damping = 0.03
    a = m.clone()
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    a[upper] = float("nan")  # the kernel reads only the lower triangle
    res, out = _invert(cholesky_emulator, tmp_path, a, damping, threads)
    _clean(res)
    assert res["info"] == 0
    assert torch.isfinite(out).all(), "an output element was never written (it is still NaN)"
    assert torch.equal(out, out.T), "the two triangles must be written with the same values"
    lower = torch.tril(m.to(torch.float64))
    sym = lower + torch.tril(lower, -1).T
    expected, info = torch_path.cholesky_inverse_damped(
        sym[None], torch.tensor([float(torch.tensor(damping, dtype=dtype))], dtype=torch.float64)
    )
    assert int(info[0]) == 0
    rel = float(torch.linalg.norm(out.double() - expected[0]) / torch.linalg.norm(expected[0]))
    assert rel < (2e-6 if dtype == torch.float32 else 1e-13), rel


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("fault", ["negative definite", "nan below the diagonal", "inf on the last pivot"])
def test_block_inverse_flags_the_failed_pivot(cholesky_emulator, tmp_path, n, fault):
    a = spd(n, seed=n, dtype=torch.float32)
    if fault == "negative definite":
        a = -torch.eye(n)
        expected = 1  # the first pivot, -1 + damping, is not positive
    elif fault == "nan below the diagonal":
        a[n // 2, 0] = float("nan")  # (0, 0) itself when n == 1
        expected = n // 2 + 1  # NaN enters S(n/2, n/2) through the update from column 0
    else:
        a[n - 1, n - 1] = float("inf")
        expected = n
    res, _ = _invert(cholesky_emulator, tmp_path, a, 0.5)
    _clean(res)
    assert res["info"] == expected


@pytest.mark.parametrize(
    "broken, check", [("race", "races"), ("oob", "out_of_bounds"), ("barrier", "barrier_mismatch")]
)
def test_emulator_checks_fire_on_a_broken_block(cholesky_emulator, broken, check):
    res = _run(cholesky_emulator, "selftest", broken)
    assert res[check] > 0, f"the {check} check did not fire on the {broken!r} self-test"
