"""The raw ops' argument-check cases, for tests/test_ops_cuda.py and tests/test_ops_extension.py.

The cases ship inside the package (:mod:`spngd_ext.selftest.op_error_cases`), so that
``python -m spngd_ext.selftest`` runs them on an installed copy; this module re-exports them.
Not collected (no test_ prefix).
"""

from spngd_ext.selftest.op_error_cases import ErrorCase, child_command, error_cases, run_error_cases

__all__ = ["ErrorCase", "child_command", "error_cases", "run_error_cases"]
