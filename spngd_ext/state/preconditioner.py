"""Preconditioning the owned gradients in place, and this rank's share of the KL-clip sum.

Each layer preconditions itself (:meth:`~spngd_ext.layers.CurvatureLayer.precondition_batch`);
layers of one class with equal :meth:`~spngd_ext.layers.CurvatureLayer.batch_key` go in one call
(Kronecker layers of one shape: two batched GEMMs). A layer without curvature yet keeps its
gradient (U = ∇).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .. import ops
from ..layers import CurvatureLayer, LayerCurvature
from .buffers import FlatBuffers
from .estimates import Estimates
from .inverses import InverseCache

__all__ = ["Preconditioner"]


class Preconditioner:
    """Turns this rank's gradient chunk into updates.

    Args:
        layers: the curvature layers.
        buffers: the flat buffers (the gradient chunk is overwritten).
        estimates: the owned estimates (for layers without inverse sides).
        inverses: the owned inverses (for layers with inverse sides).
        owned: indices of the layers this rank owns.
        plain_owned: whether this rank owns the parameters outside curvature layers.
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        buffers: FlatBuffers,
        estimates: Estimates,
        inverses: InverseCache,
        owned: Sequence[int],
        plain_owned: bool,
    ) -> None:
        self.layers = list(layers)
        self.buffers = buffers
        self.estimates = estimates
        self.inverses = inverses
        self.owned = list(owned)
        self.plain_owned = plain_owned
        self._runs: dict[int, tuple[int, int, list[int]] | None] = {}

    def curvature(self, index: int) -> LayerCurvature | None:
        """What layer ``index`` is preconditioned with, or None when it has no curvature yet."""
        layer = self.layers[index]
        if layer.inverse_sides:
            inv = self.inverses.inverses.get(index)
            return None if inv is None else LayerCurvature(inverses=tuple(inv))
        if not self.estimates.is_ready(index):
            return None
        run = self._estimate_run(index) if layer.reads_estimates_as_run else None
        if run is not None:  # one unpacking for the whole layer
            start, end, counts = run
            scale = self.estimates.bias_correction(counts)
            return LayerCurvature(estimates=layer.estimates_from_run(self.buffers.est[start:end], scale))
        return LayerCurvature(estimates={n: self.estimates.estimate(index, n) for n in self.estimates.names[index]})

    def _estimate_run(self, index: int) -> tuple[int, int, list[int]] | None:
        """Where layer ``index``'s statistics lie back to back in :meth:`stat_specs` order within this
        rank's estimate chunk: (start, end) in the chunk and their count slots; None when they do not."""
        if index not in self._runs:
            layout, base = self.buffers.layout, self.buffers.chunk_base
            names = [s.name for s in self.layers[index].stat_specs()]
            segs = [layout.stats[index][n] for n in names]
            back_to_back = all(a.end == b.offset for a, b in zip(segs, segs[1:]))
            inside = base <= segs[0].offset and segs[-1].end <= base + self.buffers.chunk_numel
            run = (segs[0].offset - base, segs[-1].end - base, [layout.counts[index][n] for n in names])
            self._runs[index] = run if back_to_back and inside else None
        return self._runs[index]

    def precondition_owned(
        self,
        damping: float | Tensor,
        lrs: Sequence[float] | Tensor | None,
        backend: ops.Backend | str,
        plain_lrs: Sequence[float] | Tensor | None = None,
    ) -> None:
        """Overwrite this rank's gradient chunk with the preconditioned gradients, and with ``lrs``
        write this rank's share of the KL sum Σ lr²·⟨U, ∇⟩ over every parameter the optimizer
        updates: U = ∇ where there is no curvature (yet), so those terms are lr²·‖∇‖².

        Args:
            damping: λ of this step (a 0-dim tensor in the compiled step).
            lrs: the learning rate of each layer (None: no KL clipping, no sum; a 1-D tensor in
                the compiled step).
            backend: the ops backend.
            plain_lrs: the learning rate of each parameter outside curvature layers.
        """
        buf = self.buffers
        kl_terms: list[Tensor] = []
        groups: dict[tuple[type[CurvatureLayer], Hashable], list[tuple[int, LayerCurvature]]] = {}
        for i in self.owned:
            curvature = self.curvature(i)
            if curvature is None:
                if lrs is not None:
                    g = buf.grad_segment(i)
                    kl_terms.append(lrs[i] ** 2 * (g * g).sum())
                continue
            layer = self.layers[i]
            groups.setdefault((type(layer), layer.batch_key(curvature)), []).append((i, curvature))
        for (cls, _), members in groups.items():
            grads = [buf.grad_segment(i) for i, _ in members]
            # a tensor λ works wherever λ enters the layers' arithmetic (the compiled step)
            updates = cls.precondition_batch(
                [self.layers[i] for i, _ in members], grads, [c for _, c in members], cast(float, damping), backend
            )
            for (i, _), g, u in zip(members, grads, updates):
                if lrs is not None:
                    kl_terms.append(lrs[i] ** 2 * (u * g).sum())
                g.copy_(u)
        if lrs is not None and self.plain_owned:
            flat = buf.grad_segment(len(self.layers))
            pos = 0
            params: list[nn.Parameter] = buf.plain_params
            for p, lr in zip(params, plain_lrs if plain_lrs is not None else []):
                g = flat[pos : pos + p.numel()]
                kl_terms.append(lr**2 * (g * g).sum())
                pos += p.numel()
        slot = buf.layout.kl_slots[buf.rank]  # None: this rank owns no gradient
        if lrs is not None and slot is not None:
            total = torch.stack(kl_terms).sum() if kl_terms else torch.zeros((), device=buf.device)
            buf.grad_buffer[slot] = total

    def kl_coefficient(self, kl_clip: float) -> Tensor:
        """ν = min(1, sqrt(kl_clip / Σ_ranks KL share)) from the gathered KL slots (on the device)."""
        buf = self.buffers
        slots = torch.tensor([k for k in buf.layout.kl_slots if k is not None], device=buf.device, dtype=torch.long)
        return ops.kl_clip_from_total(buf.grad_buffer[slots].sum(), kl_clip)
