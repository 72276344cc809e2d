"""Alias of :mod:`spngd_ext.ops.extension` for existing imports; new code imports that module."""

from .ops.extension import cuda_ops_available, extension_error, extension_loaded

__all__ = ["cuda_ops_available", "extension_error", "extension_loaded"]
