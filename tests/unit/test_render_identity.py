"""Which container carries which AWS identity (pure): the skip annotation, dptr's own token."""

from __future__ import annotations

from typing import Any

import pytest
from dptr_samples import pipeline_task_owner, set_attempt_fields, task_object, task_runner_object
from kubelet_view import seen

from dptr_common.models import TaskRunner
from dptr_common.render import RUNNER_TOKEN_AUDIENCE, RUNNER_TOKEN_VOLUME, TASK_CONTAINER, render_job
from dptr_common.task import parse_task
from dptr_operator.tenancy import task_account_refusal

SKIP = "eks.amazonaws.com/skip-containers"
ROLE = "arn:aws:iam::111122223333:role/runner"


def _runner(**spec: Any) -> TaskRunner:
    return TaskRunner.from_k8s(task_runner_object(**spec))


def _job(runner: TaskRunner, kind: str = "ShellCommandActivity", **fields: str) -> dict[str, Any]:
    given = {"command": "true", "scriptUri": "", **fields}
    listed = [{"key": k, "stringValue": v} for k, v in given.items() if v]
    task = parse_task(set_attempt_fields(task_object(), [{"key": "type", "stringValue": kind}, *listed]))
    return render_job(
        task,
        runner,
        sidecar_image="dptr:1",
        namespace="data",
        owner=pipeline_task_owner(),
        service_account_name="dptr-sidecar",
    )


def _annotations(job: dict[str, Any]) -> dict[str, str]:
    return job["spec"]["template"]["metadata"]["annotations"]  # type: ignore[no-any-return]


def _containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: seen(c) for c in pod.get("initContainers", []) + pod["containers"]}


@pytest.mark.parametrize("mode", ["Secret", "PodIdentity"])
def test_under_dptrs_account_the_task_is_always_skipped(mode: str) -> None:
    # dptr's account carries the runner's identity, in either mode (it may have a role for
    # another TaskRunner of the namespace), and a template's annotation cannot undo it.
    credentials: dict[str, Any] = {"mode": mode}
    if mode == "Secret":
        credentials["secretRef"] = {"name": "keys"}
    runner = _runner(
        credentials=credentials,
        jobTemplate={"image": "busybox", "annotations": {SKIP: "nothing"}},
    )
    job = _job(runner)
    assert _annotations(job)[SKIP] == TASK_CONTAINER
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "dptr-sidecar"


def test_passing_pod_identity_credentials_to_the_task_skips_nothing() -> None:
    runner = _runner(credentials={"mode": "PodIdentity"}, passDataPipelineCredentials=True)
    assert SKIP not in _annotations(_job(runner))


def test_under_the_tasks_own_account_dptrs_containers_are_skipped_and_keep_their_keys() -> None:
    runner = _runner(
        credentials={"mode": "Secret", "secretRef": {"name": "keys"}, "roleArn": ROLE},
        jobTemplate={"image": "busybox", "serviceAccountName": "etl-task", "annotations": {SKIP: ""}},
    )
    job = _job(runner, scriptUri="s3://b/s.sh", command="")
    skipped = _annotations(job)[SKIP].split(",")
    assert TASK_CONTAINER not in skipped and {"dptr-sidecar", "dptr-fetch-script"} <= set(skipped)
    env = {e["name"] for e in _containers(job)["dptr-sidecar"]["env"]}
    assert {"AWS_ACCESS_KEY_ID", "DPTR_ROLE_ARN"} <= env and "AWS_ROLE_ARN" not in env
    assert not any(v["name"] == RUNNER_TOKEN_VOLUME for v in job["spec"]["template"]["spec"]["volumes"])


