"""Kronecker factors of nn.Linear.

a_n = input row (+1 for the bias), g_n = per-example output gradient. Inputs with extra leading
dimensions are flattened into rows; every row counts for A and G alike (docs/design.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..options import Backend
from .base import KroneckerLayer


class LinearCurvature(KroneckerLayer):
    """Kronecker factors of an nn.Linear.

    Args:
        name: the module's name in the model.
        module: the Linear module.
    """

    kind = "linear"
    module: nn.Linear

    def __init__(self, name: str, module: nn.Linear) -> None:
        super().__init__(name, module)

    @property
    def dim_a(self) -> int:
        return self.module.in_features + int(self.has_bias)

    @property
    def dim_g(self) -> int:
        return self.module.out_features

    def splits_by_example(self, tensor: Tensor) -> bool:
        return tensor.dim() >= 2 and tensor.shape[0] >= 2

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        x = inputs.detach().reshape(-1, self.module.in_features)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        ops.accumulate_factor(stats["A"], x, scale=1.0, decay=0.0 if first else 1.0, backend=backend)
        return None, x.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = grad_out.detach().reshape(-1, self.module.out_features)
        ops.accumulate_factor(stats["G"], g, scale=1.0, decay=0.0 if first else 1.0, backend=backend)
        return g.shape[0]
