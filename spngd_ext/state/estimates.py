"""The curvature estimates of the statistics this rank owns: finalising a refresh (with or without
an EMA), the bias correction, the relative change a refresh brings, export and checkpointing.

After a refresh the owner turns each fresh statistic's reduced sum into X = sum / rows and folds
it into its estimate: est ← X, or est ← b·est + (1−b)·X with a per-statistic refresh count k in
the buffer, so the bias-corrected estimate is est / (1 − b^k).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layers import CurvatureLayer
from .accumulation import Accumulation
from .buffers import FlatBuffers

# Statistics shorter than this (elements) are finalized together by one gather and one scatter.
_BATCHED_BELOW = 1024
_SMALL_PATTERNS = 64  # cached index sets of small statistics (patterns of fresh statistics)

__all__ = ["Estimates"]

_WHERE = "SPNGD.load_state_dict"


class Estimates:
    """The estimates of the owned statistics, in the buffers' estimate chunk.

    Args:
        layers: the curvature layers.
        buffers: the flat buffers.
        owned: (layer index, statistic name) of the statistics this rank owns.
        ema_decay: the EMA decay b, or None (an estimate is replaced at each refresh).
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        buffers: FlatBuffers,
        owned: Sequence[tuple[int, str]],
        ema_decay: float | None,
    ) -> None:
        self.layers = list(layers)
        self.buffers = buffers
        self.owned = list(owned)
        self.ema_decay = ema_decay
        self.names = [[s.name for s in layer.stat_specs()] for layer in self.layers]
        self.ready = [{n: False for n in names} for names in self.names]
        self.noise_aware = False  # measure the change net of sampling noise (StalePolicy(rule="noise"))
        self._change_cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        # small statistics' gather indices by pattern of fresh statistics (built on the host once)
        self._small_index: dict[tuple[object, ...], tuple[Tensor, Tensor, Tensor]] = {}

    def is_ready(self, index: int, names: Sequence[str] | None = None) -> bool:
        """Whether layer ``index`` has an estimate of each of ``names`` (default: all its statistics),
        on whichever rank owns it: readiness is kept for every statistic on every rank (a
        statistic becomes ready when it is first collected, which all ranks see alike)."""
        return all(self.ready[index][n] for n in (self.names[index] if names is None else names))

    # ------------------------------------------------------------------ refresh
    def finalize(self, accumulation: Accumulation, track_changes: bool = False) -> None:
        """est ← X (or the EMA b·est + (1−b)·X) for each refreshed statistic this rank owns; every
        refreshed statistic, owned or not, is marked ready.

        With ``track_changes``, r = ‖X − Ê‖_F / ‖Ê‖_F of every owned statistic — the newly
        collected X against the current (bias-corrected) estimate Ê, before X enters it — is
        written into its change slot of the gradient buffer (returned to all ranks by the
        gather of the updates), computed for all statistics in a few whole-chunk ops. Comparing two EMA
        estimates instead would read a change of X as only (1−b)·r.

        Args:
            accumulation: this step's collection (which statistics are fresh).
            track_changes: measure the relative changes (adaptive refresh).
        """
        if track_changes:
            self._write_changes()
        buf = self.buffers
        base = buf.chunk_base
        b = self.ema_decay
        small: list[tuple[int, int, int]] = []  # (offset, end, count slot)
        for i, n in self.owned:
            if not accumulation.is_fresh(i, n):
                continue
            seg, c = buf.layout.stats[i][n], buf.layout.counts[i][n]
            if seg.end - seg.offset < _BATCHED_BELOW:
                small.append((seg.offset, seg.end, c))
                continue
            value = buf.acc[seg.offset : seg.end] / buf.acc[c]
            e = buf.est[seg.offset - base : seg.end - base]
            k = buf.est[c - base : c - base + 1]
            if b is None:
                e.copy_(value)
                k.fill_(1.0)
            else:
                e.mul_(b).add_(value, alpha=1.0 - b)
                k.add_(1.0)
        if small:
            self._finalize_small(small, b)
        for i, n in accumulation.fresh_stats():
            self.ready[i][n] = True

    def _finalize_small(self, small: list[tuple[int, int, int]], b: float | None) -> None:
        """The same update for many small statistics in a few whole-buffer ops (a depthwise layer
        has a statistic pair per channel: per-statistic ops would cost more than the arithmetic)."""
        buf = self.buffers
        base = buf.chunk_base
        slots, count_of_slot, counts = self._small_indices(small)
        value = buf.acc[slots] / buf.acc[count_of_slot]
        if b is None:
            buf.est[slots - base] = value
            buf.est[counts - base] = 1.0
        else:  # the same two roundings as e.mul_(b).add_(value, alpha=1 - b)
            buf.est[slots - base] = torch.add(buf.est[slots - base] * b, value, alpha=1.0 - b)
            buf.est[counts - base] += 1.0

    def _small_indices(self, small: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """(every element's slot, its statistic's count slot, the count slots) of ``small``,
        cached per pattern: a schedule repeats a few patterns of fresh statistics, so the indices
        reach the device once each, not at every refresh."""
        device = self.buffers.device
        key = (device, *small)
        cached = self._small_index.get(key)
        if cached is None:
            offsets = torch.tensor([o for o, _, _ in small], device=device)
            lengths = torch.tensor([e - o for o, e, _ in small], device=device)
            counts = torch.tensor([c for _, _, c in small], device=device)
            total = sum(e - o for o, e, _ in small)
            # element k of statistic j sits at offsets[j] + k; k = (position in the run) − (run start of j)
            shift = offsets - (torch.cumsum(lengths, 0) - lengths)
            slots = torch.arange(total, device=device) + torch.repeat_interleave(shift, lengths, output_size=total)
            cached = (slots, torch.repeat_interleave(counts, lengths, output_size=total), counts)
            if len(self._small_index) >= _SMALL_PATTERNS:  # a schedule with many patterns: keep the newest
                self._small_index.clear()
            self._small_index[key] = cached
        return cached

    def bias_correction(self, count_slots: Sequence[int]) -> Tensor | float:
        """1 / (1 − b^k) for the statistics whose count slots are given (1.0 without EMA)."""
        b = self.ema_decay
        if b is None:
            return 1.0
        base = self.buffers.chunk_base
        k = self.buffers.est[torch.tensor([c - base for c in count_slots], device=self.buffers.device)]
        return 1.0 / (1.0 - torch.pow(torch.full_like(k, b), k))

    def estimate(self, index: int, name: str) -> Tensor:
        """The bias-corrected estimate of an owned statistic, in its layer's usable form."""
        scale = self.bias_correction([self.buffers.layout.counts[index][name]])
        return self.layers[index].estimate_from_packed(name, self.buffers.est_view(index, name), scale)

    # ------------------------------------------------------------------ change measurement
    def _change_index(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per element of the estimate chunk: its statistic (owned index, or a spare bin) and its
        Frobenius weight (2 for an off-diagonal packed entry, 1 on the diagonal, 0 for counts)."""
        if self._change_cache is not None:
            return self._change_cache
        buf = self.buffers
        base, n_chunk = buf.chunk_base, buf.chunk_numel
        owned_stats = self.owned
        seg_id = torch.full((n_chunk,), len(owned_stats), dtype=torch.long)
        weight = torch.zeros(n_chunk, dtype=buf.dtype)
        count_pos, slots = [], []
        for k, (i, n) in enumerate(owned_stats):
            seg = buf.layout.stats[i][n]
            lo, hi = seg.offset - base, seg.end - base
            seg_id[lo:hi] = k
            spec = next(sp for sp in self.layers[i].stat_specs() if sp.name == n)
            if spec.dim > 0:
                w = torch.full((seg.numel,), 2.0, dtype=buf.dtype)
                rows = torch.arange(spec.dim)
                w[rows * spec.dim - rows * (rows - 1) // 2] = 1.0  # packed diagonal positions
            else:
                w = self.layers[i].frobenius_weights(n).to(buf.dtype)
            weight[lo:hi] = w
            count_pos.append(buf.layout.counts[i][n] - base)
            slots.append(buf.layout.change_slots[i][n])
        dev = buf.device
        self._change_cache = (
            seg_id.to(dev),
            weight.to(dev),
            torch.tensor(count_pos, dtype=torch.long, device=dev),
            torch.tensor(slots, dtype=torch.long, device=dev),
        )
        return self._change_cache

    def _write_changes(self) -> None:
        seg_id, weight, count_pos, slots = self._change_index()
        if slots.numel() == 0:
            return
        buf = self.buffers
        base = buf.chunk_base
        collected = buf.acc[base : base + buf.chunk_numel]
        rows = collected[count_pos]
        # X = sum / count per statistic; a statistic not collected this step (count 0) gives inf/NaN
        # here, but only the fresh statistics' slots are read (read_changes).
        per_row = torch.cat([1.0 / rows, rows.new_ones(1)])[seg_id]
        new = collected * per_row
        old = buf.est
        b = self.ema_decay
        k = buf.est[count_pos]  # refreshes so far
        if b is not None:  # the bias-corrected estimate; no refresh yet (k = 0) leaves it zero: "large"
            corr = torch.where(k > 0, 1.0 / (1.0 - torch.pow(torch.full_like(k, b), k)), torch.zeros_like(k))
            old = old * torch.cat([corr, k.new_ones(1)])[seg_id]
        n_bins = slots.numel() + 1

        def binned(values: Tensor) -> Tensor:  # weighted squared Frobenius norm per statistic
            return torch.zeros(n_bins, dtype=buf.dtype, device=buf.device).index_add_(0, seg_id, weight * values)

        diff = binned((new - old) ** 2)
        if self.noise_aware and buf.half is not None:
            # (S1 − S2)/rows: ‖·‖² estimates the noise variance of X (docs/design.md, "Telling change
            # from sampling noise"); Ê carries c_k times that (1 without EMA)
            noise = binned(((2.0 * buf.half[base : base + buf.chunk_numel] - collected) * per_row) ** 2)[:-1]
            c = torch.ones_like(k)
            if b is not None:
                bk = torch.pow(torch.full_like(k, b), k)
                c = torch.where(k > 0, (1.0 - b) * (1.0 + bk) / ((1.0 + b) * (1.0 - bk)), c)
            diff = diff - torch.cat([(1.0 + c) * noise, noise.new_zeros(1)])
        norm = binned(old**2)
        change = torch.sqrt(diff.clamp(min=0.0) / norm)[:-1]  # 0/0 or x/0 (no previous estimate): NaN/inf, "large"
        buf.grad_buffer.index_copy_(0, slots, change.to(buf.grad_buffer.dtype))

    def read_changes(self, stats: Sequence[tuple[int, str]]) -> list[float]:
        """Relative changes of the given statistics from the gathered buffer (one host transfer)."""
        if not stats:
            return []
        buf = self.buffers
        idx = torch.tensor([buf.layout.change_slots[i][n] for i, n in stats], device=buf.device)
        return buf.grad_buffer[idx].tolist()

    # ------------------------------------------------------------------ export, checkpoint
    def export(self) -> dict[str, dict[str, Tensor]]:
        """Bias-corrected estimates of the owned statistics by layer and statistic name (dense A, G;
        BatchNorm's F as (C, 3)); a layer whose factors have two owners appears on both ranks,
        each with its own statistic."""
        out: dict[str, dict[str, Tensor]] = {}
        if not self.buffers.allocated:
            return out
        for i, n in self.owned:
            entry = out.setdefault(self.layers[i].name, {})
            if self.ready[i][n]:
                entry[n] = self.estimate(i, n)
        return out

    def state_dict(self) -> dict:
        """The estimate chunk (None before the first step) and the readiness flags."""
        est = self.buffers.est.detach().clone() if self.buffers.allocated else None
        return {"est": est, "est_ready": [dict(r) for r in self.ready]}

    def validate_state_dict(self, sd: dict) -> None:
        """ValueError for saved estimates that do not fit this model (before anything is loaded)."""
        est = sd["est"]
        chunk = self.buffers.chunk_numel
        if est is not None and (not isinstance(est, Tensor) or est.numel() != chunk):
            got = est.numel() if isinstance(est, Tensor) else type(est).__name__
            raise ValueError(f"{_WHERE}: curvature estimate has {got} elements, expected {chunk}")
        if len(sd["est_ready"]) != len(self.layers):
            raise ValueError(f"{_WHERE}: est_ready lists {len(sd['est_ready'])} layers, expected {len(self.layers)}")

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`'s output (buffers already allocated)."""
        if sd["est"] is not None:
            if sd["est"].shape != self.buffers.est.shape:
                raise ValueError(
                    f"{_WHERE}: curvature estimate has {sd['est'].numel()} elements, expected {self.buffers.est.numel()}"
                )
            self.buffers.est.copy_(sd["est"])
        self.ready = [dict(r) for r in sd["est_ready"]]
