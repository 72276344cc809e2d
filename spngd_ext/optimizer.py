"""SPNGD: the optimizer (orchestration of capture → statistics → communication → update).

The math lives elsewhere: per-layer-type statistics in :mod:`spngd_ext.layers`, damping in
:mod:`spngd_ext.damping`, inversion in :mod:`spngd_ext.inverse`, buffer placement in
:mod:`spngd_ext.layout`, rank ownership in :mod:`spngd_ext.distributed.placement`, collectives in
:mod:`spngd_ext.distributed.communicator`. This module keeps the per-step state machine.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from . import kernel_guard, ops
from ._extension import cuda_ops_available, extension_loaded
from .capture import ActivationCapture
from .curvature_state import CurvatureState
from .distributed.communicator import Communicator, default_communicator
from .distributed.placement import LayerCost, OwnerAssignment
from .layers import CurvatureLayer, KroneckerLayer, find_curvature_layers
from .layout import build_layouts
from .options import CurvatureOptions, DampingSchedule, FisherType
from .recipe import rescaled_weight_norm_limit
from .stale import RefreshSchedule, StalePolicy

__all__ = ["SPNGD"]


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module inside a DistributedDataParallel wrapper, and whether there was one."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, True
    return model, False


class SPNGD(torch.optim.Optimizer):
    """Scalable and Practical Natural Gradient Descent (Osawa et al., TPAMI 2020).

    Kronecker-factored Fisher for Linear and Conv2d, unit-wise 2×2 Fisher for BatchNorm, other
    parameters momentum SGD. See docs/design.md for the formulas; ``opt.counters`` reports the work done.

    With ``torch.amp.GradScaler``: ``scaler.step(opt)`` hands this optimizer the scale and the
    found-inf flag (``_step_supports_amp_scaling``); the step unscales the gradients (and, with
    fisher="emp", the output-gradient statistics) itself and is skipped when an inf was found.
    Do not call ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` with fisher="emp": the scale of
    the statistics would then be unknown.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: DampingSchedule = 1e-3,
        fisher: str = "mc",
        mc_samples: int = 1,
        ema_decay: float | None = None,
        curvature_interval: int = 1,
        inverse_interval: int = 1,
        kl_clip: float | None = None,
        backend: str = "auto",
        stale: bool | StalePolicy = False,
        momentum_correction: bool = False,
        weight_rescale: bool = False,
        check_finite: bool = True,
        max_inverse_retries: int = 3,
        seed: int | None = None,
        process_group: object | None = None,
        comm_dtype: torch.dtype | None = None,
        communicator: Communicator | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SPNGD: model must be an nn.Module, got {type(model).__name__}")
        for name, value, low, high in (("lr", lr, 0.0, None), ("momentum", momentum, 0.0, 1.0), ("weight_decay", weight_decay, 0.0, None)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (high is not None and value >= high):
                bound = f">= {low}" + (f" and < {high}" if high is not None else "")
                raise ValueError(f"SPNGD: {name} must be a finite number {bound}, got {value!r}")
        if comm_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"SPNGD: comm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {comm_dtype!r}")
        inner, self._ddp_wrapped = _unwrap(model)
        params = list(model.parameters())
        if not params:
            raise ValueError("SPNGD: the model has no parameters")
        named = list(inner.named_parameters())
        first_device = named[0][1].device
        for pname, p in named:
            if p.device != first_device:
                raise ValueError(
                    f"SPNGD: all parameters must be on one device; {pname} is on {p.device} but "
                    f"{named[0][0]} is on {first_device}"
                )
        super().__init__(params, dict(lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay)))
        self.options = CurvatureOptions(
            damping=damping, fisher=fisher, mc_samples=mc_samples, ema_decay=ema_decay,
            curvature_interval=curvature_interval, inverse_interval=inverse_interval, kl_clip=kl_clip,
            backend=backend, check_finite=check_finite, max_inverse_retries=max_inverse_retries,
        )
        self._backend = self.options.backend.value
        if self._backend == "cuda":  # fail here, not at the first refresh several steps later
            if not cuda_ops_available():
                why = "no CUDA GPU is visible" if extension_loaded() else "the spngd_ext CUDA extension is not built"
                raise RuntimeError(f"SPNGD: backend='cuda' but {why} (use backend='auto' or 'torch')")
            if first_device.type != "cuda":
                raise ValueError(f"SPNGD: backend='cuda' needs the model on a CUDA device, but its parameters are on {first_device}")
        self._model = model
        self._layers: list[CurvatureLayer] = find_curvature_layers(inner)
        if not self._layers:
            warnings.warn("SPNGD: the model has no supported layer (Linear, Conv2d, BatchNorm); training as momentum SGD", stacklevel=2)
        layer_ids = {id(p) for layer in self._layers for p in layer.params}
        self._plain_params = [p for p in params if id(p) not in layer_ids]

        self._comm = communicator if communicator is not None else default_communicator(process_group, comm_dtype)
        costs = [self._cost_of(layer) for layer in self._layers]
        if self._plain_params:
            costs.append(LayerCost("<plain>", elementwise=sum(p.numel() for p in self._plain_params)))
        self.assignment = OwnerAssignment.balance(costs, self._comm.world_size)
        specs = [[(s.name, s.numel, s.dim) for s in layer.stat_specs()] for layer in self._layers]
        grad_numels = [layer.grad_numel for layer in self._layers]
        if self._plain_params:
            specs.append([])
            grad_numels.append(sum(p.numel() for p in self._plain_params))
        stats_layout, grad_layout = build_layouts(specs, grad_numels, self.assignment.owners, self._comm.world_size)
        self._state = CurvatureState(self._layers, stats_layout, grad_layout, list(self.assignment.owners), self._comm.rank, self.options,
                                     plain_params=self._plain_params)
        if not isinstance(stale, (bool, StalePolicy)):
            raise ValueError(f"SPNGD: stale must be a bool or a StalePolicy, got {stale!r}")
        policy = (StalePolicy() if stale is True else stale) or None
        self._stat_ids = [(i, s.name) for i, layer in enumerate(self._layers) for s in layer.stat_specs()]
        self._schedule = RefreshSchedule(len(self._stat_ids), fixed_interval=curvature_interval, policy=policy)
        self._kron_sides = sum(2 for layer in self._layers if isinstance(layer, KroneckerLayer))
        self._inverse_sides_done = 0

        # torch's form (v ← m·v + d; θ −= η·v) already is Goyal et al.'s corrected update
        # u ← m·(η_t/η_{t−1})·u + η_t·d with u = η·v: the recipe's correction needs no extra
        # factor here (docs/design.md, "Momentum correction").
        self._momentum_correction = bool(momentum_correction)
        self._weight_rescale = bool(weight_rescale)

        self._step_index = 0
        self._set_due()
        self._phase: str | None = None
        self._examples = 0
        self._loss_terms = 0  # label positions of the losses passed to opt.backward this step
        self._seed = int(seed) if seed is not None else int(torch.initial_seed() % (2**62))
        self._mc_generator: torch.Generator | None = None
        self._outputs: list[tuple[Tensor, int, Tensor]] = []  # layer outputs of this micro-batch
        self._warned: set[str] = set()
        # Hooks last: a constructor that raised above leaves the model untouched.
        self._capture = ActivationCapture(self._layers, self)
        # Examples per step (the per-example gradient scale of fisher="emp"): counted once per
        # forward pass of the whole model, so shared layers and unbatched inputs count right.
        self._root_hook = inner.register_forward_hook(self._count_examples)
        self._counters = {
            "steps": 0, "factor_updates": 0, "inverse_updates": 0, "skipped_steps": 0,
            "inversion_retries": 0, "inversion_fallbacks": 0, "mc_backwards": 0,
        }

    # ------------------------------------------------------------------ public API
    @property
    def counters(self) -> dict:
        """Work done so far: steps, factor/inverse refreshes, skipped steps, inversion events, and
        per-statistic refresh intervals with the fraction of factor and inverse work skipped
        (relative to refreshing every statistic and inverse at every step). ``kernel_fallbacks``:
        how many (op, device, dtype) kernels in this process failed their first-use check and run
        the PyTorch path instead (process-wide; ``spngd_ext.kernel_guard.fallbacks()`` lists them)."""
        out = dict(self._counters)
        steps = max(1, self._counters["steps"])
        intervals: dict[str, dict[str, int]] = {}
        for (i, name), k in zip(self._stat_ids, self._schedule.intervals):
            intervals.setdefault(self._layers[i].name, {})[name] = k
        out["intervals"] = intervals
        total_stats = len(self._stat_ids) * steps
        out["factor_work_skipped"] = 1.0 - sum(self._schedule.refreshes) / total_stats if total_stats else 0.0
        out["inverse_work_skipped"] = 1.0 - self._inverse_sides_done / (self._kron_sides * steps) if self._kron_sides else 0.0
        out["kernel_fallbacks"] = kernel_guard.fallback_count()
        return out

    @property
    def layers(self) -> list[CurvatureLayer]:
        return list(self._layers)

    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Current curvature estimates (bias-corrected) of the layers this rank owns, by layer name:
        dense ``A`` and ``G`` for Linear/Conv2d, ``F`` as (C, 3) = (γγ, γβ, ββ) for BatchNorm."""
        return self._state.estimates()

    def inverses(self) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """Damped inverses (Â⁻¹, Ĝ⁻¹) of the owned Kronecker layers; None means identity (fallback)."""
        return {self._layers[i].name: (inv[0], inv[1]) for i, inv in self._state.inverses.items()}

    def backward(self, loss: Tensor, out: Tensor | None = None) -> None:
        """Curvature backward (sampled labels, when a refresh is due and fisher='mc'), then ``loss.backward()``."""
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("SPNGD.backward: loss must be a scalar tensor (the batch-mean loss)")
        if out is not None:
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise ValueError("SPNGD.backward: out must be the model's (N, C[, ...]) logits")
        if self._refresh_now and self.options.fisher is FisherType.MC and self._state.any_backward_due():
            if out is None:
                raise ValueError("SPNGD.backward: fisher='mc' needs the model output: opt.backward(loss, out)")
            self._mc_backward(out)
        if out is not None:
            # The loss averages over one term per label position (N, or N·L for token-mean losses on
            # (N·L, C) or (N, C, L) logits): the empirical Fisher's per-term gradients are the
            # output gradients times that count (docs/design.md, "Empirical Fisher on sequence inputs").
            self._loss_terms += out.numel() // out.shape[1]
        self._outputs = []
        loss.backward()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_impl()
        return loss

    # ------------------------------------------------------------------ capture sink
    def _count_examples(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled() and self._refresh_now):
            return
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output = output[0]
        if isinstance(output, Tensor):
            self._examples += output.shape[0] if output.dim() >= 2 else 1

    def wants_forward(self, index: int) -> bool:
        return self._refresh_now and self._state.wants_forward(index)

    def on_forward(self, index: int, inputs: Tensor, output: Tensor) -> object:
        layer = self._layers[index]
        if output.requires_grad and any(self._state.due[index][n] for n in layer.backward_stat_names()):
            # only layers whose output-gradient statistic is due: the MC backward can stop early
            self._outputs.append((output, output._version, layer.module.weight))
        with record_function("spngd::factor_accumulation"):
            return self._state.accumulate_forward(index, inputs, output, self._backend)

    def on_output_grad(self, index: int, grad: Tensor, context: object) -> None:
        collecting = self._phase == "mc" if self.options.fisher is FisherType.MC else self._phase is None
        if self._refresh_now and collecting:
            with record_function("spngd::factor_accumulation"):
                self._state.accumulate_backward(index, grad, context, self._backend)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _cost_of(layer: CurvatureLayer) -> LayerCost:
        if isinstance(layer, KroneckerLayer):
            return LayerCost(layer.name, (layer.dim_a, layer.dim_g), (layer.dim_g, layer.dim_a))
        return LayerCost(layer.name, elementwise=layer.grad_numel * 3)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._mc_generator is None or self._mc_generator.device != device:
            self._mc_generator = torch.Generator(device=device)
            self._mc_generator.manual_seed(self._seed + 1_000_003 * self._comm.rank)
        return self._mc_generator

    def _mc_backward(self, out: Tensor) -> None:
        """Backward of the cross-entropy with labels sampled from the model (sum over examples, so
        each output gradient is a per-example gradient). Parameter .grad is left untouched."""
        # Differentiate with respect to the captured layer outputs, not the weights: the backward
        # then stops at the first layer and skips every weight-gradient GEMM (about half the cost).
        # An output modified in place afterwards is no longer the tensor the hook saw; for that
        # layer ask for its weight instead, which forces the backward through it.
        targets = [o if o._version == v else w for o, v, w in self._outputs]
        targets = [t for t in targets if t.requires_grad]
        self._outputs = []
        if not targets or not out.requires_grad:
            return
        logits = out.detach().float()
        classes = logits.shape[1]
        flat = logits.movedim(1, -1).reshape(-1, classes)
        probs = torch.softmax(flat, dim=-1)
        # Non-finite logits (an overflowing AMP step, a corrupt batch) would make the sampler
        # fail on the device; sample those rows uniformly instead — the step is then skipped by
        # the finite check on the gradients, so these labels never reach the weights.
        bad_rows = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(bad_rows, torch.full_like(probs, 1.0 / classes), probs)
        target_shape = (logits.shape[0],) + tuple(logits.shape[2:])
        gen = self._generator(out.device)
        self._phase = "mc"
        scope = record_function("spngd::mc_backward")
        scope.__enter__()
        try:
            for _ in range(self.options.mc_samples):
                y = torch.multinomial(probs, 1, generator=gen).reshape(target_shape)
                loss_mc = F.cross_entropy(out, y, reduction="sum")
                torch.autograd.grad(loss_mc, targets, retain_graph=True, allow_unused=True)
                self._counters["mc_backwards"] += 1
        finally:
            self._phase = None
            scope.__exit__(None, None, None)

    def _set_due(self) -> None:
        flags = self._schedule.due(self._step_index)
        for (i, name), flag in zip(self._stat_ids, flags):
            self._state.due[i][name] = flag
        self._refresh_now = any(flags)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _group_of(self) -> dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _check_groups(self) -> None:
        """Hyperparameters written into param_groups mid-run (schedulers, user code) are checked
        before they can reach the weights (host floats: no synchronisation)."""
        for k, group in enumerate(self.param_groups):
            for name, low, high in (("lr", 0.0, None), ("momentum", 0.0, 1.0), ("weight_decay", 0.0, None)):
                v = group[name]
                if isinstance(v, Tensor):
                    continue  # a tensor lr (torch allows it) is used as is
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low and (high is None or v < high)):
                    raise ValueError(f"SPNGD.step: param_groups[{k}]['{name}'] is {v!r} at step {self._step_index}; expected a finite number >= {low}" + (f" and < {high}" if high is not None else ""))

    def _step_impl(self) -> None:
        self._check_groups()
        st = self._state
        opts = self.options
        device = self._state.all_params[0].device
        st.ensure_buffers(device)
        self._comm.begin_step()  # per-step byte counter
        refresh = self._refresh_now and st.any_collected()
        if (self._refresh_now and opts.fisher is FisherType.MC and st.forward_seen()
                and st.any_backward_due() and not st.any_backward_collected()):
            raise RuntimeError(
                "SPNGD.step: a curvature refresh was due but no sampled-label backward ran; "
                "with fisher='mc' call opt.backward(loss, out) instead of loss.backward()"
            )
        lam = opts.damping_at(self._step_index)

        with record_function("spngd::gather_gradients"):
            # Set by torch.amp.GradScaler.step (see the class docstring); None without a scaler.
            amp_scale = getattr(self, "grad_scale", None)
            found_inf = getattr(self, "found_inf", None)
            st.fill_gradients(self._layers, self._plain_params)
            if amp_scale is not None:
                st.grad_buffer.mul_(torch.reciprocal(amp_scale.to(st.grad_buffer)))
            if refresh:
                examples = self._loss_terms or self._examples or st.examples_seen()
                grad_scale = float(examples) if opts.fisher is FisherType.EMP else 1.0
                loss_scale = amp_scale if opts.fisher is FisherType.EMP else None
                st.prepare_local_stats(grad_scale, loss_scale)
            if opts.check_finite or found_inf is not None:
                bad = st.local_nonfinite(refresh) if opts.check_finite else torch.zeros((), dtype=torch.bool, device=device)
                if found_inf is not None:
                    bad = bad | (found_inf.to(bad.device) > 0)
                if bool(self._comm.any_flag(bad)):  # one host sync per step
                    names = st.nonfinite_names(self._layers, refresh) if opts.check_finite else []
                    self._skip_step(names or ["the gradients (GradScaler found inf)"])
                    return

        with record_function("spngd::communication"):
            if refresh:
                st.reduce_stats(self._comm)
            st.reduce_gradients(self._comm, already_averaged=self._ddp_wrapped)
        adaptive = self._schedule.adaptive
        fresh = st.fresh_stats() if refresh else []
        if refresh:
            with record_function("spngd::factor_finalize"):
                st.finalize_stats(track_changes=adaptive)
            self._counters["factor_updates"] += 1
        if adaptive:  # inverses follow their own statistic's refreshes
            invert = bool(fresh) or st.needs_first_inverse()
        else:
            invert = (self._step_index % opts.inverse_interval == 0) or st.needs_first_inverse()
        if invert:
            with record_function("spngd::inversion"):
                events = st.refresh_inverses(lam, self._backend, only_fresh=adaptive)
            self._counters["inverse_updates"] += 1
            # Both sides of a layer are inverted whenever either is fresh (CurvatureState.refresh_inverses).
            kron_fresh = len({i for i, n in fresh if isinstance(self._layers[i], KroneckerLayer)})
            self._inverse_sides_done += 2 * kron_fresh if adaptive else self._kron_sides
            self._counters["inversion_retries"] += events.retries
            self._counters["inversion_fallbacks"] += len(events.fallbacks)
            for name in events.fallbacks:
                self._warn_once(f"inv:{name}", f"SPNGD: inverting the factors of {name} failed even with more damping; using its last good inverse (or the plain gradient)")

        lrs = plain_lrs = None
        if opts.kl_clip is not None:
            groups = self._group_of()
            lrs = [groups[id(layer.module.weight)]["lr"] for layer in self._layers]
            plain_lrs = [groups[id(p)]["lr"] for p in self._plain_params]
        with record_function("spngd::preconditioning"):
            st.precondition_owned(lam, lrs, self._backend, plain_lrs=plain_lrs)
        with record_function("spngd::communication"):
            self._comm.all_gather(st.grad_buffer, st.grad_layout.chunk_numel, kind="precond")
        with record_function("spngd::update"):
            nu = st.kl_coefficient(opts.kl_clip) if opts.kl_clip is not None else None
            self._apply_updates(nu)

        if fresh:
            ids = {key: k for k, key in enumerate(self._stat_ids)}
            changes = st.read_changes(fresh) if adaptive else []
            self._schedule.record(self._step_index, [ids[key] for key in fresh], changes)
        self._counters["steps"] += 1
        self._step_index += 1
        self._examples = 0
        self._loss_terms = 0
        self._outputs = []
        st.reset_accumulation()
        self._set_due()

    def _skip_step(self, names: list[str]) -> None:
        self._counters["skipped_steps"] += 1
        where = ", ".join(names[:5]) + (" …" if len(names) > 5 else "") if names else "unknown layer"
        warnings.warn(f"SPNGD: non-finite gradient or curvature statistics in {where}; step skipped, state unchanged", stacklevel=3)
        self._examples = 0
        self._loss_terms = 0
        self._state.reset_accumulation()

    def _apply_updates(self, nu: Tensor | None) -> None:
        st = self._state
        updates: dict[int, Tensor] = {}
        for index, layer in enumerate(self._layers):
            u = st.update_view(index)
            if nu is not None:
                u = u * nu
            if isinstance(layer, KroneckerLayer):
                parts = layer.split_update(u.view(layer.dim_g, layer.dim_a))
            else:
                c = layer.channels
                parts = [u[:c], u[c:]]
            for p, part in zip(layer.params, parts):
                updates[id(p)] = part.view_as(p)
        if self._plain_params:
            flat = st.update_view(len(self._layers))
            if nu is not None:  # the KL sum counted these parameters too
                flat = flat * nu
            pos = 0
            for p in self._plain_params:
                updates[id(p)] = flat[pos : pos + p.numel()].view_as(p)
                pos += p.numel()
        for group in self.param_groups:
            ps, us, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None or id(p) not in updates:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p)
                us.append(updates[id(p)].to(p.dtype))
                bufs.append(state["momentum_buffer"])
            ops.momentum_update(ps, us, bufs, lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"])
        if self._weight_rescale:
            self._rescale_weights()

    def _rescale_weights(self) -> None:
        """Scale each Linear/Conv2d weight whose norm exceeds √(2·fan_out) back onto that norm."""
        for layer in self._layers:
            if isinstance(layer, KroneckerLayer):
                w = layer.module.weight
                limit = rescaled_weight_norm_limit(layer.module)
                w.mul_(torch.clamp(limit / w.norm(), max=1.0))

    # ------------------------------------------------------------------ checkpointing
    def _signature(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """What a state_dict must match: every curvature layer and every other parameter's shape."""
        sig = [(layer.name, layer.kind, tuple(layer.module.weight.shape)) for layer in self._layers]
        sig += [(f"param[{k}]", "plain", tuple(p.shape)) for k, p in enumerate(self._plain_params)]
        return sig

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["spngd"] = {
            "signature": self._signature(),
            "world_size": self._comm.world_size,
            "rank": self._comm.rank,
            "step_index": self._step_index,
            "counters": dict(self._counters),
            "schedule": self._schedule.state_dict(),
            "inverse_sides_done": self._inverse_sides_done,
            "seed": self._seed,
            "mc_rng": None if self._mc_generator is None else (str(self._mc_generator.device), self._mc_generator.get_state()),
            "curvature": self._state.state_dict(),
        }
        return sd

    _EXTRA_KEYS = ("signature", "world_size", "rank", "step_index", "counters", "schedule", "inverse_sides_done",
                   "seed", "mc_rng", "curvature")

    def _validated_extra(self, state_dict: object) -> dict:
        """The 'spngd' entry of a state_dict, checked in full before anything is loaded."""
        where = "SPNGD.load_state_dict"
        if not isinstance(state_dict, dict) or "spngd" not in state_dict:
            raise ValueError(f"{where}: not an SPNGD state_dict (no 'spngd' entry)")
        extra = state_dict["spngd"]
        if not isinstance(extra, dict):
            raise ValueError(f"{where}: the 'spngd' entry must be a dict, got {type(extra).__name__}")
        missing = [k for k in self._EXTRA_KEYS if k not in extra]
        if missing:
            raise ValueError(f"{where}: the 'spngd' entry lacks {', '.join(missing)} (truncated or from another version)")
        mine = self._signature()
        try:
            theirs = [(n, k, tuple(shape)) for n, k, shape in extra["signature"]]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the signature entry is malformed") from None
        if theirs != mine:
            diff = next(((a, b) for a, b in zip(theirs, mine) if a != b), None)
            raise ValueError(
                f"{where}: the state_dict was saved for another model "
                f"({len(theirs)} layers/parameters vs {len(mine)} here; first difference: saved {diff[0] if diff else theirs[len(mine):][:1]} "
                f"vs here {diff[1] if diff else mine[len(theirs):][:1]})"
            )
        if extra["world_size"] != self._comm.world_size:
            raise ValueError(f"{where}: saved with world_size={extra['world_size']}, running with {self._comm.world_size}")
        n_stats = len(self._stat_ids)
        sched = extra["schedule"]
        if not isinstance(sched, dict) or any(len(sched.get(k, ())) != n_stats for k in ("intervals", "next_due", "refreshes")):
            raise ValueError(f"{where}: the refresh schedule does not match: {n_stats} statistics here, other statistics saved")
        self._state.validate_state_dict(extra["curvature"])
        return extra

    def load_state_dict(self, state_dict: dict) -> None:
        extra = self._validated_extra(state_dict)
        base = {k: v for k, v in state_dict.items() if k != "spngd"}
        super().load_state_dict(base)
        self._step_index = int(extra["step_index"])
        self._counters.update(extra["counters"])
        self._schedule.load_state_dict(extra["schedule"])
        self._set_due()
        self._inverse_sides_done = int(extra["inverse_sides_done"])
        self._seed = int(extra["seed"])
        if extra["mc_rng"] is not None:
            device, rng_state = extra["mc_rng"]
            self._mc_generator = None
            self._generator(torch.device(device)).set_state(rng_state)
        device = self._state.all_params[0].device
        self._state.load_state_dict(extra["curvature"], device)
