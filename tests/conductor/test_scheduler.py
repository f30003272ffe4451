"""Admission modes and the scheduler on hand-built views (costs in sched_fixtures)."""
from __future__ import annotations

import pytest
from sched_fixtures import costs, request, view

from conductor.decision import LoadBasis, RejectReason, Stage
from conductor.modes import AdmissionMode, PolicyName
from conductor.request import NodeId
from conductor.scheduler import Scheduler
from conductor.settings import ConductorSettings, SettingsValues
from conductor.view import DecodeNodeView, DecodeResident

NOW = 100.0


def scheduler(admission: AdmissionMode, policy: PolicyName = PolicyName.KV_CENTRIC, **values) -> Scheduler:
    values.setdefault("ttft_slo_s", 2.0)
    values.setdefault("tbt_slo_s", 0.05)
    values.setdefault("typical_output_tokens", 100)
    return Scheduler(ConductorSettings(SettingsValues(admission=admission, policy=policy, **values)), costs())


def decode_node(name: str, running: int, tokens: int) -> DecodeNodeView:
    return DecodeNodeView(NodeId(name), 1_000_000, running=running, tokens_in_flight=tokens,
                          reserved_tokens=tokens + 100 * running)


def overloaded_decode_cluster(prefill_busy_s: float = 0.0):
    """One idle prefill node; one decode node whose 40 running requests (started long ago)
    make a step 10 + 41 + 41 ms = 92 ms now, over the 50 ms TBT SLO."""
    d0 = decode_node("d0", 40, 40_000)
    for i in range(40):
        d0.residents[f"x{i}"] = DecodeResident(f"x{i}", 1000, ready_at_s=NOW - 30.0, running=True)
    return view({"p0": NOW + prefill_busy_s}, decode=[d0])


def test_none_admits_everything():
    d = scheduler(AdmissionMode.NONE).decide(overloaded_decode_cluster(prefill_busy_s=60.0), request(), NOW)
    assert d.admitted and d.rejection is None
    assert (d.prefill.node, d.decode.node, d.decode.basis) == ("p0", "d0", LoadBasis.COMMITTED)


@pytest.mark.parametrize("mode", [AdmissionMode.PER_STAGE, AdmissionMode.EARLY, AdmissionMode.PREDICTIVE])
def test_prefill_overload_rejects_on_arrival_in_every_mode(mode):
    # queue 1.5 s + prefill 1.0 s + send 0.1 s = 2.6 s > TTFT SLO 2 s
    d = scheduler(mode).decide(view({"p0": NOW + 1.5}), request(), NOW)
    assert not d.admitted
    r = d.rejection
    assert (r.reason, r.stage) == (RejectReason.PREFILL_OVERLOADED, Stage.ARRIVAL)
    assert "predicted TTFT 2.6 s on p0" in r.detail and "TTFT SLO 2 s" in r.detail
    assert r.retry_after_s == pytest.approx(1.0)  # max(1 s, 0.6 s over)


def test_prefill_threshold_scales_the_slo():
    d = scheduler(AdmissionMode.EARLY, prefill_reject_threshold=1.5).decide(view({"p0": NOW + 1.5}), request(), NOW)
    assert d.admitted  # 2.6 s <= 1.5 × 2 s


def test_early_rejects_on_the_current_decode_load():
    d = scheduler(AdmissionMode.EARLY).decide(overloaded_decode_cluster(), request(), NOW)
    r = d.rejection
    assert (r.reason, r.stage) == (RejectReason.DECODE_OVERLOADED, Stage.ARRIVAL)
    assert d.decode.predicted_tbt_s == pytest.approx(0.092)
    assert "decode load 1.84 on d0" in r.detail


def test_predictive_admits_when_the_decode_load_will_have_drained_by_the_end_of_prefill():
    # The 40 residents started 30 s ago; at 92 ms a step, 100 typical tokens take 9.2 s:
    # by the time this prefill ends (t = 101.1) they are projected gone.
    d = scheduler(AdmissionMode.PREDICTIVE).decide(overloaded_decode_cluster(), request(), NOW)
    assert d.admitted
    assert d.decode.projected and d.decode.at_s == pytest.approx(NOW + 1.1)
    assert d.decode.predicted_tbt_s == pytest.approx(0.010 + 0.001 + 1e-6 * (1000 + 50))  # its own growth too


