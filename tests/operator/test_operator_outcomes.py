"""Exactly one outcome on the failure paths the cluster and users create: refused Jobs,
refused pods, values out of bounds, a sidecar that cannot confirm its uploads, deleted
PipelineTasks and Jobs, a cancel cut short, Job TTLs, and a Data Pipeline that cannot
say whether an attempt was already reported.

The real operator runs against the shared bed and the local Data Pipeline service; every
scenario ends with the service's ledger: one outcome per attempt, no protocol violation.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_common import ledger
from dptr_common.kube import job_path, pipelinetask_path
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def activity(command: str = "echo hi", **fields: Any) -> dict[str, Any]:
    return {"type": "ShellCommandActivity", "command": command, "maximumRetries": "0", **fields}


def outcomes(dp: LocalDataPipeline, *names: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        records = {r.object_id: r for r in dp.ledger.attempts.values() if r.object_id in names}
        if set(records) == set(names) and all(r.outcome for r in records.values()):
            return records
        return None

    result: dict[str, Any] = wait_for(done, timeout=timeout, interval=0.2, what=f"outcomes of {names}")
    return result


def set_task_status_calls(dp: LocalDataPipeline) -> int:
    return len([c for c in dp.ledger.calls_to("SetTaskStatus") if c.error is None])


def task_named(cluster: Cluster, object_id: str) -> dict[str, Any] | None:
    return next(
        (t for t in cluster.tasks() if (t["spec"].get("activity") or {}).get("componentId") == object_id),
        None,
    )


#: A minimal valid object of each resource a test policy denies (for the dry run).
PROBES: dict[str, dict[str, Any]] = {
    "jobs": {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}
        },
    },
    "pipelinetasks": {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "spec": {"taskRunner": "r", "taskId": "t", "pipelineId": "df-x", "attemptId": "a"},
    },
}


@pytest.fixture
def policy(cluster: Cluster) -> Iterator[Callable[[str, str], None]]:
    """A ValidatingAdmissionPolicy denying CREATE of ``resource`` in the test's namespace
    (cluster-scoped: removed afterwards)."""
    made: list[str] = []

    def deny(group: str, resource: str) -> None:
        name = f"deny-{resource}-{uuid.uuid4().hex[:6]}"
        made.append(name)
        objects = [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {
                        "resourceRules": [
                            {
                                "apiGroups": [group],
                                "apiVersions": ["*"],
                                "operations": ["CREATE"],
                                "resources": [resource],
                            }
                        ],
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}
                        },
                    },
                    "validations": [
                        {
                            "expression": "false",
                            "message": f"no {resource} here, says policy",
                            "reason": "Forbidden",
                        }
                    ],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {"policyName": name, "validationActions": ["Deny"]},
            },
        ]
        cluster.testbed.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
        )
        # Policies take effect asynchronously: wait until a server-side dry run is refused.
        probe = PROBES[resource] | {"metadata": {"name": "probe", "namespace": cluster.namespace}}

        def refused() -> bool:
            result = subprocess.run(
                [
                    "kubectl",
                    "--kubeconfig",
                    str(cluster.testbed.kubeconfig),
                    "create",
                    "--dry-run=server",
                    "-f",
                    "-",
                ],
                input=json.dumps(probe),
                capture_output=True,
                text=True,
                check=False,
            )
            return result.returncode != 0 and "says policy" in result.stderr

        wait_for(refused, timeout=30, interval=0.2, what=f"the policy denying {resource}")

    yield deny
    for name in made:
        cluster.testbed.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name, check=False
        )


@pytest.fixture
def outage(cluster: Cluster) -> Iterator[Callable[[str, str], Callable[[], None]]]:
    """An API server that cannot answer for CREATE of ``resource`` in the test's namespace:
    a validating webhook (failurePolicy Fail) at a loopback port nobody listens on, so
    the API server answers 500 "failed calling webhook", as it does when any webhook it
    depends on is down.  Returns a function that ends the outage."""
    made: list[str] = []

    def begin(group: str, resource: str) -> Callable[[], None]:
        name = f"outage-{resource}-{uuid.uuid4().hex[:6]}"
        made.append(name)
        webhook = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": f"{name}.dptr.test",
                    "clientConfig": {"url": "https://127.0.0.1:1/down"},
                    "rules": [
                        {
                            "apiGroups": [group],
                            "apiVersions": ["*"],
                            "operations": ["CREATE"],
                            "resources": [resource],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 2,
                }
            ],
        }
        cluster.testbed.kubectl("apply", "-f", "-", input=json.dumps(webhook))
        probe = PROBES[resource] | {"metadata": {"name": "probe", "namespace": cluster.namespace}}

        def dry_run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    "kubectl",
                    "--kubeconfig",
                    str(cluster.testbed.kubeconfig),
                    "create",
                    "--dry-run=server",
                    "-f",
                    "-",
                ],
                input=json.dumps(probe),
                capture_output=True,
                text=True,
                check=False,
            )

        wait_for(
            lambda: "failed calling webhook" in dry_run().stderr,
            timeout=30,
            interval=0.2,
            what=f"the outage for {resource}",
        )

        def end() -> None:
            cluster.testbed.kubectl("delete", "validatingwebhookconfiguration", name, check=False)
            wait_for(
                lambda: dry_run().returncode == 0, timeout=30, interval=0.2, what=f"{resource} served again"
            )

        return end

    yield begin
    for name in made:
        cluster.testbed.kubectl("delete", "validatingwebhookconfiguration", name, check=False)


# --------------------------------------------------------------------------- API outages


def test_an_outage_while_recording_the_task_fails_nothing(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    outage: Callable[[str, str], Callable[[], None]],
) -> None:
    """No PipelineTask can be written: an outage, not a refusal.  The attempt is left
    unacknowledged (Data Pipeline gives it again after its ack window) rather than
    reported FAILED, which would cost the activity a retry for the cluster's trouble."""
    end = outage("dptr.dev", "pipelinetasks")
    operator_factory(*QUIET_GRACES).start()
    cluster.create_runner(datapipeline, "wg-outage-pt", maxConcurrentTasks=1)
    datapipeline.run_pipeline({"Echo": activity(maximumRetries="3")}, worker_group="wg-outage-pt")
    wait_for(lambda: cluster.events("TaskNotRecorded"), timeout=30, what="a TaskNotRecorded Event")
    end()
    # Given again (ack window: 2 minutes, 1.2 s here), it is recorded and gets its Job.
    wait_for(cluster.jobs, timeout=60, what="the Job once the API server answers")
    assert set_task_status_calls(datapipeline) == 0, datapipeline.ledger.calls_to("SetTaskStatus")
    assert [r.reassigned for r in datapipeline.ledger.attempts.values() if r.reassigned] != []


