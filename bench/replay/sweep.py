"""Rate sweeps: which loads to run, and the effective request capacity they show.

A sweep replays the same trace window at several speed-ups; each speed-up is one load
(offered requests/s). The effective request capacity is the highest load at which at
least ``threshold`` (default 90%) of the requests met both SLOs. On noisy machines a
sweep need not be monotone; the pick is the highest passing load, and
``first_miss_below_capacity`` flags a failing load under it so a reader can see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CAPACITY_THRESHOLD = 0.9


@dataclass(frozen=True, slots=True)
class SweepPoint:
    speedup: float
    request_rate: float  # offered requests/s
    slo_attainment: float  # share of all requests meeting both SLOs


@dataclass(frozen=True, slots=True)
class Capacity:
    """The sweep's verdict; ``point`` is None when no load met the threshold."""

    threshold: float
    point: SweepPoint | None
    first_miss_below_capacity: SweepPoint | None

    @property
    def request_rate(self) -> float | None:
        return None if self.point is None else self.point.request_rate


def effective_capacity(
    points: Sequence[SweepPoint], threshold: float = CAPACITY_THRESHOLD
) -> Capacity:
    if not 0 < threshold <= 1:
        raise ValueError(f"capacity threshold must be in (0, 1], got {threshold}")
    passing = [p for p in points if p.slo_attainment >= threshold]
    best = max(passing, key=lambda p: p.request_rate, default=None)
    miss = None
    if best is not None:
        below = [
            p for p in points if p.request_rate < best.request_rate and p.slo_attainment < threshold
        ]
        miss = min(below, key=lambda p: p.request_rate, default=None)
    return Capacity(threshold, best, miss)


def speedups_for_rates(rates: Sequence[float], base_rate: float) -> list[float]:
    """Speed-ups that turn a window offering ``base_rate`` requests/s into ``rates``."""
    if base_rate <= 0:
        raise ValueError(f"the window's own request rate must be > 0, got {base_rate}")
    if any(rate <= 0 for rate in rates):
        raise ValueError(f"request rates must be > 0, got {list(rates)}")
    return [rate / base_rate for rate in rates]
