"""Kronecker factors of nn.MultiheadAttention's projections, captured by what is computed.

``nn.MultiheadAttention`` never calls its ``out_proj`` module: ``F.multi_head_attention_forward``
applies ``F.linear`` to the packed ``in_proj_weight`` (or the separate ``q/k/v_proj_weight``) and to
``out_proj.weight`` directly, so module hooks on those Linears never fire. While an attention
module runs, its hooks route those ``F.linear`` calls through a :class:`FunctionalLinear` per
weight: an ``nn.Linear`` that owns no parameter, computes exactly the same ``F.linear``, and whose
forward hooks therefore see the projection's input and output. Each gets the Linear's Kronecker
factors (rows = sequence positions × examples, as for any Linear).

Covered: self-attention with the packed projection (query, key and value one tensor, as in
``nn.TransformerEncoderLayer`` and torchvision's ViT), separate q/k/v weights (their bias slices of
``in_proj_bias`` stay first-order), and ``out_proj``. A packed projection applied to distinct query
and key/value tensors (encoder-decoder attention) is computed in slices of the packed weight; it
then gets no statistics, and a one-time warning names it.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .linear import LinearCurvature

__all__ = ["FunctionalLinear", "AttentionProjectionCurvature", "attention_layers", "routed_linear_is_plain"]

_plain_linear: Callable[..., Tensor] = F.linear


class FunctionalLinear(nn.Linear):
    """A weight that ``F.multi_head_attention_forward`` applies with ``F.linear``, as an ``nn.Linear``
    whose forward is that call (hooks see its input and output). It holds no parameter of its own:
    ``weight``/``bias`` read the attention module's, ``training`` follows it.

    Args:
        owner: the nn.MultiheadAttention.
        weight_name: attribute path of the weight on ``owner`` ("in_proj_weight", "out_proj.weight", ...).
        bias_name: attribute path of the bias, or None (no bias in the curvature).
    """

    def __init__(self, owner: nn.MultiheadAttention, weight_name: str, bias_name: str | None) -> None:
        nn.Module.__init__(self)
        self._owner = [owner]  # a list: not registered as a submodule
        self._weight_name = weight_name
        self._bias_name = bias_name
        self.out_features, self.in_features = owner.get_parameter(weight_name).shape

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self._owner[0].get_parameter(self._weight_name)

    @property
    def bias(self) -> nn.Parameter | None:  # type: ignore[override]
        if self._bias_name is None:
            return None
        return self._owner[0].get_parameter(self._bias_name)

    @property
    def training(self) -> bool:
        return self._owner[0].training

    @training.setter
    def training(self, value: bool) -> None:
        pass  # follows the attention module

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return _plain_linear(x, weight, bias)


class AttentionProjectionCurvature(LinearCurvature):
    """Kronecker factors of one projection of an nn.MultiheadAttention (see the module docstring).

    Args:
        name: the projection's name ("<attention>.in_proj", "<attention>.out_proj", ...).
        module: its :class:`FunctionalLinear`.
        attention: the nn.MultiheadAttention whose F.linear calls are routed.
        router: the routing shared by the attention module's projections.
    """

    kind = "attention_linear"

    def __init__(
        self, name: str, module: FunctionalLinear, attention: nn.MultiheadAttention, router: _LinearRouter
    ) -> None:
        super().__init__(name, module)
        self.attention = attention
        self.router = router

    def attach(self, refresh_due: Callable[[], bool]) -> list[RemovableHandle]:
        return self.router.attach(refresh_due)  # type: ignore[return-value]


class _LinearRouter:
    """While its attention module runs on a step that collects statistics, ``F.linear`` on one of
    the watched weights goes through that weight's FunctionalLinear (same result, hooks fire);
    other calls are untouched.

    The routing is installed as the attention module's ``forward`` (an instance attribute, removed
    on detach) rather than as forward hooks, because Dynamo inlines ``F.multi_head_attention_forward``
    and calls torch's ``F.linear`` whatever the module attribute holds: on a refresh step the routed
    forward runs eagerly (one graph break per attention module, as at every hooked layer), on
    other steps and in evaluation it is the module's own forward, traced as usual.
    """

    def __init__(self, name: str, attention: nn.MultiheadAttention, proxies: list[FunctionalLinear]) -> None:
        self.name = name
        self.attention = attention
        self.proxies = list(proxies)
        self.by_weight = {id(p.weight): p for p in proxies}
        self.refresh_due: Callable[[], bool] = _never
        self.installed: _RoutedForward | None = None
        self.saved: list[Callable[..., Tensor]] = []
        self.warned = False

    def attach(self, refresh_due: Callable[[], bool]) -> list[_RoutedForward]:
        """Install the routed forward once per router (every projection layer asks)."""
        if self.installed is not None and self.attention.__dict__.get("forward") is self.installed:
            return []  # another projection of this module installed it
        self.refresh_due = refresh_due
        self.installed = _RoutedForward(self, self.attention.__dict__.get("forward"))
        self.attention.forward = self.installed  # type: ignore[method-assign,assignment]
        return [self.installed]

    def call(self, args: tuple, kwargs: dict) -> object:
        """The attention module's forward with its projections routed."""
        # The weights as the forward sees them: FSDP2 swaps in unsharded parameters for the forward.
        self.by_weight = {id(p.weight): p for p in self.proxies}
        self.saved.append(F.linear)
        F.linear = self._route  # type: ignore[assignment]
        try:
            return self.installed.original(*args, **kwargs)  # type: ignore[union-attr]
        finally:
            F.linear = self.saved.pop()

    def _route(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        proxy = self.by_weight.get(id(weight))
        if proxy is not None:
            return proxy(x, weight, bias)
        base = weight._base
        if base is not None and id(base) in self.by_weight and not self.warned:
            self.warned = True
            warnings.warn(
                f"SPNGD: {self.name}.in_proj_weight is applied in slices (query distinct from key/value): "
                "it gets no curvature statistics and trains with the plain gradient",
                stacklevel=2,
            )
        return _plain_linear(x, weight, bias)


def _never() -> bool:
    return False


@torch._dynamo.disable
def _routed_call(router: _LinearRouter, args: tuple, kwargs: dict) -> object:
    """Eagerly, even inside a compiled model: Dynamo would not see the routing."""
    return router.call(args, kwargs)


class _RoutedForward:
    """The attention module's ``forward`` while SPNGD is attached: routed on training steps that
    collect statistics, the module's own forward otherwise. A deep copy of the module gets its own
    forward back, bound to the copy (the routing stays with the original)."""

    def __init__(self, router: _LinearRouter, instance_forward: Callable[..., object] | None) -> None:
        self.router = router
        self.instance_forward = instance_forward  # a forward the user had set on the instance, kept

    @property
    def original(self) -> Callable[..., object]:
        attention = self.router.attention
        if self.instance_forward is not None:
            return self.instance_forward
        return types.MethodType(type(attention).forward, attention)

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        router = self.router
        attention = router.attention
        if attention.training and torch.is_grad_enabled() and router.refresh_due():
            return _routed_call(router, args, kwargs)
        if self.instance_forward is not None:
            return self.instance_forward(*args, **kwargs)
        return type(attention).forward(attention, *args, **kwargs)

    def remove(self) -> None:
        """Give the module its own forward back (a later assignment by the user is left alone)."""
        attention = self.router.attention
        if attention.__dict__.get("forward") is self:
            if self.instance_forward is None:
                del attention.__dict__["forward"]
            else:
                attention.__dict__["forward"] = self.instance_forward
        self.router.installed = None

    def __deepcopy__(self, memo: dict) -> object:
        if self.instance_forward is not None:
            return copy.deepcopy(self.instance_forward, memo)
        attention = self.router.attention
        return types.MethodType(type(attention).forward, copy.deepcopy(attention, memo))


def attention_layers(name: str, module: nn.MultiheadAttention) -> list[AttentionProjectionCurvature]:
    """The projection layers of one nn.MultiheadAttention (its in-projection(s) and out_proj).

    Args:
        name: the attention module's name in the model.
        module: the nn.MultiheadAttention.
    """
    if module._qkv_same_embed_dim:
        specs: list[tuple[str, str, str | None]] = [
            ("in_proj", "in_proj_weight", "in_proj_bias" if module.in_proj_bias is not None else None)
        ]
    else:
        specs = [(f"{s}_proj", f"{s}_proj_weight", None) for s in ("q", "k", "v")]
    specs.append(("out_proj", "out_proj.weight", "out_proj.bias" if module.out_proj.bias is not None else None))
    proxies = [FunctionalLinear(module, w, b) for _, w, b in specs]
    router = _LinearRouter(name, module, proxies)
    return [
        AttentionProjectionCurvature(f"{name}.{short}", proxy, module, router)
        for (short, _, _), proxy in zip(specs, proxies)
    ]


def routed_linear_is_plain() -> bool:
    """Whether ``F.linear`` is torch's own (no attention module is mid-forward)."""
    return F.linear is _plain_linear
