"""One SPNGD step: gradients → (statistics) → communication → refresh → inversion →
preconditioning → KL clip → update, and the per-step bookkeeping around it.

The stages, with the profiler ranges they run under:

1. ``spngd::gather_gradients``: copy gradients into the flat buffer (unscaled under AMP); on a
   refresh scale the output-gradient statistics and write the row counts; agree over ranks on
   whether anything is non-finite (one host sync) and skip the step if so;
2. ``spngd::communication``: sum the due statistics (on a refresh) and the gradients onto owners;
3. ``spngd::factor_finalize``: owners fold the new statistics into their estimates;
4. ``spngd::inversion``: owners re-invert (π-damped) when due;
5. ``spngd::preconditioning``: owners precondition their gradients (and their KL share);
6. ``spngd::communication``: gather the updates from their owners;
7. ``spngd::update``: KL-clip coefficient, momentum update, weight rescale.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from . import kernel_guard, ops
from .compiled_step import CompiledStep
from .distributed.communicator import Communicator
from .distributed.fsdp import ShardedGradients, local_tensor
from .layers import CurvatureLayer
from .options import FisherType, SPNGDOptions
from .refresh import RefreshSchedule
from .state import CurvatureState

__all__ = ["StepRunner"]

_COUNTER_NAMES = (
    "steps",
    "factor_updates",
    "inverse_updates",
    "skipped_steps",
    "inversion_retries",
    "inversion_fallbacks",
    "mc_backwards",
)


class StepRunner:
    """Runs SPNGD's steps and keeps the per-step bookkeeping (step index, refresh flags, counters).

    Args:
        layers: the curvature layers.
        plain_params: parameters outside curvature layers.
        state: the curvature state of this rank.
        schedule: when each statistic is refreshed.
        comm: the communicator.
        options: the optimizer's options.
        ddp_wrapped: the model is DDP-wrapped (gradients arrive averaged).
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        plain_params: Sequence[nn.Parameter],
        state: CurvatureState,
        schedule: RefreshSchedule,
        comm: Communicator,
        options: SPNGDOptions,
        ddp_wrapped: bool,
    ) -> None:
        self.layers = list(layers)
        self.plain_params = list(plain_params)
        self.state = state
        self.schedule = schedule
        self.comm = comm
        self.options = options
        self.ddp_wrapped = ddp_wrapped
        self.step_index = 0
        self.refresh_now = False
        self.examples = 0  # examples seen by the model's forward this step
        self.loss_terms = 0  # label positions of the losses passed to opt.backward this step
        self.inverse_sides_done = 0
        self.counters = {name: 0 for name in _COUNTER_NAMES}
        self._warned: set[str] = set()
        self.sharded: ShardedGradients | None = None  # FSDP2 models: set by SPNGD (distributed/fsdp.py)
        self._local_updates: dict[int, Tensor] = {}
        backend = options.compile_backend
        self.compiled = (
            CompiledStep(layers, plain_params, state, comm, options, backend) if backend is not None else None
        )
        self.set_due()

    # ------------------------------------------------------------------ bookkeeping
    def set_due(self) -> None:
        """Tell the accumulation which statistics the current step refreshes."""
        flags = self.schedule.due(self.step_index)
        self.state.accumulation.set_due(flags)
        self.refresh_now = any(flags)

    def report(self) -> dict:
        """The counters, per-statistic refresh intervals, skipped work and kernel fallbacks."""
        out: dict = dict(self.counters)
        steps = max(1, self.counters["steps"])
        stat_ids = self.state.accumulation.stat_ids
        intervals: dict[str, dict[str, int]] = {}
        for (i, name), k in zip(stat_ids, self.schedule.intervals):
            intervals.setdefault(self.layers[i].name, {})[name] = k
        out["intervals"] = intervals
        total_stats = len(stat_ids) * steps
        out["factor_work_skipped"] = 1.0 - sum(self.schedule.refreshes) / total_stats if total_stats else 0.0
        sides = self.state.inverses.sides
        out["inverse_work_skipped"] = 1.0 - self.inverse_sides_done / (sides * steps) if sides else 0.0
        out["kernel_fallbacks"] = kernel_guard.fallback_count()
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _end_step(self) -> None:
        self.examples = 0
        self.loss_terms = 0
        self.state.accumulation.reset()

    @staticmethod
    def check_groups(param_groups: Sequence[dict], step_index: int) -> None:
        """Hyperparameters written into param_groups mid-run (schedulers, user code) are checked
        before they can reach the weights (host floats: no synchronisation)."""
        for k, group in enumerate(param_groups):
            for name, low, high in (("lr", 0.0, None), ("momentum", 0.0, 1.0), ("weight_decay", 0.0, None)):
                v = group[name]
                if isinstance(v, Tensor):
                    continue  # a tensor lr (torch allows it) is used as is
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low and (high is None or v < high)):
                    raise ValueError(
                        f"SPNGD.step: param_groups[{k}]['{name}'] is {v!r} at step {step_index}; expected a finite number >= {low}"
                        + (f" and < {high}" if high is not None else "")
                    )

    # ------------------------------------------------------------------ the step
    def run(
        self, param_groups: Sequence[dict], param_state: dict, amp_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        """One step over ``param_groups`` (momentum buffers in ``param_state``).

        Args:
            param_groups: the optimizer's parameter groups.
            param_state: the optimizer's per-parameter state.
            amp_scale: the GradScaler's scale (None without one).
            found_inf: the GradScaler's found-inf flag (None without one).
        """
        self.check_groups(param_groups, self.step_index)
        if self.compiled is not None and self.sharded is not None:
            raise ValueError(
                "SPNGD: compile_step is not supported for FSDP2 (fully_shard) models; use compile_step=False"
            )
        st, opts = self.state, self.options
        buffers, acc = st.buffers, st.accumulation
        device = buffers.all_params[0].device
        buffers.ensure(device)
        self.comm.begin_step()  # per-step byte counter
        refresh = self.refresh_now and acc.any_collected()
        if (
            self.refresh_now
            and opts.fisher is FisherType.MC
            and acc.forward_seen()
            and acc.any_backward_due()
            and not acc.any_backward_collected()
        ):
            raise RuntimeError(
                "SPNGD.step: a curvature refresh was due but no sampled-label backward ran; "
                "with fisher='mc' call opt.backward(loss, out) instead of loss.backward()"
            )
        lam = opts.damping_at(self.step_index)

        with record_function("spngd::gather_gradients"):
            if self.compiled is not None:
                self.compiled.gather(amp_scale)
            else:
                buffers.fill_gradients() if self.sharded is None else self.sharded.fill_gradients(buffers.grad_buffer)
                if amp_scale is not None:
                    buffers.grad_buffer.mul_(torch.reciprocal(amp_scale.to(buffers.grad_buffer)))
            if refresh:
                examples = self.loss_terms or self.examples or acc.examples_seen()
                grad_scale = float(examples) if opts.fisher is FisherType.EMP else 1.0
                loss_scale = amp_scale if opts.fisher is FisherType.EMP else None
                acc.prepare_local_stats(grad_scale, loss_scale)
            if opts.check_finite or found_inf is not None:
                bad = (
                    buffers.local_nonfinite(refresh)
                    if opts.check_finite
                    else torch.zeros((), dtype=torch.bool, device=device)
                )
                if found_inf is not None:
                    bad = bad | (found_inf.to(bad.device) > 0)
                if bool(self.comm.any_flag(bad)):  # one host sync per step
                    names = buffers.nonfinite_names(refresh) if opts.check_finite else []
                    self._skip(names or ["the gradients (GradScaler found inf)"])
                    return

        with record_function("spngd::communication"):
            if refresh:
                buffers.reduce_stats(self.comm, acc.due_stats())
            buffers.reduce_gradients(self.comm, already_averaged=self.ddp_wrapped)
        fresh = acc.fresh_stats() if refresh else []
        self._refresh_curvature(refresh, fresh, lam)
        self._precondition_and_update(param_groups, param_state, lam)

        if fresh:
            ids = {key: k for k, key in enumerate(acc.stat_ids)}
            changes = st.estimates.read_changes(fresh) if self.schedule.adaptive else []
            self.schedule.record(self.step_index, [ids[key] for key in fresh], changes)
        self.counters["steps"] += 1
        self.step_index += 1
        self._end_step()
        self.set_due()

    def _refresh_curvature(self, refresh: bool, fresh: list[tuple[int, str]], lam: float) -> None:
        """Finalise the new statistics and re-invert where due."""
        st, opts = self.state, self.options
        adaptive = self.schedule.adaptive
        if refresh:
            with record_function("spngd::factor_finalize"):
                st.estimates.finalize(st.accumulation, track_changes=adaptive)
            self.counters["factor_updates"] += 1
        if adaptive:  # inverses follow their own statistic's refreshes
            invert = bool(fresh) or st.inverses.needs_first_inverse()
        else:
            invert = (self.step_index % opts.inverse_interval == 0) or st.inverses.needs_first_inverse()
        if not invert:
            return
        with record_function("spngd::inversion"):
            events = st.inverses.refresh(lam, opts.backend, st.accumulation, only_fresh=adaptive, comm=self.comm)
        self.counters["inverse_updates"] += 1
        self.inverse_sides_done += st.inverses.sides_refreshed(fresh) if adaptive else st.inverses.sides
        self.counters["inversion_retries"] += events.retries
        self.counters["inversion_fallbacks"] += len(events.fallbacks)
        for name in events.fallbacks:
            self._warn_once(
                f"inv:{name}",
                f"SPNGD: inverting the factors of {name} failed even with more damping; using its last good inverse (or the plain gradient)",
            )

    def _precondition_and_update(self, param_groups: Sequence[dict], param_state: dict, lam: float) -> None:
        st, opts = self.state, self.options
        if self.compiled is not None:
            with record_function("spngd::compiled_update"):
                self.compiled.precondition_and_update(param_groups, param_state, lam)
            return
        lrs = plain_lrs = None
        if opts.kl_clip is not None:
            group_of = {id(p): g for g in param_groups for p in g["params"]}
            lrs = [group_of[id(layer.module.weight)]["lr"] for layer in self.layers]
            plain_lrs = [group_of[id(p)]["lr"] for p in self.plain_params]
        with record_function("spngd::preconditioning"):
            st.preconditioner.precondition_owned(lam, lrs, opts.backend, plain_lrs=plain_lrs)
        with record_function("spngd::communication"):
            if self.sharded is None:
                st.buffers.gather_updates(self.comm)
            else:
                self._local_updates = self.sharded.local_updates(st.buffers.grad_buffer)
        with record_function("spngd::update"):
            nu = st.preconditioner.kl_coefficient(opts.kl_clip) if opts.kl_clip is not None else None
            self._apply_updates(param_groups, param_state, nu)

    def _skip(self, names: list[str]) -> None:
        self.counters["skipped_steps"] += 1
        where = ", ".join(names[:5]) + (" …" if len(names) > 5 else "") if names else "unknown layer"
        warnings.warn(
            f"SPNGD: non-finite gradient or curvature statistics in {where}; step skipped, state unchanged",
            stacklevel=3,
        )
        self._end_step()

    def _apply_updates(self, param_groups: Sequence[dict], param_state: dict, nu: Tensor | None) -> None:
        """θ ← θ − lr·v with v ← m·v + (ν·U + wd·θ), per parameter group (torch-SGD form)."""
        buffers = self.state.buffers
        updates: dict[int, Tensor] = {}
        if self.sharded is not None:  # this rank's shards of the updates (FSDP2)
            updates = {k: u * nu if nu is not None else u for k, u in self._local_updates.items()}
        for index, layer in enumerate(self.layers if self.sharded is None else ()):
            u = buffers.grad_segment(index)
            if nu is not None:
                u = u * nu
            for p, part in zip(layer.params, layer.split_update(u)):
                updates[id(p)] = part.view_as(p)
        if self.plain_params and self.sharded is None:
            flat = buffers.grad_segment(len(self.layers))
            if nu is not None:  # the KL sum counted these parameters too
                flat = flat * nu
            pos = 0
            for p in self.plain_params:
                updates[id(p)] = flat[pos : pos + p.numel()].view_as(p)
                pos += p.numel()
        # torch's form (v ← m·v + d; θ −= η·v) already is Goyal et al.'s corrected update
        # u ← m·(η_t/η_{t−1})·u + η_t·d with u = η·v: the recipe's momentum correction needs no
        # extra factor here (docs/design.md, "Momentum correction").
        for group in param_groups:
            ps, us, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None or id(p) not in updates:
                    continue
                state = param_state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(local_tensor(p))
                us.append(updates[id(p)].to(p.dtype))
                bufs.append(local_tensor(state["momentum_buffer"]))
            ops.momentum_update(
                ps, us, bufs, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"]
            )
        if self.options.weight_rescale:
            for layer in self.layers:
                layer.rescale_weight()
