"""FSDP2 (``torch.distributed.fsdp.fully_shard``): gradient shards to their layers' owners,
preconditioned updates back to the shards.

Under FSDP2 every parameter is a ``DTensor`` sharded over a 1-D device mesh (``Shard(d)``,
``torch.chunk`` pieces along dimension d, the last ones possibly short or empty), or under HSDP
over the columns of a 2-D mesh and replicated over its rows (``(Replicate(), Shard(d))``); after
the backward each rank holds its shard of the *averaged* gradient (FSDP2's reduce-scatter, and
under HSDP its all-reduce over the replicas). The statistics are collected by the usual hooks
from the unsharded activations and output gradients and reduced onto their owners as without
FSDP. The gradients move differently:

1. :meth:`ShardedGradients.fill_gradients`: one ``all_to_all`` (:func:`.uneven.exchange`) in which
   every rank sends each owner (of its own replica, under HSDP) exactly its shards of that
   owner's layers' gradients; the owner writes them into its segments of its gradient buffer
   (:class:`LocalGradientLayout`: the slots and its own gradients only) through precomputed
   positions, one ``index_copy_`` per source rank. No rank holds or allocates another owner's
   gradients; no further gradient reduction runs.
2. the owner preconditions its segments as usual;
3. :meth:`ShardedGradients.local_updates`: one ``all_to_all`` returns every rank its shards of
   every owner's updates (read through the same indices), and one gather copies each owner's
   change and KL slots to every rank; the updates are applied to the local shards.

Positions: a layer's :meth:`~spngd_ext.layers.CurvatureLayer.split_update` applied to
``arange(n)`` gives, for every parameter element, its place in the layer's flat segment, so the
positions of rank r's shard are the r-th ``torch.chunk`` of that along the shard dimension. Any
shard dimension works.

What is refused at construction (``ValueError`` naming the parameter and its placement): any
other mesh or placement (tensor parallelism, ``Replicate`` or ``Partial`` on a 1-D mesh, strided
shards), a mesh whose ranks are not the optimizer's process group or that differs between
parameters, a local shard that is not the ``torch.chunk`` piece, a model that mixes DTensor and
plain parameters, ``weight_rescale=True`` and a compiled step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..layout import Segment
from .communicator import Communicator
from .segments import SegmentLayout

__all__ = ["LocalGradientLayout", "ShardedGradients", "is_sharded", "local_layout", "local_tensor"]


@dataclass(frozen=True)
class LocalGradientLayout(SegmentLayout):
    """A :class:`SegmentLayout` whose gradient buffer holds only what this rank needs under FSDP2:
    every owner's change and KL slots first (at the same offsets on every rank, so they can be
    gathered), then this rank's own gradient segments; another owner's segment is empty.
    ``grad_ranges[o]`` is owner o's slots.

    Args:
        local_grad_numel: the length of this rank's gradient buffer.
    """

    local_grad_numel: int = 0

    @property
    def grad_numel(self) -> int:
        """This rank's gradient-buffer length (all slots and its own gradients)."""
        return self.local_grad_numel


def local_layout(layout: SegmentLayout, rank: int) -> LocalGradientLayout:
    """``layout`` with the rank-local gradient buffer of :class:`LocalGradientLayout`.

    Args:
        layout: the layout of the whole model (the same on every rank).
        rank: this rank.
    """
    slots = sorted(
        [k for k in layout.kl_slots if k is not None] + [c for ch in layout.change_slots for c in ch.values()]
    )
    where = {g: k for k, g in enumerate(slots)}  # owners' ranges are in rank order: each stays contiguous
    ranges = [
        Segment(sum(1 for g in slots if g < r.offset), sum(1 for g in slots if r.offset <= g < r.end))
        for r in layout.grad_ranges
    ]
    pos, grads = len(slots), []
    for i, seg in enumerate(layout.grads):
        if layout.assignment.grad_owners[i] == rank:
            grads.append(Segment(pos, seg.numel))
            pos += seg.numel
        else:
            grads.append(Segment(len(slots), 0))
    base = {f.name: getattr(layout, f.name) for f in fields(SegmentLayout)}
    base.update(
        grads=tuple(grads),
        change_slots=tuple({n: where[c] for n, c in ch.items()} for ch in layout.change_slots),
        kl_slots=tuple(None if k is None else where[k] for k in layout.kl_slots),
        grad_ranges=tuple(ranges),
    )
    return LocalGradientLayout(**base, local_grad_numel=pos)


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (an FSDP2 model).

    Args:
        params: the model's parameters.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return any(isinstance(p, DTensor) for p in params)


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (in place updates reach the DTensor); any other tensor itself.

    Args:
        t: a tensor or DTensor.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return t
    return t._local_tensor if isinstance(t, DTensor) else t


