"""Kronecker factors of nn.Embedding with a diagonal input factor.

An embedding is a Linear on one-hot inputs: row r looks up token t_r, a_r = e_{t_r}, and its output
gradient is g_r. So A = (1/R) Σ_r a aᵀ is diagonal, A_ii = the fraction of rows with token i, and
G = (1/R) Σ_r g gᵀ over the D embedding dimensions; rows are all looked-up positions (examples ×
positions), as for a Linear. The weight is (V × D) = (input × output), so the update is
Â⁻¹ ∇W Ĝ⁻¹: each token's gradient row times Ĝ⁻¹, divided by that token's damped count, with
π = sqrt((tr A / V) / (tr G / D)). Rows of ``padding_idx`` get no gradient and are left out of
both factors. The layer has no inverse sides: Ĝ (D × D) is inverted when the layer is
preconditioned, and Â is a vector.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .. import ops
from ..distributed.placement import LayerCost
from ..options import Backend
from .base import CurvatureLayer, LayerCurvature, StatSpec


class EmbeddingCurvature(CurvatureLayer):
    """Diagonal-A Kronecker factors of a dense nn.Embedding.

    Args:
        name: the module's name in the model.
        module: the Embedding (``sparse=False``).
    """

    kind = "embedding"
    module: nn.Embedding

    def __init__(self, name: str, module: nn.Embedding) -> None:
        if module.sparse:
            raise ValueError(f"{name}: Embedding with sparse=True has sparse gradients (not supported)")
        super().__init__(name, module)

    @property
    def vocabulary(self) -> int:
        """Number of embeddings V (the size of the diagonal A)."""
        return self.module.num_embeddings

    @property
    def dim_g(self) -> int:
        """Embedding dimension D (the size of G)."""
        return self.module.embedding_dim

    def stat_specs(self) -> list[StatSpec]:
        return [StatSpec("A", self.vocabulary, 0), StatSpec("G", self.dim_g * (self.dim_g + 1) // 2, self.dim_g)]

    def forward_stat_names(self) -> tuple[str, ...]:
        return ("A",)

    def backward_stat_names(self) -> tuple[str, ...]:
        return ("G",)

    def placement_cost(self) -> LayerCost:
        return LayerCost(self.name, elementwise=self.grad_numel * 3 + self.dim_g**3)

    def frobenius_weights(self, name: str) -> Tensor:
        return torch.ones(self.vocabulary)

    def _kept(self, tokens: Tensor) -> Tensor | None:
        """Mask of the rows that reach the weight's gradient (None: all)."""
        pad = self.module.padding_idx
        return None if pad is None else tokens.reshape(-1) != pad

    def accumulate_forward(
        self, inputs: Tensor, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> tuple[object, int]:
        tokens = inputs.detach().reshape(-1)
        kept = self._kept(tokens)
        if kept is not None:
            tokens = tokens[kept]
        counts = torch.bincount(tokens, minlength=self.vocabulary).to(stats["A"].dtype)
        if first:
            stats["A"].copy_(counts)
        else:
            stats["A"].add_(counts)
        return kept, int(tokens.numel())

    def accumulate_backward(
        self, grad_out: Tensor, context: object, stats: dict[str, Tensor], first: bool, backend: Backend | str
    ) -> int:
        g = grad_out.detach().reshape(-1, self.dim_g)
        if context is not None:
            g = g[cast(Tensor, context)]
        ops.accumulate_factor(stats["G"], g, scale=1.0, decay=0.0 if first else 1.0, backend=backend)
        return g.shape[0]

    def estimate_from_packed(self, name: str, packed: Tensor, scale: Tensor | float) -> Tensor:
        """A as its (V,) diagonal; G dense from its packed upper triangle."""
        if name == "A":
            return packed * scale
        return ops.unpack_upper(packed, [self.dim_g], scale=scale, dtype=packed.dtype, backend="torch")[0]

    def precondition(self, grad: Tensor, curvature: LayerCurvature, damping: float, backend: Backend | str) -> Tensor:
        """Â⁻¹ ∇W Ĝ⁻¹ with π-damping (Ĝ failing its Cholesky: the identity on that side)."""
        a, g = curvature.estimates["A"], curvature.estimates["G"]
        mean_a = a.sum() / self.vocabulary
        mean_g = g.diagonal().sum() / self.dim_g
        ok = torch.isfinite(mean_a) & torch.isfinite(mean_g) & (mean_a > 0) & (mean_g > 0)
        pi = torch.where(ok, torch.sqrt(torch.where(ok, mean_a / torch.where(ok, mean_g, 1.0), 1.0)), 1.0)
        root = damping**0.5
        g_inv, info = ops.cholesky_inverse_damped(g.unsqueeze(0), (root / pi).reshape(1), backend=backend)
        eye = torch.eye(self.dim_g, dtype=g.dtype, device=g.device)
        g_inv = torch.where(info[0] == 0, g_inv[0], eye)
        rows = grad.view(self.vocabulary, self.dim_g) / (a + pi * root).unsqueeze(1)
        return (rows @ g_inv).reshape(-1)
