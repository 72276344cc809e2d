"""SPNGD checkpoints through ``torch.distributed.checkpoint`` (DCP), loadable at another world size.

``state_dict(opt)`` is a flat dict of named pieces that do not depend on the number of ranks:

* ``spngd.meta`` (saved by rank 0): the model signature, step index, counters, refresh schedule
  (per-statistic intervals, next due steps, refresh counts), inverse work done, the MC seed and
  the param_groups' hyperparameters;
* ``spngd.momentum.<parameter name>``: each momentum buffer (a DTensor under FSDP2, which DCP
  reshards to the loading world's shards);
* per curvature layer, saved by the rank that preconditions its gradient:
  ``spngd.layer.<name>.info`` (which estimates are ready, which inverses exist) and
  ``spngd.layer.<name>.inverse.<side>``; per statistic, saved by its owner (under ownership per
  statistic not necessarily the same rank): ``spngd.layer.<name>.<statistic>`` (the estimate at
  its true length) and ``spngd.layer.<name>.<statistic>.count`` (its EMA count).

:func:`load` reads the meta, then asks for exactly what this rank owns in the loading run (the
statistics are re-owned: the owner assignment of the loading world decides), so a checkpoint
saved at 4 ranks resumes at 2. The MC label generator restarts from the saved seed (its stream
is per rank); with ``fisher="emp"`` a resumed run continues as the uninterrupted one, up to the
float reordering of another world size. Save the model with DCP alongside (``model.state_dict()``
of an FSDP2 model holds DTensors).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch import Tensor

__all__ = ["state_dict", "save", "load"]

_META = "spngd.meta"


def _pack(obj: object) -> bytes:
    """Non-tensor pieces travel as pickled bytes (DCP would flatten a nested dict into keys)."""
    return pickle.dumps(obj)


def _unpack(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 — a checkpoint this module wrote


def _names(opt: Any) -> dict[int, str]:
    return {id(p): n for n, p in opt._model.named_parameters()}


def _stat_items(opt: Any) -> dict[str, Tensor]:
    """Views of the estimate chunk: every statistic this rank owns and its count."""
    st = opt._state
    buffers = st.buffers
    out: dict[str, Tensor] = {}
    for i, name in st.estimates.owned:
        key = f"spngd.layer.{opt._layers[i].name}.{name}"
        out[key] = buffers.est_view(i, name)
        at = buffers.layout.counts[i][name] - buffers.chunk_base
        out[key + ".count"] = buffers.est[at : at + 1]
    return out


def _inverse_items(opt: Any, i: int) -> dict[str, Tensor]:
    """The cached inverses of layer ``i`` (whose gradient this rank preconditions)."""
    layer = opt._layers[i]
    return {
        f"spngd.layer.{layer.name}.inverse.{side}": t
        for side, t in zip(layer.inverse_sides, opt._state.inverses.inverses.get(i, []))
        if t is not None
    }


def state_dict(opt: Any) -> dict[str, Any]:
    """This rank's share of the checkpoint (module docstring); pass it to ``dcp.save``.

    Args:
        opt: the :class:`~spngd_ext.SPNGD` optimizer.
    """
    from .. import checkpoint

    runner, st = opt._runner, opt._state
    st.buffers.ensure(st.buffers.all_params[0].device)
    names = _names(opt)
    out: dict[str, Any] = {}
    for p, s in opt.state.items():
        if "momentum_buffer" in s:
            out[f"spngd.momentum.{names[id(p)]}"] = s["momentum_buffer"]
    for i in st.preconditioner.owned:
        layer = opt._layers[i]
        inv = st.inverses.inverses.get(i)
        out[f"spngd.layer.{layer.name}.info"] = _pack(
            {"ready": dict(st.estimates.ready[i]), "inverses": None if inv is None else [t is not None for t in inv]}
        )
        out.update(_inverse_items(opt, i))
    out.update(_stat_items(opt))
    if runner.comm.rank == 0:
        out[_META] = _pack(
            {
                "signature": checkpoint.model_signature(opt._layers, opt._plain_params),
                "step_index": runner.step_index,
                "counters": dict(runner.counters),
                "schedule": runner.schedule.state_dict(),
                "inverse_sides_done": runner.inverse_sides_done,
                "seed": opt._sampler.seed,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                "momentum": sorted(k for k in out if k.startswith("spngd.momentum.")),
            }
        )
    return out


def save(opt: Any, checkpoint_id: str) -> None:
    """``dcp.save`` of :func:`state_dict` (every rank calls it).

    Args:
        opt: the optimizer.
        checkpoint_id: the checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict(opt), checkpoint_id=checkpoint_id)


