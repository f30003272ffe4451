"""The scheduling core: the current policy and admission mode applied to one request.

Pure: it reads a `ClusterView` and the settings snapshot and returns a `Decision`; it never
mutates the view (the caller records the dispatch, e.g. `PrefillNodeView.busy_until_s`).
The live conductor and the simulator call it the same way:

    decision = scheduler.decide(view, request, now_s)          # on arrival
    ... prefill runs on decision.prefill.node ...
    decision = scheduler.decide_after_prefill(view, request, now_s, decision)
    ... KV goes to decision.decode.node, unless decision.rejection (per_stage) ...

The policy and mode are looked up in the settings on every call, so a runtime change takes
effect on the next request.
"""
from __future__ import annotations

from dataclasses import replace

from conductor import admission
from conductor.cost_model import CostModel
from conductor.decision import Decision, RejectReason, Rejection, Stage
from conductor.modes import PolicyName
from conductor.policies import POLICIES, Policy
from conductor.request import RequestInfo
from conductor.settings import ConductorSettings
from conductor.view import ClusterView


class Scheduler:
    def __init__(self, settings: ConductorSettings, costs: CostModel, *, seed: int = 0) -> None:
        self.settings = settings
        self._costs = costs
        self._seed = seed
        self._policies: dict[PolicyName, Policy] = {}

    @property
    def costs(self) -> CostModel:
        return self._costs

    def set_costs(self, costs: CostModel) -> None:
        """Swap the cost model (e.g. a new profile); policies keep their own state."""
        self._costs = costs
        for policy in self._policies.values():
            policy.costs = costs

    def policy(self, name: PolicyName) -> Policy:
        policy = self._policies.get(name)
        if policy is None:
            policy = self._policies[name] = POLICIES[name](self._costs, self._seed)
        return policy

    def decide(self, view: ClusterView, request: RequestInfo, now_s: float) -> Decision:
        """Route and admit `request` on arrival."""
        s = self.settings.values
        policy = self.policy(s.policy)
        prefill = policy.choose_prefill(view, request, now_s)
        if prefill is None:
            return Decision(
                request.request_id, s.policy, s.admission, now_s, None, None,
                Rejection(RejectReason.NO_PREFILL_NODE, Stage.ARRIVAL, "no healthy prefill node", 5.0),
            )
        decode = None
        if not admission.picks_decode_after_prefill(s.admission):
            projected = admission.projects_decode_load(s.admission)
            at_s = now_s + prefill.ttft_s if projected else now_s
            decode = policy.choose_decode(view, request, at_s, s, projected)
            if decode is None:
                return Decision(
                    request.request_id, s.policy, s.admission, now_s, prefill, None,
                    Rejection(RejectReason.NO_DECODE_NODE, Stage.ARRIVAL, "no healthy decode node", 5.0),
                )
        rejection = admission.check_arrival(s, prefill, decode)
        return Decision(request.request_id, s.policy, s.admission, now_s, prefill, decode, rejection)

    def decide_after_prefill(
        self, view: ClusterView, request: RequestInfo, now_s: float, decision: Decision
    ) -> Decision:
        """Second stage: keep the decode node chosen on arrival, or (per_stage, or none
        chosen yet) pick one now and judge its current load."""
        if decision.decode is not None:
            return decision
        s = self.settings.values
        decode = self.policy(s.policy).choose_decode(view, request, now_s, s, False)
        if decode is None:
            rejection = Rejection(RejectReason.NO_DECODE_NODE, Stage.AFTER_PREFILL, "no healthy decode node", 5.0)
            return replace(decision, decided_at_s=now_s, rejection=rejection)
        return replace(decision, decided_at_s=now_s, decode=decode, rejection=admission.check_after_prefill(s, decode))
