"""Collectives over true-length, per-owner segments (see :mod:`spngd_ext.distributed.segments`).

Three operations on a flat buffer that every rank holds, given the same segment lists on every
rank (they come from the layout, so no sizes are exchanged):

* :func:`reduce_segments` — ``sends[o]`` lists the segments owned by rank o; afterwards rank o
  holds there the sum over ranks, and every segment a rank sent to another owner is zero (so a
  segment nobody rewrites before the next reduce is not summed twice). Segments of no list are
  untouched; an owner with an empty list receives nothing.
* :func:`gather_segments` — in place, every rank's copy of owner o's segments becomes owner
  o's values.
* :func:`exchange` — point to point: each rank sends given tensors to given ranks (the
  inverses a statistic owner hands to a gradient owner).

Algorithms (``impl``):

``"all_to_all"``
    ``all_to_all_single`` with split sizes: rank r sends each owner exactly that owner's
    segments (S − S_r elements for the statistics, nothing padded) and adds the W received
    contributions itself, in the buffer's dtype, in rank order. The only way to add in fp32
    when bf16/fp16 is on the wire (each contribution is rounded once). The receive staging is
    W × the owner's segment length; the transfer runs in as many rounds as needed to keep it
    below ``staging_numel`` elements, so memory does not grow with W.
``"reduce"``
    one asynchronous ``dist.reduce`` per owner segment (full precision only: the backend adds
    in the wire dtype). No staging at all; NCCL's ring/tree reduce sends each segment once per
    rank, the large-W path.

The gather is one asynchronous ``dist.broadcast`` per owner segment. With bf16/fp16 on the wire
the owner's own segments are overwritten by the rounded values too, so every rank holds
bit-identical results. fp16 (max 65504) is scaled by a power of two per (sender, receiver)
piece before the cast and unscaled after it (exact short of underflow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Segment

__all__ = ["reduce_segments", "gather_segments", "exchange", "slice_segments", "DEFAULT_STAGING_NUMEL"]

DEFAULT_STAGING_NUMEL = 1 << 24  # 16 Mi elements of receive staging per all-to-all round
_FP16_TARGET_EXP = 14  # scaled magnitudes stay below 2**15 (fp16 max 65504)
# torch 2.14 renamed all_gather_into_tensor (the old name warns).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _total(segments: Sequence[Segment]) -> int:
    return sum(s.numel for s in segments)


def slice_segments(segments: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """Elements [lo, hi) of the concatenation of ``segments``, as segments of the buffer.

    Args:
        segments: segments of one buffer, in the order they are concatenated.
        lo: the first element taken, counted along the concatenation.
        hi: one past the last element taken.
    """
    out, pos = [], 0
    for s in segments:
        a, b = max(lo, pos), min(hi, pos + s.numel)
        if a < b:
            out.append(Segment(s.offset + a - pos, b - a))
        pos += s.numel
    return out


def _wait_all(works: list) -> None:
    for work in works:
        if work is not None:  # async_op=True always returns a handle; None only in torch's type stubs
            work.wait()


def _views(buffer: Tensor, segments: Sequence[Segment]) -> list[Tensor]:
    return [buffer[s.offset : s.end] for s in segments]


def _cat(buffer: Tensor, segments: Sequence[Segment]) -> Tensor:
    """The segments' elements in order: a view when they are one contiguous range."""
    if not segments:
        return buffer.new_empty(0)
    if len(segments) == 1:
        return buffer[segments[0].offset : segments[0].end]
    return torch.cat(_views(buffer, segments))


def _scatter_back(buffer: Tensor, segments: Sequence[Segment], values: Tensor) -> None:
    pos = 0
    for s in segments:
        buffer[s.offset : s.end].copy_(values[pos : pos + s.numel])
        pos += s.numel


def _pow2_scale(x: Tensor) -> Tensor:
    """A power of two s (fp32, shape (1,)) with max|finite x|·s < 2**15; 1·2**14 for all-zero x."""
    mag = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    amax = mag.max().float().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)), torch.full_like(amax, _FP16_TARGET_EXP))
    return torch.exp2(_FP16_TARGET_EXP - exp).clamp(max=2.0**100, min=2.0**-100)


