"""Damped inversion of many Kronecker factors: equal sizes in one batched call, failures retried.

A factor whose Cholesky fails (or whose inverse is not finite) is retried alone with its damping
×10, up to ``max_retries`` times; if it still fails the caller falls back to the last good inverse,
then to the identity (the plain gradient for that side). Reading the failure flags costs one host
synchronisation per refresh (not per layer).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import Tensor

from . import ops


@dataclass
class InversionResult:
    inverse: Tensor | None  # None: every attempt failed
    retries: int


def invert_damped(
    items: Sequence[tuple[Hashable, Tensor, Tensor]],
    *,
    backend: str,
    max_retries: int,
) -> dict[Hashable, InversionResult]:
    """Invert ``matrix + shift·I`` for every (key, matrix, shift) item; shift is a 0-dim tensor."""
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = defaultdict(list)
    for k, (_, mat, _) in enumerate(items):
        groups[(mat.shape[0], mat.dtype, mat.device)].append(k)

    inverses: list[Tensor | None] = [None] * len(items)
    infos: list[Tensor] = []
    order: list[int] = []
    for members in groups.values():
        mats = torch.stack([items[k][1] for k in members])
        shifts = torch.stack([items[k][2].to(mats.dtype).reshape(()) for k in members])
        inv, info = ops.cholesky_inverse_damped(mats, shifts, backend=backend)
        for j, k in enumerate(members):
            inverses[k] = inv[j]
        infos.append(info)
        order.extend(members)

    results: dict[Hashable, InversionResult] = {}
    if not items:
        return results
    failed_pos = torch.nonzero(torch.cat(infos) != 0).flatten().tolist()  # the one host sync
    failed = {order[p] for p in failed_pos}
    for k, (key, mat, shift) in enumerate(items):
        if k not in failed:
            results[key] = InversionResult(inverses[k], 0)
            continue
        inverse = None
        attempt = 0
        for attempt in range(1, max_retries + 1):
            retry_shift = (shift * (10.0 ** attempt)).to(mat.dtype).reshape(1)
            inv, info = ops.cholesky_inverse_damped(mat.unsqueeze(0), retry_shift, backend=backend)
            if int(info[0]) == 0:
                inverse = inv[0]
                break
        results[key] = InversionResult(inverse, attempt)
    return results
