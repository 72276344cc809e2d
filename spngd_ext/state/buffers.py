"""The optimizer's three flat buffers and the views into them.

* ``acc``: the statistics accumulator of every layer (every statistic once, at its true length,
  grouped by owner); on a refresh step the due statistics are summed onto their owners;
* ``est``: this rank's range of the curvature estimates (the statistics it owns, and one refresh
  count per statistic);
* ``grad_buffer``: every layer's gradient segment (then its update), the per-statistic change
  slots and each gradient owner's KL slot; summed onto the owners as gradients, gathered from
  them as updates.

Where each piece lives is :class:`~spngd_ext.distributed.segments.SegmentLayout`'s business; this
module allocates the buffers on the model's device on first use and hands out the views.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor, nn

from ..distributed.communicator import Communicator
from ..distributed.segments import SegmentLayout
from ..layers import CurvatureLayer
from ..layers.base import write_flat_gradients

__all__ = ["FlatBuffers"]


class FlatBuffers:
    """Statistics accumulator, estimate chunk and gradient buffer of one rank.

    Args:
        layers: the curvature layers, in layout order.
        layout: where each statistic lives in ``acc``/``est`` and each gradient, change slot and
            KL slot in ``grad_buffer``, and which rank owns each.
        rank: this process's rank.
        plain_params: parameters outside curvature layers (one more gradient segment).
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        layout: SegmentLayout,
        rank: int,
        plain_params: Sequence[nn.Parameter],
    ) -> None:
        self.layers = list(layers)
        self.layout = layout
        self.rank = rank
        self.plain_params = list(plain_params)
        self.all_params = [p for layer in self.layers for p in layer.params] + self.plain_params
        self.device: torch.device | None = None  # None until allocated on the model's device
        self.dtype = torch.float32
        self.acc = self.est = self.grad_buffer = torch.empty(0)
        self.half: Tensor | None = None  # first half-batch accumulator (noise-aware stale statistics)
        self._acc_views: list[dict[str, Tensor]] = []
        self._half_views: list[dict[str, Tensor]] = []
        self._slot_index = self._count_index = torch.empty(0, dtype=torch.long)

    @property
    def allocated(self) -> bool:
        """Whether the buffers exist (the optimizer has run, or a checkpoint was loaded)."""
        return self.device is not None

    @property
    def chunk_base(self) -> int:
        """Offset of this rank's range in the statistics buffer."""
        return self.layout.stats_ranges[self.rank].offset

    @property
    def chunk_numel(self) -> int:
        """Elements of this rank's range of the statistics buffer (the size of ``est``)."""
        return self.layout.stats_ranges[self.rank].numel

    def ensure(self, device: torch.device) -> None:
        """Allocate the buffers on ``device`` the first time; ValueError if the model moved since."""
        if self.device is not None:
            if device != self.device:
                raise ValueError(
                    f"SPNGD: the model moved from {self.device} to {device} after the optimizer first ran; "
                    "build the optimizer after moving the model"
                )
            return
        for layer in self.layers:
            for p in layer.params:
                if p.device != device:
                    raise ValueError(
                        f"SPNGD: all parameters must be on one device; {layer.name} has a parameter on {p.device}, expected {device}"
                    )
        self.device = device
        # Statistics are kept in fp32 (fp64 when the model is fp64), whatever the activations' dtype.
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.all_params) else torch.float32
        self.acc = torch.zeros(self.layout.stats_numel, dtype=self.dtype, device=device)
        self.est = torch.zeros(self.chunk_numel, dtype=self.dtype, device=device)
        self.grad_buffer = torch.zeros(self.layout.grad_numel, dtype=self.dtype, device=device)
        self._acc_views = self._views(self.acc)
        kl_slots = [k for k in self.layout.kl_slots if k is not None]
        slots = kl_slots + [c for ch in self.layout.change_slots for c in ch.values()]
        self._slot_index = torch.tensor(slots, dtype=torch.long, device=device)
        self._count_index = torch.tensor(
            [c for counts in self.layout.counts for c in counts.values()], dtype=torch.long, device=device
        )

    def _views(self, flat: Tensor) -> list[dict[str, Tensor]]:
        return [
            {n: flat[s.offset : s.end].view(-1, 3) if n == "F" else flat[s.offset : s.end] for n, s in stats.items()}
            for stats in self.layout.stats
        ]

    # ------------------------------------------------------------------ views
    def acc_views(self, index: int) -> dict[str, Tensor]:
        """The accumulator of each statistic of layer ``index`` (BatchNorm's F as (C, 3))."""
        return self._acc_views[index]

    def half_views(self, index: int) -> dict[str, Tensor]:
        """The first-half-batch accumulator of each statistic of layer ``index`` (allocated, like
        ``acc``, on first use)."""
        if self.half is None:
            self.half = torch.zeros_like(self.acc)
            self._half_views = self._views(self.half)
        return self._half_views[index]

    def grad_segment(self, index: int) -> Tensor:
        """The flat gradient (later update) segment of layer ``index``; ``len(layers)``: the plain parameters."""
        seg = self.layout.grads[index]
        return self.grad_buffer[seg.offset : seg.end]

    def est_view(self, index: int, name: str) -> Tensor:
        """The estimate of statistic ``name`` of an owned layer, in this rank's estimate chunk."""
        seg = self.layout.stats[index][name]
        return self.est[seg.offset - self.chunk_base : seg.end - self.chunk_base]

    def write_counts(self, counts: Sequence[float]) -> None:
        """Write the per-statistic row counts (layout order) into their accumulator slots."""
        if counts:
            self.acc.index_copy_(
                0, self._count_index, torch.tensor(list(counts), dtype=self.dtype).to(self.device, non_blocking=True)
            )

    # ------------------------------------------------------------------ per step
    def fill_gradients(self) -> None:
        """Copy every parameter's gradient into its segment; clear last step's KL and change slots."""
        self.grad_buffer.index_fill_(0, self._slot_index, 0.0)  # last step's KL / change values are not gradients
        for i, layer in enumerate(self.layers):
            layer.write_gradient(self.grad_segment(i))
        if self.plain_params:
            write_flat_gradients(self.plain_params, self.grad_segment(len(self.layers)))

    def local_nonfinite(self, refresh: bool) -> Tensor:
        """A 0-dim flag: a non-finite gradient (or, on a refresh, statistic) on this rank."""
        bad = ~torch.isfinite(self.grad_buffer).all()
        if refresh:
            bad = bad | ~torch.isfinite(self.acc).all()
        return bad

    def nonfinite_names(self, refresh: bool) -> list[str]:
        """Names of the layers with a non-finite gradient or statistic (for the warning)."""
        names = []
        for i, layer in enumerate(self.layers):
            bad = not bool(torch.isfinite(self.grad_segment(i)).all())
            if refresh:
                bad = bad or any(not bool(torch.isfinite(v).all()) for v in self._acc_views[i].values())
            if bad:
                names.append(layer.name)
        if len(self.layout.grads) > len(self.layers):
            if not bool(torch.isfinite(self.grad_segment(len(self.layers))).all()):
                names.append("<parameters outside supported layers>")
        return names

    def reduce_stats(self, comm: Communicator, due: Collection[tuple[int, str]]) -> None:
        """Sum the due statistics (and their counts) over ranks onto their owners; a statistic
        that is not due moves nothing, so an owner with nothing due receives nothing.

        Args:
            comm: the communicator.
            due: (layer index, statistic name) of the statistics due this step.
        """
        if comm.world_size == 1:
            return
        comm.reduce_segments(self.acc, self.layout.stats_sends(due), kind="stats")
        if self.half is not None:  # the noise estimate's half-batch sums travel like the statistics
            comm.reduce_segments(self.half, self.layout.stats_sends(due), kind="stats")

    def reduce_gradients(self, comm: Communicator, already_averaged: bool) -> None:
        """Average the gradients over ranks onto their owners (DDP has done it already)."""
        if comm.world_size == 1 or already_averaged:
            return
        comm.reduce_segments(self.grad_buffer, self.layout.grad_sends(), kind="grads")
        mine = self.layout.grad_ranges[self.rank]
        self.grad_buffer[mine.offset : mine.end].div_(comm.world_size)

    def gather_updates(self, comm: Communicator) -> None:
        """Every rank's copy of each owner's gradient range (updates, change and KL slots)
        becomes the owner's values."""
        if comm.world_size == 1:
            return
        comm.gather_segments(self.grad_buffer, self.layout.grad_sends(), kind="precond")
