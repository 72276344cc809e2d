"""bench/unitwise_sums.py: its candidates compute the same sums, and a tiny run writes its table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "unitwise_sums.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_unitwise_sums", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_candidates_agree() -> None:
    """The timed forms are the same computation: equal row sums, equal BatchNorm statistics."""
    bench = _load_bench()
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 7) * 2.0 + 0.5
    g = torch.randn(3, 5, 7, 7)
    fns = bench._candidates(x, g)
    gemv, product, fused = fns["gemv"](), fns["product_sum"](), fns["fused"]()
    want_dot, want_sum = (g * x).sum((2, 3)).reshape(-1), g.sum((2, 3)).reshape(-1)
    for name, (dot, total) in {"gemv": gemv, "product_sum": product, "fused": fused}.items():
        torch.testing.assert_close(dot.reshape(-1), want_dot, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(total.reshape(-1), want_sum, rtol=1e-5, atol=1e-4, msg=name)
    via_xhat = fns["bn_from_xhat"]().clone()
    torch.testing.assert_close(fns["bn_from_input"](), via_xhat, rtol=1e-4, atol=1e-4)


def test_tiny_run_writes_every_row(tmp_path, capsys) -> None:
    out = tmp_path / "sums.json"
    result = _load_bench().main(
        [
            "--batch-sizes",
            "2,3",
            "--shapes",
            "3x5,2x1",
            "--rounds",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--threads",
            str(torch.get_num_threads()),
        ]  # keep this process's thread count
    )
    assert json.loads(out.read_text()) == result
    assert [(r["batch"], r["channels"], r["size"]) for r in result["rows"]] == [
        (2, 3, 5),
        (2, 2, 1),
        (3, 3, 5),
        (3, 2, 1),
    ]
    for row in result["rows"]:
        assert set(row["ms"]) == {"gemv", "product_sum", "fused", "bn_from_xhat", "bn_from_input"}
        assert all(math.isfinite(v) and v > 0 for v in row["ms"].values())
    assert "| 3×2×1×1 |" in capsys.readouterr().out