def _shard_dim(name: str, p: Tensor, comm: Communicator) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """The dimension ``p`` is sharded on and its mesh as rows of the optimizer's group ranks (one
    row for fully_shard, one per replica for HSDP), after checking SPNGD supports the placement."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        raise ValueError(
            f"SPNGD: {name} is a plain tensor but other parameters are FSDP2 DTensors; shard every "
            "parameter with fully_shard (a parameter FSDP2 ignores is not averaged over ranks)"
        )
    mesh, placements = p.device_mesh, tuple(p.placements)
    hsdp = mesh.ndim == 2 and type(placements[0]) is Replicate
    if not (mesh.ndim == 1 or hsdp):
        raise ValueError(
            f"SPNGD: {name} has placements {placements!r} on a {mesh.ndim}-D device mesh; supported are "
            "fully_shard on a 1-D mesh and HSDP (Replicate(), Shard(d)) on a 2-D mesh, not tensor parallelism"
        )
    pl = placements[-1]
    if type(pl) is not Shard:
        raise ValueError(
            f"SPNGD: {name} has placements {placements!r}; the sharded mesh dimension must be Shard(d) "
            "(fully_shard; Replicate, Partial and strided shards are not supported there)"
        )
    group_of = {g: r for r, g in enumerate(getattr(comm, "_global_ranks", range(comm.world_size)))}
    rows = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()
    if sorted(g for row in rows for g in row) != sorted(group_of):
        raise ValueError(
            f"SPNGD: {name} is sharded over ranks {rows} but the optimizer's process group has ranks "
            f"{sorted(group_of)}; pass process_group=<the group of the whole mesh>"
        )
    grid = tuple(tuple(group_of[int(g)] for g in row) for row in rows)
    dim = pl.dim if pl.dim >= 0 else pl.dim + p.dim()
    width, column = len(grid[0]), next(row.index(comm.rank) for row in grid if comm.rank in row)
    expected = tuple(_chunk(torch.empty(p.shape, device="meta"), dim, width, column).shape)
    if tuple(p._local_tensor.shape) != expected:
        raise ValueError(
            f"SPNGD: {name} ({pl!r}, global shape {tuple(p.shape)}) has a local shard of shape "
            f"{tuple(p._local_tensor.shape)} on rank {comm.rank}, expected the torch.chunk piece {expected}"
        )
    return dim, grid


def _split_flat(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` cut into pieces shaped like ``params`` (one after another)."""
    out, pos = [], 0
    for p in params:
        out.append(flat[pos : pos + p.numel()].view(p.shape))
        pos += p.numel()
    return out


