"""Running named checks and reporting them: each check passes, fails (with its error) or is skipped."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Check", "Outcome", "Skip", "run_checks", "format_outcomes"]


class Skip(Exception):
    """Raised by a check that cannot run here (the message says why); not a failure."""


@dataclass(frozen=True)
class Check:
    """One named check: ``fn()`` returns a short detail (e.g. how many cases ran) or raises.

    Args:
        name: what is checked, one line.
        fn: runs the check; raises AssertionError (or anything) on failure, :class:`Skip` to skip.
        group: "kernels" (needs a GPU), "cpu" or "end-to-end".
    """

    name: str
    fn: Callable[[], str | None]
    group: str


@dataclass
class Outcome:
    """The result of one :class:`Check`."""

    name: str
    group: str
    status: str  # "passed" | "failed" | "skipped"
    seconds: float
    detail: str


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, Skip) else str(exc)
    return " ".join(text.split())[:400]


def run_checks(checks: list[Check], budget_s: float, log: Callable[[str], None]) -> list[Outcome]:
    """Run ``checks`` in order; once ``budget_s`` seconds are spent the rest fail as "not run".

    Args:
        checks: what to run.
        budget_s: the time budget for all of them.
        log: receives one line per check as it finishes.
    """
    start = time.perf_counter()
    outcomes = []
    for check in checks:
        if time.perf_counter() - start > budget_s:
            outcome = Outcome(check.name, check.group, "failed", 0.0, f"not run: the {budget_s:.0f} s budget was spent")
        else:
            t0 = time.perf_counter()
            try:
                detail = check.fn() or ""
                status = "passed"
            except Skip as exc:
                status, detail = "skipped", _first_line(exc)
            except Exception as exc:  # noqa: BLE001  (every failure is reported, none stops the run)
                status, detail = "failed", _first_line(exc)
                where = traceback.extract_tb(exc.__traceback__)[-1]
                detail += f" [{where.filename.rsplit('/', 1)[-1]}:{where.lineno}]"
            outcome = Outcome(check.name, check.group, status, time.perf_counter() - t0, detail)
        outcomes.append(outcome)
        log(_line(outcome))
    return outcomes


def _line(o: Outcome) -> str:
    mark = {"passed": "PASS", "failed": "FAIL", "skipped": "skip"}[o.status]
    return f"  [{mark}] {o.name:<58s} {o.seconds:6.2f} s  {o.detail}"


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The summary line: counts of passed, failed and skipped checks."""
    count = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    return f"{count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped"
