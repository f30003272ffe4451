"""Flag types and the error boundary of the benchmark programs (the simulator's and others).

A number a flag takes is checked where argparse reads it (`error: argument --load: ...`,
exit 2), so a run never starts on a load of 0 (a division by zero), NaN (a run that never
ends) or -1 (a run of nonsense). What the run itself refuses — a configuration
`SimConfig` or the conductor's settings reject, a file that cannot be read or written — is
printed as one line and exits 2 (`run`), as `halfmoon bench sim` always did.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from conductor.errors import ConductorError


def count(minimum: int) -> Callable[[str], int]:
    """An integer flag of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum}, got {value}")
        return value

    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number, got {text!r}")
    return value


def positive(text: str) -> float:
    """A finite number > 0 (a load, a speed-up, a period)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a number > 0, got {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = _finite(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share in (0, 1], got {text}")
    return value


def positives(text: str) -> list[float]:
    """Comma-separated finite numbers > 0, at least one."""
    values = [positive(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("at least one number")
    return values


def counts(minimum: int) -> Callable[[str], list[int]]:
    """Comma-separated integers of at least `minimum`, at least one."""
    one = count(minimum)

    def parse(text: str) -> list[int]:
        values = [one(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("at least one integer")
        return values

    return parse


def names(choices) -> Callable[[str], list[str]]:
    """Comma-separated names out of `choices`, at least one."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"comma-separated names from {', '.join(allowed)}, got {text!r}")
        return values

    return parse


SEED = count(0)  # NumPy's generators take no negative seed


def run(prog: str, main: Callable[[], int]) -> int:
    """`main()`, with what the run refuses printed as `prog: reason` (exit 2), not a traceback."""
    try:
        return main()
    except (ConductorError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
