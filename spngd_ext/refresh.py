"""When each curvature statistic (each A, G, BatchNorm Fisher) is refreshed: the fixed schedule and
the adaptive one of stale statistics.

Fixed (``curvature_interval`` = k, no stale statistics): every statistic is due on the steps
divisible by k.

Adaptive (:class:`StalePolicy`): each statistic refreshes on its own interval. At a refresh the
owner measures how much the statistic moved: with ``rule="relative"`` (the paper's rule)
r = ‖X_new − X_old‖_F / ‖X_old‖_F; with ``rule="noise"`` the part of r² that sampling noise
explains is taken out first, d = √max(0, r² − (1 + c)·ν²), ν being the relative noise of X
measured from the two halves of the batch (docs/design.md, "Telling change from sampling noise").
If the measure is < threshold the statistic's interval doubles, otherwise it halves, always within
[1, max_interval]. The measures are computed on the device for all statistics at once and read
back in one transfer per refresh step; every rank reads the same (all-gathered) values, so every
rank makes the same decisions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_INTERVAL = 32


class StaleRule(str, enum.Enum):
    """What a refresh compares with the threshold.

    RELATIVE: r = ‖X − Ê‖_F / ‖Ê‖_F (Osawa et al.). NOISE: the drift d = √max(0, r² − (1 + c)·ν²)
    left after removing what the sampling noise ν of X and Ê explains.
    """

    RELATIVE = "relative"
    NOISE = "noise"


@dataclass(frozen=True)
class StalePolicy:
    """When to lengthen or shorten a statistic's refresh interval.

    threshold: relative Frobenius change (``rule="relative"``) or drift (``rule="noise"``) under
    which a statistic counts as unchanged.
    max_interval: cap on any interval; None takes the optimizer's ``curvature_interval`` when it
    is > 1, else ``DEFAULT_MAX_INTERVAL``.
    rule: ``"relative"`` (the paper's rule, the default) or ``"noise"`` (noise-aware; each refresh
    of a statistic with a noise estimate then also collects its first half-batch separately).
    align: a statistic with interval k is next due at the next multiple of k (instead of k steps
    after its refresh), so statistics with power-of-two intervals fall due on nested steps and the
    steps on which none is due (no hook, no sampled-label backward) are as many as possible.
    """

    threshold: float = 0.1
    max_interval: int | None = None
    rule: StaleRule = StaleRule.RELATIVE
    align: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rule", StaleRule(self.rule))
        except ValueError:
            raise ValueError(f"StalePolicy: rule must be 'relative' or 'noise', got {self.rule!r}") from None
        if isinstance(self.threshold, bool) or not (
            isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0
        ):
            raise ValueError(f"StalePolicy: threshold must be a finite number > 0, got {self.threshold!r}")
        if self.max_interval is not None and (
            isinstance(self.max_interval, bool) or not isinstance(self.max_interval, int) or self.max_interval < 1
        ):
            raise ValueError(f"StalePolicy: max_interval must be an integer >= 1, got {self.max_interval!r}")


class RefreshSchedule:
    """Host-side intervals and due steps of every statistic (plain Python ints).

    Args:
        n_stats: number of statistics scheduled.
        fixed_interval: the fixed schedule's k (``curvature_interval``); with a policy, the default cap.
        policy: the adaptive policy, or None for the fixed schedule.
    """

    def __init__(self, n_stats: int, *, fixed_interval: int, policy: StalePolicy | None) -> None:
        self.policy = policy
        self.fixed_interval = fixed_interval
        if policy is None:
            self.max_interval = fixed_interval
        elif policy.max_interval is not None:
            self.max_interval = policy.max_interval
        else:
            self.max_interval = fixed_interval if fixed_interval > 1 else DEFAULT_MAX_INTERVAL
        self.intervals = [1 if policy is not None else fixed_interval] * n_stats
        self.next_due = [0] * n_stats
        self.refreshes = [0] * n_stats

    @property
    def adaptive(self) -> bool:
        """Whether intervals adapt to the statistics' changes (a :class:`StalePolicy` is set)."""
        return self.policy is not None

    @property
    def noise_aware(self) -> bool:
        """Whether the changes are measured net of sampling noise (``rule="noise"``)."""
        return self.policy is not None and self.policy.rule is StaleRule.NOISE

    def due(self, step: int) -> list[bool]:
        """For every statistic, whether it is refreshed at ``step``."""
        if not self.adaptive:
            return [step % self.fixed_interval == 0] * len(self.intervals)
        return [step >= t for t in self.next_due]

    def record(self, step: int, refreshed: Sequence[int], changes: Sequence[float]) -> None:
        """Update the intervals of the statistics refreshed at ``step`` from their relative changes.

        A change that is not finite or negative (no previous estimate) counts as large.

        Args:
            step: the step index of the refresh.
            refreshed: indices of the statistics refreshed.
            changes: their relative changes (adaptive schedule; ignored by the fixed one).
        """
        for s in refreshed:
            self.refreshes[s] += 1
        if not self.adaptive:
            return
        for s, r in zip(refreshed, changes):
            similar = math.isfinite(r) and 0 <= r < self.policy.threshold  # type: ignore[union-attr]
            k = self.intervals[s] * 2 if similar else self.intervals[s] // 2
            k = self.intervals[s] = min(self.max_interval, max(1, k))
            self.next_due[s] = (step // k + 1) * k if self.policy.align else step + k  # type: ignore[union-attr]

    def state_dict(self) -> dict:
        """Intervals, next due steps and refresh counts, as plain lists."""
        return {"intervals": list(self.intervals), "next_due": list(self.next_due), "refreshes": list(self.refreshes)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`'s output; ValueError when it has another number of statistics."""
        if len(sd["intervals"]) != len(self.intervals):
            raise ValueError(
                f"SPNGD.load_state_dict: {len(sd['intervals'])} statistics saved, {len(self.intervals)} here"
            )
        self.intervals = list(sd["intervals"])
        self.next_due = list(sd["next_due"])
        self.refreshes = list(sd["refreshes"])
