"""The BatchNorm kernels (csrc/cuda/batchnorm_kernels.cuh) run on the CPU: warp shuffles, the batch
split and the cross-block ticket, under ThreadSanitizer (see tests/emulation.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from emulation import DTYPES, run_checked

from spngd_ext.ops import torch_path

BN_LINE = re.compile(r"sub=(\d+) blocks_per_channel=(\d+) barrier_mismatch=(\d+)")


def _bn_run(exe: Path, *args: str) -> dict:
    done = run_checked(exe, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    m = BN_LINE.search(done.stdout)
    assert m, done.stdout
    res = dict(zip(("sub", "blocks_per_channel", "barrier_mismatch"), map(int, m.groups())))
    assert res["barrier_mismatch"] == 0, res
    return res


def _floats(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32)


# (N, C, HW, sms, decay): 1x1 planes, planes shorter than a warp (sub 4, 2), the unrolled loop's
# tail, large planes, and batch splits across blocks (ticket and workspace), decay 0 over NaN state.
BN = [
    (1, 1, 1, 4, 0.9, "f32"),
    (2, 3, 5, 4, 0.9, "f32"),
    (3, 2, 4, 4, 0.0, "f32"),
    (5, 3, 1000, 4, 0.5, "f32"),
    (40, 2, 33, 4, 0.9, "f32"),
    (300, 1, 3, 8, 0.0, "f32"),
    (64, 16, 49, 4, 0.95, "f32"),
    (9, 5, 130, 132, 0.9, "f32"),
    (40, 2, 33, 4, 0.9, "f16"),
    (7, 3, 50, 4, 0.0, "bf16"),
]


@pytest.mark.parametrize(
    "n, c, hw, sms, decay, dtype", BN, ids=[f"N{n}-C{c}-HW{hw}-sm{s}-decay{d}-{t}" for n, c, hw, s, d, t in BN]
)
def test_bn_fisher_matches_float64_reference(bn_emulator, tmp_path, n, c, hw, sms, decay, dtype):
    exe, _ = bn_emulator
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + hw)
    # values the storage dtype holds exactly, so the reference sees what the kernel reads
    g = torch.randn(n, c, hw, generator=gen).to(DTYPES[dtype]).float()
    xh = torch.randn(n, c, hw, generator=gen).to(DTYPES[dtype]).float()
    state = torch.full((c, 3), float("nan")) if decay == 0.0 else torch.randn(c, 3, generator=gen)
    for name, t in (("g", g), ("xh", xh), ("state", state)):
        (tmp_path / f"{name}.bin").write_bytes(t.contiguous().numpy().tobytes())
    res = _bn_run(
        exe,
        "fisher",
        dtype,
        str(n),
        str(c),
        str(hw),
        "0.5",
        str(decay),
        str(sms),
        str(tmp_path / "g.bin"),
        str(tmp_path / "xh.bin"),
        str(tmp_path / "state.bin"),
        str(tmp_path / "out.bin"),
    )
    expected = torch_path.bn_unitwise_fisher(state.double().nan_to_num(), g.double(), xh.double(), 0.5, decay)
    got = _floats(tmp_path / "out.bin").reshape(c, 3)
    assert torch.isfinite(got).all()
    err = float((got.double() - expected).abs().max() / expected.abs().max())
    assert err < 2e-6, err
    if (n, hw) == (40, 33) or n == 300:
        assert res["blocks_per_channel"] > 1, "this case is meant to split the batch across blocks"


def test_bn_solve_matches_float64_reference(bn_emulator, tmp_path):
    exe, _ = bn_emulator
    c = 300  # two blocks of 256 threads
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(c, 2, 5, generator=gen, dtype=torch.float64)
    full = u @ u.transpose(1, 2)  # PSD 2x2 blocks
    fisher = torch.stack([full[:, 0, 0], full[:, 0, 1], full[:, 1, 1]], dim=1).float()
    fisher[3] = torch.tensor([-5.0, 0.0, 1.0])  # damped block not positive definite
    fisher[4] = torch.tensor([float("nan"), 0.0, 1.0])
    fisher[5] = torch.tensor([1.0, 1.0, 1.0])  # singular before damping
    gg, gb = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    for name, t in (("f", fisher), ("gg", gg), ("gb", gb)):
        (tmp_path / f"{name}.bin").write_bytes(t.contiguous().numpy().tobytes())
    _bn_run(
        exe,
        "solve",
        str(c),
        "0.001",
        str(tmp_path / "f.bin"),
        str(tmp_path / "gg.bin"),
        str(tmp_path / "gb.bin"),
        str(tmp_path / "out.bin"),
    )
    got = _floats(tmp_path / "out.bin").reshape(2, c)
    eg, eb = torch_path.bn_unitwise_solve(
        fisher.double(), gg.double(), gb.double(), float(torch.tensor(0.001, dtype=torch.float32))
    )
    assert torch.isfinite(got).all()
    assert torch.equal(got[0, 3:5], gg[3:5]) and torch.equal(got[1, 3:5], gb[3:5]), "fallback to the plain gradient"
    well = torch.ones(c, dtype=torch.bool)
    well[5] = False  # condition number ~1e3 after damping: fp32 loses ~3 digits there
    for out, exp in ((got[0], eg), (got[1], eb)):
        torch.testing.assert_close(out[well].double(), exp[well], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(out[5].double(), exp[5], rtol=1e-3, atol=0.0)


def test_emulator_reports_a_shuffle_only_some_lanes_make(bn_emulator):
    exe, _ = bn_emulator
    done = run_checked(exe, "selftest-shuffle", deadlock_s=2)
    assert done.returncode == 3 and "deadlock" in done.stderr, (done.returncode, done.stderr[-2000:])
