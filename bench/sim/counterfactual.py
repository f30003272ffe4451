"""Was a rejection right? For a rejected request, the run it would have had if admitted.

`CounterfactualSimulation` is a `Simulation` that, at each admission rejection it is asked
to judge, forks itself (`Simulation.fork`: the cluster as it is at that instant), admits the
request in the fork on the nodes the scheduler had chosen for it, and runs the fork until the
request has finished or has already missed its TTFT SLO. The rejection was right when the
request would have missed an SLO (TTFT, or TBT: the mean of its longest 10% of gaps); its
precision is the share of judged rejections that were right. The main run goes on as if
nothing happened (the fork is independent).

What else the fork may change (`Counterfactual`):

* ``replay`` (the default): the fork differs from the real run by that one admission only.
  The real run is simulated first with every decision recorded (`record_decisions`), then
  replayed with those decisions forced (the same run, event for event), and each fork forces
  every later request's decisions to the real run's too: a request admitted there is admitted
  in the fork (it still needs its decode node's KV: where the extra request took it, the
  later one is refused `decode_out_of_blocks`), a rejected one stays rejected. This asks
  exactly "would it have met its SLOs had it been admitted", with the load the cluster really
  had after it.
* ``free``: the fork's scheduler goes on deciding. When the overload is collective (a decode
  pool at its TBT limit), the fork then rejects a later request in the admitted one's place,
  so the admitted one meets its SLOs and nearly every rejection is judged wrong although the
  cluster could not have served one more request: this measures whether the admission chose
  the right *one* to reject, not whether it should have rejected. Kept to compare.

Each verdict also counts the later requests the fork refused that the real run had admitted
(`displaced`): in a free fork, the rejections it made in the admitted one's place.

Only admission's verdicts are judged (prefill or decode overloaded, on arrival): a decode
node that refuses a reservation for want of KV had no choice. `sample` judges every n-th
rejection (a fork per rejection costs ~0.1-0.3 s on a busy cluster). Service noise (off by
default) is one stream of draws: a fork's extra prefill shifts the later draws.
"""
from __future__ import annotations

import enum
import math
import statistics
from dataclasses import dataclass, replace

from bench.sim.cluster import RequestState, SimConfig, Simulation, SimRequest, SimRun
from bench.sim.events import Outcome
from bench.sim.metrics import request_tbt, slo_met
from conductor.cost_model import CostModel
from conductor.decision import Decision, RejectReason

PREFILL_REASONS = (RejectReason.PREFILL_OVERLOADED,)
DECODE_REASONS = (RejectReason.DECODE_OVERLOADED, RejectReason.DECODE_OVERLOADED_PROJECTED)
JUDGED = PREFILL_REASONS + DECODE_REASONS


class Counterfactual(str, enum.Enum):
    REPLAY = "replay"  # every other decision as in the real run
    FREE = "free"  # the fork's scheduler keeps deciding


@dataclass(frozen=True, slots=True)
class Decisions:
    """A run's decisions by request index: on arrival, and (per_stage) after the prefill."""

    arrival: dict[int, Decision]
    after_prefill: dict[int, Decision | None]
    refused: set[int]  # the requests the run rejected (by a decision or for want of decode KV)
    met: set[int]  # the requests that completed within both SLOs


class _Recording(Simulation):
    """A simulation that keeps its decisions in `recorded` (set by `record_decisions`)."""

    recorded: Decisions

    def admit(self, st: RequestState, t: float) -> Decision:
        decision = super().admit(st, t)
        self.recorded.arrival[st.req.index] = decision
        return decision

    def admit_after_prefill(self, st: RequestState, t: float) -> Decision | None:
        decision = super().admit_after_prefill(st, t)
        self.recorded.after_prefill[st.req.index] = decision
        return decision


