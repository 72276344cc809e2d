"""Kernel benchmarks: every spngd_ext CUDA op against its best pure-PyTorch composition.

    python bench/kernels.py [--quick] [--json PATH]

The benchmarks live in the package (:mod:`spngd_ext.bench.kernels`), so an installed copy runs
them too: ``python -m spngd_ext.bench`` runs them with a whole-step comparison. Shapes follow
ResNet-50 (factor sizes 147 ... 4609, BN widths 64 ... 2048, 32 examples per GPU); every row prints
both times, the speedup and the achieved GB/s or TFLOP/s; the targets are checked at the end
(met / NOT MET). Needs a GPU and the built extension.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spngd_ext.bench.kernels import run_kernel_bench  # noqa: E402
from spngd_ext.ops.extension import extension_error, extension_loaded  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--json", type=Path, help="write all rows and targets here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU")
        return 2
    if not extension_loaded():
        print(f"bench/kernels.py needs the built extension: {extension_error()}")
        return 2
    result = run_kernel_bench(quick=args.quick, log=lambda line: print(line, flush=True))
    print("\ntargets:")
    for t in result["targets"]:
        status = "   info" if t["met"] is None else ("    met" if t["met"] else "NOT MET")
        print(f"  [{status}] {t['target']}: {t['detail']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
