"""Runtime settings: validation refuses bad values with a reason and changes nothing."""
from __future__ import annotations

import logging
import math

import pytest

from conductor.errors import InvalidSetting
from conductor.modes import AdmissionMode, PolicyName
from conductor.settings import ConductorSettings, SettingsValues


def make() -> ConductorSettings:
    ticks = iter(range(1000, 2000))
    return ConductorSettings(clock=lambda: float(next(ticks)))


def test_defaults():
    v = SettingsValues()
    assert (v.ttft_slo_s, v.tbt_slo_s, v.prefill_reject_threshold, v.decode_reject_threshold) == (30.0, 1.0, 1.0, 1.0)
    assert (v.admission, v.policy, v.typical_output_tokens) == (AdmissionMode.EARLY, PolicyName.COST_AWARE, 256)


def test_text_values_are_parsed_to_their_types():
    s = make()
    change = s.set("ttft_slo_s", "5", actor="sre@example")
    assert s.values.ttft_slo_s == 5.0 and isinstance(s.values.ttft_slo_s, float)
    assert (change.name, change.old, change.new, change.actor, change.at_s) == ("ttft_slo_s", "30", "5", "sre@example", 1000.0)
    s.set("admission", "predictive")
    s.set("policy", "cache_aware")  # the cluster config's alias
    s.set("typical_output_tokens", "512")
    assert s.values.admission is AdmissionMode.PREDICTIVE
    assert s.values.policy is PolicyName.CACHE_AWARE_LOCAL
    assert s.values.typical_output_tokens == 512


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("ttft_slo_s", "-1", "must be a finite number > 0"),
        ("ttft_slo_s", 0, "must be a finite number > 0"),
        ("tbt_slo_s", "nan", "must be a finite number > 0"),
        ("tbt_slo_s", math.inf, "must be a finite number > 0"),
        ("tbt_slo_s", "fast", "must be a number"),
        ("tbt_slo_s", True, "not a boolean"),
        ("ttft_slo_s", 7200, "at most 3600"),
        ("decode_reject_threshold", "0", "must be a finite number > 0"),
        ("admission", "sometimes", "unknown admission mode 'sometimes'"),
        ("policy", "fastest", "unknown policy 'fastest'"),
        ("policy", 3, "must be a name"),
        ("typical_output_tokens", "2.5", "whole number"),
        ("typical_output_tokens", 0, "between 1 and"),
        ("max_batch", 8, "no such setting"),
    ],
)
def test_bad_values_are_refused_with_a_reason_and_change_nothing(name, value, reason):
    s = make()
    before = s.values
    with pytest.raises(InvalidSetting) as err:
        s.set(name, value)
    assert err.value.name == name and reason in err.value.reason
    assert s.values is before and s.changes == ()


def test_an_update_applies_all_or_nothing():
    s = make()
    with pytest.raises(InvalidSetting) as err:
        s.update({"ttft_slo_s": 10, "tbt_slo_s": -0.2, "policy": "random"})
    assert err.value.name == "tbt_slo_s"
    assert s.values == SettingsValues() and s.changes == ()
    done = s.update({"ttft_slo_s": 10, "policy": "random"}, actor="cli")
    assert [(c.name, c.old, c.new) for c in done] == [("ttft_slo_s", "30", "10"), ("policy", "cost_aware", "random")]
    assert s.changes == tuple(done)


def test_setting_the_value_in_force_is_not_a_change():
    s = make()
    assert s.set("policy", "cost_aware") is None
    assert s.changes == ()


def test_changes_are_logged_and_announced(caplog):
    s = make()
    seen = []
    s.add_listener(seen.append)
    with caplog.at_level(logging.INFO, logger="halfmoon.conductor.settings"):
        change = s.set("tbt_slo_s", 0.2, actor="sre")
    assert seen == [change]
    assert "setting tbt_slo_s changed 1 -> 0.2 by sre" in caplog.text


def test_describe_lists_every_setting_with_its_value():
    s = make()
    s.set("admission", "per_stage")
    rows = {i.name: i.value for i in s.describe()}
    assert rows == {
        "ttft_slo_s": "30", "tbt_slo_s": "1", "prefill_reject_threshold": "1", "decode_reject_threshold": "1",
        "admission": "per_stage", "policy": "cost_aware", "typical_output_tokens": "256",
    }
    assert s.get("admission") is AdmissionMode.PER_STAGE
    with pytest.raises(InvalidSetting):
        s.get("nope")


def test_a_snapshot_does_not_change_under_the_reader():
    s = make()
    snap = s.values
    s.set("ttft_slo_s", 1)
    assert snap.ttft_slo_s == 30.0 and s.values.ttft_slo_s == 1.0


def test_constructing_values_validates_them_too():
    with pytest.raises(InvalidSetting):
        SettingsValues(ttft_slo_s=-3)
    assert SettingsValues(admission="stage").admission is AdmissionMode.PER_STAGE
