"""Alias of :mod:`spngd_ext.refresh` for existing imports; new code imports that module."""

from .refresh import DEFAULT_MAX_INTERVAL, RefreshSchedule, StalePolicy

__all__ = ["DEFAULT_MAX_INTERVAL", "RefreshSchedule", "StalePolicy"]
