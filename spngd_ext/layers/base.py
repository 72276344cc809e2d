"""What every curvature layer provides: its statistics, how a forward/backward feeds them, how its
gradient is laid out in the flat buffer, and how that gradient is preconditioned.

Everything that differs between layer types is a method here, so a new layer type is one subclass
and the optimizer never asks which type a layer is. A layer accumulates into views of a flat
statistics buffer that the optimizer owns, so the buffer can be reduced and communicated in one
piece; it reads and writes its gradient as one flat segment of the gradient buffer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from ..distributed.placement import LayerCost
from ..options import Backend
from ..recipe import rescaled_weight_norm_limit


def write_flat_gradients(params: Sequence[nn.Parameter], dst: Tensor) -> None:
    """Copy the gradients of ``params`` one after another into the flat ``dst``; a missing grad
    (frozen parameter) reads as zero.

    Args:
        params: the parameters, in segment order.
        dst: a 1-D tensor of their total element count.
    """
    pos = 0
    for p in params:
        part = dst[pos : pos + p.numel()]
        if p.grad is None:
            part.zero_()
        else:  # a sparse gradient (Embedding(sparse=True), first-order) is read densely
            part.copy_((p.grad.to_dense() if p.grad.is_sparse else p.grad).reshape(-1))
        pos += p.numel()


@dataclass(frozen=True)
class StatSpec:
    """One statistic of a layer.

    Args:
        name: "A", "G" (Kronecker factors) or "F" (BatchNorm Fisher).
        numel: elements it occupies in the statistics buffer.
        dim: matrix size of a packed symmetric matrix; 0 for a statistic that is not one (BN).
    """

    name: str
    numel: int
    dim: int


@dataclass
class LayerCurvature:
    """What preconditioning one layer reads.

    Args:
        inverses: for a layer with :attr:`CurvatureLayer.inverse_sides`, its damped inverses in that
            order (None: identity, after a failed inversion); empty otherwise.
        estimates: for a layer without inverse sides, its bias-corrected estimates by statistic
            name, shaped by :meth:`CurvatureLayer.estimate_from_packed`, or as
            :meth:`CurvatureLayer.estimates_from_run` returns them.
    """

    inverses: tuple[Tensor | None, ...] = ()
    estimates: dict[str, Tensor] = field(default_factory=dict)


class CurvatureLayer(abc.ABC):
    """Per-layer-type curvature math. Subclasses: Kronecker-factored (Linear, Conv2d) and BN."""

    kind: ClassVar[str]
    #: the optimizer reads this layer's estimates with :meth:`estimates_from_run`, all at once
    reads_estimates_as_run: ClassVar[bool] = False

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    # ---- description ----------------------------------------------------------------------
    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters this layer preconditions (weight first)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def weight(self) -> nn.Parameter:
        """The module's weight."""
        return cast(nn.Parameter, self.module.weight)

    @property
    def bias(self) -> nn.Parameter | None:
        """The module's bias (None without one)."""
        return cast("nn.Parameter | None", getattr(self.module, "bias", None))

    @abc.abstractmethod
    def stat_specs(self) -> list[StatSpec]:
        """The statistics this layer accumulates, in buffer order."""

    @property
    def grad_numel(self) -> int:
        """Elements of this layer's segment of the gradient buffer."""
        return sum(p.numel() for p in self.params)

    @property
    def inverse_sides(self) -> tuple[str, ...]:
        """The statistics inverted (with π-damping, as one Kronecker pair) before preconditioning;
        empty for a layer that preconditions from its estimates directly."""
        return ()

    def inverse_shapes(self) -> dict[str, tuple[int, int]]:
        """Shape of each side's inverse, by statistic name."""
        dims = {s.name: s.dim for s in self.stat_specs()}
        return {n: (dims[n], dims[n]) for n in self.inverse_sides}

    def placement_cost(self) -> LayerCost:
        """What owning this layer costs (for placing layers on ranks)."""
        return LayerCost(self.name, elementwise=self.grad_numel * 3)

    # ---- gradient and update layout ----------------------------------------------------------
    def write_gradient(self, dst: Tensor) -> None:
        """Copy the parameters' gradients into ``dst`` (this layer's flat gradient segment); a
        missing grad (frozen parameter) reads as zero."""
        write_flat_gradients(self.params, dst)

    def split_update(self, flat: Tensor) -> list[Tensor]:
        """This layer's flat update as per-parameter tensors shaped like :attr:`params`."""
        parts, pos = [], 0
        for p in self.params:
            parts.append(flat[pos : pos + p.numel()].view(p.shape))
            pos += p.numel()
        return parts

    # ---- curvature -----------------------------------------------------------------------------
    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """Statistic ``name`` in its usable form from its slice of the estimate buffer, times ``scale``.

        Args:
            name: the statistic.
            packed: its slice of the estimate buffer.
            scale: the bias correction (1.0 without EMA, else a 1-element tensor).
        """
        return packed * scale

    def estimates_from_run(self, run: Tensor, scale: Tensor | float) -> dict[str, Tensor]:
        """Every statistic in its usable form from the run of the estimate buffer that holds them
        back to back in :meth:`stat_specs` order (read instead of :meth:`estimate_from_packed`
        per statistic when :attr:`reads_estimates_as_run`). Default: statistic by statistic.

        Args:
            run: the layer's slice of the estimate buffer.
            scale: the bias correction (1.0 without EMA, else one per statistic).
        """
        out, pos = {}, 0
        for k, spec in enumerate(self.stat_specs()):
            part = scale[k : k + 1] if isinstance(scale, Tensor) else scale
            out[spec.name] = self.estimate_from_packed(spec.name, run[pos : pos + spec.numel], part)
            pos += spec.numel
        return out

    def batch_key(self, curvature: LayerCurvature) -> Hashable:
        """Layers of one class with equal keys are preconditioned in one :meth:`precondition_batch` call."""
        return id(self)

    def precondition(self, grad: Tensor, curvature: LayerCurvature, damping: float, backend: Backend | str) -> Tensor:
        """The preconditioned update (flat, like ``grad``) of this layer.

        Args:
            grad: the layer's flat gradient segment (not modified).
            curvature: its inverses or estimates.
            damping: λ of this step.
            backend: the ops backend.
        """
        raise NotImplementedError(f"{type(self).__name__} defines neither precondition nor precondition_batch")

    @classmethod
    def precondition_batch(
        cls,
        layers: Sequence[CurvatureLayer],
        grads: Sequence[Tensor],
        curvatures: Sequence[LayerCurvature],
        damping: float,
        backend: Backend | str,
    ) -> list[Tensor]:
        """Preconditioned flat updates of layers sharing one :meth:`batch_key` (default: one by one).

        Args:
            layers: the layers, all of this class.
            grads: their flat gradient segments (not modified).
            curvatures: their inverses or estimates.
            damping: λ of this step.
            backend: the ops backend.
        """
        return [layer.precondition(g, c, damping, backend) for layer, g, c in zip(layers, grads, curvatures)]

    def frobenius_weights(self, name: str) -> Tensor:
        """Per element of statistic ``name`` (one that is not a packed matrix, ``dim == 0``), its
        weight in the statistic's squared Frobenius norm (for measuring how much a refresh changes
        it). Default: 1 for every element."""
        spec = next(s for s in self.stat_specs() if s.name == name)
        return torch.ones(spec.numel)

    def attach(self, refresh_due: Callable[[], bool]) -> list[RemovableHandle]:
        """Hooks this layer needs on the model besides the forward hook on :attr:`module` (which the
        capture registers); the capture removes them with its own. ``refresh_due()`` says whether
        any statistic is due this step. Default: none."""
        return []

    def rescale_weight(self) -> None:  # noqa: B027  (a hook: most layer types have nothing to rescale)
        """After the update: bound the weight's norm (``SPNGD(weight_rescale=True)``); default: nothing."""

    # ---- accumulation (called from hooks) ----------------------------------------------------
    def splits_by_example(self, tensor: Tensor) -> bool:
        """Whether one call's input or output gradient ``tensor`` may be cut along dim 0 into two
        sets of examples whose statistics add up to the call's (for the sampling-noise estimate of
        ``StalePolicy(rule="noise")``; the context must then be cut by :meth:`slice_context`).
        Default: no (the layer's statistics get no noise estimate)."""
        return False

    def slice_context(self, context: object, part: slice) -> object:
        """The backward context of examples ``part`` of a call whose context is ``context``."""
        return context

    @abc.abstractmethod
    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        """Fold one call's input into the forward statistic; returns (context for the backward, count).

        Args:
            inputs: the layer's input of this call.
            stats: the accumulator of each of the layer's statistics, by name.
            first: the first contribution of this refresh (overwrite the accumulator: decay 0).
            backend: the ops backend.

        The count is the number of examples (or rows) the statistic is normalised by.
        """

    @abc.abstractmethod
    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        """Fold one output gradient into the backward statistic; returns its count.

        Args:
            grad_out: the gradient with respect to the layer's output.
            context: what :meth:`accumulate_forward` returned for this call.
            stats: the accumulator of each of the layer's statistics, by name.
            first: the first contribution of this refresh (overwrite: decay 0).
            backend: the ops backend.
        """

    @abc.abstractmethod
    def forward_stat_names(self) -> tuple[str, ...]:
        """Statistics updated by the forward hook."""

    @abc.abstractmethod
    def backward_stat_names(self) -> tuple[str, ...]:
        """Statistics updated by the output-gradient hook."""


