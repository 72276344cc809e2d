"""Alias of :mod:`spngd_ext.ops.torch_path` for existing imports; new code imports that module."""

from .ops.torch_path import *  # noqa: F403
from .ops.torch_path import __all__, bn_unit_gradients_from_input, bn_unitwise_fisher_from_sums  # noqa: F401
