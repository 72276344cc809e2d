"""SP-NGD on FSDP2 (``fully_shard``) models, on Gloo ranks on the CPU (spawned as in test_distributed).

* Equivalence: W ranks of FSDP2 + SPNGD on equal shards of a batch vs one process (no FSDP) on
  the concatenated batch, float64, fisher="emp", KL clipping on; the full parameters after every
  step agree within ``EQUIV_RTOL``/``EQUIV_ATOL`` (float reordering only, as in test_distributed).
  Models: the CNN with a synchronised BatchNorm (whole-batch BN, its unit-wise Fisher collected)
  of test_distributed, and a small transformer (embedding, pre-norm self-attention blocks built
  from Linear layers, LayerNorm, a position table trained first-order, mean-pooled classifier).
  Parameter sizes are chosen so that 4 ranks get uneven and empty shards.
* Bytes: each rank sends exactly its shards of the gradients other ranks own (nothing else of
  the gradients), so no rank receives the gradients of layers it does not own.
* HSDP at 4 ranks (2 replicas × 2 shards): the same equivalence; each rank sends its gradient
  shards only to the owners of its replica.
* DCP: checkpoints saved at 4 ranks (FSDP2, and HSDP 2×2) resume at 2 ranks and continue as
  the saving run does.
* Refusals at construction: a tensor-parallel 2-D mesh, a Replicate placement, a plain parameter
  next to DTensor ones; each error names the parameter and its placement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from steps import train_step
from test_distributed import BF16_REL_TOL, EQUIV_ATOL, EQUIV_RTOL, OPT_KW, make_batch, make_model, run_world
from test_train_cli import small_run_args, torchrun_train
from torch import nn

from spngd_ext import SPNGD

VOCAB, SEQ, WIDTH, CLASSES = 11, 5, 6, 5


class TinyAttention(nn.Module):
    """Causal-free multi-head self-attention from Linear layers (their Kronecker factors apply)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class TinyBlock(nn.Module):
    def __init__(self, width: int, torch_attention: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.torch_attention = torch_attention
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True) if torch_attention else TinyAttention(width, 2)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + (self.attn(h, h, h, need_weights=False)[0] if self.torch_attention else self.attn(h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, WIDTH))  # no curvature layer: first-order
        # nn.MultiheadAttention in the second block: its projections are matched by their weights,
        # which FSDP2 swaps for unsharded copies during the forward
        self.blocks = nn.ModuleList([TinyBlock(WIDTH), TinyBlock(WIDTH, torch_attention=True)])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def build(kind: str) -> nn.Module:
    if kind == "transformer":
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            torch.manual_seed(4321)
            return TinyTransformer().double().train()
        finally:
            torch.set_default_dtype(old)
    return make_model(kind)


