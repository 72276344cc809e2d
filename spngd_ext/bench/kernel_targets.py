"""The kernel microbenchmarks' performance targets, checked against the measured rows.

Each target is met when every row it selects meets it ("no rows" when none was measured); the
Cholesky kernel/ATen crossover is reported, not judged.
"""

from __future__ import annotations

import torch

__all__ = ["targets"]


def targets(measured: list[dict], crossover: int | None) -> list[dict]:
    """Each performance target with whether the measured rows meet it (None: reported, not judged).

    Args:
        measured: the benchmark rows (:func:`spngd_ext.bench.kernels.run_kernel_bench` collects them).
        crossover: the largest n at which the Cholesky kernel beat ATen (batch 16).
    """

    def rows(op, pred=lambda r: True):
        return [r for r in measured if r["op"] == op and pred(r)]

    out = []

    def target(name, sel, ok, detail):
        met = bool(sel) and all(ok(r) for r in sel)
        out.append({"target": name, "met": met, "detail": detail(sel) if sel else "no rows"})

    packs = rows("pack_upper") + rows("unpack_upper")
    target(
        "pack/unpack >= 85% of copy bandwidth",
        packs,
        lambda r: r["pct_copy"] >= 85,
        lambda s: "min {:.0f}%".format(min(r["pct_copy"] for r in s)),
    )
    facs = rows("accumulate_factor", lambda r: r["d"] >= 512)
    target(
        "factor accumulation >= 1.5x torch (d >= 512)",
        facs,
        lambda r: r["speedup"] >= 1.5,
        lambda s: "min {:.2f}x".format(min(r["speedup"] for r in s)),
    )
    convs = rows("conv_a_factor")
    target(
        "conv A-factor extra memory <= unfold/(kh*kw)",
        convs,
        lambda r: r["extra_MB_ours"] <= r["extra_MB_unfold"] / r["kk"],
        lambda s: "max ratio {:.4f}".format(max(r["extra_MB_ours"] / max(r["extra_MB_unfold"], 1e-9) for r in s)),
    )
    target(
        "conv A-factor no slower than unfold+GEMM",
        convs,
        lambda r: r["speedup"] >= 1.0,
        lambda s: "min {:.2f}x".format(min(r["speedup"] for r in s)),
    )
    chols = rows("cholesky_inverse_damped", lambda r: r["n"] <= 256 and r["batch"] >= 16)
    target(
        "Cholesky inverse n<=256, B>=16: >= 5x cholesky_ex+cholesky_inverse",
        chols,
        lambda r: r["speedup"] >= 5,
        lambda s: "min {:.2f}x".format(min(r["speedup"] for r in s)),
    )
    bns = rows("bn_unitwise_fisher") + rows("bn_unitwise_solve")
    target(
        "unit-wise BN >= 3x the PyTorch composition",
        bns,
        lambda r: r["speedup"] >= 3,
        lambda s: "min {:.2f}x".format(min(r["speedup"] for r in s)),
    )
    out.append(
        {
            "target": "Cholesky kernel/ATen crossover (B=16)",
            "met": None,
            "detail": f"kernel wins up to n={crossover} (default cholesky_kernel_max_n="
            f"{torch.ops.spngd_ext.cholesky_kernel_max_n(-1)})",
        }
    )
    return out
