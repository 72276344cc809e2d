"""Damped inverses of the Kronecker factors: π-damping, batched inversion with retries, and the
cache of the last good inverses.

π-factored Tikhonov damping (Martens & Grosse 2015): π = sqrt((tr A / dim A) / (tr G / dim G));
Â = A + π√λ I, Ĝ = G + (√λ/π) I. π = 1 when either trace is zero or not finite. Moving a factor T
between A and G leaves Ĝ⁻¹ ∇ Â⁻¹ unchanged.

Equal sizes are inverted in one batched call. A factor whose Cholesky fails (or whose inverse is
not finite) is retried alone with its damping ×10, up to ``max_retries`` times; if it still fails
the cache keeps the last good inverse, else None (the identity: the plain gradient for that side).
Reading the failure flags costs one host synchronisation per refresh (not per layer).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import ops
from ..layers import CurvatureLayer
from .accumulation import Accumulation
from .buffers import FlatBuffers
from .estimates import Estimates

__all__ = ["pi_damping", "InversionResult", "invert_damped", "InversionEvents", "InverseCache"]

_WHERE = "SPNGD.load_state_dict"


def pi_damping(
    trace_a: Tensor, dim_a: Tensor | int, trace_g: Tensor, dim_g: Tensor | int, damping: float
) -> tuple[Tensor, Tensor]:
    """Per-layer diagonal shifts (for A, for G); all arguments may be batched 1-D tensors.

    Args:
        trace_a: tr A per layer.
        dim_a: size of A per layer.
        trace_g: tr G per layer.
        dim_g: size of G per layer.
        damping: λ.
    """
    mean_a = trace_a / dim_a
    mean_g = trace_g / dim_g
    ok = torch.isfinite(mean_a) & torch.isfinite(mean_g) & (mean_a > 0) & (mean_g > 0)
    ratio = torch.where(ok, mean_a, torch.ones_like(mean_a)) / torch.where(ok, mean_g, torch.ones_like(mean_g))
    pi = torch.where(ok, torch.sqrt(ratio), torch.ones_like(ratio))
    root = math.sqrt(damping)
    return pi * root, root / pi


@dataclass
class InversionResult:
    """One factor's inversion: its inverse (None: every attempt failed) and the retries it took."""

    inverse: Tensor | None
    retries: int


def invert_damped(
    items: Sequence[tuple[Hashable, Tensor, Tensor]],
    *,
    backend: ops.Backend | str,
    max_retries: int,
) -> dict[Hashable, InversionResult]:
    """Invert ``matrix + shift·I`` for every (key, matrix, shift) item.

    Args:
        items: (key, symmetric matrix, 0-dim shift tensor) per factor.
        backend: the ops backend.
        max_retries: retries of a failed factor, each with 10x its shift.
    """
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = defaultdict(list)
    for k, (_, mat, _) in enumerate(items):
        groups[(mat.shape[0], mat.dtype, mat.device)].append(k)

    inverses: list[Tensor | None] = [None] * len(items)
    infos: list[Tensor] = []
    order: list[int] = []
    for members in groups.values():
        mats = torch.stack([items[k][1] for k in members])
        shifts = torch.stack([items[k][2].to(mats.dtype).reshape(()) for k in members])
        inv, info = ops.cholesky_inverse_damped(mats, shifts, backend=backend)
        for j, k in enumerate(members):
            inverses[k] = inv[j]
        infos.append(info)
        order.extend(members)

    results: dict[Hashable, InversionResult] = {}
    if not items:
        return results
    failed_pos = torch.nonzero(torch.cat(infos) != 0).flatten().tolist()  # the one host sync
    failed = {order[p] for p in failed_pos}
    for k, (key, mat, shift) in enumerate(items):
        if k not in failed:
            results[key] = InversionResult(inverses[k], 0)
            continue
        inverse = None
        attempt = 0
        for attempt in range(1, max_retries + 1):
            retry_shift = (shift * (10.0**attempt)).to(mat.dtype).reshape(1)
            inv, info = ops.cholesky_inverse_damped(mat.unsqueeze(0), retry_shift, backend=backend)
            if int(info[0]) == 0:
                inverse = inv[0]
                break
        results[key] = InversionResult(inverse, attempt)
    return results


@dataclass
class InversionEvents:
    """What one refresh of the inverses ran into: retries, and the factors that fell back."""

    retries: int = 0
    fallbacks: list[str] = field(default_factory=list)