def batch(kind: str, step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "transformer":
        g = torch.Generator().manual_seed(200 + step)
        return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return make_batch(kind, step, n)


def shard(model: nn.Module, kind: str, mesh=None, mp_policy=None) -> None:
    """fully_shard the inner blocks (each its own FSDP group), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    inner = list(model.blocks) if kind == "transformer" else [model[6]]
    for m in inner:
        fully_shard(m, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_params(model: nn.Module) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return torch.cat(
        [(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1).clone() for p in model.parameters()]
    )


def hsdp_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))


def train(kind: str, steps: int, global_batch: int, rank: int, world: int, *, fsdp: bool, hsdp: bool = False) -> dict:
    model = build(kind)
    if fsdp:
        shard(model, kind, mesh=hsdp_mesh(world) if hsdp else None)
    opt = SPNGD(model, **OPT_KW)
    part = global_batch // world
    params, nbytes = [full_params(model)], []
    for step in range(steps):
        x, y = batch(kind, step, global_batch)
        train_step(model, opt, x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part])
        params.append(full_params(model))
        nbytes.append(opt._comm.bytes_sent()["last"])
    expected_grad_bytes = 0
    if fsdp:  # this rank's shards of every segment another rank (of its replica) owns, in float64
        sharded = opt._runner.sharded
        for i, params_i in enumerate(sharded.segment_params):
            o = sharded.owners[i]
            if o != rank and sharded.replica[o] == sharded.replica[rank]:
                expected_grad_bytes += sum(p.to_local().numel() for p in params_i) * 8
    unused = [layer.name for i, layer in enumerate(opt.layers) if i not in opt._layers_ran]
    buffer = {"numel": opt._state.buffers.grad_buffer.numel(), "model": sum(p.numel() for p in model.parameters())}
    if fsdp:  # the gradient buffer: the owners' slots and this rank's own gradients only
        owned = [i for i, o in enumerate(sharded.owners) if o == rank]
        buffer["own"] = sum(p.numel() for i in owned for p in sharded.segment_params[i])
        buffer["slots"] = sum(len(ch) for ch in opt._state.buffers.layout.change_slots) + sum(
            k is not None for k in opt._state.buffers.layout.kl_slots
        )
    return {
        "params": params,
        "bytes": nbytes,
        "expected_grad_bytes": expected_grad_bytes,
        "unused": unused,
        "buffer": buffer,
    }


def _w_equivalence(rank: int, world: int, payload: dict) -> dict:
    out = {name: train(rank=rank, world=world, fsdp=True, **cfg) for name, cfg in payload.items()}
    if world == 4:  # HSDP: 2 replicas of 2 shards
        out.update({f"hsdp {n}": train(rank=rank, world=world, fsdp=True, hsdp=True, **c) for n, c in payload.items()})
    out["refusals"] = _refusals(rank, world) if world == 4 else {}
    out["mixed"] = _mixed_precision(rank, world) if world == 2 else {}
    return out


def _mixed_precision(rank: int, world: int) -> dict:
    """The float32 transformer under FSDP2 with bf16 parameters and bf16 gradient reduction, and
    without a policy: parameters after the steps, and the dtypes of statistics and inverses."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    out = {}
    for name, policy in (("fp32", None), ("bf16", MixedPrecisionPolicy(torch.bfloat16, torch.bfloat16))):
        model = build("transformer").float()
        shard(model, "transformer", mp_policy=policy)
        opt = SPNGD(model, **OPT_KW)
        start = full_params(model)
        for step in range(3):
            x, y = batch("transformer", step, 8)
            train_step(model, opt, x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4])
        dtypes = {str(t.dtype) for f in opt.factors().values() for t in f.values()}
        dtypes |= {str(t.dtype) for inv in opt.inverses().values() for t in inv if t is not None}
        out[name] = {
            "start": start,
            "end": full_params(model),
            "dtypes": dtypes,
            "buffers": str(opt._state.buffers.dtype),
            "factors": len(opt.factors()),
        }
    return out


