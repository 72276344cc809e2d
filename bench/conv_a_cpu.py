"""Conv A factor on the pure-PyTorch path: im2col + GEMM vs shifted self-correlations.

    python bench/conv_a_cpu.py [--batch-sizes 256,1024] [--threads 1] [--repeats 5] [--out PATH]

For each conv of the main job's CNN (3x3, stride 1, padding 1: 1->16 at 28x28, 16->32 at 14x14,
32->64 at 7x7) plus two wider 28x28 inputs, times ``torch_path.conv_a_factor`` (im2col + GEMM,
the test oracle) and ``conv_gram.conv_a_factor_shifted`` (what ``ops.conv_a_factor`` runs on the
torch path for stride-1 convs) alternately on the same input, best of --repeats, and checks both
against a float64 im2col Gram. Prints the table and writes it as JSON to ``--out`` (default
``runs/conv_a/results.json`` in the checkout, which git ignores; ``--json`` is the same option).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spngd_ext.ops import torch_path  # noqa: E402
from spngd_ext.ops.conv_gram import conv_a_factor_shifted  # noqa: E402

SHAPES = [(1, 28), (16, 14), (32, 7), (4, 28), (16, 28)]  # (C_in, H=W)


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--out",
        "--json",
        dest="out",
        default=str(REPO / "runs" / "conv_a" / "results.json"),
        help="JSON output path (default: runs/conv_a/results.json in the checkout)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}\n")
    print("| batch | C_in | H=W | im2col + GEMM (ms) | shifted (ms) | speedup | rel. err im2col | rel. err shifted |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for c, hw in SHAPES:
            x = torch.randn(batch, c, hw, hw)
            d = c * 9
            geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
            s_ref = torch.zeros(torch_path.packed_size(d))
            s_new = torch.zeros(torch_path.packed_size(d))
            exact = torch_path.conv_a_factor(
                torch.zeros(torch_path.packed_size(d), dtype=torch.float64), x.double(), *geometry, False, 1.0, 0.0
            )
            t_ref = t_new = float("inf")
            for _ in range(2):  # alternate, so drift on a shared machine hits both
                t_ref = min(
                    t_ref,
                    _best_ms(lambda: torch_path.conv_a_factor(s_ref, x, *geometry, False, 1.0, 0.0), args.repeats),
                )
                t_new = min(
                    t_new,
                    _best_ms(lambda: conv_a_factor_shifted(s_new, x, (3, 3), (1, 1), False, 1.0, 0.0), args.repeats),
                )
            err_ref = float((s_ref.double() - exact).norm() / exact.norm())
            err_new = float((s_new.double() - exact).norm() / exact.norm())
            rows.append(
                dict(
                    batch=batch,
                    c_in=c,
                    hw=hw,
                    im2col_ms=t_ref,
                    shifted_ms=t_new,
                    speedup=t_ref / t_new,
                    rel_err_im2col=err_ref,
                    rel_err_shifted=err_new,
                )
            )
            print(
                f"| {batch} | {c} | {hw} | {t_ref:.1f} | {t_new:.1f} | {t_ref / t_new:.1f}x | {err_ref:.1e} | {err_new:.1e} |"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(torch=torch.__version__, threads=args.threads, rows=rows), indent=1))


if __name__ == "__main__":
    main()