def test_predictive_rejects_when_requests_already_in_prefill_will_be_decoding_then():
    d0 = decode_node("d0", 0, 0)
    for i in range(40):  # admitted earlier, their KV lands just before ours
        d0.residents[f"y{i}"] = DecodeResident(f"y{i}", 1000, ready_at_s=NOW + 1.0)
    d0.incoming, d0.incoming_tokens = 40, 40_000
    v = view({"p0": NOW}, decode=[d0])
    d = scheduler(AdmissionMode.PREDICTIVE).decide(v, request(), NOW)
    assert (d.rejection.reason, d.rejection.stage) == (RejectReason.DECODE_OVERLOADED_PROJECTED, Stage.ARRIVAL)
    assert "at t=101.100 s" in d.rejection.detail
    early = scheduler(AdmissionMode.EARLY).decide(v, request(), NOW)  # committed: the 40 count too
    assert (early.rejection.reason, early.rejection.stage) == (RejectReason.DECODE_OVERLOADED, Stage.ARRIVAL)
    d0.incoming, d0.incoming_tokens = 0, 0  # (as if they had left)
    d0.residents.clear()
    d0.unsized_residents = 0
    assert scheduler(AdmissionMode.EARLY).decide(v, request(), NOW).admitted


def test_per_stage_admits_then_the_paired_decode_node_judges_its_own_load_after_prefill():
    sched = scheduler(AdmissionMode.PER_STAGE)
    v = view({"p0": NOW}, decode=[decode_node("d0", 0, 0)])
    d = sched.decide(v, request(), NOW)
    assert d.admitted and d.decode.node == "d0" and d.decode.basis is LoadBasis.CURRENT
    # While the prefill ran, d0 filled up.
    v.decode[0].running, v.decode[0].tokens_in_flight = 40, 40_000
    later = sched.decide_after_prefill(v, request(), NOW + 1.0, d)
    r = later.rejection
    assert (r.reason, r.stage) == (RejectReason.DECODE_OVERLOADED, Stage.AFTER_PREFILL)
    assert later.decided_at_s == NOW + 1.0 and later.prefill == d.prefill


def test_per_stage_keeps_the_pair_when_the_decode_node_has_room():
    sched = scheduler(AdmissionMode.PER_STAGE)
    v = view({"p0": NOW}, decode=[decode_node("d0", 3, 3000)])
    d = sched.decide(v, request(), NOW)
    later = sched.decide_after_prefill(v, request(), NOW + 1.0, d)
    assert later.admitted and later.decode.node == "d0"
    assert later.decode.predicted_tbt_s == pytest.approx(0.010 + 0.004 + 0.004)


@pytest.mark.parametrize("mode", [AdmissionMode.NONE, AdmissionMode.EARLY, AdmissionMode.PREDICTIVE])
def test_other_modes_never_reject_after_prefill(mode):
    sched = scheduler(mode)
    v = view({"p0": NOW}, decode=[decode_node("d0", 0, 0)])
    d = sched.decide(v, request(), NOW)
    v.decode[0].running, v.decode[0].tokens_in_flight = 40, 40_000
    assert sched.decide_after_prefill(v, request(), NOW + 1.0, d) is d


def test_a_paired_decode_node_that_went_down_is_replaced_after_prefill():
    sched = scheduler(AdmissionMode.EARLY)
    v = view({"p0": NOW}, decode=[decode_node("d0", 0, 0), decode_node("d1", 5, 5000)])
    d = sched.decide(v, request(), NOW)
    assert d.decode.node == "d0"
    v.decode[0].healthy = False
    later = sched.decide_after_prefill(v, request(), NOW + 1.0, d)
    assert later.admitted and later.decode.node == "d1"


def test_no_healthy_nodes_reject_with_a_reason():
    v = view({"p0": NOW})
    v.prefill[0].healthy = False
    d = scheduler(AdmissionMode.NONE).decide(v, request(), NOW)
    assert d.rejection.reason is RejectReason.NO_PREFILL_NODE and d.prefill is None
    v = view({"p0": NOW}, decode=[])
    d = scheduler(AdmissionMode.NONE).decide(v, request(), NOW)
    assert d.rejection.reason is RejectReason.NO_DECODE_NODE and d.prefill.node == "p0"