def _refusals(rank: int, world: int) -> dict:
    """The error message of each unsupported configuration (None: it was accepted)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def message(make, **options) -> str | None:
        try:
            SPNGD(make(), **OPT_KW, **options)
        except ValueError as exc:
            return str(exc)
        return None

    def tensor_parallel() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 4)).double()
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0), Shard(1)]))
        model[0].bias = nn.Parameter(distribute_tensor(model[0].bias.detach(), mesh, [Shard(0), Replicate()]))
        return model

    def replicated() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 3)).double()
        mesh = init_device_mesh("cpu", (world,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Replicate()]))
        model[0].bias = nn.Parameter(distribute_tensor(model[0].bias.detach(), mesh, [Replicate()]))
        return model

    def mixed() -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
        fully_shard(model[0])
        return model

    def sharded() -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        model = nn.Sequential(nn.Linear(4, 3)).double()
        fully_shard(model)
        return model

    return {
        "tp": message(tensor_parallel),
        "replicated": message(replicated),
        "mixed": message(mixed),
        "compile_step": message(sharded, compile_step=True),
        "weight_rescale": message(sharded, weight_rescale=True),
        "plain options": message(sharded),
    }


CONFIGS = {
    "cnn_syncbn": dict(kind="conv_syncbn", steps=3, global_batch=8),
    "transformer": dict(kind="transformer", steps=3, global_batch=8),
}


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_matches_one_process_on_the_concatenated_batch(world: int) -> None:
    results = run_world(world, _w_equivalence, CONFIGS)
    assert (f"hsdp {next(iter(CONFIGS))}" in results[0]) == (world == 4)  # HSDP runs on 2×2 ranks
    for name, cfg in [(n, c) for n, c in CONFIGS.items()] + [(f"hsdp {n}", c) for n, c in CONFIGS.items()]:
        if name not in results[0]:
            continue
        ref = train(rank=0, world=1, fsdp=False, **cfg)["params"]
        moved = (ref[-1] - ref[0]).abs().max()
        assert moved > 1e-3, f"{name}: the reference did not move: the comparison would be vacuous"
        for r, res in enumerate(results):
            got = res[name]
            for step, (a, b) in enumerate(zip(got["params"], ref)):
                torch.testing.assert_close(
                    a, b, rtol=EQUIV_RTOL, atol=EQUIV_ATOL, msg=lambda m: f"{name}, rank {r}, step {step}: {m}"
                )
            buf = got["buffer"]
            assert buf["numel"] == buf["own"] + buf["slots"] < buf["model"], (name, buf)
            assert got["unused"] == [], f"{name}: curvature layers without statistics under FSDP2: {got['unused']}"
            # each rank sends only its shards of the gradients other ranks own, every step
            assert got["expected_grad_bytes"] > 0
            assert [b["grads"] for b in got["bytes"]] == [got["expected_grad_bytes"]] * cfg["steps"], name
    if world == 2:  # bf16 parameters and reduction: statistics and inverses stay float32
        mixed = results[0]["mixed"]
        assert mixed["bf16"]["factors"] > 0
        assert mixed["bf16"]["dtypes"] == {"torch.float32"} and mixed["bf16"]["buffers"] == "torch.float32"
        fp32, bf16 = mixed["fp32"], mixed["bf16"]
        rel = (bf16["end"] - fp32["end"]).norm() / (fp32["end"] - fp32["start"]).norm()
        assert rel < BF16_REL_TOL, f"bf16 FSDP2 run is {rel:.3e} (relative) away from the float32 one"
    if world == 4:
        refusals = results[0]["refusals"]
        assert refusals["tp"] is not None and "0.weight" in refusals["tp"], refusals
        assert "Shard(dim=1)" in refusals["tp"] and "2-D device mesh" in refusals["tp"], refusals
        assert refusals["replicated"] is not None and "0.weight" in refusals["replicated"], refusals
        assert "Replicate()" in refusals["replicated"], refusals
        assert refusals["mixed"] is not None and "1.weight is a plain tensor" in refusals["mixed"], refusals
        assert "compile_step is not supported with FSDP2" in (refusals["compile_step"] or ""), refusals
        assert "weight_rescale=True is not supported with FSDP2" in (refusals["weight_rescale"] or ""), refusals
        assert refusals["plain options"] is None, refusals


def _w_compiled(rank: int, world: int, payload: dict) -> dict:
    """The transformer under FSDP2, eager and torch.compile'd (AOT autograd), 3 steps each."""
    from torch._dynamo.utils import counters

    out = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = build("transformer")
        shard(model, "transformer")
        opt = SPNGD(model, **OPT_KW)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        start = full_params(model)
        for step in range(3):
            x, y = batch("transformer", step, 8)
            train_step(run, opt, x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4])
        out[str(compiled)] = {
            "start": start,
            "end": full_params(model),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "factors": {f"{k}.{n}": t.clone() for k, v in opt.factors().items() for n, t in v.items()},
        }
    return out


def test_fsdp2_with_a_torch_compiled_model_matches_eager_fsdp2() -> None:
    """torch.compile(model) on an FSDP2-sharded transformer (2 ranks, nn.MultiheadAttention
    included): the compiled model trains with SPNGD exactly as the eager sharded one (float64,
    AOT autograd), every statistic of this rank included."""
    results = run_world(2, _w_compiled, {})
    for r, res in enumerate(results):
        eager, compiled = res["False"], res["True"]
        assert compiled["graphs"] > 0 and eager["graphs"] == 0, r
        assert (eager["end"] - eager["start"]).abs().max() > 1e-3, "the eager run did not move"
        torch.testing.assert_close(
            compiled["end"], eager["end"], rtol=1e-12, atol=1e-14, msg=lambda m: f"rank {r}: {m}"
        )
        assert compiled["factors"].keys() == eager["factors"].keys() and eager["factors"], r
        for key, value in eager["factors"].items():
            torch.testing.assert_close(compiled["factors"][key], value, rtol=1e-12, atol=1e-14, msg=key)
    owned = set(results[0]["False"]["factors"]) | set(results[1]["False"]["factors"])
    assert any("attn.in_proj" in k for k in owned), sorted(owned)


