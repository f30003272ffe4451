"""What one chaos scenario saw, as one row: counted from the requests' outcomes and the
block audit, printed as a table and written as JSON.

Every request ends one way (`Outcome.status`):

- `completed`: the answer streamed to its end;
- `failed_clean`: it failed and the client was told, in time, in the API's terms (a gRPC
  status other than INTERNAL / UNKNOWN / DEADLINE_EXCEEDED, an HTTP error with an
  OpenAI-shaped body that is not an internal error, a refused or dropped connection while
  the conductor was down);
- `failed_unclean`: it failed with gRPC INTERNAL / UNKNOWN, or an HTTP 5xx that is not a
  named failure, or with a message naming a Python exception class whatever the status
  (what a client can only read as a server bug);
- `hung`: no end within the client's timeout.

A row's required keys are `scenario, requests, completed, failed_clean, hung,
leaked_blocks, detect_s` (detect_s: seconds from the fault until the conductor took the
faulty node out of rotation, None when no node was faulted or it never was); the rest say
more (failures among requests sent after the fault, answers that differ from the
fault-free run, how long a faulted part took to be back in rotation, the commonest errors).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

STATUSES = ("completed", "failed_clean", "failed_unclean", "hung")
EXCEPTION_CLASS = re.compile(r"<class '|\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback \(most recent")


def names_exception_class(message: str) -> bool:
    """Whether a server's message leaks an exception class (`<class 'TypeError'>`, `KeyError`)."""
    return EXCEPTION_CLASS.search(message) is not None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request ended, seen by the client."""

    index: int  # which prompt of the load (the same index means the same prompt and length)
    api: str  # "grpc" | "http"
    sent_s: float  # monotonic clock
    ended_s: float
    status: str  # one of STATUSES
    error: str = ""  # the server's words, "" when completed
    tokens: tuple[int, ...] = ()
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass(frozen=True, slots=True)
class Audit:
    """KV blocks still used on each surviving node once the cluster was idle."""

    used: dict[str, int]  # node id -> blocks used at the end of the audit
    settle_s: float | None  # seconds after the load until every node read 0; None: never
    unreachable: tuple[str, ...] = ()  # surviving nodes whose /metrics did not answer

    @property
    def leaked(self) -> int:
        return sum(self.used.values())


@dataclass(slots=True)
class Row:
    scenario: str
    requests: int
    completed: int
    failed_clean: int
    hung: int
    leaked_blocks: int | None
    detect_s: float | None
    failed_unclean: int = 0
    failed_after_fault: int = 0  # failed requests sent after the fault began
    mismatched: int | None = None  # completed answers unlike the fault-free run's (None: no reference)
    recover_s: float | None = None  # fault ended -> the part back in rotation
    settle_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)  # commonest error messages, counted
    notes: str = ""
    details: dict = field(default_factory=dict)  # what a scenario adds (the fuzzer's breakdown)

    def ok(self) -> bool:
        """No hang, no unclean failure, no leak, no wrong answer."""
        return (self.hung == 0 and self.failed_unclean == 0 and self.leaked_blocks == 0
                and not self.mismatched)


def error_key(message: str, limit: int = 120) -> str:
    """An error message with request-specific digits folded, so equal failures count together."""
    out, digits = [], False
    for ch in message[:limit]:
        if ch.isdigit():
            if not digits:
                out.append("#")
            digits = True
        else:
            out.append(ch)
            digits = False
    return "".join(out)


def summarize(scenario: str, outcomes: Sequence[Outcome], audit: Audit | None, *, fault_at: float | None = None,
              detect_s: float | None = None, recover_s: float | None = None,
              reference: dict[int, tuple[int, ...]] | None = None, notes: str = "", top_errors: int = 4,
              details: dict | None = None) -> Row:
    counts = Counter(o.status for o in outcomes)
    failed = [o for o in outcomes if o.status != "completed"]
    mismatched = None
    if reference is not None:
        mismatched = sum(1 for o in outcomes
                         if o.status == "completed" and o.index in reference and o.tokens != reference[o.index])
    errors = Counter(f"{o.status}: {error_key(o.error)}" for o in failed)
    return Row(
        scenario=scenario, requests=len(outcomes), completed=counts["completed"],
        failed_clean=counts["failed_clean"], hung=counts["hung"],
        leaked_blocks=None if audit is None or audit.unreachable else audit.leaked, detect_s=detect_s,
        failed_unclean=counts["failed_unclean"],
        failed_after_fault=0 if fault_at is None else sum(1 for o in failed if o.sent_s >= fault_at),
        mismatched=mismatched, recover_s=recover_s, settle_s=None if audit is None else audit.settle_s,
        errors=dict(errors.most_common(top_errors)),
        notes="; ".join(x for x in (notes, _audit_note(audit)) if x), details=details or {})


def _audit_note(audit: Audit | None) -> str:
    if audit is None:
        return ""
    parts = [f"{node} holds {n} blocks" for node, n in sorted(audit.used.items()) if n]
    parts += [f"{node} /metrics unreachable" for node in audit.unreachable]
    return ", ".join(parts)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


COLUMNS = ("scenario", "requests", "completed", "failed_clean", "failed_unclean", "hung", "failed_after_fault",
           "mismatched", "leaked_blocks", "detect_s", "recover_s")


def table(rows: Iterable[Row]) -> str:
    """A plain-text table (fixed columns; errors and notes under it)."""
    rows = list(rows)
    cells = [list(COLUMNS)] + [[_fmt(getattr(r, c)) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for message, n in r.errors.items():
            lines.append(f"  {r.scenario}: {n} x {message}")
        if r.notes:
            lines.append(f"  {r.scenario}: {r.notes}")
    return "\n".join(lines)


def write_json(rows: Iterable[Row], path: Path, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"rows": [asdict(r) for r in rows]} | (extra or {})
    path.write_text(json.dumps(doc, indent=1) + "\n")