@torch.no_grad()
def load(opt: Any, checkpoint_id: str) -> None:
    """Restore a checkpoint of :func:`save`, possibly written by another number of ranks (every
    rank calls it). ValueError when it was saved for another model.

    Args:
        opt: the optimizer (built over the loading run's model).
        checkpoint_id: the checkpoint directory.
    """
    import torch.distributed.checkpoint as dcp

    from .. import checkpoint

    runner, st = opt._runner, opt._state
    holder: dict[str, Any] = {_META: b""}
    dcp.load(holder, checkpoint_id=checkpoint_id)
    meta = _unpack(holder[_META])
    signature = checkpoint.model_signature(opt._layers, opt._plain_params)
    if [tuple(s[:2]) + (tuple(s[2]),) for s in meta["signature"]] != signature:
        raise ValueError("spngd_ext.distributed.dcp.load: the checkpoint was saved for another model")
    if len(meta["groups"]) != len(opt.param_groups):
        raise ValueError(
            f"spngd_ext.distributed.dcp.load: {len(meta['groups'])} param_groups saved, {len(opt.param_groups)} here"
        )
    st.buffers.ensure(st.buffers.all_params[0].device)
    by_name = {n: p for n, p in opt._model.named_parameters()}
    want: dict[str, Any] = {}
    for key in meta["momentum"]:
        want[key] = torch.zeros_like(by_name[key[len("spngd.momentum.") :]])
    for layer in opt._layers:  # readiness is kept on every rank for every statistic
        want[f"spngd.layer.{layer.name}.info"] = b""
    dcp.load(want, checkpoint_id=checkpoint_id)
    tensors: dict[str, Any] = _stat_items(opt)  # views of the estimate chunk: filled in place
    for i, layer in enumerate(opt._layers):
        info = _unpack(want[f"spngd.layer.{layer.name}.info"])
        st.estimates.ready[i] = dict(info["ready"])
    for i in st.preconditioner.owned:
        layer = opt._layers[i]
        info = _unpack(want[f"spngd.layer.{layer.name}.info"])
        shapes = layer.inverse_shapes()
        inv = None
        if info["inverses"] is not None:
            inv = [
                torch.empty(shapes[s], dtype=st.buffers.dtype, device=st.buffers.device) if ok else None
                for s, ok in zip(layer.inverse_sides, info["inverses"])
            ]
            st.inverses.inverses[i] = inv
        else:
            st.inverses.inverses.pop(i, None)
        tensors.update(_inverse_items(opt, i))  # the new inverses: filled in place
    dcp.load(tensors, checkpoint_id=checkpoint_id)
    st.inverses.after_load()
    for key, buf in ((k, v) for k, v in want.items() if k.startswith("spngd.momentum.")):
        opt.state[by_name[key[len("spngd.momentum.") :]]]["momentum_buffer"] = buf
    for group, saved in zip(opt.param_groups, meta["groups"]):
        group.update(saved)
    runner.step_index = int(meta["step_index"])
    runner.counters.update(meta["counters"])
    runner.schedule.load_state_dict(meta["schedule"])
    runner.set_due()
    runner.inverse_sides_done = int(meta["inverse_sides_done"])
    opt._sampler.load_state_dict(meta["seed"], None)