def test_an_outage_while_creating_the_job_fails_nothing(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    outage: Callable[[str, str], Callable[[], None]],
) -> None:
    """The PipelineTask exists, the Job cannot be created yet: the task is acked and
    heartbeated, and the sweep creates the Job once the API server answers."""
    end = outage("batch", "jobs")
    operator_factory(*QUIET_GRACES, "--pod-create-grace-seconds", "1000").start()  # 10 s
    cluster.create_runner(datapipeline, "wg-outage-job")
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-outage-job")
    wait_for(lambda: cluster.events("JobPending"), timeout=30, what="a JobPending Event")
    time.sleep(3)  # sweeps that retry with the outage on: none fails the task
    assert set_task_status_calls(datapipeline) == 0
    end()
    job = wait_for(cluster.jobs, timeout=30, what="the Job once the API server answers")[0]
    task = wait_for(
        lambda: (
            (task_named(cluster, "Echo") or {}).get("status", {}).get("jobName")
            and task_named(cluster, "Echo")
        ),
        timeout=30,
        what="jobName recorded",
    )
    assert task["status"]["jobName"] == job["metadata"]["name"]
    record = next(iter(datapipeline.ledger.attempts.values()))
    assert record.outcome is None and record.progress_calls >= 1, record
    assert set_task_status_calls(datapipeline) == 0


