"""The chart's alerts and dashboard against a real Prometheus (Debian's package) scraping
the real operator on the bed.

Each fault is real: a Lease another holder keeps, credentials the local Data Pipeline
service refuses, heartbeats it fails, throttling, a SetTaskStatus it fails, a TaskRunner
deleted under its task, and the operator stopped.  The rules are the chart's own, rendered
by helm with short `for` durations and low thresholds (the expressions are unchanged);
tests/chart/test_alert_rules.py checks the defaults with promtool.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed import binaries
from dptr_testbed.prometheus import PrometheusServer, prometheus_server, rule_groups, wait_firing
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptr"
DASHBOARD = CHART / "dashboards" / "dptr.json"
JOB = "dptr-e2e"
ECHO = {"type": "ShellCommandActivity", "command": "echo hi"}
#: What the bed makes happen quickly: every alert fires as soon as its expression holds.
FAST_RULES: dict[str, Any] = {
    "metrics": {
        "prometheusRule": {
            "enabled": True,
            "selector": f'job="{JOB}"',
            "for": {
                name: "0s"
                for name in (
                    "DptrOperatorDown",
                    "DptrNoLeader",
                    "DptrTwoLeaders",
                    "DptrLeaderFlapping",
                    "DptrPollErrors",
                    "DptrNotPolling",
                    "DptrTaskRunnerNotReady",
                    "DptrHeartbeatNearTimeout",
                    "DptrSetTaskStatusFailures",
                    "DptrThrottled",
                    "DptrStatusWritesBackingUp",
                    "DptrFallbackReportBurst",
                )
            },
            "thresholds": {
                "heartbeatAgeRatio": 0.5,
                "throttledPerSecond": 0,
                "fallbackReportsPer15m": 0,
                "leaderTransitionsPerHour": 0,
                "notPollingSeconds": 60,  # the least the schema takes
            },
        }
    }
}


def _chart_rules(tmp_path: Path) -> dict[str, Any]:
    values = tmp_path / "alert-values.yaml"
    values.write_text(yaml.safe_dump(FAST_RULES))
    helm = binaries.Binaries(binaries.bin_dir()).helm
    proc = subprocess.run(
        [str(helm), "template", "dptr", str(CHART), "--kube-version", "v1.34.4", "--values", str(values)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return rule_groups([d for d in yaml.safe_load_all(proc.stdout) if d])


def _http_port(operator: OperatorProcess) -> int:
    text: str = wait_for(
        lambda: "http port" in (t := operator.log_path.read_text(errors="replace")) and t,
        timeout=30,
        what="the operator's http port",
    )
    line = next(line for line in text.splitlines() if "http port" in line)
    return int(line.rsplit(" ", 1)[1])


def _quiet(prometheus: PrometheusServer, name: str) -> None:
    assert not prometheus.firing(name), f"{name} fires before its fault: {prometheus.firing(name)}"


def _second_runner(cluster: Cluster, datapipeline: LocalDataPipeline, name: str, worker_group: str) -> None:
    """A TaskRunner whose Secret holds keys the local service does not know."""
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{name}-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "wrong"},
        }
    )
    cluster.apply(
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": name},
            "spec": {
                "workerGroup": worker_group,
                "region": "us-east-1",
                "endpointUrl": datapipeline.endpoint_url,
                "credentials": {"mode": "Secret", "secretRef": {"name": f"{name}-credentials"}},
                "jobTemplate": {
                    "image": "debian:bookworm",
                    "nodeSelector": {"dptr.dev/test": "no-such-node"},
                },
            },
        }
    )


def _dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    assert len(queries) >= len(board["panels"])
    return queries


def _as_grafana_would(expr: str, namespace: str) -> str:
    # The dashboard's variables, as Grafana substitutes them: one namespace selected, all
    # TaskRunners (allValue ".*"), and $__rate_interval at least four scrape intervals.
    return (
        expr.replace("$job", JOB)
        .replace("$namespace", namespace)
        .replace("$taskrunner", ".*")
        .replace("$__rate_interval", "1m")
    )


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


def test_alerts_fire_on_real_faults_and_every_dashboard_panel_has_data(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Any,
    tmp_path: Path,
) -> None:
    ns = cluster.namespace
    # Another holder has the Lease for 15 s: the operator starts as a standby, then takes
    # it over when it expires (a real change of leader: leaseTransitions 0 -> 1).
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.apply(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "dptr-operator"},
            "spec": {
                "holderIdentity": "someone-else",
                "leaseDurationSeconds": 15,
                "leaseTransitions": 0,
                "acquireTime": now,
                "renewTime": now,
            },
        }
    )
    operator = operator_factory(*QUIET_GRACES).start()
    port = _http_port(operator)
    with prometheus_server(
        tmp_path / "prometheus", {JOB: [f"127.0.0.1:{port}"]}, rules=_chart_rules(tmp_path)
    ) as prom:
        wait_for(prom.targets_up, timeout=30, what="Prometheus scraping the operator")
        fired: dict[str, str] = {}

        # 1. No leader: the replica is up but stands by.
        wait_firing(prom, "DptrNoLeader")
        fired["DptrNoLeader"] = "a Lease held by another identity"
        _quiet(prom, "DptrOperatorDown")
        _quiet(prom, "DptrTwoLeaders")
        _quiet(prom, "DptrLeaderFlapping")
        wait_for(lambda: not prom.firing("DptrNoLeader"), timeout=60, interval=0.5, what="a leader again")
        wait_firing(prom, "DptrLeaderFlapping")
        lease = json.loads(cluster.testbed.kubectl("get", "lease", "dptr-operator", "-n", ns, "-o", "json"))
        assert lease["spec"]["leaseTransitions"] == 1 and lease["spec"]["holderIdentity"] == "op-test"
        fired["DptrLeaderFlapping"] = "the operator taking the expired Lease over (threshold 0 per hour)"

        # 2. A good TaskRunner with a task (its pod never runs here: the operator
        #    heartbeats it), and one whose credentials Data Pipeline refuses.
        cluster.create_runner(datapipeline, "wg-prom")
        pipeline = datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-prom")
        wait_for(cluster.jobs, timeout=30, what="the task's Job")
        _quiet(prom, "DptrPollErrors")
        _quiet(prom, "DptrHeartbeatNearTimeout")
        _second_runner(cluster, datapipeline, "refused", "wg-refused")
        poll_errors = wait_firing(prom, "DptrPollErrors")
        assert {a["labels"]["taskrunner"] for a in poll_errors} == {"refused"}
        assert poll_errors[0]["labels"]["taskrunner_namespace"] == ns
        fired["DptrPollErrors"] = "credentials the local service refuses (UnrecognizedClientException)"
        not_ready = wait_firing(prom, "DptrTaskRunnerNotReady")
        assert {a["labels"]["taskrunner"] for a in not_ready} == {"refused"}
        fired["DptrTaskRunnerNotReady"] = "the same TaskRunner, Degraded"

        # 3. Heartbeats stall: Data Pipeline fails every ReportTaskProgress.
        datapipeline.set_fault("ReportTaskProgress", error_rate=1.0)
        near = wait_firing(prom, "DptrHeartbeatNearTimeout")
        assert {a["labels"]["taskrunner"] for a in near} == {"runner"}
        fired["DptrHeartbeatNearTimeout"] = "every ReportTaskProgress failing (age ratio over 0.5)"
        datapipeline.set_fault("ReportTaskProgress")

        # 4. Throttling that the retries hide.
        _quiet(prom, "DptrThrottled")
        datapipeline.set_fault("PollForTask", throttle=True)
        throttled = wait_firing(prom, "DptrThrottled")
        assert throttled[0]["labels"]["operation"] == "PollForTask"
        fired["DptrThrottled"] = "PollForTask throttled (ThrottlingException)"
        datapipeline.set_fault("PollForTask")

        # 5. Polls that get no answer, and no error either: PollForTask answers after 80 s,
        #    within the client's 100 s read timeout and past notPollingSeconds (60). The
        #    metric is the newer of a TaskRunner's two pollers' answers; both start their
        #    slow poll within a long poll (0.9 s here) of the fault, so the alert has some
        #    20 s in which neither has been answered.
        _quiet(prom, "DptrNotPolling")
        datapipeline.set_fault("PollForTask", latency=80)
        stuck = wait_firing(prom, "DptrNotPolling", timeout=120)
        assert "runner" in {a["labels"]["taskrunner"] for a in stuck}, stuck
        fired["DptrNotPolling"] = "PollForTask answering after 80 s (no answered poll for 60 s, no error)"
        datapipeline.set_fault("PollForTask")
        wait_for(
            lambda: not prom.firing("DptrNotPolling"), timeout=90, interval=0.5, what="polls answered again"
        )

        # 6. The operator reports an outcome itself (the TaskRunner is deleted under its
        #    task) while SetTaskStatus fails, then succeeds.  Another TaskRunner keeps
        #    polling for the dashboard.
        cluster.create_runner(datapipeline, "wg-steady", name="steady")
        _quiet(prom, "DptrSetTaskStatusFailures")
        _quiet(prom, "DptrFallbackReportBurst")
        datapipeline.set_fault("SetTaskStatus", error_rate=1.0)
        cluster.testbed.kubectl("delete", "taskrunner", "runner", "-n", ns, "--wait=false")
        failures = wait_firing(prom, "DptrSetTaskStatusFailures")
        assert failures[0]["labels"]["reason"] == "TransientError"
        fired["DptrSetTaskStatusFailures"] = "SetTaskStatus failing (InternalServiceError)"
        datapipeline.set_fault("SetTaskStatus")
        burst = wait_firing(prom, "DptrFallbackReportBurst")
        assert burst[0]["labels"]["taskrunner"] == "runner"
        fired["DptrFallbackReportBurst"] = "the operator's dptr.TaskRunnerDeleted report (threshold 0)"
        record = next(r for r in datapipeline.ledger.attempts.values() if r.pipeline_id == pipeline)
        assert (record.outcome, record.error_id) == ("FAILED", "dptr.TaskRunnerDeleted")

        # 7. Every panel of the dashboard has data from what just happened.
        time.sleep(2)  # one more scrape after the last outcome
        empty = []
        for title, expr in _dashboard_queries():
            if not _has_data(prom.query(_as_grafana_would(expr, ns))):
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n  " + "\n  ".join(empty)

        # 8. The operator goes away.
        _quiet(prom, "DptrOperatorDown")
        operator.stop()
        wait_firing(prom, "DptrOperatorDown")
        fired["DptrOperatorDown"] = "the operator stopped (its scrape fails)"
        print("alerts fired:\n" + "\n".join(f"  {name}: {why}" for name, why in fired.items()))
    datapipeline.clear_faults()
