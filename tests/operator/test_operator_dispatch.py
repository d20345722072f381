"""Polling -> PipelineTask -> ack -> Job, and the operator's heartbeats while the pod waits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_common.version import VERSION
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def test_task_becomes_pipelinetask_acked_job_and_is_heartbeated_then_canceled(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-dispatch")
    pipeline = datapipeline.run_pipeline(
        {"Echo": {"type": "ShellCommandActivity", "command": "echo hi"}}, worker_group="wg-dispatch"
    )

    task = wait_for(cluster.tasks, timeout=20, what="a PipelineTask")[0]
    assert task["spec"]["pipelineId"] == pipeline
    assert task["metadata"]["ownerReferences"][0]["kind"] == "TaskRunner"
    job = wait_for(cluster.jobs, timeout=20, what="a Job")[0]
    assert job["metadata"]["name"] == task["metadata"]["name"]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "PipelineTask"
    assert job["spec"]["backoffLimit"] == 0
    sidecar = job["spec"]["template"]["spec"]["initContainers"][0]
    assert {"name": "DPTR_TIME_SCALE", "value": "0.01"} in sidecar["env"]

    attempt = next(iter(datapipeline.ledger.attempts.values()))
    wait_for(lambda: attempt.acked_at is not None, timeout=20, what="the ack")
    assert attempt.acked_at - attempt.polled_at < 1.2  # the scaled 2-minute window
    # The pod cannot run (no node): the operator keeps the task alive well past its
    # (scaled, 9 s) reportProgressTimeout.
    wait_for(lambda: attempt.progress_calls >= 5, timeout=30, what="operator heartbeats")
    status = wait_for(
        lambda: cluster.tasks()[0].get("status", {}).get("acknowledgedAt") and cluster.tasks()[0]["status"],
        timeout=20,
        what="acknowledgedAt on the PipelineTask",
    )
    assert status["heartbeat"]["owner"] == "operator"
    assert status["jobName"] == job["metadata"]["name"]
    runner = cluster.runner()
    wait_for(lambda: cluster.runner().get("status", {}).get("active") == 1, timeout=20, what="active=1")
    assert cluster.runner()["status"]["taskrunnerId"]
    assert runner["status"]["heartbeatIntervalSeconds"] == 60

    # Cancel it at Data Pipeline: the Job goes, the task is Canceled, no SetTaskStatus.
    datapipeline.client().deactivate_pipeline(pipelineId=pipeline, cancelActive=True)
    wait_for(lambda: cluster.tasks()[0]["status"]["phase"] == "Canceled", timeout=30, what="Canceled")
    wait_for(lambda: not cluster.jobs(), timeout=20, what="the Job deleted")
    assert not datapipeline.ledger.calls_to("SetTaskStatus")
    datapipeline.assert_clean()


def test_metrics_follow_the_dispatch(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-metrics")
    pipeline = datapipeline.run_pipeline(
        {"Echo": {"type": "ShellCommandActivity", "command": "true"}}, worker_group="wg-metrics"
    )
    wait_for(cluster.jobs, timeout=20, what="a Job")
    # prometheus_client writes labels in name order.
    runner = f'taskrunner="runner",taskrunner_namespace="{cluster.namespace}"'
    # The Job exists a moment before its dispatch is timed: wait for both counts.
    samples = wait_for(
        lambda: (
            (m := operator.metrics()).get(f"dptr_tasks_polled_total{{{runner}}}") == 1
            and m.get("dptr_dispatch_duration_seconds_count") == 1
            and m
        ),
        timeout=20,
        what="the polled task counted and its dispatch timed",
    )
    assert samples["dptr_leader"] == 1
    assert samples["dptr_lease_transitions"] == 0  # a new Lease: no holder before this one
    assert samples['dptr_api_call_duration_seconds_count{operation="CreateJob"}'] >= 1
    assert samples["dptr_status_writes_pending"] >= 0
    version = next(k for k in samples if k.startswith("dptr_build_info{"))
    assert f'version="{VERSION}"' in version and samples[version] == 1
    # The TaskRunner's state is read at each scrape.
    assert samples[f"dptr_taskrunner_ready{{{runner}}}"] == 1
    assert samples[f"dptr_taskrunner_paused{{{runner}}}"] == 0
    assert samples[f"dptr_taskrunner_capacity{{{runner}}}"] == 10  # the CRD default
    assert samples[f"dptr_tasks_active{{{runner}}}"] == 1
    assert samples[f'dptr_tasks{{phase="Failed",{runner}}}'] == 0
    assert abs(samples[f"dptr_last_successful_poll_timestamp_seconds{{{runner}}}"] - time.time()) < 60
    assert 0 <= samples[f"dptr_heartbeat_age_ratio{{{runner}}}"] < 1
    wait_for(
        lambda: operator.metrics().get('dptr_operator_heartbeats_total{result="ok"}', 0) >= 1,
        timeout=20,
        what="an operator heartbeat counted",
    )
    # The Job's pod never runs here (no kubelet): the cancel ends it, counted as canceled.
    datapipeline.client().deactivate_pipeline(pipelineId=pipeline, cancelActive=True)
    done = wait_for(
        lambda: (
            (m := operator.metrics()).get(f'dptr_task_outcomes_total{{status="canceled",{runner}}}') == 1
            and m
        ),
        timeout=30,
        what="the canceled attempt counted",
    )
    assert done[f"dptr_tasks_active{{{runner}}}"] == 0
    assert done[f'dptr_tasks{{phase="Canceled",{runner}}}'] == 1
    # Each status starts at 0 with the TaskRunner, so a first outcome is an increase.
    assert done[f'dptr_task_outcomes_total{{status="FAILED",{runner}}}'] == 0


def test_json_logs_name_the_taskrunner_and_the_attempt(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator = operator_factory(*QUIET_GRACES, "--log-format", "json").start()
    cluster.create_runner(datapipeline, "wg-json-logs")
    pipeline = datapipeline.run_pipeline(
        {"Echo": {"type": "ShellCommandActivity", "command": "true"}}, worker_group="wg-json-logs"
    )
    job = wait_for(cluster.jobs, timeout=20, what="a Job")[0]
    attempt = next(iter(datapipeline.ledger.attempts.values())).attempt_id
    sidecar = job["spec"]["template"]["spec"]["initContainers"][0]
    assert {"name": "DPTR_LOG_FORMAT", "value": "json"} in sidecar["env"]  # the pods follow

    def lines() -> list[dict[str, Any]]:
        text = operator.logs()
        # Only the port announcement (stdout, for the test bed) is not a log record.
        raw = [
            line
            for line in text.splitlines()
            if line.strip() and not line.startswith("dptr-operator: http port")
        ]
        return [json.loads(line) for line in raw]

    about = wait_for(
        lambda: [r for r in lines() if r.get("attempt") == attempt] or None,
        timeout=20,
        what="a log line about the attempt",
    )
    assert {"time", "level", "logger", "message"} <= set(about[0])
    assert {r["pipeline"] for r in about} == {pipeline}
    assert {r["taskrunner"] for r in about} == {f"{cluster.namespace}/runner"}
    assert {r["task"] for r in about} == {job["metadata"]["name"]}

    # The heartbeat threads and the cancel say which task too, not only the poller's.
    def about_it(logger: str, words: str) -> list[dict[str, Any]] | None:
        return [
            r
            for r in lines()
            if r["logger"] == logger and words in r["message"] and r.get("attempt") == attempt
        ] or None

    datapipeline.set_fault("ReportTaskProgress", error_rate=1.0)
    failed = wait_for(
        lambda: about_it("dptr_operator.heartbeats", "heartbeat failed"),
        timeout=30,
        what="a failed heartbeat",
    )
    datapipeline.set_fault("ReportTaskProgress")
    assert failed[0]["task"] == job["metadata"]["name"] and failed[0]["pipeline"] == pipeline
    datapipeline.client().deactivate_pipeline(pipelineId=pipeline, cancelActive=True)
    canceled = wait_for(
        lambda: about_it("dptr_operator.events", "event Canceled"), timeout=30, what="the cancel"
    )
    assert canceled[0]["taskrunner"] == f"{cluster.namespace}/runner"


def test_scheduling_fields_are_kept_by_the_api_server_and_reach_the_task_pod(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    """affinity, topologySpreadConstraints, priorityClassName and imagePullSecrets survive
    the real API server's pruning and reach the Job's pod (and the pod itself), with the
    operator's sidecar resources and log level; a misspelt field is refused, not kept."""
    # Cluster-scoped: one of this test's own, deleted at its end.
    priority_class = f"{cluster.namespace}-batch"
    cluster.testbed.kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": priority_class},
                "value": 1000,
                "preemptionPolicy": "Never",
            }
        ),
    )
    try:
        _check_scheduling_fields(cluster, datapipeline, operator_factory, priority_class)
    finally:
        cluster.testbed.kubectl("delete", "priorityclass", priority_class, "--wait=false", check=False)