def test_an_outage_that_outlasts_the_pod_create_grace_ends_the_attempt(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    outage: Callable[[str, str], Callable[[], None]],
) -> None:
    """An API server that never answers for the Job (a webhook it depends on stays down):
    the attempt is not heartbeated without a Job past the pod create grace, it ends
    FAILED once, naming the cause."""
    outage("batch", "jobs")
    operator_factory(*QUIET_GRACES, "--pod-create-grace-seconds", "300").start()  # 3 s
    cluster.create_runner(datapipeline, "wg-outage-long")
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-outage-long")
    record = outcomes(datapipeline, "Echo")["Echo"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.JobRejected.Unavailable"), record
    assert "failed calling webhook" in (record.error_message or ""), record
    assert cluster.events("JobPending") and cluster.events("JobRejected")
    assert set_task_status_calls(datapipeline) == 1
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- refused Jobs


@pytest.mark.parametrize("refusal", ["Quota", "Denied", "Invalid"])
def test_a_refused_job_ends_the_attempt_failed_once(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    policy: Callable[[str, str], None],
    refusal: str,
) -> None:
    spec: dict[str, Any] = {"maxConcurrentTasks": 1}
    if refusal == "Quota":
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-jobs"},
                "spec": {"hard": {"count/jobs.batch": "0"}},
            }
        )
    elif refusal == "Denied":
        policy("batch", "jobs")
    else:
        # A node selector key the Job API refuses: the Job is invalid (422).
        spec["jobTemplate"] = {"image": "debian:bookworm", "nodeSelector": {"bad key!": "x"}}
    operator_factory(*QUIET_GRACES).start()
    cluster.create_runner(datapipeline, f"wg-refused-{refusal.lower()}", **spec)
    datapipeline.run_pipeline(
        {"First": activity(), "Second": activity()}, worker_group=f"wg-refused-{refusal.lower()}"
    )

    # Both end, one after the other on a runner with room for one: the capacity is freed.
    records = outcomes(datapipeline, "First", "Second")
    for record in records.values():
        assert (record.outcome, record.error_id) == ("FAILED", f"dptr.JobRejected.{refusal}"), record
        assert "refused the Job" in (record.error_message or "")
    assert set_task_status_calls(datapipeline) == 2
    assert not cluster.jobs()
    wait_for(
        lambda: all(t["status"].get("phase") == "Failed" for t in cluster.tasks()),
        timeout=20,
        what="Failed recorded",
    )
    rejected = cluster.events("JobRejected")
    assert {e["involvedObject"]["kind"] for e in rejected} == {"PipelineTask", "TaskRunner"}
    datapipeline.assert_clean()


def test_a_restarted_operator_ends_a_recorded_task_whose_job_is_refused(
    cluster: Cluster, operator_factory: Callable[..., OperatorProcess]
) -> None:
    """A task recorded before a restart, whose Job was never made: the restarted operator
    tries once more, is refused, and reports; it never heartbeats it forever."""
    # Time at 1/10 here: the 2-minute ack window (12 s) must outlast a restart on a busy
    # machine, or Data Pipeline gives the attempt to someone else meanwhile.
    datapipeline = LocalDataPipeline(time_scale=0.1).start()
    cluster.create_runner(datapipeline, "wg-refused-restart")
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-refused-restart")
    op = operator_factory(*QUIET_GRACES, "--time-scale", "0.1")
    # The quota arrives between the PipelineTask and the Job: kill the operator as soon
    # as the PipelineTask exists, then refuse Jobs.
    op.start()
    wait_for(cluster.tasks, timeout=30, interval=0.01, what="the PipelineTask")
    op.kill()
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-jobs"},
            "spec": {"hard": {"count/jobs.batch": "0"}},
        }
    )
    for job in cluster.jobs():  # made before the kill: remove it, as if the kill came first
        cluster.kube.delete(
            job_path(cluster.namespace, job["metadata"]["name"]), propagation_policy="Background"
        )
        cluster.kube.patch(
            pipelinetask_path(cluster.namespace, cluster.tasks()[0]["metadata"]["name"], "status"),
            {"status": {"jobName": None}},
        )
    try:
        op.start()
        record = outcomes(datapipeline, "Echo")["Echo"]
        assert record.outcome == "FAILED"
        assert record.error_id == "dptr.JobRejected.Quota", record
        assert set_task_status_calls(datapipeline) == 1
        datapipeline.assert_clean()
    finally:
        datapipeline.stop()


