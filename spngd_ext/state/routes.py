"""What the two owners of a split Kronecker layer exchange (ownership per statistic).

When A and G of a layer have different owners, the gradient owner (owner of the larger factor)
preconditions with one inverse it computes and one it receives (docs/design.md, "Distributed
design"). Before inverting, both owners need π, which takes both factors' mean traces:

* :func:`exchange_traces` — each owner sends the other tr(X)/dim X of its factor (one scalar);
* :func:`exchange_inverses` — each sending owner sends the packed upper triangle of its new
  inverse, preceded by a flag (1: a new inverse; 0: inverting failed, keep the last good one).

Each is one ``Communicator.exchange`` (kind ``"inverse"``, full precision), which every rank runs
when some split layer is inverted (decided alike on every rank: readiness and freshness are the
same everywhere); only the two owners of such a layer send anything for it, so a refresh in which
neither factor of a split layer is fresh sends nothing for that layer, and a step without an
inversion sends nothing at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from ..distributed.communicator import Communicator
from ..distributed.placement import InverseRoute

__all__ = ["exchange_traces", "exchange_inverses"]


def exchange_traces(
    comm: Communicator,
    routes: Sequence[InverseRoute],
    sides: Sequence[tuple[str, ...]],
    means: dict[tuple[int, str], Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[int, Tensor]:
    """Per route this rank is an end of: the other owner's mean trace (one scalar each way).

    Args:
        comm: the communicator.
        routes: the split layers inverted this refresh (identical on every rank).
        sides: per layer, its inverse sides (statistic names), to find the dst's own factor.
        means: this rank's mean trace tr(X)/dim X of each factor it owns, by (layer, statistic).
        dtype: the dtype of the traces.
        device: where they live.
    """
    rank, world = comm.rank, comm.world_size
    sends: list[list[Tensor]] = [[] for _ in range(world)]
    receives: list[list[Tensor]] = [[] for _ in range(world)]
    out: dict[int, Tensor] = {}
    for r in routes:
        if rank not in (r.src, r.dst):
            continue
        peer, own = (r.dst, r.stat) if r.src == rank else (r.src, next(n for n in sides[r.layer] if n != r.stat))
        sends[peer].append(means[(r.layer, own)].reshape(1).to(dtype))
        out[r.layer] = torch.empty(1, dtype=dtype, device=device)
        receives[peer].append(out[r.layer])
    comm.exchange(sends, receives, kind="inverse", dtype=dtype, device=device)
    return {i: t[0] for i, t in out.items()}


def exchange_inverses(
    comm: Communicator,
    routes: Sequence[InverseRoute],
    computed: dict[tuple[int, str], Tensor | None],
    *,
    dtype: torch.dtype,
    device: torch.device,
    backend: ops.Backend | str,
) -> dict[tuple[int, str], Tensor | None]:
    """Send each route's new inverse from its src to its dst; returns, on a dst, the received
    inverse by (layer, statistic), None where the src's inversion failed (keep the last good one).
    Every rank calls it together (one collective), also a rank that is no route's end.

    Args:
        comm: the communicator.
        routes: the inverses that travel this refresh (identical on every rank).
        computed: on a src, its new inverse of each route's statistic (None: inverting failed).
        dtype: the inverses' dtype.
        device: where they live.
        backend: the ops backend (packing).
    """
    rank, world = comm.rank, comm.world_size
    sends: list[list[Tensor]] = [[] for _ in range(world)]
    receives: list[list[Tensor]] = [[] for _ in range(world)]
    incoming: list[tuple[InverseRoute, Tensor]] = []
    for r in routes:
        if r.src == rank:
            inv = computed[(r.layer, r.stat)]
            if inv is None:
                payload = torch.zeros(1 + r.numel, dtype=dtype, device=device)
            else:
                packed = ops.pack_upper([inv], dtype=dtype, backend=backend)
                payload = torch.cat([torch.ones(1, dtype=dtype, device=device), packed])
            sends[r.dst].append(payload)
        elif r.dst == rank:
            buf = torch.empty(1 + r.numel, dtype=dtype, device=device)
            receives[r.src].append(buf)
            incoming.append((r, buf))
    comm.exchange(sends, receives, kind="inverse", dtype=dtype, device=device)  # also with no route of this rank
    out: dict[tuple[int, str], Tensor | None] = {}
    ok = torch.stack([buf[0] for _, buf in incoming]).tolist() if incoming else []  # one host sync
    for (r, buf), flag in zip(incoming, ok):
        if flag > 0:
            dim = int(round(((8 * r.numel + 1) ** 0.5 - 1) / 2))
            out[(r.layer, r.stat)] = ops.unpack_upper(buf, [dim], offset=1, dtype=dtype, backend=backend)[0]
        else:
            out[(r.layer, r.stat)] = None
    return out
