"""Was a rejection right? For a rejected request, the run it would have had if admitted.

`CounterfactualSimulation` is a `Simulation` that, at each admission rejection it is asked
to judge, forks itself (`Simulation.fork`: the cluster as it is at that instant), admits the
request in the fork on the nodes the scheduler had chosen for it, and runs the fork until the
request has finished or has already missed its TTFT SLO. The rejection was right when the
request would have missed an SLO (TTFT, or TBT: the mean of its longest 10% of gaps); its
precision is the share of judged rejections that were right. The main run goes on as if
nothing happened (the fork is independent).

Only admission's verdicts are judged (prefill or decode overloaded, on arrival): a decode
node that refuses a reservation for want of KV had no choice. `sample` judges every n-th
rejection (a fork per rejection costs ~0.1-0.3 s on a busy cluster).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from bench.sim.cluster import Simulation
from bench.sim.events import Outcome
from bench.sim.metrics import request_tbt
from conductor.decision import Decision, RejectReason

JUDGED = (RejectReason.PREFILL_OVERLOADED, RejectReason.DECODE_OVERLOADED, RejectReason.DECODE_OVERLOADED_PROJECTED)


@dataclass(frozen=True, slots=True)
class Verdict:
    request: int
    reason: RejectReason
    would_meet: bool  # admitted, it would have met both SLOs: the rejection was wrong
    ttft_s: float  # what it would have had (NaN: no first token by the TTFT SLO)
    tbt_s: float


@dataclass(frozen=True, slots=True)
class Precision:
    rejections: int  # admission's rejections in the run
    judged: int
    right: int  # would have missed an SLO

    @property
    def precision(self) -> float:
        return self.right / self.judged if self.judged else math.nan

    def wilson_low(self, z: float = 1.96) -> float:
        """Lower end of the 95% Wilson interval of the precision (judging a sample)."""
        n = self.judged
        if not n:
            return math.nan
        p = self.right / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - spread) / (1 + z * z / n)


class CounterfactualSimulation(Simulation):
    def __init__(self, *args, sample: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sample = max(1, sample)
        self.verdicts: list[Verdict] = []
        self.admission_rejections = 0

    def admit(self, st, t: float) -> Decision:
        decision = super().admit(st, t)
        r = decision.rejection
        if r is None or r.reason not in JUDGED or decision.prefill is None or decision.decode is None:
            return decision
        self.admission_rejections += 1
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
        fork.forced[st.req.index] = replace(decision, rejection=None)
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
        return Verdict(st.req.index, decision.rejection.reason, meets, ttft, tbt)  # type: ignore[union-attr]

    def precision(self) -> Precision:
        return Precision(self.admission_rejections, len(self.verdicts), sum(not v.would_meet for v in self.verdicts))