def test_a_refused_pipeline_task_is_reported_directly(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    policy: Callable[[str, str], None],
) -> None:
    policy("dptr.dev", "pipelinetasks")
    operator_factory(*QUIET_GRACES).start()
    cluster.create_runner(datapipeline, "wg-no-record")
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-no-record")
    record = outcomes(datapipeline, "Echo")["Echo"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.PipelineTaskRejected.Denied"), record
    assert "no pipelinetasks here" in (record.error_message or "")
    assert not cluster.tasks() and not cluster.jobs()
    assert cluster.events("TaskRejected")
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- refused pods


@pytest.mark.parametrize(
    ("setup", "error_id"),
    [("quota", "dptr.PodRejected.Quota"), ("account", "dptr.PodRejected.ServiceAccount")],
)
def test_a_job_whose_pods_are_refused_ends_failed(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    setup: str,
    error_id: str,
) -> None:
    spec: dict[str, Any] = {}
    if setup == "quota":
        cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "no-pods"},
                "spec": {"hard": {"pods": "0"}},
            }
        )
    else:
        spec["jobTemplate"] = {"image": "debian:bookworm", "serviceAccountName": "no-such-account"}
    # A pod that never appears within 3 s (scaled) is refused.
    op = operator_factory(*QUIET_GRACES, "--pod-create-grace-seconds", "300").start()
    cluster.create_runner(datapipeline, f"wg-pods-{setup}", **spec)
    datapipeline.run_pipeline({"Echo": activity()}, worker_group=f"wg-pods-{setup}")
    wait_for(cluster.jobs, timeout=20, what="the Job")
    # A restart in between: the new operator gives the Job its grace again, and ends it.
    op.kill()
    op.start()
    record = outcomes(datapipeline, "Echo", timeout=60)["Echo"]
    assert (record.outcome, record.error_id) == ("FAILED", error_id), record
    assert "could not create the pod" in (record.error_message or "")
    assert set_task_status_calls(datapipeline) == 1
    wait_for(lambda: not cluster.jobs(), timeout=20, what="the refused Job removed")
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- bounds


