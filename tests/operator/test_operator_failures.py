"""Failure paths the operator owns: cancels, gone tasks, invalid tasks, pod failures,
deadlines, TaskRunner deletion.  Pods never run here (the shared bed has no node): the
operator heartbeats every task itself, and pod failures are written as pod status."""

from __future__ import annotations

import time

import pytest
from op_helpers import Cluster, OperatorProcess

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

ECHO = {"type": "ShellCommandActivity", "command": "echo hi"}


def _phase(cluster: Cluster, name: str) -> str | None:
    task = next((t for t in cluster.tasks() if t["metadata"]["name"] == name), None)
    return (task or {}).get("status", {}).get("phase")


def test_task_not_found_cancels_without_set_task_status(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-gone")
    pipeline = datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-gone")
    wait_for(cluster.jobs, timeout=20, what="a Job")
    datapipeline.client().delete_pipeline(pipelineId=pipeline)
    task = wait_for(
        lambda: [t for t in cluster.tasks() if t.get("status", {}).get("phase") == "Canceled"],
        timeout=30,
        what="Canceled",
    )[0]
    assert task["status"]["canceled"]["reason"] in ("TaskGone", "Canceled")
    wait_for(lambda: not cluster.jobs(), timeout=20, what="Job deleted")
    assert not datapipeline.ledger.calls_to("SetTaskStatus")
    datapipeline.assert_clean()


def test_invalid_tasks_fail_with_error_id_and_no_job(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-invalid")
    datapipeline.run_pipeline(
        {
            "BadImage": {"type": "ShellCommandActivity", "command": "true", "myImage": "evil/miner:latest"},
            "BadTimeout": {"type": "ShellCommandActivity", "command": "true", "attemptTimeout": "soon"},
        },
        worker_group="wg-invalid",
    )
    wait_for(
        lambda: len([o for o in datapipeline.ledger.outcomes().values() if o]) == 2,
        timeout=30,
        what="2 outcomes",
    )
    records = {r.object_id: r for r in datapipeline.ledger.attempts.values()}
    assert records["BadImage"].outcome == "FAILED"
    assert records["BadImage"].error_id == "dptr.ImageNotAllowed"
    assert records["BadTimeout"].outcome == "FAILED"
    assert records["BadTimeout"].error_id.startswith("dptr.InvalidTask.BadPeriod")
    assert not cluster.jobs()
    assert cluster.events("InvalidTask")
    # The operator keeps running and keeps polling.
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-invalid")
    wait_for(cluster.jobs, timeout=20, what="a Job for the next, valid task")
    assert operator.alive()
    datapipeline.client().delete_pipeline(
        pipelineId=next(iter(datapipeline.ledger.attempts.values())).pipeline_id
    )
    for record in list(datapipeline.ledger.attempts.values()):
        if record.outcome is None:
            datapipeline.client().deactivate_pipeline(pipelineId=record.pipeline_id)
    wait_for(
        lambda: all(t["status"].get("phase") in ("Failed", "Canceled") for t in cluster.tasks()),
        timeout=30,
        what="every task Failed or Canceled",
    )
    datapipeline.assert_clean()


@pytest.mark.parametrize("failure", ["Evicted", "OOMKilled", "NodeLost"])
def test_pod_failure_is_reported_once_by_the_operator(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess, failure: str
) -> None:
    cluster.create_runner(datapipeline, f"wg-{failure.lower()}")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group=f"wg-{failure.lower()}")
    pod = wait_for(cluster.pods, timeout=20, what="the task pod")[0]
    name = pod["metadata"]["name"]
    if failure == "Evicted":
        status = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    elif failure == "NodeLost":
        # What the node lifecycle controller leaves of a pod on a node that stopped answering.
        status = {
            "phase": "Failed",
            "reason": "NodeLost",
            "message": "Node node-1 which was running pod is unresponsive",
        }
    else:
        status = {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "task",
                    "image": "debian:bookworm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        }
    cluster.patch_pod_status(name, status)
    record = next(iter(datapipeline.ledger.attempts.values()))
    wait_for(lambda: record.outcome is not None, timeout=30, what="the outcome")
    assert record.outcome == "FAILED"
    assert record.error_id == f"dptr.{failure}"
    task = wait_for(
        lambda: cluster.tasks()[0]["status"].get("report", {}).get("reportedAt") and cluster.tasks()[0],
        timeout=20,
        what="report.reportedAt on the PipelineTask",
    )
    assert task["status"]["report"]["reportedBy"].startswith("operator/")
    assert task["status"]["phase"] == "Failed"
    time.sleep(1.5)  # more pod events must not produce a second report
    assert len(datapipeline.ledger.calls_to("SetTaskStatus")) == 1
    datapipeline.assert_clean()


def test_attempt_timeout_is_reported_as_deadline_exceeded(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-deadline")
    datapipeline.run_pipeline(
        {"Slow": {"type": "ShellCommandActivity", "command": "sleep 600", "attemptTimeout": "3 seconds"}},
        worker_group="wg-deadline",
    )
    job = wait_for(cluster.jobs, timeout=20, what="a Job")[0]
    assert job["spec"]["activeDeadlineSeconds"] == 3
    record = next(iter(datapipeline.ledger.attempts.values()))
    wait_for(lambda: record.outcome is not None, timeout=40, what="the outcome")
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.DeadlineExceeded")
    datapipeline.assert_clean()


def test_unschedulable_past_grace_fails_and_removes_the_job(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory
) -> None:
    operator_factory("--unschedulable-grace-seconds", "200").start()  # 2 s at 0.01
    cluster.create_runner(datapipeline, "wg-unsched")  # its pods ask for a node that does not exist
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-unsched")
    record = wait_for(
        lambda: next(iter(datapipeline.ledger.attempts.values()), None), timeout=20, what="polled"
    )
    wait_for(lambda: record.outcome is not None, timeout=60, what="the outcome")
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.Unschedulable")
    wait_for(lambda: not cluster.jobs(), timeout=20, what="the Job deleted")
    datapipeline.assert_clean()


def test_a_job_update_after_the_pod_became_unschedulable_clears_nothing(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory
) -> None:
    """Job and pod events come on separate watches.  A Job status update that lands after
    its pod's Unschedulable event (the Job controller counting the pod, another
    controller's label) speaks of the Job, not of the pod, and must not clear the pod's
    problem: nothing else would set it again, and the task would be heartbeated forever."""
    operator_factory("--unschedulable-grace-seconds", "800").start()  # 8 s at 0.01
    cluster.create_runner(datapipeline, "wg-unsched-job")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-unsched-job")
    record = wait_for(
        lambda: next(iter(datapipeline.ledger.attempts.values()), None), timeout=20, what="polled"
    )

    def unschedulable() -> bool:
        return any(
            c.get("reason") == "Unschedulable"
            for p in cluster.pods()
            for c in (p.get("status") or {}).get("conditions") or []
        )

    wait_for(unschedulable, timeout=30, what="the scheduler marked the pod Unschedulable")
    job = cluster.jobs()[0]["metadata"]["name"]
    # Job events after the pod's, within the grace: each one is a healthy Job.
    for n in range(6):
        cluster.kube.patch(
            f"/apis/batch/v1/namespaces/{cluster.namespace}/jobs/{job}",
            {"metadata": {"annotations": {"example.com/touched": str(n)}}},
        )
        time.sleep(0.5)
    wait_for(lambda: record.outcome is not None, timeout=60, what="the outcome")
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.Unschedulable")
    datapipeline.assert_clean()


def test_image_pull_failure_past_grace_fails_and_removes_the_job(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory
) -> None:
    operator_factory("--image-pull-grace-seconds", "200", "--unschedulable-grace-seconds", "100000").start()
    cluster.create_runner(datapipeline, "wg-pull")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-pull")
    pod = wait_for(cluster.pods, timeout=20, what="the task pod")[0]
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.invalid/task:1"'}
    cluster.patch_pod_status(
        pod["metadata"]["name"],
        {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "task",
                    "image": "registry.invalid/task:1",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": waiting},
                }
            ],
        },
    )
    record = next(iter(datapipeline.ledger.attempts.values()))
    wait_for(lambda: record.outcome is not None, timeout=40, what="the outcome")  # 2 s grace at 0.01
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.ImagePullFailed")
    assert "ImagePullBackOff" in (record.error_message or "")
    wait_for(lambda: not cluster.jobs(), timeout=20, what="the Job deleted")
    time.sleep(1.5)  # the pod's deletion must not produce a second report
    assert len(datapipeline.ledger.calls_to("SetTaskStatus")) == 1
    datapipeline.assert_clean()


def test_deleting_the_taskrunner_fails_running_tasks_then_releases_it(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator: OperatorProcess
) -> None:
    cluster.create_runner(datapipeline, "wg-delete")
    wait_for(
        lambda: "dptr.dev/task-runner" in (cluster.runner()["metadata"].get("finalizers") or []),
        timeout=20,
        what="the TaskRunner's finalizer",
    )
    datapipeline.run_pipeline({"A": ECHO, "B": ECHO}, worker_group="wg-delete")
    wait_for(lambda: len(cluster.jobs()) == 2, timeout=20, what="two Jobs")
    cluster.testbed.kubectl("delete", "taskrunner", "runner", "-n", cluster.namespace, "--wait=false")
    wait_for(
        lambda: all(o == "FAILED" for o in datapipeline.ledger.outcomes().values()),
        timeout=30,
        what="every outcome FAILED",
    )
    for record in datapipeline.ledger.attempts.values():
        assert record.error_id == "dptr.TaskRunnerDeleted"
    wait_for(
        lambda: (
            not cluster.testbed.kubectl("get", "taskrunners", "-n", cluster.namespace, "-o", "name").strip()
        ),
        timeout=30,
        what="the TaskRunner gone",
    )
    wait_for(lambda: not cluster.jobs(), timeout=30, what="Jobs garbage-collected")
    datapipeline.assert_clean()
