"""SP-NGD's curvature cost per parameter, by layer type, measured side by side in one process.

For each model (default: the main-job CNN with Linear/Conv2d/BatchNorm, ``vit`` with attention
projections and LayerNorm, ``dwcnn`` with depthwise convolutions and GroupNorm, ``pixel_embed``
with an Embedding: each pixel's value bucketed into 256 levels and looked up in an
Embedding(256, 32), averaged over the image, then a Linear head) one training step
of SP-NGD (fisher="emp", torch backend) records every curvature layer's hook inputs: the layer
input, the output gradient and the forward context. Then, in interleaved rounds (every layer of
every model once per round), each layer's two parts of an every-step refresh are re-run and timed:

* statistics: ``accumulate_forward`` + ``accumulate_backward`` on the recorded tensors (what the
  hooks do);
* inversion + preconditioning: for a Kronecker layer (Linear, Conv2d, attention projection) the
  damped Cholesky inverses of A and G and the update Ĝ⁻¹ ∇ Â⁻¹; for the others the estimates'
  unpacking (a grouped convolution all its groups at once, ``estimates_from_run``, as the
  optimizer does) and ``precondition`` (grouped convolutions and Embedding invert there,
  BatchNorm and LayerNorm/GroupNorm solve their 2×2 blocks).

Reported per model and layer kind: parameters, median µs per step of each part summed over the
kind's layers, and ns per parameter; the buffers, reductions and the optimizer step itself are
not included (they are per element and alike for every kind). As a floor for the statistics, one
read of the layer's recorded inputs (``sum`` over each call's input) is timed in the same rounds.
``--profile KIND`` then runs the statistics of that kind's layers under ``torch.profiler`` and
prints the operators by self CPU time and, per layer, its input values per parameter.

    python bench/layer_cost.py [--batch-size 64] [--rounds 30] [--models small_bn_cnn,vit,dwcnn,pixel_embed]
        [--profile grouped_conv]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spngd_ext import SPNGD, ops  # noqa: E402
from spngd_ext.layers import KroneckerLayer, LayerCurvature  # noqa: E402
from spngd_ext.train.data import load_dataset  # noqa: E402
from spngd_ext.train.models import build_model, small_bn_cnn  # noqa: E402

DAMPING = 1e-3


def parse_cpu_bench(p: argparse.ArgumentParser, argv: list[str] | None, script: str) -> tuple[argparse.Namespace, str]:
    """Add --threads, --data-dir and --json, parse, set the torch threads; (arguments, the command)."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args, " ".join(shlex.quote(a) for a in ["python", script, *(sys.argv[1:] if argv is None else argv)])


def write_json(path: str | None, result: dict) -> None:
    """``result`` as JSON at ``path`` (nothing when None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


class PixelEmbedding(torch.nn.Module):
    """Each pixel of a normalised Fashion-MNIST image bucketed into 256 levels over [-1, 2.1] (the
    normalised range), looked up in an Embedding(256, 32), averaged over the image, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("edges", torch.linspace(-1.0, 2.1, 255))
        self.embed = torch.nn.Embedding(256, 32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(torch.bucketize(x.flatten(1), self.edges)).mean(1))


def _model(name: str) -> torch.nn.Module:
    if name == "pixel_embed":
        return PixelEmbedding()
    return small_bn_cnn() if name == "small_bn_cnn" else build_model(name)


