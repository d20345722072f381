"""The chart's PrometheusRule, checked by promtool (Debian's prometheus package): the rules
parse, and tests/chart/alerts/dptr-alerts.test.yaml fires and silences each alert as its
condition holds or not.  tests/operator/test_operator_prometheus.py fires them for real."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from dptr_testbed.prometheus import promtool, rule_groups

from .conftest import Helm

ALERT_TESTS = Path(__file__).parent / "alerts" / "dptr-alerts.test.yaml"
ENABLED = ["metrics.prometheusRule.enabled=true", "metrics.serviceMonitor.enabled=true"]


def _rules(helm: Helm, *sets: str, values: Any = None) -> dict[str, Any]:
    return rule_groups(helm.render(sets=[*ENABLED, *sets], values=values))


def _promtool_test(tmp_path: Path, rules: dict[str, Any]) -> tuple[int, str]:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    check = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


def test_no_prometheus_rule_unless_asked(helm: Helm) -> None:
    assert not [d for d in helm.render() if d["kind"] == "PrometheusRule"]


def test_every_alert_fires_and_stays_quiet_as_promtool_tests_say(helm: Helm, tmp_path: Path) -> None:
    rules = _rules(helm)
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert names == tested, f"alerts without a promtool test: {names - tested}"
    rc, output = _promtool_test(tmp_path, rules)
    assert rc == 0, output


def test_the_promtool_tests_see_the_rendered_values(helm: Helm, tmp_path: Path) -> None:
    # Proof that the tests exercise what the chart renders: a higher threshold keeps the
    # heartbeat alert quiet where the tests expect it to fire.
    # (--set would make the float a string, which the schema refuses.)
    higher = {"metrics": {"prometheusRule": {"thresholds": {"heartbeatAgeRatio": 0.999}}}}
    rc, output = _promtool_test(tmp_path, _rules(helm, values=higher))
    assert rc != 0
    assert "DptrHeartbeatNearTimeout" in output


def test_selector_labels_disabled_alerts_and_runbooks(helm: Helm) -> None:
    rules = _rules(
        helm,
        'metrics.prometheusRule.selector=namespace="dptr-system"',
        "metrics.prometheusRule.disabled={DptrLeaderFlapping}",
        "metrics.prometheusRule.additionalLabels.team=data",
        "metrics.prometheusRule.runbookUrl=https://runbooks.example/dptr/",
        "metrics.prometheusRule.for.DptrPollErrors=2m",
    )
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert "DptrLeaderFlapping" not in by_name
    poll = by_name["DptrPollErrors"]
    assert poll["for"] == "2m"
    assert 'namespace="dptr-system"' in poll["expr"] and "job=" not in poll["expr"]
    assert poll["labels"] == {"severity": "warning", "team": "data"}
    assert poll["annotations"]["runbook_url"] == "https://runbooks.example/dptr/DptrPollErrors"


def test_the_default_selector_follows_the_release_name(helm: Helm) -> None:
    rules = rule_groups(helm.render(release="etl-prod", sets=ENABLED))
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert all('job="etl-prod-dptr-metrics",namespace="dptr-system"' in e for e in exprs), exprs
    elsewhere = rule_groups(helm.render(release="etl-prod", namespace="team-x", sets=ENABLED))
    exprs = [r["expr"] for g in elsewhere["groups"] for r in g["rules"]]
    assert all('job="etl-prod-dptr-metrics",namespace="team-x"' in e for e in exprs), exprs


@pytest.mark.parametrize(
    ("sets", "path"),
    [
        (["metrics.prometheusRule.disabled={DptrNoSuchAlert}"], "/metrics/prometheusRule/disabled/0"),
        (["metrics.prometheusRule.for.DptrPollErrors=soon"], "/metrics/prometheusRule/for/DptrPollErrors"),
        (["metrics.prometheusRule.for.DptrTypo=1m"], "/metrics/prometheusRule/for"),
        (["metrics.prometheusRule.thresholds.heartbeatAgeRatio=2"], "/metrics/prometheusRule/thresholds"),
        (["metrics.prometheusRule.selector=job"], "/metrics/prometheusRule/selector"),
    ],
)
def test_bad_alert_values_are_refused(helm: Helm, sets: list[str], path: str) -> None:
    proc = helm.template(sets=[*ENABLED, *sets])
    assert proc.returncode != 0
    assert path in proc.stderr, proc.stderr
