"""A compiled model that runs eagerly on the steps where SPNGD collects statistics.

``torch.compile(model)`` works with SPNGD, but the capture's output-gradient delivery is
``torch._dynamo.disable``d, so on a refresh step the compiled forward breaks at each hooked layer.
A break inside a loop (``nn.Sequential.forward``, a ResNet stage) cannot be resumed: Dynamo then
skips that function's code for good and compiles every submodule on its own, on every later step
(plain ones too) and for every model of the process that shares the code (an SGD baseline of the
same architecture included). Measured on the main job's CNN: 8-10 small compiled regions per step
instead of one.

:func:`compile_model` avoids the break: on a training step that refreshes a statistic (with
gradients enabled) it calls the eager model, whose hooks collect the statistics exactly as without
compilation; on every other call (plain steps, evaluation) the compiled model, whose hooks find
nothing due and return before any work, so Dynamo traces one graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CompiledModel", "compile_model"]


class CompiledModel:
    """Calls the eager model on SPNGD's refresh steps and the compiled one otherwise (see
    :func:`compile_model`). Not a module: ``model`` holds the parameters, state and train/eval mode."""

    def __init__(self, model: nn.Module, compiled: Callable[..., Any], optimizer: Any) -> None:
        self.model = model
        self.compiled = compiled
        self._optimizer = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.model.training and torch.is_grad_enabled() and self._optimizer._runner.refresh_now:
            return self.model(*args, **kwargs)
        return self.compiled(*args, **kwargs)


def compile_model(model: nn.Module, optimizer: Any, **compile_kwargs: Any) -> CompiledModel:
    """``torch.compile(model, **compile_kwargs)`` for training with ``optimizer``, eager on refresh steps.

    Args:
        model: the model ``optimizer`` was built for (its hooks are attached).
        optimizer: the :class:`~spngd_ext.SPNGD` instance training ``model``.
        **compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).

    Returns:
        a callable to use instead of ``model`` in the training loop (``model`` keeps its parameters,
        state dict and train/eval mode).
    """
    from .optimizer import SPNGD

    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, SPNGD):
        raise TypeError(f"compile_model: optimizer must be an SPNGD instance, got {type(optimizer).__name__}")
    if optimizer._model is not model:
        raise ValueError("compile_model: model is not the model optimizer was built for")
    return CompiledModel(model, torch.compile(model, **compile_kwargs), optimizer)
