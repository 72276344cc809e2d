"""The step's tensor work as compiled regions (``SPNGD(compile_step=...)``).

Each region is one ``torch.compile(fullgraph=True, dynamic=False)`` function, so a graph break
inside one is an error, not a silent fallback:

* ``gather``: every parameter's gradient into the flat gradient buffer (unscaled under AMP);
* ``work``: preconditioning with the cached inverses (or estimates) and this rank's KL share,
  the KL-clip coefficient ν, ν·U + weight_decay·θ, momentum, θ ← θ − lr·v and the weight rescale.
  With more than one rank it is two regions, ``precondition`` and ``update``, around the gather of
  the updates (the collectives stay eager).

What stays eager between them is the host's part of the step (docs/design.md, "Compiled step"):
the non-finite decision, the statistics' reduction, factor finalisation and inversion on a refresh.

Hyperparameters enter as device tensors: the learning rate of every group and layer, momentum,
weight decay and λ, so a learning-rate or damping schedule does not recompile. Whether a group's
momentum and weight decay are zero is a host constant of the region (a change recompiles once).
The regions are compiled on first use; Dynamo guards on the layers' curvature (a layer's first
inverse recompiles once) and on which parameters have gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .distributed.communicator import Communicator
from .layers import CurvatureLayer
from .options import SPNGDOptions
from .state import CurvatureState

__all__ = ["CompiledStep"]

# One group of the update: parameters, momentum buffers, (lr, momentum, weight_decay) as a
# tensor, whether momentum and weight decay are non-zero, and each parameter's update index.
_Group = tuple[list[Tensor], list[Tensor], Tensor, bool, bool, tuple[int, ...]]


class CompiledStep:
    """The compiled regions of one optimizer's step.

    Args:
        layers: the curvature layers.
        plain_params: parameters outside curvature layers.
        state: the curvature state of this rank.
        comm: the communicator.
        options: the optimizer's options.
        backend: the ``torch.compile`` backend.
    """

    def __init__(
        self,
        layers: Sequence[CurvatureLayer],
        plain_params: Sequence[nn.Parameter],
        state: CurvatureState,
        comm: Communicator,
        options: SPNGDOptions,
        backend: str,
    ) -> None:
        self.layers = list(layers)
        self.plain_params = list(plain_params)
        self.state = state
        self.comm = comm
        self.options = options
        self.backend = backend

        def region(fn):
            return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)

        self.gather = region(self._gather)
        self.work = region(self._work)
        self.precondition = region(self._precondition)
        self.update = region(self._update)
        self._scalars: dict[object, tuple[tuple[float, ...], Tensor]] = {}
        # index of each parameter's update in the list that _update builds (layers, then plain)
        order = [p for layer in self.layers for p in layer.params] + self.plain_params
        self._position = {id(p): k for k, p in enumerate(order)}

    # ------------------------------------------------------------------ host side
    def scalars(self, key: object, values: Sequence[float], dtype: torch.dtype) -> Tensor:
        """``values`` as a device tensor, made again only when they change (no transfer per step).

        Args:
            key: what the values are (one cache entry per key).
            values: the host floats.
            dtype: the tensor's dtype.
        """
        values = tuple(float(v) for v in values)
        cached = self._scalars.get(key)
        if cached is None or cached[0] != values or cached[1].dtype != dtype:
            cached = (values, torch.tensor(values, dtype=dtype).to(self.state.buffers.device))
            self._scalars[key] = cached
        return cached[1]

    def groups(self, param_groups: Sequence[dict], param_state: dict) -> list[_Group]:
        """The update's groups: parameters with a gradient and their momentum buffers (created here)."""
        out = []
        for k, group in enumerate(param_groups):
            ps, bufs, where = [], [], []
            for p in group["params"]:
                if p.grad is None or id(p) not in self._position:
                    continue
                state = param_state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p)
                bufs.append(state["momentum_buffer"])
                where.append(self._position[id(p)])
            if not ps:
                continue
            hyper = self.scalars(("group", k), (group["lr"], group["momentum"], group["weight_decay"]), ps[0].dtype)
            out.append((ps, bufs, hyper, group["momentum"] != 0, group["weight_decay"] != 0, tuple(where)))
        return out

    def precondition_and_update(self, param_groups: Sequence[dict], param_state: dict, lam: float) -> None:
        """The step after the gradients are on their owners: the compiled work (one region on one rank).

        Args:
            param_groups: the optimizer's parameter groups.
            param_state: the optimizer's per-parameter state.
            lam: λ of this step.
        """
        buffers = self.state.buffers
        dtype = buffers.dtype
        # shape (1,), not a 0-dim tensor: Dynamo reads a 0-dim input's value into a guard (a sync)
        lam_t = self.scalars("damping", (lam,), dtype)
        lrs = plain_lrs = None
        if self.options.kl_clip is not None:
            group_of = {id(p): g for g in param_groups for p in g["params"]}
            lrs = self.scalars("kl", [group_of[id(layer.module.weight)]["lr"] for layer in self.layers], dtype)
            plain_lrs = self.scalars("kl_plain", [group_of[id(p)]["lr"] for p in self.plain_params], dtype)
        groups = self.groups(param_groups, param_state)
        if self.comm.world_size == 1:
            self.work(lam_t, lrs, plain_lrs, groups)
            return
        self.precondition(lam_t, lrs, plain_lrs)
        buffers.gather_updates(self.comm)
        self.update(groups)

    # ------------------------------------------------------------------ the regions
    def _gather(self, amp_scale: Tensor | None) -> None:
        buffers = self.state.buffers
        buffers.fill_gradients()
        if amp_scale is not None:
            buffers.grad_buffer.mul_(torch.reciprocal(amp_scale.to(buffers.grad_buffer)))

    def _work(self, lam: Tensor, lrs: Tensor | None, plain_lrs: Tensor | None, groups: list[_Group]) -> None:
        self._precondition(lam, lrs, plain_lrs)
        self._update(groups)

    def _precondition(self, lam: Tensor, lrs: Tensor | None, plain_lrs: Tensor | None) -> None:
        self.state.preconditioner.precondition_owned(lam, lrs, self.options.backend, plain_lrs=plain_lrs)

    def _update(self, groups: list[_Group]) -> None:
        """ν·U + wd·θ, momentum and θ ← θ − lr·v per group, as in ``ops.momentum_update``."""
        buffers, pre = self.state.buffers, self.state.preconditioner
        nu = pre.kl_coefficient(self.options.kl_clip) if self.options.kl_clip is not None else None
        parts: list[Tensor] = []
        for index, layer in enumerate(self.layers):
            u = buffers.grad_segment(index)
            parts += layer.split_update(u if nu is None else u * nu)
        if self.plain_params:
            flat = buffers.grad_segment(len(self.layers))
            flat = flat if nu is None else flat * nu
            pos = 0
            for p in self.plain_params:
                parts.append(flat[pos : pos + p.numel()].view_as(p))
                pos += p.numel()
        for ps, bufs, hyper, has_momentum, has_decay, where in groups:
            d = [parts[k].view_as(p).to(p.dtype) for k, p in zip(where, ps)]
            lr, momentum, decay = hyper[0], hyper[1], hyper[2]
            if has_decay:
                d = list(torch._foreach_add(d, torch._foreach_mul(ps, decay)))
            if has_momentum:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
                d = bufs
            torch._foreach_add_(ps, torch._foreach_mul(d, -lr))
        if self.options.weight_rescale:
            for layer in self.layers:
                layer.rescale_weight()