# ---------------------------------------------------------------------------------------------
# DCP: save at 4 ranks, resume at 2

DCP_KW = dict(OPT_KW, ema_decay=0.9, stale=True)  # EMA counts and adaptive intervals travel too
DCP_STEPS, DCP_SAVE_AT, DCP_BATCH = 4, 2, 8


# saved at 4 ranks as FSDP2 (CNN) and as HSDP 2×2 (transformer), both resumed at 2 as FSDP2
DCP_CASES = {"conv_syncbn": False, "transformer": True}


def _w_dcp(rank: int, world: int, payload: dict) -> dict:
    """Save (payload['save']) after DCP_SAVE_AT steps and go on, or load and go on."""
    import torch.distributed.checkpoint as dcp

    from spngd_ext.distributed import dcp as spngd_dcp

    out = {}
    for kind, hsdp in DCP_CASES.items():
        path = f"{payload['path']}/{kind}"
        model = build(kind)
        shard(model, kind, mesh=hsdp_mesh(world) if hsdp and payload["save"] else None)
        opt = SPNGD(model, **DCP_KW)
        part = DCP_BATCH // world
        first = 0
        if not payload["save"]:
            state = model.state_dict()
            dcp.load(state, checkpoint_id=f"{path}/model")
            model.load_state_dict(state)
            spngd_dcp.load(opt, f"{path}/optim")
            first = DCP_SAVE_AT
        params = {}
        for step in range(first, DCP_STEPS):
            if payload["save"] and step == DCP_SAVE_AT:
                dcp.save(model.state_dict(), checkpoint_id=f"{path}/model")
                spngd_dcp.save(opt, f"{path}/optim")
            x, y = batch(kind, step, DCP_BATCH)
            train_step(model, opt, x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part])
            params[step + 1] = full_params(model)
        out[kind] = {"params": params, "intervals": opt.counters["intervals"], "step": opt._runner.step_index}
    return out


def test_dcp_checkpoint_saved_at_4_ranks_resumes_at_2(tmp_path) -> None:
    saved_all = run_world(4, _w_dcp, {"save": True, "path": str(tmp_path)})[0]
    resumed_all = run_world(2, _w_dcp, {"save": False, "path": str(tmp_path)})[0]
    for kind in DCP_CASES:
        saved, resumed = saved_all[kind], resumed_all[kind]
        assert resumed["step"] == saved["step"] == DCP_STEPS
        assert resumed["intervals"] == saved["intervals"]
        moved = (saved["params"][DCP_STEPS] - saved["params"][DCP_SAVE_AT]).abs().max()
        assert moved > 1e-3, f"{kind}: the steps after the checkpoint did not move the parameters"
        for step in range(DCP_SAVE_AT + 1, DCP_STEPS + 1):
            torch.testing.assert_close(
                resumed["params"][step],
                saved["params"][step],
                rtol=EQUIV_RTOL,
                atol=EQUIV_ATOL,
                msg=lambda m: f"{kind}, step {step}: {m}",
            )


# ---------------------------------------------------------------------------------------------
# the training CLI


def test_cli_fsdp_under_torchrun(fmnist_dir: Path, tmp_path: Path) -> None:
    """--fsdp on two Gloo ranks: the CNN sharded by fully_shard, trained by SP-NGD, evaluated by every rank."""
    out = tmp_path / "fsdp"
    proc = torchrun_train(
        ["--optimizer", "spngd", "--fsdp", *small_run_args(fmnist_dir, out, "--epochs", "1")], timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert 0.1 < summary["best_test_acc"] <= 1


def test_cli_fsdp_needs_torchrun(fmnist_dir: Path, tmp_path: Path, capsys) -> None:
    from spngd_ext.train.cli import main

    assert main(["--optimizer", "spngd", "--fsdp", *small_run_args(fmnist_dir, tmp_path / "x", "--epochs", "1")]) != 0
    assert "--fsdp needs torchrun with more than one rank" in capsys.readouterr().err