def _chunk(t: Tensor, dim: int, world: int, rank: int) -> Tensor:
    """Rank ``rank``'s ``torch.chunk`` piece of ``t`` along ``dim`` (possibly empty)."""
    size = t.shape[dim]
    step = -(-size // world) if size else 0
    lo, hi = min(rank * step, size), min((rank + 1) * step, size)
    return t.narrow(dim, lo, hi - lo)


class ShardedGradients:
    """Routes an FSDP2 model's gradient shards to their owners and the updates back.

    Build with :meth:`build` (which refuses what is not supported). Segment i is layer i's
    gradient segment, the last one (when there are plain parameters) theirs.

    Args:
        segment_params: per gradient segment, its parameters in segment order.
        shard_dims: per segment, each parameter's shard dimension.
        positions: (receive, send): per rank, the absolute gradient-buffer positions of the
            gradient shards of this rank's segments that rank sends (empty for a rank in another
            HSDP replica), and of the update shards this rank sends it; in segment and parameter order.
        slots: per owner, its change and KL slots (gathered to every rank after preconditioning).
        owners: per segment, the rank that preconditions it.
        clear: the absolute indices of every change and KL slot (zeroed before the gradients arrive).
        comm: the communicator.
        replica: per rank, its replica (row of the mesh; all 0 without HSDP).
    """

    def __init__(
        self,
        segment_params: Sequence[Sequence[nn.Parameter]],
        shard_dims: Sequence[Sequence[int]],
        positions: tuple[Sequence[Tensor], Sequence[Tensor]],
        slots: Sequence[Sequence[Segment]],
        owners: Sequence[int],
        clear: Sequence[int],
        comm: Communicator,
        replica: Sequence[int],
    ) -> None:
        self.segment_params = [list(ps) for ps in segment_params]
        self.shard_dims = [list(ds) for ds in shard_dims]
        self.positions = [list(positions[0]), list(positions[1])]
        self.replica = list(replica)
        self.slots = [list(s) for s in slots]
        self.owners = list(owners)
        self.clear = torch.tensor(list(clear), dtype=torch.long)
        self.comm = comm
        self._device_positions: list[list[Tensor]] = []

    @classmethod
    def build(
        cls,
        named: dict[int, str],
        segment_params: Sequence[Sequence[nn.Parameter]],
        segment_splits: Sequence,
        layout: SegmentLayout,
        comm: Communicator,
    ) -> ShardedGradients:
        """Check every parameter's placement and precompute this rank's positions.

        Args:
            named: parameter id → its name in the model (for the errors).
            segment_params: per gradient segment, its parameters in segment order.
            segment_splits: per segment, a function taking the flat segment to per-parameter
                tensors shaped like the parameters (``CurvatureLayer.split_update``).
            layout: the buffers' :class:`LocalGradientLayout` (segment offsets and owners).
            comm: the communicator (its world must be the mesh).
        """
        w, me = comm.world_size, comm.rank
        placed = [[(_shard_dim(named.get(id(p), "<parameter>"), p, comm), p) for p in ps] for ps in segment_params]
        grid = placed[0][0][0][1] if placed and placed[0] else ((me,),)
        for (_, g), p in (x for row in placed for x in row):
            if g != grid:
                raise ValueError(
                    f"SPNGD: {named.get(id(p), '<parameter>')} is on the mesh {g}, other parameters on {grid}; "
                    "every parameter must be sharded over the same mesh"
                )
        dims = [[d for (d, _), _ in row] for row in placed]
        replica = [0] * w  # each rank's row (replica) and column (shard index) in the mesh
        column = [0] * w
        for q, row in enumerate(grid):
            for j, r in enumerate(row):
                replica[r], column[r] = q, j
        width = len(grid[0])
        owners = list(layout.assignment.grad_owners)
        receive: list[list[Tensor]] = [[] for _ in range(w)]  # gradient shards from each rank of my row
        send: list[list[Tensor]] = [[] for _ in range(w)]  # update shards to every rank
        for i, split in enumerate(segment_splits):
            if owners[i] != me:
                continue
            seg = layout.grads[i]
            parts = split(torch.arange(seg.offset, seg.end))
            for part, d in zip(parts, dims[i]):
                for r in range(w):
                    piece = _chunk(part, d, width, column[r]).reshape(-1)
                    send[r].append(piece)
                    if replica[r] == replica[me]:
                        receive[r].append(piece)
        cat = [torch.cat(ps) if ps else torch.empty(0, dtype=torch.long) for ps in receive]
        flat = [torch.cat(ps) if ps else torch.empty(0, dtype=torch.long) for ps in send]
        slots = layout.grad_sends()  # a LocalGradientLayout's grad_ranges are the owners' slots
        clear = [k for k in layout.kl_slots if k is not None] + [c for ch in layout.change_slots for c in ch.values()]
        return cls(segment_params, dims, (cat, flat), slots, owners, clear, comm, replica)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        layers: Sequence,
        plain_params: Sequence[nn.Parameter],
        layout: SegmentLayout,
        comm: Communicator,
        options: object = None,
    ) -> ShardedGradients:
        """:meth:`build` for the optimizer's curvature layers and its other parameters (one last segment).

        Args:
            model: the model (for the parameters' names in errors).
            layers: the curvature layers (``CurvatureLayer``), in layout order.
            plain_params: the parameters outside curvature layers.
            layout: the buffers' layout.
            comm: the communicator.
            options: the optimizer's ``SPNGDOptions`` (options not supported with FSDP2 are refused).
        """
        if getattr(options, "weight_rescale", False):
            raise ValueError("SPNGD: weight_rescale=True is not supported with FSDP2 (sharded) parameters")
        if getattr(options, "compile_step", False) not in (False, None):
            raise ValueError(
                "SPNGD: compile_step is not supported with FSDP2 (sharded) parameters; use compile_step=False"
            )
        named = {id(p): n for n, p in model.named_parameters()}
        segments = [list(layer.params) for layer in layers]
        splits = [layer.split_update for layer in layers]
        if plain_params:
            plain = list(plain_params)
            segments.append(plain)
            splits.append(lambda flat: _split_flat(flat, plain))
        return cls.build(named, segments, splits, layout, comm)

    def _positions(self, device: torch.device, which: int) -> list[Tensor]:
        """The receive (0) or send (1) positions on ``device``."""
        if not self._device_positions or self._device_positions[0][0].device != device:
            self._device_positions = [[p.to(device) for p in ps] for ps in self.positions]
        return self._device_positions[which]

    def _by_owner(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.comm.world_size)]
        for i, o in enumerate(self.owners):
            out[o].append(i)
        return out

    def fill_gradients(self, grad_buffer: Tensor) -> None:
        """Owners' segments of ``grad_buffer`` ← the averaged gradients from every rank's shards;
        the change and KL slots are cleared (last step's values are not gradients).

        Args:
            grad_buffer: the flat gradient buffer.
        """
        from torch.distributed.tensor import DTensor

        grad_buffer.index_fill_(0, self.clear.to(grad_buffer.device), 0.0)
        w, me = self.comm.world_size, self.comm.rank
        dtype, device = grad_buffer.dtype, grad_buffer.device
        sends: list[list[Tensor]] = []
        for o, segs in enumerate(self._by_owner()):
            pieces = []
            for i in segs if self.replica[o] == self.replica[me] else ():  # HSDP: owners of my replica
                for p in self.segment_params[i]:
                    g = p.grad
                    if g is None:
                        pieces.append(torch.zeros(local_tensor(p).numel(), dtype=dtype, device=device))
                    else:
                        local = g._local_tensor if isinstance(g, DTensor) else g
                        pieces.append(local.reshape(-1).to(dtype))
            sends.append([torch.cat(pieces) if pieces else grad_buffer.new_empty(0)])
        pos = self._positions(device, 0)
        grad_buffer.index_copy_(0, pos[me], sends[me][0])
        sends[me] = []
        receives = [[grad_buffer.new_empty(pos[r].numel())] if r != me else [] for r in range(w)]
        if w > 1:
            self.comm.exchange(sends, receives, kind="grads", dtype=dtype, device=device)
            for r in range(w):
                if r != me:
                    grad_buffer.index_copy_(0, pos[r], receives[r][0])

    def local_updates(self, grad_buffer: Tensor) -> dict[int, Tensor]:
        """Every rank's shards of the owners' updates (by parameter id), after copying each owner's
        change and KL slots to every rank.

        Args:
            grad_buffer: the flat buffer whose owned segments hold the preconditioned updates.
        """
        w, me = self.comm.world_size, self.comm.rank
        dtype, device = grad_buffer.dtype, grad_buffer.device
        pos = self._positions(device, 1)
        mine = [grad_buffer.index_select(0, pos[r]) for r in range(w)]
        by_owner = self._by_owner()
        receives = [
            [grad_buffer.new_empty(sum(local_tensor(p).numel() for i in segs for p in self.segment_params[i]))]
            if o != me
            else []
            for o, segs in enumerate(by_owner)
        ]
        if w > 1:
            sends = [[mine[r]] if r != me else [] for r in range(w)]
            self.comm.exchange(sends, receives, kind="precond", dtype=dtype, device=device)
            if any(self.slots):
                self.comm.gather_segments(grad_buffer, self.slots, kind="precond")
        receives[me] = [mine[me]]
        out: dict[int, Tensor] = {}
        for o, segs in enumerate(by_owner):
            flat, at = receives[o][0], 0
            for i in segs:
                for p in self.segment_params[i]:
                    local = local_tensor(p)
                    out[id(p)] = flat[at : at + local.numel()].view(local.shape)
                    at += local.numel()
        return out
