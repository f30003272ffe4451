"""Latency math on one request's token arrival times, and distributions over requests.

Definitions follow ``../shared/DESIGN.md`` section 5, all measured at the client:

- TTFT: send -> first token.
- TBT gaps: every gap between consecutive tokens. Tokens that arrive in one stream
  message share an arrival time, so their gaps are 0: that is what the user saw.
- Mooncake TBT: the mean of a request's longest 10% of gaps, over ``ceil(0.1 * gaps)``
  gaps (at least one); undefined for a one-token answer.
- TPOT: (E2E - TTFT) / (output tokens - 1); undefined for a one-token answer.
- E2E: send -> last token.
- Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

MOONCAKE_TBT_FRACTION = 0.1


def token_gaps(token_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive token arrival times."""
    return [later - earlier for earlier, later in itertools.pairwise(token_times)]


def mooncake_tbt(gaps: Sequence[float], fraction: float = MOONCAKE_TBT_FRACTION) -> float | None:
    """Mean of the longest ``fraction`` of gaps (at least one gap); None without gaps."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not gaps:
        return None
    count = max(1, math.ceil(fraction * len(gaps)))
    longest = sorted(gaps, reverse=True)[:count]
    return sum(longest) / count


def tpot(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None for fewer than two tokens."""
    if output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency over many samples, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=max(values),
        )
