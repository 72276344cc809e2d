"""Per-layer curvature state: accumulators, estimates (EMA), damped inverses, and the flat buffers.

Host-side bookkeeping (which statistics were collected this step, how many rows) stays in Python
ints, so nothing here reads device values back except the one flag per step that says whether a
step must be skipped and the inversion failure flags on refresh steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from .damping import pi_damping
from .inverse import invert_damped
from .layers import BatchNormCurvature, CurvatureLayer, KroneckerLayer
from .layout import GradLayout, StatsLayout
from .options import CurvatureOptions


@dataclass
class InversionEvents:
    inverted: int = 0
    retries: int = 0
    fallbacks: list[str] = field(default_factory=list)


class CurvatureState:
    def __init__(self, layers: list[CurvatureLayer], stats_layout: StatsLayout, grad_layout: GradLayout,
                 owners: list[int], rank: int, options: CurvatureOptions,
                 plain_params: list[torch.nn.Parameter] | None = None) -> None:
        self.layers = layers
        self.all_params = [p for layer in layers for p in layer.params] + list(plain_params or [])
        self.stats_layout = stats_layout
        self.grad_layout = grad_layout
        self.rank = rank
        self.options = options
        self.owned = [i for i in range(len(layers)) if owners[i] == rank]
        # The parameters outside curvature layers form one more gradient segment, with its own owner.
        self.plain_params = list(plain_params or [])
        self.plain_owned = bool(self.plain_params) and owners[len(layers)] == rank
        self._names = [[s.name for s in layer.stat_specs()] for layer in layers]
        self._counts = [{n: 0 for n in names} for names in self._names]
        self._first = [{n: True for n in names} for names in self._names]
        self._examples = [0] * len(layers)
        self.due = [{n: True for n in names} for names in self._names]
        self.est_ready = [{n: False for n in names} for names in self._names]
        self.inverses: dict[int, list[Tensor | None]] = {}
        self.device: torch.device | None = None
        self.acc = self.est = self.grad_buffer = None  # allocated on first use, on the model's device
        self._acc_views: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------ buffers
    def ensure_buffers(self, device: torch.device) -> None:
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
                    raise ValueError(f"SPNGD: all parameters must be on one device; {layer.name} has a parameter on {p.device}, expected {device}")
        self.device = device
        # Statistics are kept in fp32 (fp64 when the model is fp64), whatever the activations' dtype.
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.all_params) else torch.float32
        self.dtype = dtype
        f32 = dict(dtype=dtype, device=device)
        self.acc = torch.zeros(self.stats_layout.numel, **f32)
        self.est = torch.zeros(self.stats_layout.chunk_numel, **f32)
        self.grad_buffer = torch.zeros(self.grad_layout.numel, **f32)
        self._acc_views = [
            {n: self.acc[s.offset : s.end].view(-1, 3) if n == "F" else self.acc[s.offset : s.end] for n, s in stats.items()}
            for stats in self.stats_layout.stats
        ]
        slots = list(self.grad_layout.kl_slots) + [c for ch in self.grad_layout.change_slots for c in ch.values()]
        self._slot_index = torch.tensor(slots, dtype=torch.long, device=device)
        self._count_index = torch.tensor(
            [c for counts in self.stats_layout.counts for c in counts.values()], dtype=torch.long, device=device
        )

    # ------------------------------------------------------------------ accumulation (hooks)
    def wants_forward(self, index: int) -> bool:
        return any(self.due[index].values())

    def accumulate_forward(self, index: int, inputs: Tensor, output: Tensor, backend: str) -> object:
        self.ensure_buffers(inputs.device)
        layer = self.layers[index]
        names = layer.forward_stat_names()
        self._examples[index] += inputs.shape[0] if inputs.dim() > 1 else 1
        if names and not any(self.due[index][n] for n in names):
            return None  # only the output-gradient statistic is due; it needs no forward context
        first = bool(names) and self._first[index][names[0]]
        context, count = layer.accumulate_forward(inputs, output, self._acc_views[index], first, backend)
        for n in names:
            self._first[index][n] = False
            self._counts[index][n] += count
        return context

    def accumulate_backward(self, index: int, grad: Tensor, context: object, backend: str) -> None:
        layer = self.layers[index]
        names = layer.backward_stat_names()
        if not self.due[index][names[0]]:
            return
        first = self._first[index][names[0]]
        count = layer.accumulate_backward(grad, context, self._acc_views[index], 1.0, first, backend)
        for n in names:
            self._first[index][n] = False
            self._counts[index][n] += count

    def any_collected(self) -> bool:
        return any(c > 0 for counts in self._counts for c in counts.values())

    def forward_seen(self) -> bool:
        return any(e > 0 for e in self._examples)

    def any_backward_due(self) -> bool:
        return any(self.due[i][n] for i, layer in enumerate(self.layers) for n in layer.backward_stat_names())

    def fresh_stats(self) -> list[tuple[int, str]]:
        """(layer, statistic) pairs collected this step."""
        return [(i, n) for i, names in enumerate(self._names) for n in names if self._counts[i][n] > 0]

    def any_backward_collected(self) -> bool:
        return any(self._counts[i][n] > 0 for i, layer in enumerate(self.layers) for n in layer.backward_stat_names())

    def examples_seen(self) -> int:
        return max(self._examples, default=0)

    def _fresh(self, index: int, name: str) -> bool:
        return self._counts[index][name] > 0

    def reset_accumulation(self) -> None:
        for i, names in enumerate(self._names):
            for n in names:
                self._counts[i][n] = 0
                self._first[i][n] = True
            self._examples[i] = 0

    # ------------------------------------------------------------------ per step
    def fill_gradients(self, layers: list[CurvatureLayer], plain: list[torch.nn.Parameter]) -> None:
        buf = self.grad_buffer
        buf.index_fill_(0, self._slot_index, 0.0)  # last step's KL / change values are not gradients
        for i, layer in enumerate(layers):
            seg = self.grad_layout.grads[i]
            if isinstance(layer, KroneckerLayer):
                buf[seg.offset : seg.end].view(layer.dim_g, layer.dim_a).copy_(layer.gradient_matrix())
            else:
                gw, gb = layer.gradient_pair()
                c = layer.channels
                buf[seg.offset : seg.offset + c].copy_(gw)
                buf[seg.offset + c : seg.end].copy_(gb)
        if plain:
            seg = self.grad_layout.grads[len(layers)]
            pos = seg.offset
            for p in plain:
                dst = buf[pos : pos + p.numel()]
                if p.grad is None:
                    dst.zero_()
                else:
                    dst.copy_(p.grad.reshape(-1))
                pos += p.numel()

    def prepare_local_stats(self, grad_scale: float, loss_scale: Tensor | None = None) -> None:
        """Scale output-gradient statistics to per-example gradients (× grad_scale², ÷ the AMP
        loss scale² when the backward ran on a scaled loss) and write the counts."""
        if grad_scale != 1.0 or loss_scale is not None:
            factor: Tensor | float = grad_scale * grad_scale
            if loss_scale is not None:
                factor = factor / loss_scale.to(device=self.device, dtype=self.dtype) ** 2
            for i, layer in enumerate(self.layers):
                for n in layer.backward_stat_names():
                    if self._fresh(i, n):
                        self._acc_views[i][n].mul_(factor)
        counts = [float(self._counts[i][n]) for i, stats in enumerate(self.stats_layout.counts) for n in stats]
        if counts:
            self.acc.index_copy_(0, self._count_index, torch.tensor(counts, dtype=self.dtype).to(self.device, non_blocking=True))

    def local_nonfinite(self, refresh: bool) -> Tensor:
        bad = ~torch.isfinite(self.grad_buffer).all()
        if refresh:
            bad = bad | ~torch.isfinite(self.acc).all()
        return bad

    def nonfinite_names(self, layers: list[CurvatureLayer], refresh: bool) -> list[str]:
        names = []
        for i, layer in enumerate(layers):
            seg = self.grad_layout.grads[i]
            bad = not bool(torch.isfinite(self.grad_buffer[seg.offset : seg.end]).all())
            if refresh:
                bad = bad or any(not bool(torch.isfinite(v).all()) for v in self._acc_views[i].values())
            if bad:
                names.append(layer.name)
        if len(self.grad_layout.grads) > len(layers):
            seg = self.grad_layout.grads[-1]
            if not bool(torch.isfinite(self.grad_buffer[seg.offset : seg.end]).all()):
                names.append("<parameters outside supported layers>")
        return names

    def reduce_stats(self, comm) -> None:
        comm.reduce_scatter(self.acc, self.stats_layout.chunk_numel, kind="stats")

    def reduce_gradients(self, comm, already_averaged: bool) -> None:
        if comm.world_size == 1 or already_averaged:
            return
        chunk = comm.reduce_scatter(self.grad_buffer, self.grad_layout.chunk_numel, kind="grads")
        chunk.div_(comm.world_size)

    def finalize_stats(self, track_changes: bool = False) -> None:
        """est ← X (or the EMA b·est + (1−b)·X) for each refreshed statistic this rank owns.

        With ``track_changes``, r = ‖X − Ê‖_F / ‖Ê‖_F of every owned statistic — the newly
        collected X against the current (bias-corrected) estimate Ê, before X enters it — is
        written into its change slot of the gradient buffer (returned to all ranks by the
        all-gather), computed for all statistics in a few whole-chunk ops. Comparing two EMA
        estimates instead would read a change of X as only (1−b)·r.
        """
        if track_changes:
            self._write_changes()
        self._finalize_owned()

    def _change_index(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per element of the estimate chunk: its statistic (owned index, or a spare bin) and its
        Frobenius weight (2 for an off-diagonal packed entry, 1 on the diagonal, 0 for counts)."""
        cached = getattr(self, "_change_cache", None)
        if cached is not None:
            return cached
        base = self.rank * self.stats_layout.chunk_numel
        n_chunk = self.stats_layout.chunk_numel
        owned_stats = [(i, n) for i in self.owned for n in self._names[i]]
        seg_id = torch.full((n_chunk,), len(owned_stats), dtype=torch.long)
        weight = torch.zeros(n_chunk, dtype=self.dtype)
        count_pos = []
        slots = []
        for k, (i, n) in enumerate(owned_stats):
            seg = self.stats_layout.stats[i][n]
            lo, hi = seg.offset - base, seg.end - base
            seg_id[lo:hi] = k
            spec = next(sp for sp in self.layers[i].stat_specs() if sp.name == n)
            if spec.dim > 0:
                w = torch.full((seg.numel,), 2.0, dtype=self.dtype)
                rows = torch.arange(spec.dim)
                w[rows * spec.dim - rows * (rows - 1) // 2] = 1.0  # packed diagonal positions
            else:
                w = torch.tensor([1.0, 2.0, 1.0], dtype=self.dtype).repeat(seg.numel // 3)
            weight[lo:hi] = w
            count_pos.append(self.stats_layout.counts[i][n] - base)
            slots.append(self.grad_layout.change_slots[i][n])
        dev = self.device
        self._change_cache = (seg_id.to(dev), weight.to(dev), torch.tensor(count_pos, dtype=torch.long, device=dev),
                              torch.tensor(slots, dtype=torch.long, device=dev))
        return self._change_cache

    def _write_changes(self) -> None:
        seg_id, weight, count_pos, slots = self._change_index()
        if slots.numel() == 0:
            return
        base = self.rank * self.stats_layout.chunk_numel
        collected = self.acc[base : base + self.stats_layout.chunk_numel]
        rows = collected[count_pos]
        # X = sum / count per statistic; a statistic not collected this step (count 0) gives inf/NaN
        # here, but only the fresh statistics' slots are read (read_changes).
        new = collected * torch.cat([1.0 / rows, rows.new_ones(1)])[seg_id]
        old = self.est
        b = self.options.ema_decay
        if b is not None:  # the bias-corrected estimate; no refresh yet (k = 0) leaves it zero: "large"
            k = self.est[count_pos]
            corr = torch.where(k > 0, 1.0 / (1.0 - torch.pow(torch.full_like(k, b), k)), torch.zeros_like(k))
            old = old * torch.cat([corr, k.new_ones(1)])[seg_id]
        n_bins = slots.numel() + 1
        diff = torch.zeros(n_bins, dtype=self.dtype, device=self.device).index_add_(0, seg_id, weight * (new - old) ** 2)
        norm = torch.zeros(n_bins, dtype=self.dtype, device=self.device).index_add_(0, seg_id, weight * old**2)
        change = torch.sqrt(diff / norm)[:-1]  # 0/0 or x/0 (no previous estimate) gives NaN/inf: "large"
        self.grad_buffer.index_copy_(0, slots, change.to(self.grad_buffer.dtype))

    def read_changes(self, stats: list[tuple[int, str]]) -> list[float]:
        """Relative changes of the given statistics from the gathered buffer (one host transfer)."""
        if not stats:
            return []
        idx = torch.tensor([self.grad_layout.change_slots[i][n] for i, n in stats], device=self.device)
        return self.grad_buffer[idx].tolist()

    def _finalize_owned(self) -> None:
        base = self.rank * self.stats_layout.chunk_numel
        b = self.options.ema_decay
        for i in self.owned:
            for n, seg in self.stats_layout.stats[i].items():
                if not self._fresh(i, n):
                    continue
                c = self.stats_layout.counts[i][n]
                value = self.acc[seg.offset : seg.end] / self.acc[c]
                e = self.est[seg.offset - base : seg.end - base]
                k = self.est[c - base : c - base + 1]
                if b is None:
                    e.copy_(value)
                    k.fill_(1.0)
                else:
                    e.mul_(b).add_(value, alpha=1.0 - b)
                    k.add_(1.0)
                self.est_ready[i][n] = True

    def _bias_correction(self, count_slots: list[int]) -> Tensor | float:
        b = self.options.ema_decay
        if b is None:
            return 1.0
        base = self.rank * self.stats_layout.chunk_numel
        k = self.est[torch.tensor([c - base for c in count_slots], device=self.device)]
        return 1.0 / (1.0 - torch.pow(torch.full_like(k, b), k))

    def needs_first_inverse(self) -> bool:
        return any(
            i not in self.inverses and self.est_ready[i].get("A") and self.est_ready[i].get("G")
            for i in self.owned if isinstance(self.layers[i], KroneckerLayer)
        )

    def refresh_inverses(self, damping: float, backend: str, only_fresh: bool = False) -> InversionEvents:
        """Damped inverses of the owned Kronecker layers; with ``only_fresh`` just the layers with a
        statistic refreshed this step (or without an inverse yet).

        Both sides of a layer are always inverted together, with the current π and λ: π-damping's
        cross term (π√λ·I ⊗ (√λ/π)·I = λ·I) holds only when Â and Ĝ use the same π, so a side kept
        from an older refresh would turn it into λ·π_new/π_old (see docs/design.md, "Stale
        statistics and π-damping")."""
        events = InversionEvents()
        base = self.rank * self.stats_layout.chunk_numel
        offset, sizes, items = self.stats_layout.packed_runs[self.rank]
        if not sizes:
            return events
        slots = [self.stats_layout.counts[i][n] for i, n in items]
        mats = ops.unpack_upper(self.est, sizes, scale=self._bias_correction(slots), offset=offset - base, dtype=self.dtype, backend=backend)
        by_item = dict(zip(items, mats))
        ready = [i for i in self.owned if isinstance(self.layers[i], KroneckerLayer) and self.est_ready[i]["A"] and self.est_ready[i]["G"]]
        if not ready:
            return events
        a_mats = [by_item[(i, "A")] for i in ready]
        g_mats = [by_item[(i, "G")] for i in ready]
        tr_a = torch.stack([m.diagonal().sum() for m in a_mats])
        tr_g = torch.stack([m.diagonal().sum() for m in g_mats])
        dim_a = torch.tensor([m.shape[0] for m in a_mats], dtype=self.dtype, device=self.device)
        dim_g = torch.tensor([m.shape[0] for m in g_mats], dtype=self.dtype, device=self.device)
        shift_a, shift_g = pi_damping(tr_a, dim_a, tr_g, dim_g, damping)
        todo = []
        for j, i in enumerate(ready):
            have = self.inverses.get(i)
            complete = have is not None and have[0] is not None and have[1] is not None
            if only_fresh and complete and not (self._fresh(i, "A") or self._fresh(i, "G")):
                continue
            todo.append(((i, 0), a_mats[j], shift_a[j]))
            todo.append(((i, 1), g_mats[j], shift_g[j]))
        results = invert_damped(todo, backend=backend, max_retries=self.options.max_inverse_retries)
        events.inverted = len(todo)
        for i in ready:
            old = self.inverses.get(i, [None, None])
            new = list(old)
            for side in (0, 1):
                r = results.get((i, side))
                if r is None:
                    continue
                events.retries += r.retries
                if r.inverse is None:
                    new[side] = old[side]
                    events.fallbacks.append(f"{self.layers[i].name} ({'AG'[side]})")
                else:
                    new[side] = r.inverse
            self.inverses[i] = new
        return events

    def precondition_owned(self, damping: float, lrs: list[float] | None, backend: str,
                           plain_lrs: list[float] | None = None) -> None:
        """Overwrite this rank's gradient chunk with the preconditioned gradients, and with ``lrs``
        (one per layer; ``plain_lrs`` one per parameter outside curvature layers) write this rank's
        share of the KL sum Σ lr²·⟨U, ∇⟩ over every parameter the optimizer updates: U = ∇ where
        there is no curvature (yet), so those terms are lr²·‖∇‖²."""
        buf = self.grad_buffer
        kl_terms: list[Tensor] = []
        batched: dict[tuple, list[int]] = {}
        for i in self.owned:
            layer = self.layers[i]
            if isinstance(layer, KroneckerLayer):
                inv = self.inverses.get(i)
                if inv is None:
                    if lrs is not None:
                        g = self._grad_view(i)
                        kl_terms.append(lrs[i] ** 2 * (g * g).sum())
                    continue
                key = (layer.dim_g, layer.dim_a, inv[0] is None, inv[1] is None)
                batched.setdefault(key, []).append(i)
            elif isinstance(layer, BatchNormCurvature) and not self.est_ready[i]["F"]:
                if lrs is not None:
                    g = self.update_view(i)
                    kl_terms.append(lrs[i] ** 2 * (g * g).sum())
            elif isinstance(layer, BatchNormCurvature):
                seg = self.grad_layout.grads[i]
                c = layer.channels
                fisher = self._est_view(i, "F").view(-1, 3) * self._bias_correction([self.stats_layout.counts[i]["F"]])
                g_gamma, g_beta = buf[seg.offset : seg.offset + c], buf[seg.offset + c : seg.end]
                u_gamma, u_beta = ops.bn_unitwise_solve(fisher, g_gamma, g_beta, damping=damping, backend=backend)
                if lrs is not None:
                    kl_terms.append(lrs[i] ** 2 * ((u_gamma * g_gamma).sum() + (u_beta * g_beta).sum()))
                g_gamma.copy_(u_gamma)
                g_beta.copy_(u_beta)
        for (_, _, no_a, no_g), members in batched.items():
            grads = torch.stack([self._grad_view(i) for i in members])
            u = grads
            if not no_g:
                u = torch.stack([self.inverses[i][1] for i in members]) @ u
            if not no_a:
                u = u @ torch.stack([self.inverses[i][0] for i in members])
            for j, i in enumerate(members):
                if lrs is not None:
                    kl_terms.append(lrs[i] ** 2 * (u[j] * grads[j]).sum())
                self._grad_view(i).copy_(u[j])
        if lrs is not None and self.plain_owned:
            flat = self.update_view(len(self.layers))
            pos = 0
            for p, lr in zip(self.plain_params, plain_lrs or []):
                g = flat[pos : pos + p.numel()]
                kl_terms.append(lr**2 * (g * g).sum())
                pos += p.numel()
        if lrs is not None:
            slot = self.grad_layout.kl_slots[self.rank]
            total = torch.stack(kl_terms).sum() if kl_terms else torch.zeros((), device=self.device)
            buf[slot] = total

    def kl_coefficient(self, kl_clip: float) -> Tensor:
        slots = torch.tensor(self.grad_layout.kl_slots, device=self.device)
        return ops.kl_clip_from_total(self.grad_buffer[slots].sum(), kl_clip)

    def _grad_view(self, i: int) -> Tensor:
        layer = self.layers[i]
        seg = self.grad_layout.grads[i]
        return self.grad_buffer[seg.offset : seg.end].view(layer.dim_g, layer.dim_a)

    def _est_view(self, i: int, name: str) -> Tensor:
        base = self.rank * self.stats_layout.chunk_numel
        seg = self.stats_layout.stats[i][name]
        return self.est[seg.offset - base : seg.end - base]

    def update_view(self, index: int) -> Tensor:
        seg = self.grad_layout.grads[index]
        return self.grad_buffer[seg.offset : seg.end]

    def estimates(self) -> dict[str, dict[str, Tensor]]:
        """Bias-corrected estimates of the owned layers: dense A, G (Kronecker) or (C, 3) F (BatchNorm)."""
        out: dict[str, dict[str, Tensor]] = {}
        if self.est is None:
            return out
        for i in self.owned:
            layer = self.layers[i]
            entry = {}
            for n, spec in zip(self._names[i], layer.stat_specs()):
                if not self.est_ready[i][n]:
                    continue
                scale = self._bias_correction([self.stats_layout.counts[i][n]])
                if spec.dim > 0:
                    entry[n] = ops.unpack_upper(self._est_view(i, n), [spec.dim], scale=scale, dtype=self.dtype, backend="torch")[0]
                else:
                    entry[n] = self._est_view(i, n).view(-1, 3) * scale
            out[layer.name] = entry
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "est": None if self.est is None else self.est.detach().clone(),
            "est_ready": [dict(r) for r in self.est_ready],
            "inverses": {self.layers[i].name: [None if t is None else t.detach().clone() for t in inv] for i, inv in self.inverses.items()},
        }

    def validate_state_dict(self, sd: object) -> None:
        """Raise ValueError for a saved curvature state that does not fit this model (before any load)."""
        where = "SPNGD.load_state_dict"
        if not isinstance(sd, dict) or any(k not in sd for k in ("est", "est_ready", "inverses")):
            raise ValueError(f"{where}: the curvature entry must be a dict with est, est_ready and inverses")
        est = sd["est"]
        if est is not None and (not isinstance(est, Tensor) or est.numel() != self.stats_layout.chunk_numel):
            got = est.numel() if isinstance(est, Tensor) else type(est).__name__
            raise ValueError(f"{where}: curvature estimate has {got} elements, expected {self.stats_layout.chunk_numel}")
        if len(sd["est_ready"]) != len(self.layers):
            raise ValueError(f"{where}: est_ready lists {len(sd['est_ready'])} layers, expected {len(self.layers)}")
        by_name = {layer.name: layer for layer in self.layers}
        for name, inv in sd["inverses"].items():
            layer = by_name.get(name)
            if not isinstance(layer, KroneckerLayer):
                raise ValueError(f"{where}: saved inverses for {name!r}, which is not a Kronecker layer of this model")
            for side, dim in ((0, layer.dim_a), (1, layer.dim_g)):
                t = inv[side]
                if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (dim, dim)):
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{where}: saved inverse {'AG'[side]} of {name} has shape {got}, expected {(dim, dim)}")

    def load_state_dict(self, sd: dict, device: torch.device) -> None:
        self.ensure_buffers(device)
        if sd["est"] is not None:
            if sd["est"].shape != self.est.shape:
                raise ValueError(f"SPNGD.load_state_dict: curvature estimate has {sd['est'].numel()} elements, expected {self.est.numel()}")
            self.est.copy_(sd["est"])
        self.est_ready = [dict(r) for r in sd["est_ready"]]
        by_name = {layer.name: i for i, layer in enumerate(self.layers)}
        self.inverses = {
            by_name[name]: [None if t is None else t.to(device) for t in inv] for name, inv in sd["inverses"].items()
        }