def record_layers(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """One SP-NGD step; per curvature layer its hook calls' tensors and its flat gradient."""
    opt = SPNGD(model, lr=0.0, fisher="emp", backend="torch")
    calls: dict[int, list] = defaultdict(list)
    for i, layer in enumerate(opt.layers):
        fwd, bwd = layer.accumulate_forward, layer.accumulate_backward

        def forward(inputs, stats, first, backend, _i=i, _fwd=fwd):
            context, count = _fwd(inputs, stats, first, backend)
            calls[_i].append([inputs.detach(), None, context])
            return context, count

        def backward(grad, context, stats, first, backend, _i=i, _bwd=bwd):
            for call in calls[_i]:
                if call[2] is context and call[1] is None:
                    call[1] = grad.detach()
                    break
            return _bwd(grad, context, stats, first, backend)

        layer.accumulate_forward, layer.accumulate_backward = forward, backward  # type: ignore[method-assign]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    recorded = []
    for i, layer in enumerate(opt.layers):
        del layer.accumulate_forward, layer.accumulate_backward  # the class methods again
        grad = torch.zeros(layer.grad_numel)
        layer.write_gradient(grad)
        recorded.append({"layer": layer, "calls": [c for c in calls[i] if c[1] is not None], "grad": grad})
    return recorded


def time_statistics(entry: dict, normalise: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of the hooks' work on the recorded calls; the statistics (÷ their counts when ``normalise``)."""
    layer = entry["layer"]
    # views of one buffer, back to back, as the optimizer's accumulator (an "F" statistic as (C, 3))
    specs = layer.stat_specs()
    flat, stats, pos = torch.zeros(sum(s.numel for s in specs)), {}, 0
    for s in specs:
        stats[s.name] = flat[pos : pos + s.numel].view(-1, 3) if s.name == "F" else flat[pos : pos + s.numel]
        pos += s.numel
    counts: dict[str, int] = defaultdict(int)
    t0 = time.perf_counter()
    for k, (inputs, grad, _) in enumerate(entry["calls"]):
        context, n = layer.accumulate_forward(inputs, stats, k == 0, "torch")
        for name in layer.forward_stat_names():
            counts[name] += n
        n = layer.accumulate_backward(grad, context, stats, k == 0, "torch")
        for name in layer.backward_stat_names():
            counts[name] += n
    dt = time.perf_counter() - t0
    if not normalise:
        return dt, stats
    return dt, {name: value / max(counts[name], 1) for name, value in stats.items()}


def time_update(entry: dict, stats: dict[str, torch.Tensor]) -> float:
    layer, grad = entry["layer"], entry["grad"]
    t0 = time.perf_counter()
    if isinstance(layer, KroneckerLayer):
        a = layer.estimate_from_packed("A", stats["A"], 1.0)
        g = layer.estimate_from_packed("G", stats["G"], 1.0)
        root = torch.full((1,), DAMPING**0.5)
        a_inv, _ = ops.cholesky_inverse_damped(a.unsqueeze(0), root, backend="torch")
        g_inv, _ = ops.cholesky_inverse_damped(g.unsqueeze(0), root, backend="torch")
        curvature = LayerCurvature(inverses=(a_inv[0], g_inv[0]))
        type(layer).precondition_batch([layer], [grad], [curvature], DAMPING, "torch")
    elif layer.reads_estimates_as_run:  # the statistics back to back, as in the estimate buffer
        run = torch.cat([stats[s.name].reshape(-1) for s in layer.stat_specs()])
        t0 = time.perf_counter()
        estimates = layer.estimates_from_run(run, 1.0)
        layer.precondition(grad, LayerCurvature(estimates=estimates), DAMPING, "torch")
    else:
        estimates = {name: layer.estimate_from_packed(name, value.reshape(-1), 1.0) for name, value in stats.items()}
        layer.precondition(grad, LayerCurvature(estimates=estimates), DAMPING, "torch")
    return time.perf_counter() - t0


def time_read(entry: dict) -> float:
    """One read of the layer's recorded inputs (a floor for any statistic of them)."""
    t0 = time.perf_counter()
    for inputs, _, _ in entry["calls"]:
        inputs.sum()
    return time.perf_counter() - t0


def profile_kind(entries: list[dict], kind: str) -> list[str]:
    """The statistics of ``kind``'s layers under torch.profiler: top operators, and per layer
    its input values per parameter."""
    from torch.profiler import profile

    chosen = [e for e in entries if e["layer"].kind == kind]
    with profile() as prof:
        for _ in range(3):
            for entry in chosen:
                time_statistics(entry, normalise=False)
    lines = [
        f"torch.profiler, statistics of {kind} (3 repetitions):",
        "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8),
        "```",
        "",
        "| model | layer | input shape | parameters |"
        " input values per parameter | statistics ns/param | one read of the input ns/param |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for e in chosen:
        n, shape = e["layer"].grad_numel, tuple(e["calls"][0][0].shape)
        values = sum(c[0].numel() for c in e["calls"])
        lines.append(
            f"| {e['model']} | {e['layer'].name} | {shape} | {n:,} | {values / n:,.0f} | "
            f"{1e9 * statistics.median(e['stat_s']) / n:,.0f} | {1e9 * statistics.median(e['read_s']) / n:,.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small_bn_cnn,vit,dwcnn,pixel_embed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--profile", default=None, help="a layer kind whose statistics to profile after the rounds")
    args, command = parse_cpu_bench(p, argv, "bench/layer_cost.py")
    data = load_dataset(args.data_dir, limit_train=args.batch_size, limit_test=1, download=False)
    x, y = data.train_x[: args.batch_size], data.train_y[: args.batch_size]
    entries = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        for entry in record_layers(_model(name), x, y):
            entries.append(entry | {"model": name, "stat_s": [], "update_s": [], "read_s": []})
    for r in range(args.rounds + 2):  # the first two rounds are warm-up
        for entry in entries if r % 2 == 0 else reversed(entries):
            dt_stat, stats = time_statistics(entry)
            dt_update = time_update(entry, stats)
            dt_read = time_read(entry)
            if r >= 2:
                entry["stat_s"].append(dt_stat)
                entry["update_s"].append(dt_update)
                entry["read_s"].append(dt_read)

    rows: dict[tuple[str, str], dict] = {}
    for entry in entries:
        row = rows.setdefault(
            (entry["model"], entry["layer"].kind),
            {"layers": 0, "parameters": 0, "stat_us": 0.0, "update_us": 0.0, "read_us": 0.0},
        )
        row["layers"] += 1
        row["parameters"] += entry["layer"].grad_numel
        row["stat_us"] += 1e6 * statistics.median(entry["stat_s"])
        row["update_us"] += 1e6 * statistics.median(entry["update_s"])
        row["read_us"] += 1e6 * statistics.median(entry["read_s"])
    lines = [
        f"command: `{command}`  ",
        f"batch {args.batch_size} (Fashion-MNIST), {args.rounds} interleaved rounds, {args.threads} thread(s), "
        "torch backend; median per layer, summed per kind",
        "",
        "| model | kind | layers | parameters | statistics µs | ns/param | inversion + update µs | ns/param |"
        " total ns/param | one read of the inputs ns/param |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, kind), row in rows.items():
        n = row["parameters"]
        row["stat_ns_per_param"] = 1e3 * row["stat_us"] / n
        row["update_ns_per_param"] = 1e3 * row["update_us"] / n
        row["read_ns_per_param"] = 1e3 * row["read_us"] / n
        lines.append(
            f"| {model} | {kind} | {row['layers']} | {n:,} | {row['stat_us']:.0f} | {row['stat_ns_per_param']:.0f} | "
            f"{row['update_us']:.0f} | {row['update_ns_per_param']:.0f} | "
            f"{row['stat_ns_per_param'] + row['update_ns_per_param']:.0f} | {row['read_ns_per_param']:.0f} |"
        )
    if args.profile:
        lines += [""] + profile_kind(entries, args.profile)
    print("\n".join(lines))
    result = {"command": command, "batch_size": args.batch_size, "rounds": args.rounds}
    result["rows"] = [{"model": m, "kind": k} | v for (m, k), v in rows.items()]
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
