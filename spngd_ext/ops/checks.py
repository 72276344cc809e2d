"""Argument checks shared by the public ops: each raises ``TypeError``/``ValueError`` naming the op and
the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dispatch import FLOAT_DTYPES

__all__ = ["check_tensor", "check_same_device", "check_state", "pair", "check_bn_fisher_args"]


def check_tensor(name: str, t: object, op: str, *, dim: int | None = None, float_only: bool = True) -> Tensor:
    """``t`` if it is a tensor (floating unless ``float_only=False``, ``dim``-D when given).

    Args:
        name: the argument's name, for the message.
        t: the value to check.
        op: the op's name, for the message.
        dim: the required number of dimensions, or None.
        float_only: require a floating dtype (float32/float64/bf16/fp16).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor (float32/float64/bf16/fp16), got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def check_same_device(op: str, **tensors: Tensor) -> None:
    """ValueError listing each tensor's device unless all share one.

    Args:
        op: the op's name, for the message.
        **tensors: the tensors by argument name.
    """
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_state(op: str, state: Tensor, numel: int) -> None:
    """An accumulator: a contiguous float32/float64 tensor of ``numel`` elements.

    Args:
        op: the op's name, for the message.
        state: the accumulator.
        numel: its required element count.
    """
    check_tensor("state", state, op)
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{op}: state must be float32 or float64 (accumulation is never in half precision), got {state.dtype}"
        )
    if state.numel() != numel:
        raise ValueError(f"{op}: state must have {numel} elements, got {state.numel()} (shape {tuple(state.shape)})")
    if not state.is_contiguous():
        raise ValueError(f"{op}: state must be contiguous")


def pair(name: str, v: int | Sequence[int], op: str) -> tuple[int, int]:
    """An int or a pair as a pair (kernel_size, stride, padding, dilation).

    Args:
        name: the argument's name, for the message.
        v: the value.
        op: the op's name, for the message.
    """
    t = (v, v) if isinstance(v, int) else tuple(int(e) for e in v)
    if len(t) != 2:
        raise ValueError(f"{op}: {name} must be an int or a pair, got {v!r}")
    return t[0], t[1]


def check_bn_fisher_args(op: str, state: Tensor, grad_out: Tensor, other_name: str, other: Tensor) -> None:
    """grad_out and ``other`` (x̂ or x) of one (N, C, *) shape; state a contiguous fp32/fp64 (C, 3).

    Args:
        op: the op's name, for the message.
        state: the (C, 3) accumulator.
        grad_out: the output gradient.
        other_name: the name of ``other`` ("xhat" or "x").
        other: the normalised input or the input.
    """
    check_tensor("grad_out", grad_out, op)
    check_tensor(other_name, other, op)
    if grad_out.shape != other.shape or grad_out.dim() < 2:
        raise ValueError(
            f"{op}: grad_out and {other_name} must share one (N, C, *) shape, got {tuple(grad_out.shape)} and {tuple(other.shape)}"
        )
    channels = grad_out.shape[1]
    check_tensor("state", state, op)
    if state.shape != (channels, 3):
        raise ValueError(f"{op}: state must be ({channels}, 3), got {tuple(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
        raise TypeError(f"{op}: state must be a contiguous float32/float64 tensor, got {state.dtype}")
    check_same_device(op, state=state, grad_out=grad_out, **{other_name: other})
