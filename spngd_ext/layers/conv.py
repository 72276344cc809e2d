"""Kronecker factors of nn.Conv2d (KFC convention, Grosse & Martens 2016).

a_{n,t} = the C_in·kh·kw input patch at output position t (+1 for the bias); A = (1/N) Σ_{n,t} a aᵀ,
G = (1/(N·T)) Σ_{n,t} g gᵀ. The weight is viewed as d_out × (C_in·kh·kw [+1]).
Only groups=1 is supported (the optimizer leaves grouped convolutions first-order).
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .. import ops
from ..options import Backend
from .base import KroneckerLayer


class Conv2dCurvature(KroneckerLayer):
    """Kronecker factors of an nn.Conv2d (groups=1, numeric zero padding).

    Args:
        name: the module's name in the model.
        module: the Conv2d module.
    """

    kind = "conv2d"
    module: nn.Conv2d

    def __init__(self, name: str, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(
                f"{name}: Conv2d with groups={module.groups} has no Kronecker curvature here (groups=1 only)"
            )
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # padding="same"/"valid" and non-zero padding modes change the patch geometry.
            raise ValueError(
                f"{name}: Conv2d needs numeric zero padding, got padding={module.padding!r}, mode={module.padding_mode!r}"
            )
        super().__init__(name, module)

    @property
    def dim_a(self) -> int:
        m = self.module
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1] + int(self.has_bias)

    @property
    def dim_g(self) -> int:
        return self.module.out_channels

    def splits_by_example(self, tensor: Tensor) -> bool:
        return tensor.dim() == 4 and tensor.shape[0] >= 2

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        m = self.module
        x = inputs.detach()
        if x.dim() == 3:  # unbatched (C, H, W) input
            x = x.unsqueeze(0)
        ops.conv_a_factor(
            stats["A"],
            x,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=cast("tuple[int, int]", m.padding),
            dilation=m.dilation,
            has_bias=self.has_bias,
            scale=1.0,
            decay=0.0 if first else 1.0,
            backend=backend,
        )
        return None, x.shape[0]

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = grad_out.detach()
        if g.dim() == 3:
            g = g.unsqueeze(0)
        if g.is_cuda:  # the kernel reads row-major (N·T, C_out) rows
            rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        else:  # a (C_out, N·T) copy read as its transpose: contiguous T-runs, ~3x cheaper on CPU
            rows = g.transpose(0, 1).reshape(g.shape[1], -1).t()
        ops.accumulate_factor(stats["G"], rows, scale=1.0, decay=0.0 if first else 1.0, backend=backend)
        return rows.shape[0]
