"""pack_upper / unpack_upper (csrc/cuda/pack_kernels.cuh) run on the CPU: the kernels and their launch
tables in every storage dtype, under ThreadSanitizer (see tests/emulation.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from emulation import DTYPES, run_checked

from spngd_ext.ops import torch_path

PACK_LINE = re.compile(r"launches=(\d+) barrier_mismatch=(\d+)")


def _pack_run(exe: Path, *args: str) -> int:
    done = run_checked(exe, *args)
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
    ([3, 0, 5, 0], ["f32", "f16", "f32", "bf16"], "rrcr", "f32"),  # empty matrices are skipped
]


@pytest.mark.parametrize(
    "sizes, dtypes, layouts, out", PACK, ids=[f"{len(p[0])}mats-{p[3]}-{i}" for i, p in enumerate(PACK)]
)
def test_pack_upper_matches_reference(pack_emulator, tmp_path, sizes, dtypes, layouts, out):
    exe, _ = pack_emulator
    gen = torch.Generator().manual_seed(len(sizes))
    mats = [torch.randn(n, n, generator=gen, dtype=torch.float64) for n in sizes]
    (tmp_path / "in.bin").write_bytes(torch.cat([m.reshape(-1) for m in mats]).numpy().tobytes())
    specs = [f"{n}:{d}:{lay}" for n, d, lay in zip(sizes, dtypes, layouts)]
    launches = _pack_run(exe, "pack", out, str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), *specs)
    assert launches == (2 if len(sizes) > 256 else 1)
    got = _doubles(tmp_path / "out.bin")
    expected = torch_path.pack_upper([m.to(DTYPES[d]) for m, d in zip(mats, dtypes)], dtype=DTYPES[out]).double()
    assert not torch.isnan(got).any(), "a packed entry was not written"
    assert torch.equal(got, expected), float((got - expected).abs().max())


UNPACK = [
    ([1, 2, 5, 33], "f32", "f32", 0),
    ([7, 40, 3], "bf16", "f32", 5),
    ([33, 64, 65], "f32", "bf16", 0),
    ([9, 1], "f16", "f64", 3),
    ([31], "f64", "f16", 0),
    ([2] * 130 + [3] * 130, "f32", "f32", 1),
    ([0, 4, 0, 7], "f32", "f32", 2),
]


@pytest.mark.parametrize(
    "sizes, src, out, offset", UNPACK, ids=[f"{len(u[0])}mats-{u[1]}-{u[2]}-off{u[3]}" for u in UNPACK]
)
def test_unpack_upper_matches_reference(pack_emulator, tmp_path, sizes, src, out, offset):
    exe, _ = pack_emulator
    gen = torch.Generator().manual_seed(len(sizes) + offset)
    total = offset + sum(n * (n + 1) // 2 for n in sizes)
    buffer = torch.randn(total, generator=gen, dtype=torch.float64).to(DTYPES[src])  # values the source dtype holds
    scale = torch.rand(len(sizes), generator=gen) + 0.5
    (tmp_path / "in.bin").write_bytes(buffer.double().numpy().tobytes())
    (tmp_path / "scale.bin").write_bytes(scale.numpy().tobytes())
    launches = _pack_run(
        exe,
        "unpack",
        src,
        out,
        str(offset),
        str(tmp_path / "in.bin"),
        str(tmp_path / "scale.bin"),
        str(tmp_path / "out.bin"),
        *map(str, sizes),
    )
    assert launches == (2 if len(sizes) > 256 else 1)
    got = _doubles(tmp_path / "out.bin")
    expected = torch_path.unpack_upper(buffer.double(), sizes, scale.double(), torch.float64, offset)
    pos = 0
    for n, e in zip(sizes, expected):
        g = got[pos : pos + n * n].view(n, n)
        pos += n * n
        assert not torch.isnan(g).any(), f"an element of the {n}x{n} output was not written"
        assert torch.equal(g, g.T)
        # the kernel scales in fp32 (fp64 when either side is) and rounds once to the output dtype
        eps = torch.finfo(DTYPES[out]).eps if out != "f64" else torch.finfo(torch.float32).eps
        torch.testing.assert_close(g, e, rtol=eps, atol=0.0)
