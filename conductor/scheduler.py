"""The scheduling core: the current policy and admission mode applied to one request.

Pure: it reads a `ClusterView` and the settings snapshot and returns a `Decision`; it never
mutates the view (the caller records the dispatch, e.g. `PrefillNodeView.busy_until_s`).
The live conductor and the simulator call it the same way:

    decision = scheduler.decide(view, request, now_s)          # on arrival
    ... unless decision.rejection: prefill on decision.prefill.node, paired with
        decision.decode.node (record both in the view) ...
    decision = scheduler.decide_after_prefill(view, request, now_s, decision)
    ... unless decision.rejection (per_stage only): KV goes to decision.decode.node ...

The policy and mode are looked up in the settings on every call, so a runtime change takes
effect on the next request. `calibration` learns measured/predicted TTFT and decode steps
from what the adapter observes (`calibration.observe`, `observe_decode_steps`); admission
judges calibrated predictions.
"""
from __future__ import annotations

from dataclasses import replace

from conductor import admission
from conductor.cost_model import CostModel
from conductor.decision import Decision, LoadBasis, RejectReason, Rejection, Stage
from conductor.modes import PolicyName
from conductor.policies import POLICIES, Policy, decode_estimate
from conductor.predictions import Calibration, DecodeSteps, Quantity
from conductor.request import RequestInfo
from conductor.settings import ConductorSettings
from conductor.view import ClusterView


class Scheduler:
    def __init__(self, settings: ConductorSettings, costs: CostModel, *, seed: int = 0) -> None:
        self.settings = settings
        self._costs = costs
        self._seed = seed
        self._policies: dict[PolicyName, Policy] = {}
        # measured / predicted TTFT and TBT, fed by the adapter (what the cluster observed);
        # admission multiplies its predictions by these before judging them
        self.calibration = Calibration()

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

    def observe_decode_steps(self, window: DecodeSteps) -> None:
        """Decode steps a node ran (a heartbeat's window): their measured mean against the
        cost model's step on the same batch rows and context tokens, into the TBT calibration."""
        n = window.steps  # (the model is linear: its step at the mean batch and context is the mean step)
        predicted = self._costs.decode_step_s(window.rows / n, window.tokens / n)
        self.calibration.observe(Quantity.TBT, predicted, window.seconds / n)

    def decide(self, view: ClusterView, request: RequestInfo, now_s: float) -> Decision:
        """Route and admit `request` on arrival: a (prefill, decode) pair, or a rejection."""
        s = self.settings.values
        policy = self.policy(s.policy)
        policy.settings = s
        prefill = policy.choose_prefill(view, request, now_s)
        if prefill is None:
            return Decision(
                request.request_id, s.policy, s.admission, now_s, None, None,
                Rejection(RejectReason.NO_PREFILL_NODE, Stage.ARRIVAL, "no healthy prefill node", 5.0),
            )
        basis = admission.decode_basis(s.admission)
        at_s = now_s + prefill.ttft_s if basis is LoadBasis.PROJECTED else now_s
        decode = policy.choose_decode(view, request, at_s, s, basis)
        if decode is None:
            return Decision(
                request.request_id, s.policy, s.admission, now_s, prefill, None,
                Rejection(RejectReason.NO_DECODE_NODE, Stage.ARRIVAL, "no healthy decode node", 5.0),
            )
        cal = self.calibration
        rejection = admission.check_arrival(s, prefill, decode, ttft_factor=cal.factor(Quantity.TTFT),
                                            tbt_factor=cal.factor(Quantity.TBT))
        return Decision(request.request_id, s.policy, s.admission, now_s, prefill, decode, rejection)

    def decide_after_prefill(
        self, view: ClusterView, request: RequestInfo, now_s: float, decision: Decision
    ) -> Decision:
        """Second stage, when the prefill is done. Under `per_stage` the paired decode node
        judges its own current load (the request is dropped if it is overloaded); in the
        other modes the arrival decision stands. A paired node that is gone or unhealthy is
        replaced by the least loaded healthy one (or the request fails: no decode node)."""
        s = self.settings.values
        assert decision.decode is not None, "decide_after_prefill needs an admitted decision"
        node = next((d for d in view.decode if d.node_id == decision.decode.node), None)
        per_stage = admission.judges_after_prefill(s.admission)
        if node is not None and node.healthy and not per_stage:
            return decision
        if node is None or not node.healthy:
            decode = self.policy(s.policy).choose_decode(view, request, now_s, s, LoadBasis.CURRENT)
            if decode is None:
                rejection = Rejection(RejectReason.NO_DECODE_NODE, Stage.AFTER_PREFILL, "no healthy decode node", 5.0)
                return replace(decision, decided_at_s=now_s, rejection=rejection)
        else:
            decode = decode_estimate(node, request, now_s, LoadBasis.CURRENT, s, self._costs)
        late = admission.check_after_prefill(s, decode, tbt_factor=self.calibration.factor(Quantity.TBT))
        return replace(decision, decided_at_s=now_s, decode=decode, rejection=late)
