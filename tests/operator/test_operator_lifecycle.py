"""Polling policy and operator lifecycle: capacity, pause, terminate, credentials,
SIGKILL and restart, two replicas, admission, restricted Pod Security."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

ECHO = {"type": "ShellCommandActivity", "command": "echo hi"}


def _cancel_all(datapipeline: LocalDataPipeline) -> None:
    for pipeline in {r.pipeline_id for r in datapipeline.ledger.attempts.values()}:
        datapipeline.client().deactivate_pipeline(pipelineId=pipeline, cancelActive=True)


def _all_final(cluster: Cluster) -> bool:
    return all(
        t.get("status", {}).get("phase") in ("Failed", "Canceled", "Succeeded") for t in cluster.tasks()
    )


def test_burst_of_50_respects_max_concurrent_tasks(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-burst", maxConcurrentTasks=5, pollers=3)
    datapipeline.run_pipeline({f"A{i}": ECHO for i in range(50)}, worker_group="wg-burst")
    wait_for(lambda: len(cluster.tasks()) == 5, timeout=20, what="5 PipelineTasks")
    time.sleep(3)  # 3 long polls' worth at 0.01: still 5
    assert len(cluster.tasks()) == 5
    assert len(datapipeline.ledger.attempts) == 5
    wait_for(
        lambda: cluster.runner().get("status", {}).get("activeSummary") == "5/5",
        timeout=20,
        what="activeSummary 5/5",
    )
    polling = cluster.condition("runner", "Polling")
    assert polling is not None and polling["reason"] == "AtCapacity"
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster), timeout=30, what="all canceled")
    datapipeline.assert_clean()


def test_paused_stops_polling_and_running_tasks_keep_heartbeats(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-paused")
    datapipeline.run_pipeline({"First": ECHO}, worker_group="wg-paused")
    wait_for(lambda: len(cluster.tasks()) == 1, timeout=20, what="the first task")
    cluster.testbed.kubectl(
        "patch",
        "taskrunner",
        "runner",
        "-n",
        cluster.namespace,
        "--type=merge",
        "-p",
        '{"spec":{"paused":true}}',
    )
    wait_for(
        lambda: (cluster.condition("runner", "Polling") or {}).get("reason") == "Paused",
        timeout=20,
        what="Paused",
    )
    time.sleep(1.5)  # a poll in flight when paused may still return a task
    before = len(datapipeline.ledger.attempts)
    datapipeline.run_pipeline({"Second": ECHO}, worker_group="wg-paused")
    first = next(iter(datapipeline.ledger.attempts.values()))
    calls = first.progress_calls
    time.sleep(3)
    assert len(datapipeline.ledger.attempts) == before  # nothing new polled
    assert first.progress_calls > calls  # the running task is still heartbeated
    cluster.testbed.kubectl(
        "patch",
        "taskrunner",
        "runner",
        "-n",
        cluster.namespace,
        "--type=merge",
        "-p",
        '{"spec":{"paused":false}}',
    )
    wait_for(lambda: len(datapipeline.ledger.attempts) == 2, timeout=20, what="polling resumed")
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster) and len(cluster.tasks()) == 2, timeout=30, what="both tasks final")
    datapipeline.assert_clean()


def test_runner_terminate_stops_polling_with_condition(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    datapipeline.set_runner_terminate(True)
    cluster.create_runner(datapipeline, "wg-term")
    wait_for(
        lambda: (cluster.condition("runner", "Polling") or {}).get("reason") == "Terminated",
        timeout=30,
        what="Polling reason Terminated",
    )
    assert cluster.events("Terminated")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-term")
    time.sleep(2)
    assert not datapipeline.ledger.attempts
    runner_id = cluster.runner()["status"]["taskrunnerId"]
    assert runner_id in datapipeline.ledger.runners
    datapipeline.set_runner_terminate(False)
    datapipeline.assert_clean()


def test_a_taskrunner_id_set_on_the_spec_is_the_one_data_pipeline_sees(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    # The official runner's --taskrunnerId: what ReportTaskRunnerHeartbeat carries.
    cluster.create_runner(datapipeline, "wg-trid", taskrunnerId="onprem-etl-7")
    wait_for(
        lambda: "onprem-etl-7" in datapipeline.ledger.runners, timeout=30, what="the heartbeat with the id"
    )
    wait_for(
        # No status yet on a loaded machine: not a failure, keep waiting.
        lambda: (cluster.runner().get("status") or {}).get("taskrunnerId") == "onprem-etl-7",
        timeout=30,
        what="status.taskrunnerId",
    )
    assert all(not r.startswith("dptr-") for r in datapipeline.ledger.runners), datapipeline.ledger.runners
    datapipeline.assert_clean()


def test_bad_credentials_degrade_then_recover(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-creds", secret_key_id="AKIDWRONG")
    degraded = wait_for(
        lambda: (c := cluster.condition("runner", "Degraded")) and c["status"] == "True" and c,
        timeout=30,
        what="Degraded True",
    )
    assert degraded["reason"] == "InvalidCredentials"
    assert (cluster.condition("runner", "Ready") or {})["status"] == "False"
    assert [e for e in cluster.events("Degraded") if e["type"] == "Warning"]
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "dp-credentials"},
            "stringData": {"AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID},
        }
    )
    wait_for(
        lambda: (cluster.condition("runner", "Ready") or {}).get("status") == "True",
        timeout=30,
        what="Ready True again",
    )
    assert cluster.condition("runner", "Degraded")["status"] == "False"  # type: ignore[index]
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-creds")
    wait_for(cluster.jobs, timeout=20, what="polling works again")
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster), timeout=30, what="all tasks final")
    datapipeline.assert_clean()


def test_sigkill_and_restart_loses_nothing(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-restart", maxConcurrentTasks=20)
    datapipeline.run_pipeline({f"T{i}": ECHO for i in range(8)}, worker_group="wg-restart")
    wait_for(lambda: len(cluster.jobs()) == 8, timeout=20, what="8 Jobs")
    operator.kill()
    time.sleep(2)  # a fifth of the scaled reportProgressTimeout (9 s)
    calls = {a: r.progress_calls for a, r in datapipeline.ledger.attempts.items()}
    operator.start()
    # Every task is heartbeated again, well inside its timeout.
    wait_for(
        lambda: all(r.progress_calls > calls[a] + 1 for a, r in datapipeline.ledger.attempts.items()),
        timeout=6,
        what="heartbeats resumed",
    )
    time.sleep(6)  # past a whole reportProgressTimeout since the kill
    assert not datapipeline.ledger.reassignments
    assert len(cluster.jobs()) == 8 and len(cluster.tasks()) == 8
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster), timeout=30, what="all tasks final")
    datapipeline.assert_clean()


def test_two_replicas_only_the_leader_polls(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory
) -> None:
    lease = ("--lease-duration-seconds", "3", "--lease-renew-seconds", "1")
    first = operator_factory(*QUIET_GRACES, *lease, "--identity", "replica-a").start()
    wait_for(lambda: "acquired Lease" in first.logs(), timeout=20, what="replica-a leads")
    second = operator_factory(*QUIET_GRACES, *lease, "--identity", "replica-b").start()
    cluster.create_runner(datapipeline, "wg-ha")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-ha")
    wait_for(cluster.jobs, timeout=20, what="a Job")
    time.sleep(1)
    assert "standing by" in second.logs()
    assert {r.hostname for r in datapipeline.ledger.attempts.values()} == {"replica-a"}
    first.kill()
    wait_for(lambda: "acquired Lease" in second.logs(), timeout=15, what="replica-b takes over")
    datapipeline.run_pipeline({"Next": ECHO}, worker_group="wg-ha")
    wait_for(lambda: len(datapipeline.ledger.attempts) == 2, timeout=20, what="replica-b polls")
    time.sleep(3)
    assert not datapipeline.ledger.reassignments
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster), timeout=30, what="all tasks final")
    datapipeline.assert_clean()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"workerGroup": "  "}, "workerGroup must not be blank"),
        ({"maxConcurrentTasks": 0}, "maxConcurrentTasks"),
        ({"endpointUrl": "not a url"}, "endpointUrl must be an absolute http(s) URL"),
        ({"credentials": {"mode": "Magic"}}, "Unsupported value"),
        ({"credentials": {"mode": "Secret"}}, "secretRef is required"),
        # Image allow-list entries that a string-prefix match would have turned into bypasses.
        ({"imagePolicy": {"allowedImages": ["registry.example.com/etl*"]}}, "an allowedImages entry is"),
        ({"imagePolicy": {"allowedImages": ["registry.example.com*"]}}, "an allowedImages entry is"),
        ({"imagePolicy": {"allowedImages": ["registry.example.com/etl/x:1\n"]}}, "an allowedImages entry is"),
        ({"imagePolicy": {"allowedImages": ["registry.example.com/*/x"]}}, "an allowedImages entry is"),
        ({"taskIO": {"maxLogBytes": "5 GB"}}, "spec.taskIO.maxLogBytes"),
    ],
)
def test_admission_rejects_bad_taskrunners(cluster: Cluster, patch: dict[str, object], message: str) -> None:
    spec = {"workerGroup": "wg", "jobTemplate": {"image": "debian:bookworm"}, **patch}
    body = {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "TaskRunner",
        "metadata": {"name": "bad"},
        "spec": spec,
    }
    result = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(cluster.testbed.kubeconfig),
            "apply",
            "-n",
            cluster.namespace,
            "-f",
            "-",
        ],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_restricted_namespace_accepts_the_rendered_pods(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.testbed.kubectl(
        "label",
        "namespace",
        cluster.namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "--overwrite",
    )
    cluster.create_runner(datapipeline, "wg-pss")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-pss")
    wait_for(cluster.pods, timeout=30, what="the task pod admitted")
    assert not [e for e in cluster.events("FailedCreate")]
    _cancel_all(datapipeline)
    wait_for(lambda: _all_final(cluster), timeout=30, what="all tasks final")
    datapipeline.assert_clean()