def record_decisions(sim: Simulation) -> Decisions:
    """Every decision `sim` (not started) will make: a copy of it, run to the end."""
    rec = sim.fork(math.inf, from_index=0)
    rec.__class__ = _Recording
    rec.recorded = Decisions({}, {}, set(), set())  # type: ignore[attr-defined]
    run = rec.run()
    rec.recorded.refused.update(st.req.index for st in run.states if st.outcome is Outcome.REJECTED)  # type: ignore[attr-defined]
    rec.recorded.met.update(slo_met(run.states, run.config.ttft_slo_s, run.config.tbt_slo_s))  # type: ignore[attr-defined]
    return rec.recorded  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Verdict:
    request: int
    reason: RejectReason
    would_meet: bool  # admitted, it would have met both SLOs: the rejection was wrong
    ttft_s: float  # what it would have had (NaN: no first token by the TTFT SLO)
    tbt_s: float
    displaced: int = 0  # later requests the fork refused that the real run admitted
    # (judged when it would have met its SLOs) requests that overlapped it, met both SLOs in
    # the real run and not in the fork / the other way round
    harmed: int = 0
    helped: int = 0
    # what this one request adds to its decode node's step once its context is whole (prompt
    # and output), by the cost model: the most its admission can change a resident's TBT
    own_step_s: float = 0.0

    @property
    def net_right(self) -> bool:
        """Admitting it would not have raised the number of requests within both SLOs."""
        return int(self.would_meet) + self.helped - self.harmed <= 0


@dataclass(frozen=True, slots=True)
class Precision:
    rejections: int  # admission's rejections in the run
    judged: int
    right: int  # would have missed an SLO
    displaced: int = 0  # summed over the judged: later requests their forks refused and the run did not
    net_right: int = 0  # admitting would not have raised the number of requests within both SLOs

    @property
    def precision(self) -> float:
        """The share of judged rejections whose request would have missed an SLO."""
        return self.right / self.judged if self.judged else math.nan

    @property
    def net_precision(self) -> float:
        """The share of judged rejections that kept the cluster's count of requests within
        both SLOs from rising: those of requests that would have missed, and those whose
        admission would have cost as many other requests their SLOs (a decode batch's step
        is every resident's TBT)."""
        return self.net_right / self.judged if self.judged else math.nan

    def wilson_low(self, z: float = 1.96, *, net: bool = False) -> float:
        """Lower end of the 95% Wilson interval of the precision (judging a sample)."""
        n = self.judged
        if not n:
            return math.nan
        p = (self.net_right if net else self.right) / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - spread) / (1 + z * z / n)


@dataclass(frozen=True, slots=True)
class DecodeMargin:
    """How close to the TBT SLO the decode rejections judged wrong were: the TBT each of those
    requests would have had, and what one request adds to a decode step, both as shares of
    the SLO (medians). A rejection on a shared batch's step can be right for the request
    itself only when the batch runs within one request's step of the SLO, and then every
    resident is that close to missing it too."""

    wrong: int  # decode rejections judged wrong (the request would have met both SLOs)
    slack: float  # median of 1 - its TBT / the SLO, over those
    own_step: float  # median of one request's step (`Verdict.own_step_s`) / the SLO, over those

    @staticmethod
    def of(verdicts: list[Verdict], tbt_slo_s: float) -> DecodeMargin:
        wrong = [v for v in verdicts if v.reason in DECODE_REASONS and v.would_meet]
        if not wrong:
            return DecodeMargin(0, math.nan, math.nan)
        return DecodeMargin(len(wrong), statistics.median(1.0 - v.tbt_s / tbt_slo_s for v in wrong),
                            statistics.median(v.own_step_s / tbt_slo_s for v in wrong))


