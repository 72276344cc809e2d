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
from typing import cast

import torch
from torch import Tensor

from .. import ops
from ..distributed.communicator import Communicator
from ..layers import CurvatureLayer
from .accumulation import Accumulation
from .buffers import FlatBuffers
from .estimates import Estimates
from .routes import exchange_inverses, exchange_traces

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
    """The damped inverses of the Kronecker layers whose gradient this rank preconditions.

    ``inverses[i]``: one entry per side of layer i (None: identity, after failed inversions); a
    layer without an entry has no inverse yet and is not preconditioned.

    Under ownership per statistic a layer's two factors may have different owners: each owner
    inverts its own factor (π from both mean traces, exchanged first), and the owner of the
    smaller one sends its packed inverse to the gradient owner (:mod:`.routes`), which caches
    the pair. Which layers are inverted is decided alike on every rank (readiness and freshness
    are the same everywhere; completeness of a pair travels with the traces).

    Args:
        layers: the curvature layers.
        buffers: the flat buffers.
        estimates: the owned estimates the inverses are computed from.
        owned: indices of the layers whose gradient this rank preconditions.
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
        self.seen: set[int] = set()  # layers (any owner) that have been through an inversion
        self.inverted_with: dict[int, float] = {}  # split layers: λ of their last inversion

    def _ready(self) -> list[int]:
        """Layers with inverse sides (any owner) whose every side has an estimate."""
        return [
            i
            for i, layer in enumerate(self.layers)
            if layer.inverse_sides and self.estimates.is_ready(i, layer.inverse_sides)
        ]

    def needs_first_inverse(self) -> bool:
        """Whether a layer (any owner) has estimates but has not been inverted yet; the same on every rank."""
        return any(i not in self.seen for i in self._ready())

    def sides_refreshed(self, fresh: Sequence[tuple[int, str]]) -> int:
        """Inverse sides recomputed under adaptive refresh when ``fresh`` statistics were collected
        (both sides of a layer are inverted whenever either is fresh, see :meth:`refresh`)."""
        return sum(len(self.layers[i].inverse_sides) for i in {i for i, _ in fresh})

    def _complete(self, i: int) -> bool:
        have = self.inverses.get(i)
        return have is not None and all(t is not None for t in have)

    def refresh(
        self,
        damping: float,
        backend: ops.Backend | str,
        accumulation: Accumulation,
        only_fresh: bool = False,
        comm: Communicator | None = None,
    ) -> InversionEvents:
        """Damped inverses of the owned factors; with ``only_fresh`` just those of layers with a
        statistic refreshed this step (or not inverted yet; with one owner also without a complete
        inverse pair). Every rank calls it at the same steps (the exchanges are collective).

        Both sides of a layer are always inverted together, with the current π and λ: π-damping's
        cross term (π√λ·I ⊗ (√λ/π)·I = λ·I) holds only when Â and Ĝ use the same π, so a side kept
        from an older refresh would turn it into λ·π_new/π_old (see docs/design.md, "Stale
        statistics and π-damping").

        Args:
            damping: λ of this step.
            backend: the ops backend.
            accumulation: this step's collection (which statistics are fresh).
            only_fresh: invert only layers with a fresh statistic, never inverted yet, or (one owner)
                without a complete pair.
            comm: the communicator (needed when a layer's factors have different owners).
        """
        events = InversionEvents()
        buf = self.buffers
        layout = buf.layout
        ready = self._ready()
        seen_before, split = set(self.seen), {r.layer for r in layout.inverse_routes}
        self.seen.update(ready)
        owners = layout.assignment.stat_owners

        def due(i: int) -> bool:  # the same on every rank for a split layer
            fresh = any(accumulation.is_fresh(i, n) for n in self.layers[i].inverse_sides)
            if i in split:  # unchanged factors and λ give the same inverses: nothing to invert or send
                return fresh or i not in seen_before or (not only_fresh and self.inverted_with.get(i) != damping)
            return not only_fresh or fresh or i not in seen_before

        # a split layer is re-inverted only when due (its owners cannot both see whether the
        # pair is complete); a layer with one owner also when its pair is incomplete
        todo_layers = [
            i
            for i in ready
            if buf.rank in owners[i].values() and (due(i) or (i not in split and not self._complete(i)))
        ]
        routes = [r for r in layout.inverse_routes if r.layer in set(ready) and due(r.layer)]
        if routes and comm is None:
            raise ValueError("InverseCache.refresh: a layer's factors have two owners; pass the communicator")
        offset, sizes, items = layout.packed_runs[buf.rank]
        by_item: dict[tuple[int, str], Tensor] = {}
        if sizes and todo_layers:
            slots = [layout.counts[i][n] for i, n in items]
            mats = ops.unpack_upper(
                buf.est,
                sizes,
                scale=self.estimates.bias_correction(slots),
                offset=offset - buf.chunk_base,
                dtype=buf.dtype,
                backend=backend,
            )
            by_item = dict(zip(items, mats))
        means = _diagonal_means(by_item)
        sides = [layer.inverse_sides for layer in self.layers]
        remote = (
            exchange_traces(comm, routes, sides, means, dtype=buf.dtype, device=buf.est.device)  # type: ignore[arg-type]  # comm checked above
            if routes
            else {}
        )
        todo = []
        if todo_layers:

            def side_mean(i: int, name: str) -> Tensor:  # own factor, or the other owner's (exchanged)
                return means[(i, name)] if (i, name) in means else remote[i]

            mean_a = torch.stack([side_mean(i, sides[i][0]) for i in todo_layers])
            mean_g = torch.stack([side_mean(i, sides[i][1]) for i in todo_layers])
            shift_a, shift_g = pi_damping(mean_a, 1, mean_g, 1, damping)
            for j, i in enumerate(todo_layers):
                for side, (name, shift) in enumerate(zip(sides[i], (shift_a[j], shift_g[j]))):
                    if (i, name) in by_item:
                        todo.append(((i, side), by_item[(i, name)], shift))
        results = invert_damped(todo, backend=backend, max_retries=self.max_retries)
        computed: dict[tuple[int, str], Tensor | None] = {}
        for key, r in results.items():
            i, side = cast(tuple[int, int], key)
            name = self.layers[i].inverse_sides[side]
            events.retries += r.retries
            if r.inverse is None:
                events.fallbacks.append(f"{self.layers[i].name} ({name})")
            computed[(i, name)] = r.inverse
        received = (
            exchange_inverses(
                comm,  # type: ignore[arg-type]  # not None when there are routes (checked above)
                routes,
                computed,
                dtype=buf.dtype,
                device=buf.est.device,
                backend=backend,
            )
            if routes
            else {}
        )
        computed.update(received)
        self.inverted_with.update({r.layer: damping for r in routes})
        for i in todo_layers:
            if buf.layout.assignment.grad_owners[i] != buf.rank:
                continue
            old = self.inverses.get(i, [None, None])
            new = list(old)
            for side, name in enumerate(self.layers[i].inverse_sides):
                t = computed.get((i, name))
                new[side] = old[side] if t is None else t  # failed: the last good inverse (or None)
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
        self.after_load()

    def after_load(self) -> None:
        """After the estimates and inverses were restored: a ready layer has been inverted; a
        split layer is inverted again at the next inversion (its λ is not saved)."""
        self.seen = set(self._ready())
        self.inverted_with = {}


def _diagonal_means(mats: dict[tuple[int, str], Tensor]) -> dict[tuple[int, str], Tensor]:
    """tr(M)/n of each matrix; small matrices of one size in one stacked op (a depthwise layer
    has a factor pair per channel)."""
    small: dict[int, list[tuple[int, str]]] = {}
    out: dict[tuple[int, str], Tensor] = {}
    for key, m in mats.items():
        n = m.shape[0]
        if n < 64:
            small.setdefault(n, []).append(key)
        else:
            out[key] = m.diagonal().sum() / n
    for n, keys in small.items():
        means = torch.stack([mats[k] for k in keys]).diagonal(dim1=1, dim2=2).sum(-1) / n
        out.update(zip(keys, means.unbind(0)))
    return out
