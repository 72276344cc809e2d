"""The unit-wise Fisher's per-row sums on the CPU: three ways to form them, and BatchNorm's two paths.

The unit-wise Fisher (BatchNorm, GroupNorm, LayerNorm; docs/design.md) needs, per (example,
channel) row of T positions, Σ g·x and Σ g. Timed side by side in interleaved rounds (median),
on random inputs of the main job's BatchNorm shapes:

* ``gemv``: one batched GEMV per row (``torch.bmm``) for Σ g·x, and a sum for Σ g;
* ``product_sum``: ``g * x`` summed over the row, and a sum for Σ g;
* ``fused``: both in one pass of GroupNorm's backward kernel (``torch_unitwise._row_sums``, what
  the CPU path uses);

and BatchNorm's whole statistic: from x̂ (``F.batch_norm`` without affine, then
``ops.bn_unitwise_fisher`` on the PyTorch path) against from the input
(``ops.bn_unitwise_fisher_from_input``, what the optimizer runs on the CPU).

    python bench/unitwise_sums.py [--batch-sizes 64,256] [--rounds 30] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spngd_ext import ops  # noqa: E402
from spngd_ext.ops.torch_unitwise import _row_sums  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when loaded by path
from layer_cost import parse_cpu_bench, write_json  # noqa: E402

# (channels, height = width) of the main job's BatchNorm layers
SHAPES = ((16, 28), (32, 14), (64, 7))


def _candidates(x: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], object]]:
    n, c = x.shape[:2]
    rows, t = n * c, x[0, 0].numel()
    xr, gr = x.reshape(rows, t), g.reshape(rows, t)
    zero, one = x.new_zeros(rows), x.new_ones(rows)
    state = torch.zeros(c, 3)
    return {
        "gemv": lambda: (torch.bmm(gr.view(rows, 1, t), xr.view(rows, t, 1)), gr.sum(1)),
        "product_sum": lambda: ((gr * xr).sum(1), gr.sum(1)),
        "fused": lambda: _row_sums(gr, xr, zero, one),
        "bn_from_xhat": lambda: ops.bn_unitwise_fisher(
            state, g, F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5), scale=1.0, decay=0.0, backend="torch"
        ),
        "bn_from_input": lambda: ops.bn_unitwise_fisher_from_input(state, g, x, eps=1e-5, scale=1.0, decay=0.0),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shapes", default=",".join(f"{c}x{h}" for c, h in SHAPES), help="CxH list, e.g. 16x28,32x14")
    args, command = parse_cpu_bench(p, argv, "bench/unitwise_sums.py")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for c, h in shapes:
            x = torch.randn(batch, c, h, h) * 2.0 + 0.5
            g = torch.randn(batch, c, h, h)
            fns = _candidates(x, g)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.warmup + args.rounds):
                order = list(fns) if r % 2 == 0 else list(reversed(fns))
                for name in order:
                    t0 = time.perf_counter()
                    fns[name]()
                    if r >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append({"batch": batch, "channels": c, "size": h, "ms": ms})
    print(f"command: `{command}`  ")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median ms of {args.rounds} interleaved rounds\n"
    )
    print(
        "| input | gemv | product_sum | fused | gemv ÷ fused | product_sum ÷ fused | BN from x̂ | BN from input | x̂ ÷ input |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        m = row["ms"]
        print(
            f"| {row['batch']}×{row['channels']}×{row['size']}×{row['size']} | {m['gemv']:.3f} | {m['product_sum']:.3f} "
            f"| {m['fused']:.3f} | {m['gemv'] / m['fused']:.2f}× | {m['product_sum'] / m['fused']:.2f}× "
            f"| {m['bn_from_xhat']:.3f} | {m['bn_from_input']:.3f} | {m['bn_from_xhat'] / m['bn_from_input']:.2f}× |"
        )
    result = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