def test_pod_identity_under_the_tasks_own_account_uses_dptrs_own_token_for_the_runners_role() -> None:
    runner = _runner(
        credentials={"mode": "PodIdentity", "roleArn": ROLE},
        jobTemplate={"image": "busybox", "serviceAccountName": "etl-task"},
    )
    job = _job(runner, scriptUri="s3://b/s.sh", command="")
    pod = job["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == RUNNER_TOKEN_VOLUME]
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == RUNNER_TOKEN_AUDIENCE
    containers = _containers(job)
    for name in ("dptr-sidecar", "dptr-fetch-script"):
        env = {e["name"]: e.get("value") for e in containers[name]["env"]}
        assert env["AWS_ROLE_ARN"] == ROLE and env["AWS_WEB_IDENTITY_TOKEN_FILE"].endswith("/token")
        assert "DPTR_ROLE_ARN" not in env  # the web identity already is the role
        assert RUNNER_TOKEN_VOLUME in {m["name"] for m in containers[name]["volumeMounts"]}
    task = containers[TASK_CONTAINER]
    assert RUNNER_TOKEN_VOLUME not in {m["name"] for m in task.get("volumeMounts", [])}
    assert not {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} & {e["name"] for e in task.get("env", [])}


def test_pod_identity_under_the_tasks_own_account_without_a_role_is_refused() -> None:
    runner = _runner(
        credentials={"mode": "PodIdentity"}, jobTemplate={"image": "busybox", "serviceAccountName": "t"}
    )
    refusal = task_account_refusal(runner, "dptr-sidecar")
    assert refusal is not None and refusal.reason == "TaskAccountNeedsRole"
    # dptr's own account named explicitly is not the task's own.
    same = _runner(
        credentials={"mode": "PodIdentity"},
        jobTemplate={"image": "busybox", "serviceAccountName": "dptr-sidecar"},
    )
    assert task_account_refusal(same, "dptr-sidecar") is None


def test_volume_types_are_the_administrators_call() -> None:
    from dptr_operator.tenancy import TenancyPolicy

    def runner(volume: dict[str, Any]) -> TaskRunner:
        return _runner(jobTemplate={"image": "busybox", "volumes": [{"name": "v", **volume}]})

    policy = TenancyPolicy(allow_any_worker_group=True)
    assert policy.check(runner({"persistentVolumeClaim": {"claimName": "c"}})) is None
    for volume in ({"hostPath": {"path": "/"}}, {"secret": {"secretName": "s"}}, {"csi": {"driver": "d"}}):
        refusal = policy.check(runner(volume))
        assert refusal is not None and refusal.reason == "VolumeTypeNotAllowed", volume
    opened = TenancyPolicy(allow_any_worker_group=True, allowed_volume_types=frozenset({"hostPath"}))
    assert opened.check(runner({"hostPath": {"path": "/data"}})) is None


def test_priority_classes_are_the_administrators_call() -> None:
    from dptr_operator.config import parse_args
    from dptr_operator.tenancy import TenancyPolicy

    def runner(priority_class: str | None) -> TaskRunner:
        template: dict[str, Any] = {"image": "busybox"}
        if priority_class is not None:
            template["priorityClassName"] = priority_class
        return _runner(jobTemplate=template)

    # None allowed by default: a higher priority preempts other tenants' pods.
    policy = TenancyPolicy(allow_any_worker_group=True)
    assert policy.check(runner(None)) is None
    refusal = policy.check(runner("system-cluster-critical"))
    assert refusal is not None and refusal.reason == "PriorityClassNotAllowed"
    assert "system-cluster-critical" in refusal.message and "allows none" in refusal.message
    assert "tenancy.allowedPriorityClasses" in refusal.message and "--allow-priority-class" in refusal.message
    # The administrator's list, from the flags (or their env equivalent), exactly.
    config = parse_args(
        ["-n", "data", "--allow-any-worker-group", "--allow-priority-class", "batch-low"], env={}
    )
    assert config.tenancy.check(runner("batch-low")) is None
    refusal = config.tenancy.check(runner("batch-high"))
    assert refusal is not None and refusal.reason == "PriorityClassNotAllowed"
    assert "allows batch-low " in refusal.message
    from_env = parse_args(
        ["-n", "data", "--allow-any-worker-group"], env={"DPTR_ALLOWED_PRIORITY_CLASSES": "a;batch-high"}
    )
    assert from_env.tenancy.check(runner("batch-high")) is None