class CounterfactualSimulation(Simulation):
    """Judges admission's rejections as it runs. It needs the real run's decisions first (to
    force them in replay forks, and to count what a fork displaced): `run` records them with a
    copy of itself run to the end first (`record_decisions`)."""

    def __init__(self, requests: list[SimRequest], config: SimConfig, costs: CostModel, *, sample: int = 1,
                 mode: Counterfactual = Counterfactual.REPLAY) -> None:
        super().__init__(requests, config, costs)
        self.sample = max(1, sample)
        self.mode = Counterfactual(mode)
        self.verdicts: list[Verdict] = []
        self.admission_rejections = 0
        self.rejections_by_reason: dict[RejectReason, int] = {}
        self.decisions = Decisions({}, {}, set(), set())

    def run(self) -> SimRun:
        assert self.now == 0.0 and self._next_arrival == 0, "judge from the start"
        self.decisions = record_decisions(self)
        if self.mode is Counterfactual.REPLAY:
            self.forced = self.decisions.arrival  # the real run again, event for event
            self.forced_after = self.decisions.after_prefill
        return super().run()

    def admit(self, st, t: float) -> Decision:
        decision = super().admit(st, t)
        r = decision.rejection
        if r is None or r.reason not in JUDGED or decision.prefill is None or decision.decode is None:
            return decision
        self.admission_rejections += 1
        self.rejections_by_reason[r.reason] = self.rejections_by_reason.get(r.reason, 0) + 1
        if (self.admission_rejections - 1) % self.sample == 0:
            self.verdicts.append(self.judge(st, decision, t))
        return decision

    def judge(self, st, decision: Decision, t: float) -> Verdict:
        cfg = self.config
        horizon = cfg.ttft_slo_s + 1.5 * st.req.output_tokens * cfg.tbt_slo_s + 30.0
        fork = self.fork(horizon, from_index=st.req.index - self.states[0].req.index)
        fork.__class__ = Simulation  # the fork judges nothing itself
        twin = fork.states[0]
        assert twin.req.index == st.req.index
        index = st.req.index
        if self.mode is Counterfactual.REPLAY:  # (the dicts are shared with this run: the fork gets its own)
            fork.forced = {**self.decisions.arrival, index: replace(decision, rejection=None)}
            fork.forced_after = {**self.decisions.after_prefill, index: None}  # admitted means admitted
        else:
            fork.forced = {index: replace(decision, rejection=None)}
        deadline = st.req.arrival_s + cfg.ttft_slo_s

        def settled() -> bool:
            return twin.outcome is not Outcome.PENDING or (math.isnan(twin.first_token_s) and fork.now > deadline)

        fork.run_until(math.inf, until=settled)
        ttft = twin.first_token_s - st.req.arrival_s if not math.isnan(twin.first_token_s) else math.nan
        tbt = math.nan
        if twin.outcome is Outcome.COMPLETED:
            tbt = 0.0
            if twin.join_step >= 0:
                ends, durations, _ = twin.decode.step_arrays()
                tbt = request_tbt(float(ends[twin.join_step]) - twin.first_token_s, durations, twin.join_step,
                                  twin.finish_step)
        meets = twin.outcome is Outcome.COMPLETED and ttft <= cfg.ttft_slo_s and tbt <= cfg.tbt_slo_s
        harmed, helped = self._effect_on_others(fork, twin) if meets else (0, 0)  # what it did to the others
        m = self.costs.decode
        own_step = m.s_b + m.s_t * (st.req.input_tokens + st.req.output_tokens)
        return Verdict(index, decision.rejection.reason, meets, ttft, tbt,  # type: ignore[union-attr]
                       self._displaced(fork), harmed, helped, own_step)

    def _effect_on_others(self, fork: Simulation, twin: RequestState) -> tuple[int, int]:
        """Runs `fork` on until every request that arrived before `twin` finished has ended;
        returns how many of those met both SLOs in the real run and not in the fork (harmed),
        and the other way round (helped)."""
        watched = [other for other in fork.states[1:] if other.req.arrival_s <= twin.finish_s]
        cursor = 0

        def all_ended() -> bool:
            nonlocal cursor
            while cursor < len(watched) and watched[cursor].outcome is not Outcome.PENDING:
                cursor += 1
            return cursor == len(watched)

        if not all_ended():
            fork.run_until(math.inf, until=all_ended)
        met_fork = slo_met(watched, self.config.ttft_slo_s, self.config.tbt_slo_s)
        met_real = self.decisions.met
        harmed = sum(1 for other in watched if other.req.index in met_real and other.req.index not in met_fork)
        helped = sum(1 for other in watched if other.req.index in met_fork and other.req.index not in met_real)
        return harmed, helped

    def _displaced(self, fork: Simulation) -> int:
        """Requests after the twin that the fork refused and the real run did not."""
        refused = self.decisions.refused
        return sum(other.outcome is Outcome.REJECTED and other.req.index not in refused for other in fork.states[1:])

    def precision(self, reasons: tuple[RejectReason, ...] = JUDGED) -> Precision:
        """Over the judged rejections for `reasons` (every judged reason by default);
        `rejections` then counts admission's rejections for those reasons."""
        verdicts = [v for v in self.verdicts if v.reason in reasons]
        rejections = (self.admission_rejections if reasons == JUDGED
                      else sum(self.rejections_by_reason.get(r, 0) for r in reasons))
        return Precision(rejections, len(verdicts), sum(not v.would_meet for v in verdicts),
                         sum(v.displaced for v in verdicts), sum(v.net_right for v in verdicts))

    def decode_margin(self) -> DecodeMargin:
        return DecodeMargin.of(self.verdicts, self.config.tbt_slo_s)
