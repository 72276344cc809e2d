"""CUDA kernel code run on the CPU (no GPU needed), compiled unchanged with g++.

``tests/cuda_emulation/block_emulator.h`` stands in for the CUDA runtime: one std::thread per CUDA
thread, a real barrier for ``__syncthreads``, blocks of a grid one after another.

* The Cholesky kernel's block algorithm (``csrc/cuda/cholesky_blocked.cuh``, phases A, B, C of
  ``cholesky_inverse_damped``) runs with a shared-memory pointer type that flags out-of-bounds
  accesses and unsynchronised conflicting accesses between threads.
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
(outputs, workspaces and shared memory start as NaN) and that the checks stayed silent; self-tests
show each check fires on a deliberately broken block.

What this does not cover: implicit warp lockstep and the real memory model (blocks run one after
another, so the ticket's fences are not exercised), the launch limits (grid size, shared-memory
opt-in), half-precision inputs of the SYRK and BatchNorm kernels, and speed. Those need the GPU tests
in tests/test_ops_cuda.py.
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
SYRK_HARNESS = ROOT / "tests" / "cuda_emulation" / "syrk_grid.cpp"
BN_HARNESS = ROOT / "tests" / "cuda_emulation" / "bn_grid.cpp"
PACK_HARNESS = ROOT / "tests" / "cuda_emulation" / "pack_grid.cpp"
LINE = re.compile(r"info=(-?\d+) threads=(\d+) races=(\d+) out_of_bounds=(\d+) barrier_mismatch=(\d+)")


def _build(source: Path, exe: Path, *flags: str) -> subprocess.CompletedProcess:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx}) to build the emulation")
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type", *flags,
           f"-I{ROOT / 'csrc'}", f"-I{source.parent}", str(source), "-o", str(exe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("emu") / "cholesky_block"
    done = _build(HARNESS, exe)
    assert done.returncode == 0, f"building the emulation failed:\n{done.stderr[-4000:]}"
    return exe


def _build_with_tsan(source: Path, exe: Path, *flags: str) -> tuple[Path, bool]:
    """(executable, built with ThreadSanitizer). Without libtsan the kernels still run, unchecked
    for races, and test_emulation_has_threadsanitizer says so."""
    done = _build(source, exe, *flags, "-g", "-fsanitize=thread")
    if done.returncode == 0:
        return exe, True
    plain = _build(source, exe, *flags)
    assert plain.returncode == 0, f"building the emulation failed:\n{plain.stderr[-4000:]}"
    return exe, False


@pytest.fixture(scope="module")
def syrk_emulator(tmp_path_factory) -> tuple[Path, bool]:
    return _build_with_tsan(SYRK_HARNESS, tmp_path_factory.mktemp("emu") / "syrk_grid")


@pytest.fixture(scope="module")
def bn_emulator(tmp_path_factory) -> tuple[Path, bool]:
    return _build_with_tsan(BN_HARNESS, tmp_path_factory.mktemp("emu") / "bn_grid")


@pytest.fixture(scope="module")
def pack_emulator(tmp_path_factory) -> tuple[Path, bool]:
    from torch.utils.cpp_extension import include_paths

    return _build_with_tsan(PACK_HARNESS, tmp_path_factory.mktemp("emu") / "pack_grid", *(f"-I{p}" for p in include_paths()))


def _run_checked(exe: Path, *args: str, deadlock_s: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="exitcode=66 halt_on_error=0 report_signal_unsafe=0",
               SPNGD_EMU_DEADLOCK_SECONDS=str(deadlock_s))
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-6000:]
    return done


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


# ------------------------------------------------------------------------------------------ SYRK

SYRK_LINE = re.compile(r"large=(\d) tiles=(\d+) splits=(\d+) rows_per_split=(\d+) barrier_mismatch=(\d+)")


def _syrk(exe: Path, tmp_path: Path, mode: str, storage: torch.Tensor, state: torch.Tensor, **keys) -> tuple[dict, torch.Tensor]:
    (tmp_path / "x.bin").write_bytes(storage.contiguous().numpy().tobytes())
    (tmp_path / "state.bin").write_bytes(state.numpy().tobytes())
    args = [f"{k}={v}" for k, v in keys.items()]
    args += [f"x={tmp_path / 'x.bin'}", f"state={tmp_path / 'state.bin'}", f"out={tmp_path / 'out.bin'}"]
    done = _run_checked(exe, mode, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    m = SYRK_LINE.search(done.stdout)
    assert m, done.stdout
    plan = dict(zip(("large", "tiles", "splits", "rows_per_split", "barrier_mismatch"), map(int, m.groups())))
    assert plan["barrier_mismatch"] == 0
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
    return plan, out


def _state(d: int, seed: int, nan: bool) -> torch.Tensor:
    n = d * (d + 1) // 2
    if nan:  # decay 0 must overwrite the state without reading it
        return torch.full((n,), float("nan"))
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(got).all(), "a packed entry was not written (NaN left)"
    err = float((got.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert err < 2e-6, err


# (rows, cols, sms, transposed x, decay): one tile, tile edges (64, 65), 0 and 1 rows, row splits
# (few tiles for the SM count), a partial last stage, the 128-wide tiles (cols >= 512), decay 0.
DENSE = [(7, 5, 4, False, 0.9), (0, 3, 4, False, 0.9), (1, 1, 4, False, 0.9), (131, 64, 4, False, 0.9),
         (300, 65, 4, False, 0.0), (1000, 130, 8, True, 0.95), (29, 33, 132, True, 0.0), (200, 513, 1, False, 0.9),
         (257, 520, 16, True, 0.0)]


@pytest.mark.parametrize("rows, cols, sms, transposed, decay", DENSE,
                         ids=[f"r{r}-c{c}-sm{s}{'-T' if t else ''}-decay{d}" for r, c, s, t, d in DENSE])
def test_syrk_accumulate_factor_matches_float64_reference(syrk_emulator, tmp_path, rows, cols, sms, transposed, decay):
    exe, _ = syrk_emulator
    g = torch.Generator().manual_seed(rows * 131 + cols)
    x = torch.randn(rows, cols, generator=g)
    state = _state(cols, rows + cols, nan=decay == 0.0)
    storage, s0, s1 = (x.T.contiguous(), 1, rows) if transposed else (x, cols, 1)
    plan, got = _syrk(exe, tmp_path, "dense", storage, state, rows=rows, cols=cols, s0=s0, s1=s1, scale=0.5,
                      decay=decay, sms=sms, max_ws=rows * cols)
    assert plan["large"] == (cols >= 512)
    expected = reference.accumulate_factor(state.double().nan_to_num(), x.double(), 0.5, decay)
    _close(got, expected)


def test_syrk_plan_splits_rows_when_tiles_are_few(syrk_emulator, tmp_path):
    """The split path (workspace + reduction kernel) must really run in the cases above."""
    exe, _ = syrk_emulator
    x = torch.randn(1000, 130)
    plan, _ = _syrk(exe, tmp_path, "dense", x, _state(130, 0, False), rows=1000, cols=130, s0=130, s1=1, scale=1.0,
                    decay=0.5, sms=8, max_ws=1000 * 130)
    assert plan["splits"] > 1 and plan["rows_per_split"] % 8 == 0


# (n, c, h, w, kernel, stride, padding, dilation, bias, channels_last)
CONV = [(2, 3, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), False, False),
        (2, 3, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), True, True),
        (1, 5, 7, 6, (2, 3), (1, 2), (0, 1), (2, 1), True, False),
        (3, 4, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), False, True),
        (1, 3, 20, 20, (7, 7), (2, 2), (3, 3), (1, 1), False, False),
        (1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), True, False)]


@pytest.mark.parametrize("n, c, h, w, kernel, stride, padding, dilation, bias, channels_last", CONV,
                         ids=[f"{n}x{c}x{h}x{w}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}"
                              f"{'-bias' if b else ''}{'-cl' if cl else ''}" for n, c, h, w, k, s, p, d, b, cl in CONV])
def test_syrk_conv_a_factor_matches_float64_reference(syrk_emulator, tmp_path, n, c, h, w, kernel, stride, padding,
                                                      dilation, bias, channels_last):
    exe, _ = syrk_emulator
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n * c * h * w))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    d = c * kernel[0] * kernel[1] + int(bias)
    state = _state(d, d, nan=False)
    # the kernel reads x through its strides: pass the storage in memory order
    storage = x.permute(0, 2, 3, 1).contiguous() if channels_last else x.contiguous()
    sn, sc, sh, sw = x.stride()
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    _, got = _syrk(exe, tmp_path, "conv", storage, state, n=n, c=c, h=h, w=w, sn=sn, sc=sc, sh=sh, sw=sw,
                   kh=kernel[0], kw=kernel[1], sth=stride[0], stw=stride[1], ph=padding[0], pw=padding[1],
                   dh=dilation[0], dw=dilation[1], bias=int(bias), scale=0.25, decay=0.8, sms=4,
                   max_ws=n * oh * ow * c // 2)  # factor.cu's workspace cap for conv
    expected = reference.conv_a_factor(state.double(), x.double(), kernel, stride, padding, dilation, bias, 0.25, 0.8)
    _close(got, expected)


# ------------------------------------------------------------------------------------- BatchNorm

BN_LINE = re.compile(r"sub=(\d+) blocks_per_channel=(\d+) barrier_mismatch=(\d+) shuffle_mismatch=(\d+)")


def _bn_run(exe: Path, *args: str) -> dict:
    done = _run_checked(exe, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    m = BN_LINE.search(done.stdout)
    assert m, done.stdout
    res = dict(zip(("sub", "blocks_per_channel", "barrier_mismatch", "shuffle_mismatch"), map(int, m.groups())))
    assert res["barrier_mismatch"] == 0 and res["shuffle_mismatch"] == 0, res
    return res


def _floats(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32)


# (N, C, HW, sms, decay): 1x1 planes, planes shorter than a warp (sub 4, 2), the unrolled loop's
# tail, large planes, and batch splits across blocks (ticket and workspace), decay 0 over NaN state.
BN = [(1, 1, 1, 4, 0.9), (2, 3, 5, 4, 0.9), (3, 2, 4, 4, 0.0), (5, 3, 1000, 4, 0.5), (40, 2, 33, 4, 0.9),
      (300, 1, 3, 8, 0.0), (64, 16, 49, 4, 0.95), (9, 5, 130, 132, 0.9)]


@pytest.mark.parametrize("n, c, hw, sms, decay", BN, ids=[f"N{n}-C{c}-HW{hw}-sm{s}-decay{d}" for n, c, hw, s, d in BN])
def test_bn_fisher_matches_float64_reference(bn_emulator, tmp_path, n, c, hw, sms, decay):
    exe, _ = bn_emulator
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + hw)
    g, xh = torch.randn(n, c, hw, generator=gen), torch.randn(n, c, hw, generator=gen)
    state = torch.full((c, 3), float("nan")) if decay == 0.0 else torch.randn(c, 3, generator=gen)
    for name, t in (("g", g), ("xh", xh), ("state", state)):
        (tmp_path / f"{name}.bin").write_bytes(t.contiguous().numpy().tobytes())
    res = _bn_run(exe, "fisher", str(n), str(c), str(hw), "0.5", str(decay), str(sms), str(tmp_path / "g.bin"),
                  str(tmp_path / "xh.bin"), str(tmp_path / "state.bin"), str(tmp_path / "out.bin"))
    expected = reference.bn_unitwise_fisher(state.double().nan_to_num(), g.double(), xh.double(), 0.5, decay)
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
    _bn_run(exe, "solve", str(c), "0.001", str(tmp_path / "f.bin"), str(tmp_path / "gg.bin"), str(tmp_path / "gb.bin"),
            str(tmp_path / "out.bin"))
    got = _floats(tmp_path / "out.bin").reshape(2, c)
    eg, eb = reference.bn_unitwise_solve(fisher.double(), gg.double(), gb.double(), float(torch.tensor(0.001, dtype=torch.float32)))
    assert torch.isfinite(got).all()
    assert torch.equal(got[0, 3:5], gg[3:5]) and torch.equal(got[1, 3:5], gb[3:5]), "fallback to the plain gradient"
    well = torch.ones(c, dtype=torch.bool)
    well[5] = False  # condition number ~1e3 after damping: fp32 loses ~3 digits there
    for out, exp in ((got[0], eg), (got[1], eb)):
        torch.testing.assert_close(out[well].double(), exp[well], rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(out[5].double(), exp[5], rtol=1e-3, atol=0.0)


def test_emulator_reports_a_shuffle_only_some_lanes_make(bn_emulator):
    exe, _ = bn_emulator
    done = _run_checked(exe, "selftest-shuffle", deadlock_s=2)
    assert done.returncode == 3 and "deadlock" in done.stderr, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("which", ["syrk", "bn", "pack"])
def test_emulation_has_threadsanitizer(request, which):
    _, tsan = request.getfixturevalue(f"{which}_emulator")
    if not tsan:
        pytest.skip(f"g++ -fsanitize=thread is unavailable (libtsan missing): the {which} cases ran without the race check")


# ------------------------------------------------------------------------------------ pack / unpack

PACK_LINE = re.compile(r"launches=(\d+) barrier_mismatch=(\d+)")
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _pack_run(exe: Path, *args: str) -> int:
    done = _run_checked(exe, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    m = PACK_LINE.search(done.stdout)
    assert m and int(m.group(2)) == 0, done.stdout
    return int(m.group(1))


def _doubles(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float64)


# (sizes, source dtypes, layouts, out dtype): 1x1 and odd sizes, all four dtypes mixed in one
# launch with casts both ways, column-major and strided sources, and 300 matrices (two launches).
PACK = [
    ([1, 2, 5, 33], ["f32"] * 4, "rrrr", "f32"),
    ([7, 1, 40, 3], ["f32", "f64", "f16", "bf16"], "rcsr", "bf16"),
    ([17, 9], ["bf16", "f16"], "cs", "f64"),
    ([65, 4], ["f64", "f32"], "sr", "f16"),
    ([2] * 150 + [3] * 150, ["f32"] * 300, "r" * 300, "f32"),
]


@pytest.mark.parametrize("sizes, dtypes, layouts, out", PACK, ids=[f"{len(p[0])}mats-{p[3]}-{i}" for i, p in enumerate(PACK)])
def test_pack_upper_matches_reference(pack_emulator, tmp_path, sizes, dtypes, layouts, out):
    exe, _ = pack_emulator
    gen = torch.Generator().manual_seed(len(sizes))
    mats = [torch.randn(n, n, generator=gen, dtype=torch.float64) for n in sizes]
    (tmp_path / "in.bin").write_bytes(torch.cat([m.reshape(-1) for m in mats]).numpy().tobytes())
    specs = [f"{n}:{d}:{lay}" for n, d, lay in zip(sizes, dtypes, layouts)]
    launches = _pack_run(exe, "pack", out, str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), *specs)
    assert launches == (2 if len(sizes) > 256 else 1)
    got = _doubles(tmp_path / "out.bin")
    expected = reference.pack_upper([m.to(DTYPES[d]) for m, d in zip(mats, dtypes)], dtype=DTYPES[out]).double()
    assert not torch.isnan(got).any(), "a packed entry was not written"
    assert torch.equal(got, expected), float((got - expected).abs().max())


UNPACK = [([1, 2, 5, 33], "f32", "f32", 0), ([7, 40, 3], "bf16", "f32", 5), ([33, 64, 65], "f32", "bf16", 0),
          ([9, 1], "f16", "f64", 3), ([31], "f64", "f16", 0), ([2] * 130 + [3] * 130, "f32", "f32", 1)]


@pytest.mark.parametrize("sizes, src, out, offset", UNPACK, ids=[f"{len(u[0])}mats-{u[1]}-{u[2]}-off{u[3]}" for u in UNPACK])
def test_unpack_upper_matches_reference(pack_emulator, tmp_path, sizes, src, out, offset):
    exe, _ = pack_emulator
    gen = torch.Generator().manual_seed(len(sizes) + offset)
    total = offset + sum(n * (n + 1) // 2 for n in sizes)
    buffer = torch.randn(total, generator=gen, dtype=torch.float64).to(DTYPES[src])  # values the source dtype holds
    scale = torch.rand(len(sizes), generator=gen) + 0.5
    (tmp_path / "in.bin").write_bytes(buffer.double().numpy().tobytes())
    (tmp_path / "scale.bin").write_bytes(scale.numpy().tobytes())
    launches = _pack_run(exe, "unpack", src, out, str(offset), str(tmp_path / "in.bin"), str(tmp_path / "scale.bin"),
                         str(tmp_path / "out.bin"), *map(str, sizes))
    assert launches == (2 if len(sizes) > 256 else 1)
    got = _doubles(tmp_path / "out.bin")
    expected = reference.unpack_upper(buffer.double(), sizes, scale.double(), torch.float64, offset)
    pos = 0
    for n, e in zip(sizes, expected):
        g = got[pos:pos + n * n].view(n, n)
        pos += n * n
        assert not torch.isnan(g).any(), f"an element of the {n}x{n} output was not written"
        assert torch.equal(g, g.T)
        # the kernel scales in fp32 (fp64 when either side is) and rounds once to the output dtype
        eps = torch.finfo(DTYPES[out]).eps if out != "f64" else torch.finfo(torch.float32).eps
        torch.testing.assert_close(g, e, rtol=eps, atol=0.0)