def test_values_out_of_bounds_end_failed_before_anything_is_created(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(*QUIET_GRACES).start()
    cluster.create_runner(datapipeline, "wg-bounds")
    field = "x" * 9000  # under the service's 10240-character field limit
    datapipeline.run_pipeline(
        {
            "Forever": activity(attemptTimeout="300000000000 years"),
            "FatFields": activity(**{f"myField{i}": field for i in range(20)}),
            "Huge": activity(**{f"myField{i}": field for i in range(80)}),
        },
        worker_group="wg-bounds",
    )
    records = outcomes(datapipeline, "Forever", "FatFields", "Huge")
    got = {name: (r.outcome, r.error_id) for name, r in records.items()}
    assert got == {
        "Forever": ("FAILED", "dptr.InvalidTask.BadPeriod.attemptTimeout"),
        "FatFields": ("FAILED", "dptr.InvalidTask.TooLarge.myFields"),
        "Huge": ("FAILED", "dptr.InvalidTask.TooLarge.PipelineTask"),
    }
    assert not cluster.jobs()
    assert task_named(cluster, "Huge") is None  # refused before it was created
    assert set_task_status_calls(datapipeline) == 3
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- staged outputs


def test_staged_outputs_the_sidecar_never_confirmed_are_not_reported_finished(
    cluster: Cluster,
    datapipeline: LocalDataPipeline,
    operator_factory: Callable[..., OperatorProcess],
    s3_endpoint: str,
    s3_bucket: str,
    s3_raw: Any,
) -> None:
    from dptr_testbed.installs import sidecar_rbac

    for obj in sidecar_rbac(cluster.namespace):
        cluster.apply(obj)
    operator_factory(*QUIET_GRACES, "--sidecar-report-grace-seconds", "200").start()
    cluster.create_runner(
        datapipeline, "wg-unconfirmed", s3EndpointUrl=s3_endpoint, jobTemplate={"image": "debian:bookworm"}
    )
    datapipeline.run_pipeline(
        {
            "Out": {"type": "S3DataNode", "directoryPath": f"s3://{s3_bucket}/out"},
            "Stage": activity(
                'sleep 4; echo data > "$OUTPUT1_STAGING_DIR/result"', stage="true", output={"ref": "Out"}
            ),
        },
        worker_group="wg-unconfirmed",
    )
    wait_for(
        lambda: (
            (((task_named(cluster, "Stage") or {}).get("status") or {}).get("heartbeat") or {}).get("owner")
            == "sidecar"
        ),
        timeout=30,
        what="the sidecar took over",
    )
    # The sidecar loses its API access before the task exits: it can neither claim nor
    # report, so it can confirm no upload.
    cluster.kube.delete(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{cluster.namespace}/rolebindings/dptr-sidecar"
    )
    record = outcomes(datapipeline, "Stage", timeout=60)["Stage"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.StagingFailed.Incomplete"), record
    # reportedBy is recorded after SetTaskStatus returns: wait for it, do not race it.
    reporter = wait_for(
        lambda: (((task_named(cluster, "Stage") or {}).get("status") or {}).get("report") or {}).get(
            "reportedBy"
        ),
        timeout=20,
        what="the report recorded",
    )
    assert reporter.startswith("operator/"), reporter
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- deletions


def _running(cluster: Cluster, datapipeline: LocalDataPipeline, worker_group: str) -> dict[str, Any]:
    from dptr_testbed.installs import sidecar_rbac

    for obj in sidecar_rbac(cluster.namespace):
        cluster.apply(obj)
    cluster.create_runner(datapipeline, worker_group, jobTemplate={"image": "debian:bookworm"})
    datapipeline.run_pipeline(
        {"Long": activity("trap 'exit 143' TERM; sleep 60 & wait")}, worker_group=worker_group
    )
    task: dict[str, Any] = wait_for(
        lambda: (
            (t := task_named(cluster, "Long"))
            and (t.get("status") or {}).get("phase") == "Running"
            and ((t.get("status") or {}).get("heartbeat") or {}).get("owner") == "sidecar"
            and t
        ),
        timeout=45,
        what="the task running, heartbeated by its sidecar",
    )
    return task


def test_a_pipeline_task_deleted_while_its_attempt_runs_is_reported_once(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(*QUIET_GRACES, "--sidecar-report-grace-seconds", "1000").start()
    task = _running(cluster, datapipeline, "wg-pt-deleted")
    cluster.testbed.kubectl(
        "delete", "pipelinetask", task["metadata"]["name"], "-n", cluster.namespace, "--wait=false"
    )
    record = outcomes(datapipeline, "Long")["Long"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.PipelineTaskDeleted"), record
    wait_for(lambda: not cluster.jobs(), timeout=30, what="its Job deleted")
    wait_for(lambda: task_named(cluster, "Long") is None, timeout=30, what="the deletion finished")
    assert set_task_status_calls(datapipeline) == 1
    datapipeline.assert_clean()


def test_a_job_deleted_under_a_running_task_is_named_as_the_cause(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(*QUIET_GRACES, "--sidecar-report-grace-seconds", "1000").start()
    task = _running(cluster, datapipeline, "wg-job-deleted")
    cluster.kube.delete(
        job_path(cluster.namespace, task["status"]["jobName"]), propagation_policy="Background"
    )
    record = outcomes(datapipeline, "Long")["Long"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.JobDeleted"), record
    assert set_task_status_calls(datapipeline) == 1
    wait_for(
        lambda: (task_named(cluster, "Long") or {}).get("status", {}).get("phase") == "Failed",
        timeout=20,
        what="Failed",
    )
    datapipeline.assert_clean()


def test_a_cancel_cut_short_between_record_and_delete_is_finished(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(*QUIET_GRACES).start()
    cluster.create_runner(datapipeline, "wg-cancel-crash")
    pipeline = datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-cancel-crash")
    wait_for(cluster.jobs, timeout=20, what="the Job")
    task = cluster.tasks()[0]
    # A canceler recorded the cancel and stopped before deleting the Job; Data Pipeline
    # knows the attempt is canceled.
    record = next(iter(datapipeline.ledger.attempts.values()))
    datapipeline.client().set_status(pipelineId=pipeline, objectIds=[record.instance_id], status="CANCEL")
    assert ledger.mark_canceled(
        cluster.kube, cluster.namespace, task["metadata"]["name"], by="sidecar/crashed", reason="Canceled"
    )
    wait_for(lambda: not cluster.jobs(), timeout=30, what="the Job deleted by the operator")
    assert record.outcome == "CANCELED"
    assert set_task_status_calls(datapipeline) == 0
    datapipeline.assert_clean()


def test_a_job_ttl_starts_only_after_the_outcome_is_recorded(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(*QUIET_GRACES, "--sidecar-report-grace-seconds", "100").start()
    cluster.create_runner(
        datapipeline,
        "wg-ttl",
        jobTemplate={
            "image": "debian:bookworm",
            "nodeSelector": {"dptr.dev/test": "no-such-node"},
            "ttlSecondsAfterFinished": 0,
        },
    )
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-ttl")
    (job,) = wait_for(cluster.jobs, timeout=20, what="the Job")
    assert "ttlSecondsAfterFinished" not in job["spec"]
    pod = wait_for(cluster.pods, timeout=20, what="the pod")[0]["metadata"]["name"]
    # The task container exited 0 and no sidecar reports: the Job completes at once, and a
    # TTL of 0 would remove it (and the pod) before the operator's fallback reads it.
    cluster.patch_pod_status(
        pod,
        {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "task",
                    "image": "debian:bookworm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
        },
    )
    record = outcomes(datapipeline, "Echo")["Echo"]
    assert (record.outcome, record.error_id) == ("FINISHED", None), record
    # ... and then the TTL applies.
    wait_for(lambda: not cluster.jobs(), timeout=30, what="the Job removed by its TTL")
    datapipeline.assert_clean()


# --------------------------------------------------------------------------- "already final?"


def test_an_unanswerable_already_final_check_never_reports_blind(
    cluster: Cluster, datapipeline: LocalDataPipeline, operator_factory: Callable[..., OperatorProcess]
) -> None:
    operator_factory(
        *QUIET_GRACES, "--sidecar-report-grace-seconds", "100", "--claim-stale-after-seconds", "300"
    ).start()
    cluster.create_runner(datapipeline, "wg-final")
    datapipeline.run_pipeline({"Echo": activity()}, worker_group="wg-final")
    pod = wait_for(cluster.pods, timeout=20, what="the pod")[0]["metadata"]["name"]
    name = cluster.tasks()[0]["metadata"]["name"]
    # A sidecar claimed the report and died: maybe before SetTaskStatus, maybe after.
    assert ledger.claim_report(
        cluster.kube, cluster.namespace, name, holder="sidecar/dead", status="FINISHED", stale_after=300
    )
    datapipeline.set_fault("DescribeObjects", error_rate=1.0)
    cluster.patch_pod_status(
        pod,
        {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "task",
                    "image": "debian:bookworm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
        },
    )
    # The operator takes the dead claim over (3 s unchanged, scaled) but cannot learn
    # whether it was reported: it must not call SetTaskStatus.
    wait_for(lambda: cluster.events("ReportDeferred"), timeout=30, what="the report deferred")
    time.sleep(3)
    assert set_task_status_calls(datapipeline) == 0
    assert not datapipeline.ledger.calls_to("SetTaskStatus")
    datapipeline.clear_faults()
    record = outcomes(datapipeline, "Echo")["Echo"]
    assert (record.outcome, record.error_id) == ("FINISHED", None)
    assert set_task_status_calls(datapipeline) == 1
    datapipeline.assert_clean()