def test_runtime_changes_apply_to_the_next_decision():
    sched = scheduler(AdmissionMode.EARLY, PolicyName.CACHE_AWARE_LOCAL)
    v = view({"p0": NOW + 0.5, "p1": NOW - 3.0}, cached={"p0": 8})
    assert sched.decide(v, request(), NOW).prefill.node == "p0"
    sched.settings.set("policy", "kv_centric")
    d = sched.decide(v, request(), NOW)
    assert (d.policy, d.prefill.node, d.prefill.pull_from) == (PolicyName.KV_CENTRIC, "p1", "p0")
    # Tighten the TTFT SLO below the 0.38 s prediction: the same request, queued, is now refused
    sched.settings.set("ttft_slo_s", "0.3")
    v.prefill[1].busy_until_s = NOW + 0.5
    assert sched.decide(v, request(), NOW).rejection.reason is RejectReason.PREFILL_OVERLOADED
    sched.settings.set("admission", "none")
    assert sched.decide(v, request(), NOW).admitted


def test_decisions_do_not_touch_the_view():
    v = overloaded_decode_cluster()
    before = (v.prefill[0].busy_until_s, v.decode[0].running, len(v.decode[0].residents))
    for mode in AdmissionMode:
        scheduler(mode).decide(v, request(), NOW)
    assert (v.prefill[0].busy_until_s, v.decode[0].running, len(v.decode[0].residents)) == before


def test_the_cluster_config_starts_with_the_conductors_own_defaults():
    """Before: the TBT SLO default was 0.1 s here and 1.0 s in the cluster config."""
    from cluster.config import ClusterConfig

    assert ClusterConfig().conductor.settings() == SettingsValues()
    assert SettingsValues().tbt_slo_s == 1.0


def test_a_request_too_big_for_the_ttft_slo_is_not_rejected_unless_its_node_is_backlogged():
    """Before: a 3,000-token prompt (3 s of prefill, TTFT SLO 2 s) was rejected as
    `prefill_overloaded` on an idle cluster; rejecting it loses the prefix it would cache."""
    big = request(blocks=30)
    d = scheduler(AdmissionMode.EARLY).decide(view({"p0": NOW - 1.0}), big, NOW)
    assert d.admitted and d.prefill.ttft_s == pytest.approx(3.3)
    d = scheduler(AdmissionMode.EARLY).decide(view({"p0": NOW + 0.9}), big, NOW)
    assert d.admitted  # 0.9 s of queue: not more than half the limit
    d = scheduler(AdmissionMode.EARLY).decide(view({"p0": NOW + 1.1}), big, NOW)
    assert d.rejection.reason is RejectReason.PREFILL_OVERLOADED and "queue 1.1 s" in d.rejection.detail


def test_calibration_learns_measured_over_predicted_and_applies_it_only_when_sure():
    from conductor.predictions import Calibration, Quantity

    cal = Calibration(alpha=0.1, min_samples=5, low=0.5, high=2.0)
    for _ in range(4):
        cal.observe(Quantity.TTFT, 2.0, 1.0)
    assert cal.factor(Quantity.TTFT) == 1.0  # too few samples yet
    cal.observe(Quantity.TTFT, 2.0, 1.0)
    assert cal.factor(Quantity.TTFT) == pytest.approx(0.5)
    cal.observe(Quantity.TTFT, 0.0, 1.0)  # nothing to learn from
    cal.observe(Quantity.TTFT, 1.0, float("nan"))
    assert cal.samples(Quantity.TTFT) == 5
    for _ in range(200):
        cal.observe(Quantity.TTFT, 1.0, 10.0)  # ten times slower than predicted: bounded
    assert cal.factor(Quantity.TTFT) == 2.0 and cal.factor(Quantity.TBT) == 1.0
    with pytest.raises(ValueError):
        Calibration(alpha=0.0)


def test_admission_judges_calibrated_predictions():
    """A cluster that runs twice as fast as its cost model: the predicted 2.6 s TTFT (SLO
    2 s, 1.5 s of it queue) is 1.3 s once calibrated, and the request is admitted."""
    from conductor.predictions import Quantity

    sched = scheduler(AdmissionMode.EARLY)
    v = view({"p0": NOW + 1.5})
    assert sched.decide(v, request(), NOW).rejection.reason is RejectReason.PREFILL_OVERLOADED
    for _ in range(30):
        sched.calibration.observe(Quantity.TTFT, 2.0, 1.0)
    assert sched.decide(v, request(), NOW).admitted
    for _ in range(300):
        sched.calibration.observe(Quantity.TTFT, 1.0, 1.25)  # now slower than predicted
    d = sched.decide(view({"p0": NOW + 1.2}), request(), NOW)  # 2.3 s predicted, 2.9 s calibrated
    assert d.rejection.reason is RejectReason.PREFILL_OVERLOADED and "calibrated x1.25" in d.rejection.detail
