"""Alias of :mod:`spngd_ext.ops.conv_gram` for existing imports; new code imports that module."""

from .ops.conv_gram import *  # noqa: F403
from .ops.conv_gram import __all__  # noqa: F401
