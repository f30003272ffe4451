"""deploy/prometheus/alerts.yml: valid for Prometheus (`promtool check`), behaving as its unit
tests say (`promtool test rules deploy/prometheus/alerts_test.yml`), loaded by the scrape
config, querying only metrics halfmoon exports, and every alert tested firing.

promtool comes with Debian's `prometheus` package (`make test` installs it where apt-get is
available); without it the promtool tests skip, saying so."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conductor.metrics import ALL_METRICS, Kind

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package (apt-get install prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


def alerts() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_rules_pass_promtool_check():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_rules_behave_as_their_unit_tests_say():
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_scrape_config_is_valid_and_loads_the_rules():
    out = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"Checking \S*prometheus/alerts\.yml\n\s+SUCCESS", out.stdout), out.stdout


def test_scrape_config_names_the_rules_file():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert [(DEPLOY / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]
    assert yaml.safe_load(RULE_TESTS.read_text())["rule_files"] == [RULES.name]


def exposed_series() -> set[str]:
    names = set()
    for spec in ALL_METRICS:
        names.add(spec.name)
        if spec.kind is Kind.HISTOGRAM:
            names |= {spec.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_rules_query_only_metrics_halfmoon_exports():
    used = {name for rule in alerts() for name in re.findall(r"halfmoon:[A-Za-z0-9_:]+", rule["expr"])}
    assert {"halfmoon:node_up", "halfmoon:kv_blocks_reclaimed_total", "halfmoon:requests_rejected_total",
            "halfmoon:requests_failed_total", "halfmoon:requests_retried_total",
            "halfmoon:requests_migrated_total", "halfmoon:prediction_error_seconds_bucket"} <= used
    assert used <= exposed_series(), f"undefined metrics in alerts.yml: {sorted(used - exposed_series())}"


def test_every_alert_is_labelled_explained_and_tested_firing():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert set(names) <= fired, f"alerts no unit test sees firing: {sorted(set(names) - fired)}"
