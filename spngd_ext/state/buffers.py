"""The optimizer's three flat buffers and the views into them.

* ``acc``: the statistics accumulator of every layer (all ranks' chunks), reduce-scattered on a
  refresh step;
* ``est``: this rank's chunk of the curvature estimates (the statistics it owns, and one refresh
  count per statistic);
* ``grad_buffer``: every layer's gradient segment (then its update), the per-statistic change
  slots and the KL slot of each chunk; reduce-scattered as gradients, all-gathered as updates.

Where each piece lives is :mod:`spngd_ext.layout`'s business; this module allocates the buffers
on the model's device on first use and hands out the views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..distributed.communicator import Communicator
from ..layers import CurvatureLayer
from ..layers.base import write_flat_gradients
from ..layout import GradLayout, StatsLayout

__all__ = ["FlatBuffers"]


class FlatBuffers:
    """Statistics accumulator, estimate chunk and gradient buffer of one rank.

    Args:
        layers: the curvature layers, in layout order.
        stats_layout: where each statistic lives in ``acc``/``est``.
        grad_layout: where each gradient, change slot and KL slot lives in ``grad_buffer``.
        rank: this process's rank.
        plain_params: parameters outside curvature layers (one more gradient segment).
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        stats_layout: StatsLayout,
        grad_layout: GradLayout,
        rank: int,
        plain_params: Sequence[nn.Parameter],
    ) -> None:
        self.layers = list(layers)
        self.stats_layout = stats_layout
        self.grad_layout = grad_layout
        self.rank = rank
        self.plain_params = list(plain_params)
        self.all_params = [p for layer in self.layers for p in layer.params] + self.plain_params
        self.device: torch.device | None = None  # None until allocated on the model's device
        self.dtype = torch.float32
        self.acc = self.est = self.grad_buffer = torch.empty(0)
        self._acc_views: list[dict[str, Tensor]] = []
        self._slot_index = self._count_index = torch.empty(0, dtype=torch.long)

    @property
    def allocated(self) -> bool:
        """Whether the buffers exist (the optimizer has run, or a checkpoint was loaded)."""
        return self.device is not None

    @property
    def chunk_base(self) -> int:
        """Offset of this rank's chunk in the statistics buffer."""
        return self.rank * self.stats_layout.chunk_numel

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
        self.acc = torch.zeros(self.stats_layout.numel, dtype=self.dtype, device=device)
        self.est = torch.zeros(self.stats_layout.chunk_numel, dtype=self.dtype, device=device)
        self.grad_buffer = torch.zeros(self.grad_layout.numel, dtype=self.dtype, device=device)
        self._acc_views = [
            {
                n: self.acc[s.offset : s.end].view(-1, 3) if n == "F" else self.acc[s.offset : s.end]
                for n, s in stats.items()
            }
            for stats in self.stats_layout.stats
        ]
        slots = list(self.grad_layout.kl_slots) + [c for ch in self.grad_layout.change_slots for c in ch.values()]
        self._slot_index = torch.tensor(slots, dtype=torch.long, device=device)
        self._count_index = torch.tensor(
            [c for counts in self.stats_layout.counts for c in counts.values()], dtype=torch.long, device=device
        )

    # ------------------------------------------------------------------ views
    def acc_views(self, index: int) -> dict[str, Tensor]:
        """The accumulator of each statistic of layer ``index`` (BatchNorm's F as (C, 3))."""
        return self._acc_views[index]

    def grad_segment(self, index: int) -> Tensor:
        """The flat gradient (later update) segment of layer ``index``; ``len(layers)``: the plain parameters."""
        seg = self.grad_layout.grads[index]
        return self.grad_buffer[seg.offset : seg.end]

    def est_view(self, index: int, name: str) -> Tensor:
        """The estimate of statistic ``name`` of an owned layer, in this rank's estimate chunk."""
        seg = self.stats_layout.stats[index][name]
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
        if len(self.grad_layout.grads) > len(self.layers):
            if not bool(torch.isfinite(self.grad_segment(len(self.layers))).all()):
                names.append("<parameters outside supported layers>")
        return names

    def reduce_stats(self, comm: Communicator) -> None:
        """Sum the statistics over ranks into their owners' chunks."""
        comm.reduce_scatter(self.acc, self.stats_layout.chunk_numel, kind="stats")

    def reduce_gradients(self, comm: Communicator, already_averaged: bool) -> None:
        """Average the gradients over ranks into their owners' chunks (DDP has done it already)."""
        if comm.world_size == 1 or already_averaged:
            return
        chunk = comm.reduce_scatter(self.grad_buffer, self.grad_layout.chunk_numel, kind="grads")
        chunk.div_(comm.world_size)
