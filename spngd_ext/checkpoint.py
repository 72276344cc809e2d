"""SPNGD's own entry of a state_dict (``state_dict()["spngd"]``): what it holds, its validation
before anything is loaded, and restoring it.

The entry records a signature of the model (every curvature layer's name, kind and weight shape,
every other parameter's shape) and the world size, so a checkpoint of another model or run layout
is refused with a message naming the first difference; each part of the curvature state validates
its own piece.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import CurvatureLayer
from .mc import LabelSampler
from .state import CurvatureState
from .step import StepRunner

__all__ = ["ENTRY_KEYS", "OPTIONAL_ENTRY_KEYS", "model_signature", "make_entry", "validated_entry", "load_entry"]

ENTRY_KEYS = (
    "signature",
    "world_size",
    "rank",
    "step_index",
    "counters",
    "schedule",
    "inverse_sides_done",
    "seed",
    "mc_rng",
    "curvature",
)
# written by this version, absent from older entries: "ownership" (absent: one owner per layer)
OPTIONAL_ENTRY_KEYS = ("ownership",)
_WHERE = "SPNGD.load_state_dict"


def model_signature(
    layers: Sequence[CurvatureLayer], plain_params: Sequence[nn.Parameter]
) -> list[tuple[str, str, tuple[int, ...]]]:
    """What a state_dict must match: every curvature layer and every other parameter's shape.

    Args:
        layers: the curvature layers.
        plain_params: parameters outside curvature layers.
    """
    sig = [(layer.name, layer.kind, tuple(layer.weight.shape)) for layer in layers]
    sig += [(f"param[{k}]", "plain", tuple(p.shape)) for k, p in enumerate(plain_params)]
    return sig


def make_entry(runner: StepRunner, sampler: LabelSampler, state: CurvatureState, signature: list) -> dict:
    """The 'spngd' entry of a state_dict.

    Args:
        runner: the step bookkeeping (index, counters, schedule).
        sampler: the sampled-label generator.
        state: the curvature state.
        signature: :func:`model_signature` of the model.
    """
    rng = sampler.state_dict()
    return {
        "signature": signature,
        "world_size": runner.comm.world_size,
        "ownership": runner.options.ownership.value,
        "rank": runner.comm.rank,
        "step_index": runner.step_index,
        "counters": dict(runner.counters),
        "schedule": runner.schedule.state_dict(),
        "inverse_sides_done": runner.inverse_sides_done,
        "seed": rng["seed"],
        "mc_rng": rng["mc_rng"],
        "curvature": {**state.estimates.state_dict(), "inverses": state.inverses.state_dict()},
    }


def validated_entry(state_dict: object, runner: StepRunner, state: CurvatureState, signature: list) -> dict:
    """The 'spngd' entry of ``state_dict``, checked in full before anything is loaded.

    Args:
        state_dict: what was passed to ``load_state_dict``.
        runner: the step bookkeeping of this optimizer.
        state: the curvature state of this optimizer.
        signature: :func:`model_signature` of this model.

    Raises:
        ValueError: naming what does not match.
    """
    if not isinstance(state_dict, dict) or "spngd" not in state_dict:
        raise ValueError(f"{_WHERE}: not an SPNGD state_dict (no 'spngd' entry)")
    extra = state_dict["spngd"]
    if not isinstance(extra, dict):
        raise ValueError(f"{_WHERE}: the 'spngd' entry must be a dict, got {type(extra).__name__}")
    missing = [k for k in ENTRY_KEYS if k not in extra]
    if missing:
        raise ValueError(f"{_WHERE}: the 'spngd' entry lacks {', '.join(missing)} (truncated or from another version)")
    try:
        theirs = [(n, k, tuple(shape)) for n, k, shape in extra["signature"]]
    except (TypeError, ValueError):
        raise ValueError(f"{_WHERE}: the signature entry is malformed") from None
    if theirs != signature:
        diff = next(((a, b) for a, b in zip(theirs, signature) if a != b), None)
        raise ValueError(
            f"{_WHERE}: the state_dict was saved for another model "
            f"({len(theirs)} layers/parameters vs {len(signature)} here; first difference: saved {diff[0] if diff else theirs[len(signature) :][:1]} "
            f"vs here {diff[1] if diff else signature[len(theirs) :][:1]})"
        )
    if extra["world_size"] != runner.comm.world_size:
        raise ValueError(
            f"{_WHERE}: saved with world_size={extra['world_size']}, running with {runner.comm.world_size}"
        )
    # the placement decides which statistics a rank's estimate chunk holds (absent: saved before
    # ownership per statistic, i.e. one owner per layer); with one process every placement is the same
    saved_ownership = extra.get("ownership", "layer")
    if runner.comm.world_size > 1 and saved_ownership != runner.options.ownership.value:
        raise ValueError(
            f"{_WHERE}: saved with ownership={saved_ownership!r}, running with "
            f"ownership={runner.options.ownership.value!r} (each rank holds other statistics)"
        )
    n_stats = len(state.accumulation.stat_ids)
    sched = extra["schedule"]
    if not isinstance(sched, dict) or any(
        len(sched.get(k, ())) != n_stats for k in ("intervals", "next_due", "refreshes")
    ):
        raise ValueError(
            f"{_WHERE}: the refresh schedule does not match: {n_stats} statistics here, other statistics saved"
        )
    curvature = extra["curvature"]
    if not isinstance(curvature, dict) or any(k not in curvature for k in ("est", "est_ready", "inverses")):
        raise ValueError(f"{_WHERE}: the curvature entry must be a dict with est, est_ready and inverses")
    state.estimates.validate_state_dict(curvature)
    state.inverses.validate_state_dict(curvature["inverses"])
    return extra


def load_entry(
    extra: dict, runner: StepRunner, sampler: LabelSampler, state: CurvatureState, device: torch.device
) -> None:
    """Restore a validated entry (see :func:`validated_entry`).

    Args:
        extra: the validated 'spngd' entry.
        runner: the step bookkeeping to restore.
        sampler: the sampled-label generator to restore.
        state: the curvature state to restore.
        device: the model's device.
    """
    runner.step_index = int(extra["step_index"])
    runner.counters.update(extra["counters"])
    runner.schedule.load_state_dict(extra["schedule"])
    runner.set_due()
    runner.inverse_sides_done = int(extra["inverse_sides_done"])
    sampler.load_state_dict(extra["seed"], extra["mc_rng"])
    state.buffers.ensure(device)
    state.estimates.load_state_dict(extra["curvature"])
    state.inverses.load_state_dict(extra["curvature"]["inverses"], device)
