"""How the optimizer's flat buffers move between ranks; separate from the preconditioner math.

A communicator sees buffers cut into ``world_size`` equal chunks (see :mod:`spngd_ext.layout`):
``reduce_scatter`` leaves rank r holding the sum of everyone's chunk r, ``all_gather`` gives every
rank every owner's chunk, ``any_flag`` agrees on a boolean (for skipping a step everywhere).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor


class Communicator(abc.ABC):
    rank: int
    world_size: int

    @abc.abstractmethod
    def reduce_scatter(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> Tensor:
        """Sum chunk ``rank`` of ``buffer`` over ranks; returns that chunk (a view of ``buffer``).
        The other chunks of ``buffer`` are zero afterwards."""

    @abc.abstractmethod
    def all_gather(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> None:
        """In place: chunk r of ``buffer`` becomes rank r's chunk r, on every rank."""

    @abc.abstractmethod
    def any_flag(self, flag: Tensor) -> Tensor:
        """Logical OR of a 0-dim bool tensor over ranks."""

    def begin_step(self) -> None:
        """Called by the optimizer at the start of every step (resets the per-step byte count)."""

    def bytes_sent(self) -> dict[str, dict[str, int]]:
        """Bytes this rank contributed to collectives, per kind: ``{"last": {...}, "total": {...}}``
        for the last step and since construction. Nothing moves with one process."""
        zeros = {k: 0 for k in ("stats", "grads", "precond", "flag")}
        return {"last": dict(zeros), "total": dict(zeros)}


class LocalCommunicator(Communicator):
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def reduce_scatter(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> Tensor:
        return buffer[:chunk_numel]

    def all_gather(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> None:
        return None

    def any_flag(self, flag: Tensor) -> Tensor:
        return flag


def default_communicator(process_group=None, comm_dtype: torch.dtype | None = None) -> Communicator:
    """The communicator for the current run: torch.distributed when initialised with >1 rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        group = process_group if process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) > 1:
            from .collectives import TorchDistributedCommunicator

            return TorchDistributedCommunicator(group, comm_dtype=comm_dtype)
    return LocalCommunicator()
