"""Capturing layer inputs and output gradients with module and tensor hooks.

The forward hook folds the input into the forward statistic at once (nothing is kept, so an
in-place activation that later overwrites the tensor cannot corrupt it) and registers a hook on
the layer's *output tensor*. A tensor hook registered before an in-place op receives the gradient
with respect to the value before the modification — exactly ∂loss/∂s — which module backward
hooks cannot promise (they fail on outputs modified in place, as in torchvision's ResNet).

A layer called several times in one forward pass (shared weights) contributes every call: each
call's rows join A and its output gradient joins G (the "expand" reading of weight sharing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import CurvatureLayer


class CaptureSink(Protocol):
    """Receives what the hooks of layer ``index`` (its position in the layer list) see."""

    def refresh_due(self) -> bool:
        """Whether any statistic is due this step: the one piece of state a compiled forward reads."""
        ...

    def wants_forward(self, index: int) -> bool:
        """Whether the forward hook has work for this call (statistics due)."""
        ...

    def on_forward(self, index: int, inputs: Tensor, output: Tensor) -> object:
        """A training forward call; returns the context handed to :meth:`on_output_grad`."""
        ...

    def on_output_grad(self, index: int, grad: Tensor, context: object) -> None:
        """The gradient with respect to the call's output, with the forward's context."""
        ...


@torch._dynamo.disable
def _capture_forward(sink: CaptureSink, index: int, inputs: Tensor, output: Tensor) -> None:
    """Fold one training forward call into layer ``index``'s statistics, eagerly even under
    ``torch.compile``.

    Which statistics are due changes from step to step under stale statistics; traced, every
    pattern of due layers would be a guard and a recompilation of the model. Run eagerly, a
    compiled forward reads only :meth:`CaptureSink.refresh_due` (one graph for plain steps, one for
    refresh steps, which break at each hooked layer).
    """
    if not sink.wants_forward(index):
        return
    context = sink.on_forward(index, inputs, output)
    if output.requires_grad:
        output.register_hook(lambda grad, _ctx=context: _deliver_output_grad(sink, index, grad, _ctx))


@torch._dynamo.disable
def _deliver_output_grad(sink: CaptureSink, index: int, grad: Tensor, context: object) -> None:
    """Hand an output gradient to the sink, eagerly even under ``torch.compile``.

    Dynamo traces a hook registered on an intermediate tensor into the compiled backward, reading
    the Python state it consults (is the sampled-label backward running?) once, at trace time;
    both backwards of a ``fisher="mc"`` step would then make the same decision. Run eagerly, the
    sink sees the live state. The compiled forward breaks at each hooked layer on refresh steps only
    (elsewhere the forward hook registers nothing).
    """
    sink.on_output_grad(index, grad, context)


class ModelHook:
    """A forward hook that SPNGD puts on the user's model. A deep copy of the model (an EMA or
    evaluation copy, say) gets an inert hook in its place: the copy's forwards must not feed this
    optimizer's statistics, and the optimizer must not be copied along with the model.

    Args:
        fn: the hook, ``fn(module, inputs, output)``.
    """

    def __init__(self, fn: Callable[[nn.Module, tuple, object], None]) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        self.fn(module, inputs, output)

    def __deepcopy__(self, memo: dict) -> Callable[[nn.Module, tuple, object], None]:
        return _inert_hook


def _inert_hook(module: nn.Module, inputs: tuple, output: object) -> None:
    """What a deep copy of the model has where SPNGD's hook was."""


class ActivationCapture:
    """Owns the hooks of all curvature layers and routes what they see to a sink.

    Args:
        layers: the curvature layers whose modules get a forward hook.
        sink: where the hooks report.
    """

    def __init__(self, layers: list[CurvatureLayer], sink: CaptureSink) -> None:
        self._layers = layers
        self._sink = sink
        self._handles: list[RemovableHandle] = []
        for index, layer in enumerate(layers):
            # e.g. routing attention's F.linear calls to layer.module
            self._handles.extend(layer.attach(sink.refresh_due))
            self._handles.append(layer.module.register_forward_hook(ModelHook(self._make_forward_hook(index))))

    def _make_forward_hook(self, index: int) -> Callable:
        sink = self._sink

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not (module.training and torch.is_grad_enabled() and sink.refresh_due()):
                return
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                return
            _capture_forward(sink, index, inputs[0], output)

        return hook

    def remove(self) -> None:
        """Remove every hook (the model is then as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
