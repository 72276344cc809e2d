"""What the hooks collect during one step: which statistics are due, and how many rows each received.

All bookkeeping is host-side Python ints, so collecting never reads device values back. A
statistic is *fresh* when it received rows this step; only fresh statistics are scaled, counted,
finalised into the estimates and measured for change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layers import CurvatureLayer
from ..options import Backend
from .buffers import FlatBuffers

__all__ = ["Accumulation"]


class Accumulation:
    """Due flags and row counts of every statistic for the current step.

    Args:
        layers: the curvature layers.
        buffers: the flat buffers the statistics accumulate into.
    """

    def __init__(self, layers: Sequence[CurvatureLayer], buffers: FlatBuffers) -> None:
        self.layers = list(layers)
        self.buffers = buffers
        self.names = [[s.name for s in layer.stat_specs()] for layer in self.layers]
        self.stat_ids = [(i, n) for i, names in enumerate(self.names) for n in names]
        self._counts = [{n: 0 for n in names} for names in self.names]
        self._first = [{n: True for n in names} for names in self.names]
        self._examples = [0] * len(self.layers)
        self._due = [{n: True for n in names} for names in self.names]
        # Noise-aware stale statistics: each call is cut into two sets of examples, the first
        # accumulated into the buffers' ``half``; calls per statistic cut in two / taken whole.
        self.split_halves = False
        self._first_half = [{n: True for n in names} for names in self.names]
        self._halves = [{n: 0 for n in names} for names in self.names]
        self._wholes = [{n: 0 for n in names} for names in self.names]

    # ------------------------------------------------------------------ schedule
    def set_due(self, flags: Sequence[bool]) -> None:
        """Which statistics are refreshed this step, one flag per entry of :attr:`stat_ids`."""
        for (i, name), flag in zip(self.stat_ids, flags):
            self._due[i][name] = flag

    def wants_forward(self, index: int) -> bool:
        """Whether layer ``index`` has any statistic due (its forward hook must run)."""
        return any(self._due[index].values())

    def backward_due(self, index: int) -> bool:
        """Whether layer ``index``'s output-gradient statistic is due."""
        return any(self._due[index][n] for n in self.layers[index].backward_stat_names())

    def any_backward_due(self) -> bool:
        """Whether any output-gradient statistic is due (a curvature backward is needed)."""
        return any(self.backward_due(i) for i in range(len(self.layers)))

    # ------------------------------------------------------------------ hooks
    def accumulate_forward(self, index: int, inputs: Tensor, backend: Backend | str) -> object:
        """Fold a forward call's input into layer ``index``'s forward statistic; returns the
        context its output-gradient hook needs."""
        self.buffers.ensure(inputs.device)
        layer = self.layers[index]
        names = layer.forward_stat_names()
        self._examples[index] += inputs.shape[0] if inputs.dim() > 1 else 1
        if names and not any(self._due[index][n] for n in names):
            return None  # only the output-gradient statistic is due; it needs no forward context
        first = bool(names) and self._first[index][names[0]]
        acc = self.buffers.acc_views(index)
        first_half = bool(names) and self._first_half[index][names[0]]
        if names and self._split(index, names, inputs):
            h = inputs.shape[0] // 2
            _, count = layer.accumulate_forward(inputs[:h], self.buffers.half_views(index), first_half, backend)
            context, rest = layer.accumulate_forward(inputs[h:], acc, first, backend)  # a splitting layer's
            count += rest  # forward context is None: nothing to join
        else:
            context, count = layer.accumulate_forward(inputs, acc, first, backend)
        for n in names:
            self._first[index][n] = False
            self._counts[index][n] += count
        return context

    def _split(self, index: int, names: Sequence[str], tensor: Tensor) -> bool:
        """Whether this call of layer ``index`` is cut into two halves (noise-aware refresh); counts it."""
        split = self.split_halves and self.layers[index].splits_by_example(tensor)
        for n in names:
            if split:
                self._halves[index][n] += 1
                self._first_half[index][n] = False
            else:
                self._wholes[index][n] += 1
        return split

    def accumulate_backward(self, index: int, grad: Tensor, context: object, backend: Backend | str) -> None:
        """Fold an output gradient into layer ``index``'s output-gradient statistic, when due."""
        layer = self.layers[index]
        names = layer.backward_stat_names()
        if not self._due[index][names[0]]:
            return
        first = self._first[index][names[0]]
        acc = self.buffers.acc_views(index)
        first_half = self._first_half[index][names[0]]
        if self._split(index, names, grad):
            h = grad.shape[0] // 2
            whole = layer.slice_context(context, slice(None))
            ctx = layer.slice_context(whole, slice(0, h))
            count = layer.accumulate_backward(grad[:h], ctx, self.buffers.half_views(index), first_half, backend)
            ctx = layer.slice_context(whole, slice(h, None))
            count += layer.accumulate_backward(grad[h:], ctx, acc, first, backend)
        else:
            count = layer.accumulate_backward(grad, context, acc, first, backend)
        for n in names:
            self._first[index][n] = False
            self._counts[index][n] += count

    # ------------------------------------------------------------------ what was collected
    def is_fresh(self, index: int, name: str) -> bool:
        """Whether statistic ``name`` of layer ``index`` received rows this step."""
        return self._counts[index][name] > 0

    def due_stats(self) -> list[tuple[int, str]]:
        """(layer index, statistic name) of the statistics due this step."""
        return [(i, n) for i, n in self.stat_ids if self._due[i][n]]

    def fresh_stats(self) -> list[tuple[int, str]]:
        """(layer, statistic) pairs collected this step."""
        return [(i, n) for i, n in self.stat_ids if self.is_fresh(i, n)]

    def any_collected(self) -> bool:
        """Whether any statistic received rows this step."""
        return any(self.is_fresh(i, n) for i, n in self.stat_ids)

    def any_backward_collected(self) -> bool:
        """Whether any output-gradient statistic received rows this step."""
        return any(self.is_fresh(i, n) for i, layer in enumerate(self.layers) for n in layer.backward_stat_names())

    def forward_seen(self) -> bool:
        """Whether any curvature layer saw a training forward this step."""
        return any(e > 0 for e in self._examples)

    def examples_seen(self) -> int:
        """The most examples any curvature layer saw this step."""
        return max(self._examples, default=0)

    def prepare_local_stats(self, grad_scale: float, loss_scale: Tensor | None = None) -> None:
        """Scale output-gradient statistics to per-example gradients (× grad_scale², ÷ the AMP
        loss scale² when the backward ran on a scaled loss) and write the counts.

        Args:
            grad_scale: the factor from the loss's gradients to per-example gradients.
            loss_scale: the GradScaler's scale of the loss, or None.
        """
        buffers = self.buffers
        if self.split_halves:
            self._join_halves()
        if grad_scale != 1.0 or loss_scale is not None:
            factor: Tensor | float = grad_scale * grad_scale
            if loss_scale is not None:
                factor = factor / loss_scale.to(device=buffers.device, dtype=buffers.dtype) ** 2
            views = []  # one multi-tensor op: a depthwise layer has an output-gradient statistic per channel
            for i, layer in enumerate(self.layers):
                for n in layer.backward_stat_names():
                    if self.is_fresh(i, n):
                        views.append(buffers.acc_views(i)[n])
                        if self.split_halves:
                            views.append(buffers.half_views(i)[n])
            if views:
                torch._foreach_mul_(views, factor)
        stats = buffers.layout.counts
        buffers.write_counts([float(self._counts[i][n]) for i, per_layer in enumerate(stats) for n in per_layer])

    def _join_halves(self) -> None:
        """acc ← the whole batch's sums (second halves + first halves). A statistic with a call
        that was not cut gets half = acc / 2: S1 − S2 = 0, no noise estimate (the paper's rule)."""
        for i, n in self.fresh_stats():
            acc, half = self.buffers.acc_views(i)[n], self.buffers.half_views(i)[n]
            if self._halves[i][n]:
                acc.add_(half)
            if self._wholes[i][n] or not self._halves[i][n]:
                torch.mul(acc, 0.5, out=half)

    def reset(self) -> None:
        """Forget this step's rows (after the step, or when it is skipped)."""
        for i, names in enumerate(self.names):
            for n in names:
                self._counts[i][n] = 0
                self._first[i][n] = True
                self._first_half[i][n] = True
                self._halves[i][n] = self._wholes[i][n] = 0
            self._examples[i] = 0