class KroneckerLayer(CurvatureLayer):
    """A layer whose Fisher block is approximated by A ⊗ G (bias folded into A).

    Its gradient segment is the (dim_g × dim_a) matrix [∇W | ∇b]; the update is Ĝ⁻¹ [∇W | ∇b] Â⁻¹.
    """

    @property
    def has_bias(self) -> bool:
        """Whether the bias is folded into A (an extra constant input 1)."""
        return self.bias is not None

    @property
    @abc.abstractmethod
    def dim_a(self) -> int:
        """Size of A: inputs per output (+1 with a bias)."""

    @property
    @abc.abstractmethod
    def dim_g(self) -> int:
        """Size of G: outputs."""

    @property
    def inverse_sides(self) -> tuple[str, ...]:
        return ("A", "G")

    def placement_cost(self) -> LayerCost:
        return LayerCost(self.name, (self.dim_a, self.dim_g), (self.dim_g, self.dim_a))

    def stat_specs(self) -> list[StatSpec]:
        return [
            StatSpec("A", self.dim_a * (self.dim_a + 1) // 2, self.dim_a),
            StatSpec("G", self.dim_g * (self.dim_g + 1) // 2, self.dim_g),
        ]

    def forward_stat_names(self) -> tuple[str, ...]:
        return ("A",)

    def backward_stat_names(self) -> tuple[str, ...]:
        return ("G",)

    def gradient_matrix(self) -> Tensor:
        """[∇W | ∇b] as a (dim_g × dim_a) matrix; a missing grad (frozen parameter) reads as zero."""
        w = self.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        mat = gw.reshape(self.dim_g, -1)
        b = self.bias
        if b is not None:
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            mat = torch.cat([mat, gb.reshape(-1, 1)], dim=1)
        return mat

    def write_gradient(self, dst: Tensor) -> None:
        dst.view(self.dim_g, self.dim_a).copy_(self.gradient_matrix())

    def split_update(self, flat: Tensor) -> list[Tensor]:
        """The update (flat, or the dim_g × dim_a matrix) as per-parameter tensors shaped like ``params``."""
        u = flat.view(self.dim_g, self.dim_a)
        w, b = self.weight, self.bias
        if b is not None:
            return [u[:, :-1].reshape(w.shape), u[:, -1].reshape(b.shape)]
        return [u.reshape(w.shape)]

    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """The dense symmetric factor from its packed upper triangle."""
        dim = self.dim_a if name == "A" else self.dim_g
        return ops.unpack_upper(packed, [dim], scale=scale, dtype=packed.dtype, backend="torch")[0]

    def batch_key(self, curvature: LayerCurvature) -> Hashable:
        inv_a, inv_g = curvature.inverses
        return (self.dim_g, self.dim_a, inv_a is None, inv_g is None)

    @classmethod
    def precondition_batch(
        cls,
        layers: Sequence[CurvatureLayer],
        grads: Sequence[Tensor],
        curvatures: Sequence[LayerCurvature],
        damping: float,
        backend: Backend | str,
    ) -> list[Tensor]:
        """Ĝ⁻¹ ∇ Â⁻¹ for layers of one shape, as two batched GEMMs (a None inverse is the identity)."""
        first = cast(KroneckerLayer, layers[0])
        u = torch.stack([g.view(first.dim_g, first.dim_a) for g in grads])
        no_a, no_g = curvatures[0].inverses[0] is None, curvatures[0].inverses[1] is None
        if not (no_a or no_g):
            g_inv = torch.stack([c.inverses[1] for c in curvatures])  # type: ignore[misc]
            a_inv = torch.stack([c.inverses[0] for c in curvatures])  # type: ignore[misc]
            u = ops.precondition(g_inv, u, a_inv, backend=backend)
            return [u[j].reshape(-1) for j in range(len(layers))]
        if not no_g:
            u = torch.stack([c.inverses[1] for c in curvatures]) @ u  # type: ignore[misc]
        if not no_a:
            u = u @ torch.stack([c.inverses[0] for c in curvatures])  # type: ignore[misc]
        return [u[j].reshape(-1) for j in range(len(layers))]

    def rescale_weight(self) -> None:
        """Scale the weight back onto √(2·fan_out) when its norm exceeds it."""
        w = self.weight
        limit = rescaled_weight_norm_limit(self.module)
        w.mul_(torch.clamp(limit / w.norm(), max=1.0))
