"""The curvature primitives: one public function per op, dispatching to CUDA kernels or pure PyTorch.

The optimizer calls only these. Where each op runs is decided in one place,
:func:`spngd_ext.ops.dispatch.use_kernel`: ``backend="auto"`` takes the compiled kernel
(``torch.ops.spngd_ext.<op>``) when the extension is built and the tensors are on a GPU, else the
pure-PyTorch implementation in :mod:`spngd_ext.ops.torch_path` (the production CPU path, and the
float64 oracle the kernels are tested against). ``backend="cuda"`` insists on the kernel and
raises if it cannot be used; ``backend="torch"`` always takes the PyTorch path. ``backend`` is a
:class:`~spngd_ext.options.Backend` or its string value.

Dtypes on the kernel path: ``pack_upper``/``unpack_upper`` take float32/float64/bf16/fp16 (the cast
is fused), ``cholesky_inverse_damped`` float32 or float64. The accumulating ops
(``accumulate_factor``, ``conv_a_factor``, ``bn_unitwise_fisher``) keep a float32 state and read
float32/bf16/fp16 inputs (no float64); ``bn_unitwise_solve`` takes float32 only. For other dtypes
``backend="auto"`` runs the PyTorch path (so float64 statistics stay float64) and ``backend="cuda"``
raises ``TypeError``.

Every function checks its arguments (:mod:`spngd_ext.ops.checks`) and raises
``ValueError``/``TypeError`` naming the argument. Loading the compiled extension and the fake (meta)
implementations that let ``torch.compile`` trace through the ops are in :mod:`spngd_ext.ops.extension`.

Modules: ``packing``, ``factors``, ``solve``, ``update`` (the public ops by stage), ``dispatch``
(kernel or PyTorch), ``checks`` (argument checks), ``torch_path`` (pure PyTorch; its unit-wise
functions in ``torch_unitwise``), ``decay_add`` (the accumulators' update rule), ``conv_gram``
(the im2col-free conv A factor for stride 1), ``extension`` (the compiled ops).
"""

from __future__ import annotations

from .dispatch import Backend
from .extension import cuda_ops_available, extension_error, extension_loaded
from .factors import (
    accumulate_factor,
    bn_unitwise_fisher,
    bn_unitwise_fisher_from_input,
    conv_a_factor,
    gn_unitwise_fisher_from_input,
)
from .packing import pack_upper, unpack_upper
from .solve import bn_unitwise_solve, cholesky_inverse_damped, precondition
from .torch_path import packed_size
from .update import kl_clip_coefficient, kl_clip_from_total, momentum_update

__all__ = [
    "Backend",
    "packed_size",
    "pack_upper",
    "unpack_upper",
    "accumulate_factor",
    "conv_a_factor",
    "cholesky_inverse_damped",
    "bn_unitwise_fisher",
    "bn_unitwise_fisher_from_input",
    "gn_unitwise_fisher_from_input",
    "bn_unitwise_solve",
    "precondition",
    "kl_clip_coefficient",
    "kl_clip_from_total",
    "momentum_update",
    "cuda_ops_available",
    "extension_loaded",
    "extension_error",
]