def _check_scheduling_fields(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    priority_class: str,
) -> None:
    from dptr_common.kube import taskrunner_path

    resources = {"requests": {"cpu": "20m", "memory": "96Mi"}, "limits": {"memory": "192Mi"}}
    operator_factory(
        *QUIET_GRACES,
        *("--allow-priority-class", priority_class),
        *("--sidecar-resources", json.dumps(resources)),
        *("--sidecar-log-level", "DEBUG"),
    ).start()
    selector = {"matchLabels": {"dptr.dev/task-runner": "runner"}}
    template = {
        "image": "debian:bookworm",
        # Required node affinity no node has: the pod stays Pending (as the other tests'
        # nodeSelector keeps theirs).
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "dptr.dev/test", "operator": "In", "values": ["no-such-node"]}]}
                    ]
                }
            },
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 10, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": selector}}
                ]
            },
        },
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": selector}
        ],
        "priorityClassName": priority_class,
        "imagePullSecrets": [{"name": "regcred"}],
    }  # fmt: skip
    cluster.create_runner(datapipeline, "wg-scheduling", jobTemplate=template)
    # Kept as written: the CRD knows every field (the API server prunes what it does not).
    assert cluster.runner()["spec"]["jobTemplate"] == template

    # A misspelt field: kubectl asks for strict field validation and is refused...
    typo = {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "TaskRunner",
        "metadata": {"name": "typo"},
        "spec": {"workerGroup": "wg-typo", "paused": True, "jobTemplate": {"image": "x", "affinty": {}}},
    }
    with pytest.raises(RuntimeError, match=r'unknown field "spec\.jobTemplate\.affinty"'):
        cluster.apply(typo)
    # ... a client that does not ask has it pruned: what values.schema.json guards against.
    created = cluster.kube.create(taskrunner_path(cluster.namespace), typo)
    assert created["spec"]["jobTemplate"] == {"image": "x"}

    # A PriorityClass the administrator did not allow: the runner never polls.
    cluster.create_runner(
        datapipeline,
        "wg-greedy",
        name="greedy",
        jobTemplate={"image": "debian:bookworm", "priorityClassName": "system-cluster-critical"},
    )
    degraded = wait_for(
        lambda: (c := cluster.condition("greedy", "Degraded")) and c["status"] == "True" and c,
        timeout=20,
        what="greedy Degraded",
    )
    assert degraded["reason"] == "PriorityClassNotAllowed", degraded
    assert "system-cluster-critical" in degraded["message"]

    datapipeline.run_pipeline(
        {"Echo": {"type": "ShellCommandActivity", "command": "true"}}, worker_group="wg-scheduling"
    )
    job = wait_for(cluster.jobs, timeout=20, what="a Job")[0]
    pod_spec = job["spec"]["template"]["spec"]
    for key in ("affinity", "topologySpreadConstraints", "priorityClassName", "imagePullSecrets"):
        assert pod_spec[key] == template[key], key
    sidecar = pod_spec["initContainers"][0]
    assert sidecar["resources"] == resources
    assert {"name": "DPTR_LOG_LEVEL", "value": "DEBUG"} in sidecar["env"]
    # The pod itself: the Priority admission resolved the class, the scheduler is held off.
    pod = wait_for(cluster.pods, timeout=20, what="the task pod")[0]
    assert pod["spec"]["priorityClassName"] == priority_class and pod["spec"]["priority"] == 1000
    assert pod["spec"]["affinity"] == template["affinity"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["labels"]["dptr.dev/task-runner"] == "runner"  # what the selectors select
    assert pod["status"]["phase"] == "Pending"
    polls = datapipeline.ledger.calls_to("PollForTask")
    assert not [c for c in polls if (c.request or {}).get("workerGroup") == "wg-greedy"]
