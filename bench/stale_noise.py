"""How much of a statistic's change between refreshes is sampling noise: r, ν and d per statistic.

    python bench/stale_noise.py [--batch-size 4096] [--steps 6] [--lr 0.01] [--threads 2]

SP-NGD (every statistic refreshed at every step, ``StalePolicy(rule="noise", max_interval=1)``)
trains the main job's CNN on consecutive Fashion-MNIST batches; at every refresh after the first
the script prints, per statistic, the paper's relative change r = ‖X − Ê‖/‖Ê‖, the relative
sampling noise ν of X measured from the two halves of the batch, and the drift
d = √max(0, r² − 2ν²) that the noise-aware rule compares with its threshold
(docs/design.md, "Telling change from sampling noise"). With ``--lr 0`` the weights stay fixed
and each statistic changes only by sampling noise (new batch, new sampled labels): then r ≈ √2·ν.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from spngd_ext import SPNGD, StalePolicy  # noqa: E402
from spngd_ext.state.estimates import Estimates  # noqa: E402
from spngd_ext.train.data import load_dataset  # noqa: E402
from spngd_ext.train.models import build_model  # noqa: E402


def change_and_noise(est: Estimates) -> tuple[list[float], list[float]]:
    """r and ν of every owned statistic, from the collected sums and the current estimates."""
    buf = est.buffers
    seg_id, weight, count_pos, slots = est._change_index()
    base = buf.chunk_base
    collected = buf.acc[base : base + buf.chunk_numel]
    rows = collected[count_pos]
    per_row = torch.cat([1.0 / rows, rows.new_ones(1)])[seg_id]
    bins = slots.numel() + 1

    def binned(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(bins, dtype=buf.dtype).index_add_(0, seg_id, weight * v)

    norm = binned(buf.est**2)
    r = (binned((collected * per_row - buf.est) ** 2) / norm).sqrt()[:-1]
    assert buf.half is not None
    nu = (binned(((2.0 * buf.half[base : base + buf.chunk_numel] - collected) * per_row) ** 2) / norm).sqrt()[:-1]
    return r.tolist(), nu.tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=os.environ.get("SPNGD_DATA_DIR"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.batch_size
    data = load_dataset(args.data_dir, limit_train=n * args.steps, limit_test=1, download=False)
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10)
    opt = SPNGD(
        model,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
        damping=1e-3,
        seed=0,
        stale=StalePolicy(threshold=0.1, max_interval=1, rule="noise"),
    )
    est = opt._state.estimates
    measured: list[tuple[list[float], list[float]]] = []
    write = est._write_changes

    def spy() -> None:
        measured.append(change_and_noise(est))
        write()

    est._write_changes = spy  # type: ignore[method-assign]
    names = [f"{opt.layers[i].name}.{s}" for i, s in opt._state.accumulation.stat_ids]
    for step in range(args.steps):
        x, y = data.train_x[step * n : (step + 1) * n], data.train_y[step * n : (step + 1) * n]
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for step, (r, nu) in enumerate(measured[1:], start=1):
        cells = [f"{a:.3f} / {b:.3f} / {math.sqrt(max(0.0, a * a - 2 * b * b)):.3f}" for a, b in zip(r, nu)]
        print(f"| {step} | " + " | ".join(cells) + " |")
    print(f"\nr / ν / d per statistic; batch {n}, lr {args.lr}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
