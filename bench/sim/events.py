"""The per-request trail a simulation leaves, and the check that every trail is consistent.

A consistent trail: one arrival first; then either a rejection (on arrival, or after the
prefill ran — `rejected_after_prefill`) or prefill start/done, first token and completion;
or a failure with its reason. Exactly one terminal event, last, matching the request's
outcome; times never go backwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.sim.cluster import SimRun


class EventKind(StrEnum):
    ARRIVED = "arrived"
    REJECTED = "rejected"
    PREFILL_STARTED = "prefill_started"
    PREFILL_DONE = "prefill_done"
    FIRST_TOKEN = "first_token"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RequestEvent:
    t_s: float
    request: int
    kind: EventKind
    detail: str = ""


class Outcome(StrEnum):
    PENDING = "pending"
    REJECTED = "rejected"
    COMPLETED = "completed"
    FAILED = "failed"


def check_event_log(run: "SimRun") -> list[str]:
    """Problems in the per-request trail; empty when every request has a consistent story:
    one arrival; then either a rejection (before or after its prefill) or a first token; and
    exactly one terminal event (rejected, completed or failed) that matches its outcome."""
    problems: list[str] = []
    by_request: dict[int, list[RequestEvent]] = {}
    for e in run.events:
        by_request.setdefault(e.request, []).append(e)
    terminal = {EventKind.REJECTED, EventKind.COMPLETED, EventKind.FAILED}
    for st in run.states:
        rid = st.req.index
        trail = by_request.get(rid, [])
        kinds = [e.kind for e in trail]
        if not kinds or kinds[0] is not EventKind.ARRIVED or kinds.count(EventKind.ARRIVED) != 1:
            problems.append(f"request {rid}: trail does not open with one arrival: {kinds}")
            continue
        ends = [k for k in kinds if k in terminal]
        if len(ends) != 1 or kinds[-1] not in terminal:
            problems.append(f"request {rid}: expected exactly one terminal event last, got {kinds}")
            continue
        times = [e.t_s for e in trail]
        if any(b < a for a, b in zip(times, times[1:])):
            problems.append(f"request {rid}: events out of time order")
        end = kinds[-1]
        if end is EventKind.REJECTED:
            if st.outcome is not Outcome.REJECTED or EventKind.FIRST_TOKEN in kinds:
                problems.append(f"request {rid}: rejected but outcome {st.outcome} / trail {kinds}")
            ran_prefill = EventKind.PREFILL_DONE in kinds
            if ran_prefill != st.rejected_after_prefill:
                problems.append(f"request {rid}: rejected_after_prefill={st.rejected_after_prefill} but trail {kinds}")
            if not trail[-1].detail:
                problems.append(f"request {rid}: rejection without a reason")
        elif end is EventKind.COMPLETED:
            expected = [EventKind.ARRIVED, EventKind.PREFILL_STARTED, EventKind.PREFILL_DONE,
                        EventKind.FIRST_TOKEN, EventKind.COMPLETED]
            if kinds != expected or st.outcome is not Outcome.COMPLETED:
                problems.append(f"request {rid}: completed with trail {kinds}, outcome {st.outcome}")
        else:
            if st.outcome is not Outcome.FAILED or not trail[-1].detail:
                problems.append(f"request {rid}: failed without a reason or with outcome {st.outcome}")
    known = {st.req.index for st in run.states}
    strays = set(by_request) - known
    if strays:
        problems.append(f"events for unknown requests: {sorted(strays)[:5]}")
    return problems
