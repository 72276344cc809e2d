"""How the optimizer's flat buffers move between ranks; separate from the preconditioner math.

A communicator sees buffers cut into ``world_size`` equal chunks (see :mod:`spngd_ext.layout`):
``reduce_scatter`` leaves rank r holding the sum of everyone's chunk r, ``all_gather`` gives every
rank every owner's chunk, ``any_flag`` agrees on a boolean (for skipping a step everywhere).

The segment operations move true-length, per-owner segments instead (see
:mod:`spngd_ext.distributed.segments` and :mod:`spngd_ext.distributed.uneven`):
``reduce_segments`` sums each owner's segments onto it, ``gather_segments`` copies each owner's
segments to every rank, ``exchange`` sends tensors point to point.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import Segment


class Communicator(abc.ABC):
    """Moves the optimizer's flat buffers between ranks (see the module docstring)."""

    rank: int
    world_size: int

    @abc.abstractmethod
    def reduce_scatter(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> Tensor:
        """Sum chunk ``rank`` of ``buffer`` over ranks; returns that chunk (a view of ``buffer``).
        The other chunks of ``buffer`` are zero afterwards.

        Args:
            buffer: the flat buffer of ``world_size`` × ``chunk_numel`` elements.
            chunk_numel: the length of one rank's chunk.
            kind: what the buffer holds ("stats", "grads", "precond"), for the byte counts and errors.
        """

    @abc.abstractmethod
    def all_gather(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> None:
        """In place: chunk r of ``buffer`` becomes rank r's chunk r, on every rank.

        Args:
            buffer: the flat buffer of ``world_size`` × ``chunk_numel`` elements.
            chunk_numel: the length of one rank's chunk.
            kind: what the buffer holds ("stats", "grads", "precond"), for the byte counts and errors.
        """

    @abc.abstractmethod
    def any_flag(self, flag: Tensor) -> Tensor:
        """Logical OR of a 0-dim bool tensor over ranks.

        Args:
            flag: this rank's 0-dim bool tensor.
        """

    @abc.abstractmethod
    def reduce_segments(self, buffer: Tensor, sends: Sequence[Sequence[Segment]], *, kind: str) -> None:
        """``sends[o]``: the segments of ``buffer`` rank o owns (the same lists on every rank).
        Afterwards rank o holds there the sum over ranks; the segments this rank sent to other
        owners are zero; everything else is untouched.

        Args:
            buffer: the flat buffer the segments index.
            sends: one segment list per owner rank.
            kind: what the buffer holds ("stats", "grads", "precond"), for the byte counts and errors.
        """

    @abc.abstractmethod
    def gather_segments(self, buffer: Tensor, owned: Sequence[Sequence[Segment]], *, kind: str) -> None:
        """In place: every rank's copy of rank o's segments ``owned[o]`` becomes rank o's values.

        Args:
            buffer: the flat buffer the segments index.
            owned: one segment list per owner rank (the same lists on every rank).
            kind: what the buffer holds ("stats", "grads", "precond"), for the byte counts and errors.
        """

    @abc.abstractmethod
    def exchange(
        self,
        sends: Sequence[Sequence[Tensor]],
        receives: Sequence[Sequence[Tensor]],
        *,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Point to point: ``sends[d]`` go to rank d into its ``receives[this rank]`` (same sizes).

        Args:
            sends: per destination rank, the tensors this rank sends it.
            receives: per source rank, the tensors this rank receives from it (filled in place).
            kind: what the tensors hold ("stats", "grads", "precond"), for the byte counts and errors.
            dtype: the dtype of every tensor sent and received.
            device: the device of every tensor sent and received.
        """

    def begin_step(self) -> None:  # noqa: B027 — optional hook; communicators without a byte count need nothing
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
        """The buffer's only chunk, unchanged.

        Args:
            buffer: the flat buffer (one chunk).
            chunk_numel: the chunk's length.
            kind: what the buffer holds (unused with one process).
        """
        return buffer[:chunk_numel]

    def all_gather(self, buffer: Tensor, chunk_numel: int, *, kind: str) -> None:
        """Nothing to gather: the buffer already holds the only chunk.

        Args:
            buffer: the flat buffer (one chunk).
            chunk_numel: the chunk's length.
            kind: what the buffer holds (unused with one process).
        """
        return None

    def any_flag(self, flag: Tensor) -> Tensor:
        """``flag`` itself (the OR over one rank).

        Args:
            flag: this rank's 0-dim bool tensor.
        """
        return flag

    def reduce_segments(self, buffer: Tensor, sends: Sequence[Sequence[Segment]], *, kind: str) -> None:
        """Nothing to sum; checks there is one segment list (this rank's).

        Args:
            buffer: the flat buffer the segments index (unchanged).
            sends: one segment list per owner rank (exactly one).
            kind: what the buffer holds, for the error message.
        """
        _check_lists("reduce_segments", kind, sends)

    def gather_segments(self, buffer: Tensor, owned: Sequence[Sequence[Segment]], *, kind: str) -> None:
        """Nothing to gather; checks there is one segment list (this rank's).

        Args:
            buffer: the flat buffer the segments index (unchanged).
            owned: one segment list per owner rank (exactly one).
            kind: what the buffer holds, for the error message.
        """
        _check_lists("gather_segments", kind, owned)

    def exchange(
        self,
        sends: Sequence[Sequence[Tensor]],
        receives: Sequence[Sequence[Tensor]],
        *,
        kind: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Nothing to send; ValueError if this rank would send to or receive from itself.

        Args:
            sends: one tensor list per destination rank (exactly one, empty).
            receives: one tensor list per source rank (exactly one, empty).
            kind: what the tensors hold, for the error message.
            dtype: the tensors' dtype (unused with one process).
            device: the tensors' device (unused with one process).
        """
        _check_lists("exchange", kind, sends)
        _check_lists("exchange", kind, receives)
        if sends[0] or receives[0]:
            raise ValueError(f"exchange({kind}): one process cannot send to itself")


def _check_lists(op: str, kind: str, lists: Sequence) -> None:
    if len(lists) != 1:
        raise ValueError(f"{op}({kind}): expected one segment list per rank (1), got {len(lists)}")