def _rounds(sends: Sequence[Sequence[Segment]], world: int, staging_numel: int) -> int:
    largest = max((_total(s) for s in sends), default=0)
    return max(1, math.ceil(world * largest / max(1, staging_numel)))


def reduce_segments(
    comm,
    buffer: Tensor,
    sends: Sequence[Sequence[Segment]],
    *,
    kind: str,
    impl: str,
    wire: torch.dtype,
    staging_numel: int = DEFAULT_STAGING_NUMEL,
) -> None:
    """Sum each owner's segments over ranks onto the owner (see the module docstring).

    Args:
        comm: the :class:`~spngd_ext.distributed.collectives.TorchDistributedCommunicator`.
        buffer: flat buffer, the same layout on every rank.
        sends: per rank, the segments it owns (identical on every rank).
        kind: byte-counter and error-message label.
        impl: "all_to_all" or "reduce".
        wire: dtype on the wire (the buffer's own dtype for full precision).
        staging_numel: receive-staging budget of one all-to-all round, in elements.
    """
    w, r = comm.world_size, comm.rank
    if len(sends) != w:
        raise ValueError(f"reduce_segments({kind}): sends needs one list per rank ({w}), got {len(sends)}")
    if all(_total(s) == 0 for s in sends):
        return  # nothing due anywhere: no collective at all
    if impl == "reduce":
        if wire != buffer.dtype:
            raise ValueError(
                f"reduce_segments({kind}): impl='reduce' adds in the wire dtype; use 'all_to_all' for {wire}"
            )
        comm._count(kind, sum(_total(s) for o, s in enumerate(sends) if o != r) * buffer.element_size())
        works = [
            dist.reduce(buffer[s.offset : s.end], dst=comm._global_ranks[o], group=comm.group, async_op=True)
            for o in range(w)
            for s in sends[o]
        ]
        _wait_all(works)
    elif impl == "all_to_all":
        rounds = _rounds(sends, w, staging_numel)
        for j in range(rounds):
            pieces = [
                slice_segments(sends[o], j * _total(sends[o]) // rounds, (j + 1) * _total(sends[o]) // rounds)
                for o in range(w)
            ]
            _all_to_all_round(comm, buffer, pieces, kind, wire)
    else:
        raise ValueError(f"reduce_segments({kind}): impl must be 'all_to_all' or 'reduce', got {impl!r}")
    for o in range(w):
        if o != r:
            for s in sends[o]:
                buffer[s.offset : s.end].zero_()


def _all_to_all_round(comm, buffer: Tensor, pieces: list[list[Segment]], kind: str, wire: torch.dtype) -> None:
    w, r, g = comm.world_size, comm.rank, comm.group
    sizes = [_total(p) for p in pieces]
    send = torch.cat([_cat(buffer, p) for p in pieces]) if len(pieces) > 1 else _cat(buffer, pieces[0])
    mine = sizes[r]
    scales = None
    if wire == torch.float16:  # one scale per destination piece, exchanged so the receiver can undo it
        my_scales = torch.cat([_pow2_scale(part) for part in torch.split(send, sizes)])
        their = torch.empty_like(my_scales)
        dist.all_to_all_single(their, my_scales, group=g)
        comm._count(kind, 4 * (w - 1))
        send = send * torch.repeat_interleave(my_scales.to(send.dtype), torch.tensor(sizes, device=send.device))
        scales = their
    comm._count(kind, (send.numel() - mine) * wire.itemsize)
    recv = torch.empty(w * mine, dtype=wire, device=buffer.device)
    dist.all_to_all_single(recv, send.to(wire), output_split_sizes=[mine] * w, input_split_sizes=sizes, group=g)
    if mine == 0:
        return
    got = recv.view(w, mine).to(buffer.dtype)
    if scales is not None:
        got = got / scales.to(buffer.dtype).unsqueeze(1)
    _scatter_back(buffer, pieces[r], got.sum(dim=0))  # every contribution in rank order, in the buffer's dtype


def gather_segments(comm, buffer: Tensor, owned: Sequence[Sequence[Segment]], *, kind: str, wire: torch.dtype) -> None:
    """In place: every rank's copy of owner o's segments becomes owner o's values.

    Args:
        comm: the communicator (group, rank, byte counter).
        buffer: flat buffer, the same layout on every rank.
        owned: per rank, the segments it owns (identical on every rank).
        kind: byte-counter and error-message label.
        wire: dtype on the wire.
    """
    w, r, g = comm.world_size, comm.rank, comm.group
    if len(owned) != w:
        raise ValueError(f"gather_segments({kind}): owned needs one list per rank ({w}), got {len(owned)}")
    if all(_total(s) == 0 for s in owned):
        return
    comm._count(kind, _total(owned[r]) * wire.itemsize)
    if wire == buffer.dtype:
        works = [
            dist.broadcast(buffer[s.offset : s.end], src=comm._global_ranks[o], group=g, async_op=True)
            for o in range(w)
            for s in owned[o]
        ]
        _wait_all(works)
        return
    scale = None
    mine = _cat(buffer, owned[r])
    if wire == torch.float16:
        scale = _pow2_scale(mine)
        scales = torch.empty(w, dtype=torch.float32, device=buffer.device)
        _all_gather_single(scales, scale, group=g)
        comm._count(kind, 4)
        mine = mine * scale.to(mine.dtype)
    sizes = [_total(s) for s in owned]
    staging = torch.empty(sum(sizes), dtype=wire, device=buffer.device)
    parts = list(torch.split(staging, sizes))
    parts[r].copy_(mine)
    works = [dist.broadcast(parts[o], src=comm._global_ranks[o], group=g, async_op=True) for o in range(w) if sizes[o]]
    _wait_all(works)
    for o in range(w):
        if sizes[o]:
            values = parts[o].to(buffer.dtype)
            if scale is not None:
                values = values / scales[o].to(buffer.dtype)
            _scatter_back(buffer, owned[o], values)


def exchange(
    comm,
    sends: Sequence[Sequence[Tensor]],
    receives: Sequence[Sequence[Tensor]],
    *,
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Point to point, at full precision: ``sends[d]`` (contiguous tensors) go to rank d, where
    they land in its ``receives[this rank]`` (same sizes, same order). One ``all_to_all_single``
    in which every rank takes part, also one with nothing to send or receive; a caller whose
    routes (identical on every rank) are all empty skips the call on every rank.

    Args:
        comm: the communicator.
        sends: per destination rank, the tensors to send.
        receives: per source rank, the tensors to fill.
        kind: byte-counter and error-message label.
        dtype: dtype of every tensor (and of the transfer).
        device: where the transfer buffers live.
    """
    w, r = comm.world_size, comm.rank
    if len(sends) != w or len(receives) != w:
        raise ValueError(f"exchange({kind}): sends and receives need one list per rank ({w})")
    if sends[r] or receives[r]:
        raise ValueError(f"exchange({kind}): rank {r} cannot send to itself")
    in_sizes = [sum(t.numel() for t in ts) for ts in sends]
    out_sizes = [sum(t.numel() for t in ts) for ts in receives]
    bad = [
        tuple(t.shape) for ts in list(sends) + list(receives) for t in ts if t.dtype != dtype or not t.is_contiguous()
    ]
    if bad:
        raise ValueError(f"exchange({kind}): every tensor must be contiguous {dtype}; got shapes {bad}")
    send = (
        torch.cat([t.reshape(-1) for ts in sends for t in ts])
        if any(in_sizes)
        else torch.empty(0, dtype=dtype, device=device)
    )
    recv = torch.empty(sum(out_sizes), dtype=dtype, device=device)
    comm._count(kind, send.numel() * send.element_size())
    dist.all_to_all_single(recv, send, output_split_sizes=out_sizes, input_split_sizes=in_sizes, group=comm.group)
    pos = 0
    for ts in receives:
        for t in ts:
            t.view(-1).copy_(recv[pos : pos + t.numel()])
            pos += t.numel()