class InverseCache:
    """The damped inverses of the owned layers that have :attr:`~CurvatureLayer.inverse_sides`.

    ``inverses[i]``: one entry per side of layer i (None: identity, after failed inversions); a
    layer without an entry has no inverse yet and is not preconditioned.

    Args:
        layers: the curvature layers.
        buffers: the flat buffers.
        estimates: the owned estimates the inverses are computed from.
        owned: indices of the layers this rank owns.
        max_retries: retries of a failed inversion.
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        buffers: FlatBuffers,
        estimates: Estimates,
        owned: Sequence[int],
        max_retries: int,
    ) -> None:
        self.layers = list(layers)
        self.buffers = buffers
        self.estimates = estimates
        self.owned = list(owned)
        self.max_retries = max_retries
        self.inverses: dict[int, list[Tensor | None]] = {}
        self.sides = sum(len(layer.inverse_sides) for layer in self.layers)  # over all ranks

    def _ready(self) -> list[int]:
        """Owned layers with inverse sides whose every side has an estimate."""
        return [
            i
            for i in self.owned
            if self.layers[i].inverse_sides and self.estimates.is_ready(i, self.layers[i].inverse_sides)
        ]

    def needs_first_inverse(self) -> bool:
        """Whether an owned layer has estimates but no inverse yet."""
        return any(i not in self.inverses for i in self._ready())

    def sides_refreshed(self, fresh: Sequence[tuple[int, str]]) -> int:
        """Inverse sides recomputed under adaptive refresh when ``fresh`` statistics were collected
        (both sides of a layer are inverted whenever either is fresh, see :meth:`refresh`)."""
        return sum(len(self.layers[i].inverse_sides) for i in {i for i, _ in fresh})

    def refresh(
        self, damping: float, backend: ops.Backend | str, accumulation: Accumulation, only_fresh: bool = False
    ) -> InversionEvents:
        """Damped inverses of the owned layers; with ``only_fresh`` just the layers with a
        statistic refreshed this step (or without an inverse yet).

        Both sides of a layer are always inverted together, with the current π and λ: π-damping's
        cross term (π√λ·I ⊗ (√λ/π)·I = λ·I) holds only when Â and Ĝ use the same π, so a side kept
        from an older refresh would turn it into λ·π_new/π_old (see docs/design.md, "Stale
        statistics and π-damping").

        Args:
            damping: λ of this step.
            backend: the ops backend.
            accumulation: this step's collection (which statistics are fresh).
            only_fresh: invert only layers with a fresh statistic or without an inverse.
        """
        events = InversionEvents()
        buf = self.buffers
        offset, sizes, items = buf.layout.packed_runs[buf.rank]
        if not sizes:
            return events
        slots = [buf.layout.counts[i][n] for i, n in items]
        mats = ops.unpack_upper(
            buf.est,
            sizes,
            scale=self.estimates.bias_correction(slots),
            offset=offset - buf.chunk_base,
            dtype=buf.dtype,
            backend=backend,
        )
        by_item = dict(zip(items, mats))
        ready = self._ready()
        if not ready:
            return events
        a_mats = [by_item[(i, self.layers[i].inverse_sides[0])] for i in ready]
        g_mats = [by_item[(i, self.layers[i].inverse_sides[1])] for i in ready]
        tr_a = torch.stack([m.diagonal().sum() for m in a_mats])
        tr_g = torch.stack([m.diagonal().sum() for m in g_mats])
        dim_a = torch.tensor([m.shape[0] for m in a_mats], dtype=buf.dtype, device=buf.device)
        dim_g = torch.tensor([m.shape[0] for m in g_mats], dtype=buf.dtype, device=buf.device)
        shift_a, shift_g = pi_damping(tr_a, dim_a, tr_g, dim_g, damping)
        todo = []
        for j, i in enumerate(ready):
            have = self.inverses.get(i)
            complete = have is not None and all(t is not None for t in have)
            if only_fresh and complete and not any(accumulation.is_fresh(i, n) for n in self.layers[i].inverse_sides):
                continue
            todo.append(((i, 0), a_mats[j], shift_a[j]))
            todo.append(((i, 1), g_mats[j], shift_g[j]))
        results = invert_damped(todo, backend=backend, max_retries=self.max_retries)
        for i in ready:
            old = self.inverses.get(i, [None, None])
            new = list(old)
            for side, name in enumerate(self.layers[i].inverse_sides):
                r = results.get((i, side))
                if r is None:
                    continue
                events.retries += r.retries
                if r.inverse is None:
                    new[side] = old[side]
                    events.fallbacks.append(f"{self.layers[i].name} ({name})")
                else:
                    new[side] = r.inverse
            self.inverses[i] = new
        return events

    def by_name(self) -> dict[str, tuple[Tensor | None, ...]]:
        """The inverses by layer name, sides in :attr:`~CurvatureLayer.inverse_sides` order."""
        return {self.layers[i].name: tuple(inv) for i, inv in self.inverses.items()}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The inverses by layer name (copies)."""
        return {
            self.layers[i].name: [None if t is None else t.detach().clone() for t in inv]
            for i, inv in self.inverses.items()
        }

    def validate_state_dict(self, saved: dict) -> None:
        """ValueError for saved inverses that do not fit this model (before anything is loaded)."""
        by_name = {layer.name: layer for layer in self.layers}
        for name, inv in saved.items():
            layer = by_name.get(name)
            if layer is None or not layer.inverse_sides:
                raise ValueError(f"{_WHERE}: saved inverses for {name!r}, which is not a Kronecker layer of this model")
            shapes = layer.inverse_shapes()
            for side, side_name in enumerate(layer.inverse_sides):
                t = inv[side]
                if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shapes[side_name]):
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"{_WHERE}: saved inverse {side_name} of {name} has shape {got}, expected {shapes[side_name]}"
                    )

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict`'s output onto ``device``."""
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        self.inverses = {index[name]: [None if t is None else t.to(device) for t in inv] for name, inv in saved.items()}
