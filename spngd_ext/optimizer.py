"""SPNGD: the optimizer's public face (construction, the capture hooks' sink, the torch API).

The work lives elsewhere: hyperparameters in :mod:`spngd_ext.options`, per-layer-type math in
:mod:`spngd_ext.layers`, the curvature state in :mod:`spngd_ext.state`, the per-step pipeline in
:mod:`spngd_ext.step`, the sampled-label backward in :mod:`spngd_ext.mc`, checkpoints in
:mod:`spngd_ext.checkpoint`, buffer placement in :mod:`spngd_ext.layout`, rank ownership and
collectives in :mod:`spngd_ext.distributed`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.config  # skip_nnmodule_hook_guards (see __init__)
import torch._functorch.config  # donated_buffer (see __init__)
from torch import Tensor, nn
from torch.profiler import record_function

from . import checkpoint
from .capture import ActivationCapture, ModelHook
from .distributed import Communicator, default_communicator
from .distributed.fsdp import ShardedGradients, is_sharded, local_layout
from .distributed.placement import LayerCost, LayerStatistics, OwnerAssignment, StatisticAssignment, StatisticSpec
from .distributed.segments import SegmentLayout
from .layers import Coverage, CurvatureLayer, KroneckerLayer, classify
from .mc import LabelSampler
from .ops.extension import cuda_ops_available, extension_loaded
from .options import Backend, FisherType, Ownership, SPNGDOptions, options_doc
from .refresh import RefreshSchedule
from .state import CurvatureState
from .step import StepRunner

__all__ = ["SPNGD"]


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module inside a DistributedDataParallel wrapper, and whether there was one."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, True
    return model, False


def _check_one_device(inner: nn.Module) -> torch.device:
    named = list(inner.named_parameters())
    first_device = named[0][1].device
    for pname, p in named:
        if p.device != first_device:
            raise ValueError(
                f"SPNGD: all parameters must be on one device; {pname} is on {p.device} but "
                f"{named[0][0]} is on {first_device}"
            )
    return first_device


def _check_backend(backend: Backend, device: torch.device) -> None:
    """backend='cuda' fails here, not at the first refresh several steps later."""
    if backend is not Backend.CUDA:
        return
    if not cuda_ops_available():
        why = "no CUDA GPU is visible" if extension_loaded() else "the spngd_ext CUDA extension is not built"
        raise RuntimeError(f"SPNGD: backend='cuda' but {why} (use backend='auto' or 'torch')")
    if device.type != "cuda":
        raise ValueError(f"SPNGD: backend='cuda' needs the model on a CUDA device, but its parameters are on {device}")


class SPNGD(torch.optim.Optimizer):
    """Scalable and Practical Natural Gradient Descent (Osawa et al., TPAMI 2020).

    Kronecker-factored Fisher for Linear, Conv2d, grouped/depthwise Conv2d and Conv1d (one pair per
    group), the projections of MultiheadAttention and Embedding (diagonal A); unit-wise 2×2 Fisher
    for BatchNorm, LayerNorm and GroupNorm; every other parameter momentum SGD (``opt.coverage()``
    says which parameter gets what, and why). See docs/design.md ("Supported layers") for the
    formulas; ``opt.counters`` reports the work done.

    With ``torch.amp.GradScaler``: ``scaler.step(opt)`` hands this optimizer the scale and the
    found-inf flag (``_step_supports_amp_scaling``); the step unscales the gradients (and, with
    fisher="emp", the output-gradient statistics) itself and is skipped when an inf was found.
    Do not call ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` with fisher="emp": the scale of
    the statistics would then be unknown.

    Args:
        model: the model (or its DistributedDataParallel wrapper).
        process_group: the torch.distributed group to run over (default: the world, when initialised).
        communicator: a :class:`~spngd_ext.distributed.Communicator` replacing the default one.
        **options: keyword-only hyperparameters, the fields of :class:`~spngd_ext.options.SPNGDOptions`:
    """

    __doc__ = (__doc__ or "") + "\n" + options_doc() + "\n"
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        *,
        process_group: object | None = None,
        communicator: Communicator | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SPNGD: model must be an nn.Module, got {type(model).__name__}")
        self.options = SPNGDOptions.from_kwargs(options)
        inner, self._ddp_wrapped = _unwrap(model)
        params = list(model.parameters())
        if not params:
            raise ValueError("SPNGD: the model has no parameters")
        device = _check_one_device(inner)
        opts = self.options
        super().__init__(params, dict(lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay))
        _check_backend(opts.backend, device)
        self._model = model
        self._layers: list[CurvatureLayer]
        self._layers, self._coverage = classify(inner)
        logging.getLogger("spngd_ext").info(self._coverage.summary())
        if not self._layers:
            warnings.warn(
                "SPNGD: the model has no supported layer (Linear, Conv1d/Conv2d, BatchNorm, LayerNorm, GroupNorm, "
                "MultiheadAttention, Embedding); training as momentum SGD",
                stacklevel=2,
            )
        layer_ids = {id(p) for layer in self._layers for p in layer.params}
        self._plain_params = [p for p in params if id(p) not in layer_ids]
        self._comm = communicator if communicator is not None else default_communicator(process_group, opts.comm_dtype)
        self._sharded = is_sharded(params)  # FSDP2 (DTensor parameters): distributed/fsdp.py
        self._state = self._build_state()
        self._schedule = RefreshSchedule(
            len(self._state.accumulation.stat_ids), fixed_interval=opts.curvature_interval, policy=opts.stale_policy
        )
        # FSDP2: the gradients arrive averaged, in shards
        averaged = self._ddp_wrapped or self._sharded
        self._runner = StepRunner(
            self._layers, self._plain_params, self._state, self._schedule, self._comm, opts, averaged
        )
        if self._sharded:
            self._runner.sharded = ShardedGradients.for_model(
                inner, self._layers, self._plain_params, self._state.buffers.layout, self._comm, opts
            )
        self._sampler = LabelSampler(opts.seed, self._comm.rank)
        if opts.fisher is FisherType.MC:
            # The sampled-label backward and loss.backward() both run through the model's graph; a
            # torch.compile'd model allows a second backward only without donated buffers (fixed when
            # the compiled model first runs). Eager models are unaffected.
            torch._functorch.config.donated_buffer = False
        # Dynamo by default does not guard on module hooks: a graph compiled for an identical model
        # before this one had its hooks would be reused without them (no statistics, no warning).
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        # Hooks last: a constructor that raised above leaves the model untouched.
        self._capture = ActivationCapture(self._layers, self)
        # Examples per step (the per-example gradient scale of fisher="emp"): counted once per
        # forward pass of the whole model, so shared layers and unbatched inputs count right.
        self._root_hook = inner.register_forward_hook(ModelHook(self._count_examples))
        # Curvature layers whose hooks saw a training forward; after the first step that collected
        # statistics, the others are reported once (a layer that never runs never gets curvature).
        self._layers_ran: set[int] = set()
        self._unused_checked = False
        self._unhooked_warned = False

    def _build_state(self) -> CurvatureState:
        """Place layers on ranks, lay out the buffers, and build this rank's curvature state."""
        costs = [layer.placement_cost() for layer in self._layers]
        if self._plain_params:
            costs.append(LayerCost("<plain>", elementwise=sum(p.numel() for p in self._plain_params)))
        self.assignment = OwnerAssignment.balance(costs, self._comm.world_size)
        stats = [
            LayerStatistics(
                layer.name,
                tuple(StatisticSpec(s.name, s.dim, s.numel) for s in layer.stat_specs()),
                layer.grad_numel,
                (layer.dim_g, layer.dim_a) if isinstance(layer, KroneckerLayer) else (0, 0),
                splittable=bool(layer.inverse_sides),  # only layers that cache one inverse per factor
            )
            for layer in self._layers
        ]
        if self._plain_params:
            stats.append(LayerStatistics("<plain>", (), sum(p.numel() for p in self._plain_params)))
        world = self._comm.world_size
        if self.options.ownership is Ownership.STATISTIC:
            # A, G and each unit-wise Fisher placed separately; a Kronecker layer's gradient goes
            # to the owner of its larger factor, which receives the smaller one's inverse.
            placement = StatisticAssignment.balance(stats, world)
        else:  # one owner per layer (A, G and the gradient together)
            placement = StatisticAssignment.per_layer(stats, self.assignment.owners, world)
        self.placement = placement
        layout = SegmentLayout.build(stats, placement)
        if self._sharded:  # gradient buffer: all owners' slots, then only this rank's own gradients
            layout = local_layout(layout, self._comm.rank)
        return CurvatureState.build(self._layers, layout, self._comm.rank, self.options, self._plain_params)

    # ------------------------------------------------------------------ public API
    @property
    def counters(self) -> dict:
        """Work done so far: steps, factor/inverse refreshes, skipped steps, inversion events, and
        per-statistic refresh intervals with the fraction of factor and inverse work skipped
        (relative to refreshing every statistic and inverse at every step). ``kernel_fallbacks``:
        how many (op, device, dtype) kernels in this process failed their first-use check and run
        the PyTorch path instead (process-wide; ``spngd_ext.kernel_guard.fallbacks()`` lists them)."""
        return self._runner.report()

    def coverage(self) -> Coverage:
        """Which curvature each parameter gets (by layer kind) and why the others train
        first-order; what the construction logged (logger ``spngd_ext``, one INFO line)."""
        return self._coverage

    @property
    def layers(self) -> list[CurvatureLayer]:
        """The curvature layers, in ``named_modules`` order."""
        return list(self._layers)

    def factors(self) -> dict[str, dict[str, Tensor]]:
        """Current curvature estimates (bias-corrected) of the statistics this rank owns, by layer name
        (under ownership per statistic a layer's A and G may be listed by two ranks):
        dense ``A`` and ``G`` for Linear/Conv2d and attention projections; ``A0``…, ``G0``… per group
        for grouped convolutions; ``A`` as the (V,) token-frequency diagonal and dense ``G`` for
        Embedding; ``F`` as (C, 3) = (γγ, γβ, ββ) for BatchNorm, LayerNorm and GroupNorm."""
        return self._state.estimates.export()

    def inverses(self) -> dict[str, tuple[Tensor | None, ...]]:
        """Damped inverses (Â⁻¹, Ĝ⁻¹) of the Kronecker layers whose gradient this rank preconditions
        and that cache them (Linear, Conv2d, attention projections); None means identity
        (fallback). Grouped convolutions and Embedding invert their factors when preconditioned
        and are not listed."""
        return self._state.inverses.by_name()

    def backward(self, loss: Tensor, out: Tensor | None = None) -> None:
        """Curvature backward (sampled labels, when a refresh is due and fisher='mc'), then ``loss.backward()``.

        Args:
            loss: the scalar batch-mean loss.
            out: the model's (N, C[, ...]) logits (needed with fisher='mc'; with 'emp' it gives the
                number of label positions the loss averages over).
        """
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("SPNGD.backward: loss must be a scalar tensor (the batch-mean loss)")
        if out is not None:
            if not isinstance(out, Tensor) or out.dim() < 2:
                raise ValueError("SPNGD.backward: out must be the model's (N, C[, ...]) logits")
        runner = self._runner
        if runner.refresh_now and self.options.fisher is FisherType.MC and self._state.accumulation.any_backward_due():
            if out is None:
                raise ValueError("SPNGD.backward: fisher='mc' needs the model output: opt.backward(loss, out)")
            runner.counters["mc_backwards"] += self._sampler.backward(out, self.options.mc_samples)
        if out is not None:
            # The loss averages over one term per label position (N, or N·L for token-mean losses on
            # (N·L, C) or (N, C, L) logits): the empirical Fisher's per-term gradients are the
            # output gradients times that count (docs/design.md, "Empirical Fisher on sequence inputs").
            runner.loss_terms += out.numel() // out.shape[1]
        self._sampler.outputs = []
        loss.backward()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimizer step (see :mod:`spngd_ext.step`); ``closure`` recomputes the loss first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step (see the class docstring); None without a scaler.
        amp_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        runner = self._runner
        if runner.refresh_now and runner.loss_terms and not runner.examples and self._model.training:
            self._warn_unhooked()
        runner.run(self.param_groups, self.state, amp_scale, found_inf)
        if not self._unused_checked and self._layers_ran:
            self._unused_checked = True
            unused = [layer for i, layer in enumerate(self._layers) if i not in self._layers_ran]
            if unused:
                # a module in eval mode inside a training model (a frozen BatchNorm) runs without statistics
                frozen = [layer.name for layer in unused if not layer.module.training]
                note = f" ({', '.join(frozen)} in eval mode)" if frozen else ""
                warnings.warn(
                    f"SPNGD: the curvature layer(s) {', '.join(layer.name for layer in unused)} did not run in the "
                    f"first training step{note}; until they do they collect no statistics and their parameters "
                    "take the plain gradient",
                    stacklevel=2,
                )
        self._sampler.outputs = []
        return loss

    def _warn_unhooked(self) -> None:
        """opt.backward saw the model's output but the model's forward ran without the hooks."""
        if not self._unhooked_warned:
            self._unhooked_warned = True
            warnings.warn(
                "SPNGD: a curvature refresh was due and opt.backward received the model's output, but the "
                "model's forward ran without SPNGD's hooks, so no statistics were collected: a torch.compile'd "
                "graph compiled before SPNGD attached its hooks (for this model or an identical one) is being "
                "reused. Construct SPNGD before the compiled model first runs, or call torch._dynamo.reset()",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ capture sink
    def _count_examples(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if not (module.training and torch.is_grad_enabled() and self._runner.refresh_now):
            return
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output = output[0]
        if isinstance(output, Tensor):
            self._runner.examples += output.shape[0] if output.dim() >= 2 else 1

    def refresh_due(self) -> bool:
        """Capture sink: whether any statistic is due this step."""
        return self._runner.refresh_now

    def wants_forward(self, index: int) -> bool:
        """Capture sink: whether layer ``index``'s forward hook has work this step."""
        return self._runner.refresh_now and self._state.accumulation.wants_forward(index)

    def on_forward(self, index: int, inputs: Tensor, output: Tensor) -> object:
        """Capture sink: a training forward of layer ``index``; returns its backward context."""
        acc = self._state.accumulation
        self._layers_ran.add(index)
        if output.requires_grad and acc.backward_due(index):
            # only layers whose output-gradient statistic is due: the MC backward can stop early
            self._sampler.remember_output(output, self._layers[index].weight)
        with record_function("spngd::factor_accumulation"):
            return acc.accumulate_forward(index, inputs, self.options.backend)

    def on_output_grad(self, index: int, grad: Tensor, context: object) -> None:
        """Capture sink: the gradient of layer ``index``'s output (sampled or true labels)."""
        collecting = self._sampler.active if self.options.fisher is FisherType.MC else not self._sampler.active
        if self._runner.refresh_now and collecting:
            with record_function("spngd::factor_accumulation"):
                self._state.accumulation.accumulate_backward(index, grad, context, self.options.backend)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """torch's optimizer state plus the 'spngd' entry (:mod:`spngd_ext.checkpoint`)."""
        sd = super().state_dict()
        sd["spngd"] = checkpoint.make_entry(
            self._runner, self._sampler, self._state, checkpoint.model_signature(self._layers, self._plain_params)
        )
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Validate everything, then load torch's part and the 'spngd' entry.

        Args:
            state_dict: a :meth:`state_dict` of an SPNGD over the same model and world size.
        """
        signature = checkpoint.model_signature(self._layers, self._plain_params)
        extra = checkpoint.validated_entry(state_dict, self._runner, self._state, signature)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "spngd"})
        checkpoint.load_entry(extra, self._runner, self._sampler, self._state, self._state.buffers.all_params[0].device)
