"""The SYRK kernel of accumulate_factor / conv_a_factor (csrc/cuda/syrk_tiles.cuh) run on the CPU:
whole launches under ThreadSanitizer against the float64 reference (see tests/emulation.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from emulation import DTYPES, run_checked

from spngd_ext.ops import torch_path

SYRK_LINE = re.compile(r"large=(\d) tiles=(\d+) splits=(\d+) rows_per_split=(\d+) barrier_mismatch=(\d+)")


def _syrk(
    exe: Path, tmp_path: Path, mode: str, storage: torch.Tensor, state: torch.Tensor, **keys
) -> tuple[dict, torch.Tensor]:
    (tmp_path / "x.bin").write_bytes(storage.contiguous().numpy().tobytes())
    (tmp_path / "state.bin").write_bytes(state.numpy().tobytes())
    args = [f"{k}={v}" for k, v in keys.items()]
    args += [f"x={tmp_path / 'x.bin'}", f"state={tmp_path / 'state.bin'}", f"out={tmp_path / 'out.bin'}"]
    done = run_checked(exe, mode, *args)
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
DENSE = [
    (7, 5, 4, False, 0.9, "f32"),
    (0, 3, 4, False, 0.9, "f32"),
    (1, 1, 4, False, 0.9, "f32"),
    (131, 64, 4, False, 0.9, "f32"),
    (300, 65, 4, False, 0.0, "f32"),
    (1000, 130, 8, True, 0.95, "f32"),
    (29, 33, 132, True, 0.0, "f32"),
    (200, 513, 1, False, 0.9, "f32"),
    (257, 520, 16, True, 0.0, "f32"),
    (300, 65, 4, True, 0.9, "bf16"),
    (70, 513, 2, False, 0.0, "f16"),
]


@pytest.mark.parametrize(
    "rows, cols, sms, transposed, decay, dtype",
    DENSE,
    ids=[f"r{r}-c{c}-sm{s}{'-T' if t else ''}-decay{d}-{dt}" for r, c, s, t, d, dt in DENSE],
)
def test_syrk_accumulate_factor_matches_float64_reference(
    syrk_emulator, tmp_path, rows, cols, sms, transposed, decay, dtype
):
    exe, _ = syrk_emulator
    g = torch.Generator().manual_seed(rows * 131 + cols)
    x = torch.randn(rows, cols, generator=g).to(DTYPES[dtype]).float()  # values the storage dtype holds
    state = _state(cols, rows + cols, nan=decay == 0.0)
    storage, s0, s1 = (x.T.contiguous(), 1, rows) if transposed else (x, cols, 1)
    plan, got = _syrk(
        exe,
        tmp_path,
        "dense",
        storage,
        state,
        rows=rows,
        cols=cols,
        s0=s0,
        s1=s1,
        scale=0.5,
        decay=decay,
        sms=sms,
        max_ws=rows * cols,
        dtype=dtype,
    )
    assert plan["large"] == (cols >= 512)
    expected = torch_path.accumulate_factor(state.double().nan_to_num(), x.double(), 0.5, decay)
    _close(got, expected)


def test_syrk_plan_splits_rows_when_tiles_are_few(syrk_emulator, tmp_path):
    """The split path (workspace + reduction kernel) must really run in the cases above."""
    exe, _ = syrk_emulator
    x = torch.randn(1000, 130)
    plan, _ = _syrk(
        exe,
        tmp_path,
        "dense",
        x,
        _state(130, 0, False),
        rows=1000,
        cols=130,
        s0=130,
        s1=1,
        scale=1.0,
        decay=0.5,
        sms=8,
        max_ws=1000 * 130,
    )
    assert plan["splits"] > 1 and plan["rows_per_split"] % 8 == 0


# (n, c, h, w, kernel, stride, padding, dilation, bias, channels_last)
CONV = [
    (2, 3, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1), False, False),
    (2, 3, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), True, True),
    (1, 5, 7, 6, (2, 3), (1, 2), (0, 1), (2, 1), True, False),
    (3, 4, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), False, True),
    (1, 3, 20, 20, (7, 7), (2, 2), (3, 3), (1, 1), False, False),
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), True, False),
]
CONV_DTYPE = {2: "bf16", 3: "f16"}  # by case index: the kernel widens half-precision inputs on load


@pytest.mark.parametrize(
    "n, c, h, w, kernel, stride, padding, dilation, bias, channels_last",
    CONV,
    ids=[
        f"{n}x{c}x{h}x{w}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}"
        f"{'-bias' if b else ''}{'-cl' if cl else ''}"
        for n, c, h, w, k, s, p, d, b, cl in CONV
    ],
)
def test_syrk_conv_a_factor_matches_float64_reference(
    syrk_emulator, tmp_path, n, c, h, w, kernel, stride, padding, dilation, bias, channels_last
):
    exe, _ = syrk_emulator
    dtype = CONV_DTYPE.get(CONV.index((n, c, h, w, kernel, stride, padding, dilation, bias, channels_last)), "f32")
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n * c * h * w)).to(DTYPES[dtype]).float()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    d = c * kernel[0] * kernel[1] + int(bias)
    state = _state(d, d, nan=False)
    # the kernel reads x through its strides: pass the storage in memory order
    storage = x.permute(0, 2, 3, 1).contiguous() if channels_last else x.contiguous()
    sn, sc, sh, sw = x.stride()
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    _, got = _syrk(
        exe,
        tmp_path,
        "conv",
        storage,
        state,
        n=n,
        c=c,
        h=h,
        w=w,
        sn=sn,
        sc=sc,
        sh=sh,
        sw=sw,
        kh=kernel[0],
        kw=kernel[1],
        sth=stride[0],
        stw=stride[1],
        ph=padding[0],
        pw=padding[1],
        dh=dilation[0],
        dw=dilation[1],
        bias=int(bias),
        scale=0.25,
        decay=0.8,
        sms=4,
        max_ws=n * oh * ow * c // 2,
        dtype=dtype,
    )  # factor.cu's workspace cap for conv
    expected = torch_path.conv_a_factor(state.double(), x.double(), kernel, stride, padding, dilation, bias, 0.25, 0.8)
    _close(got, expected)
