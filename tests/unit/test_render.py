from __future__ import annotations

import json
from typing import Any

import pytest
from dptr_samples import (
    ATTEMPT_ID,
    PIPELINE_ID,
    TASK_ID,
    pipeline_task_owner,
    set_attempt_fields,
    task_object,
    task_runner_object,
)
from kubelet_view import seen

from dptr_common import naming
from dptr_common.models import TaskRunner
from dptr_common.render import (
    SCRIPT_PATH,
    SIDECAR_CONTAINER,
    TASK_CONTAINER,
    TOKEN_MOUNT_PATH,
    render_job,
)
from dptr_common.render_preconditions import CHECK_LOOP
from dptr_common.render_staging import TEE_WRAPPER
from dptr_common.task import Task, TaskError, parse_task

SIDECAR_IMAGE = "ghcr.io/dptr/sidecar:0.1.0"


def _runner(**spec: Any) -> TaskRunner:
    return TaskRunner.from_k8s(task_runner_object(**spec))


def _render(task: Task | None = None, runner: TaskRunner | None = None, **kw: Any) -> dict[str, Any]:
    return render_job(
        task or parse_task(task_object()),
        runner or _runner(imagePolicy={"allowedImages": ["registry.example.com/etl/*"]}),
        sidecar_image=SIDECAR_IMAGE,
        namespace="data",
        owner=pipeline_task_owner(),
        **kw,
    )


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each container as its process sees it, after kubelet's $(VAR) expansion."""
    pod = _pod(job)
    return {c["name"]: seen(c) for c in pod.get("initContainers", []) + pod["containers"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _script_task(**extra: str) -> Task:
    fields = [
        {"key": "type", "stringValue": "ShellCommandActivity"},
        {"key": "scriptUri", "stringValue": "s3://scripts/etl/run.py"},
        {"key": "scriptArgument", "stringValue": "--day"},
        {"key": "scriptArgument", "stringValue": "2024-05-01 00:00"},
        {"key": "@componentParent", "refValue": "RunPy"},
    ] + [{"key": k, "stringValue": v} for k, v in extra.items()]
    return parse_task(set_attempt_fields(task_object(), fields))


def assert_restricted(pod: dict[str, Any]) -> None:
    """The restricted Pod Security Standard (Kubernetes 1.34), checked field by field."""
    pod_sc = pod.get("securityContext", {})
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= allowed_volumes, volume
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert not pod_sc.get("sysctls")
    assert pod_sc.get("runAsUser", 1) != 0
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, container["name"]
        assert not sc.get("privileged"), container["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, container["name"]
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in {"RuntimeDefault", "Localhost"}, container["name"]
        assert not container.get("ports") or all(not p.get("hostPort") for p in container["ports"])


def test_job_basics() -> None:
    job = _render()
    name = naming.job_name(PIPELINE_ID, ATTEMPT_ID)
    meta = job["metadata"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert meta["name"] == name and meta["namespace"] == "data"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "PipelineTask",
            "name": "dptr-pt",
            "uid": "1f0e2a1e-0000-4000-8000-000000000002",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert "ttlSecondsAfterFinished" not in job["spec"]
    pod = _pod(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    # Rendering is pure: same input, same output.
    assert json.dumps(job, sort_keys=True) == json.dumps(_render(), sort_keys=True)


def test_labels_and_annotations_carry_the_ids() -> None:
    job = _render()
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        labels, annotations = meta["labels"], meta["annotations"]
        assert all(naming.is_label_value(v) for v in labels.values())
        assert labels[naming.LABEL_PIPELINE_ID] == PIPELINE_ID
        assert labels[naming.LABEL_ATTEMPT_ID] == naming.label_value(ATTEMPT_ID)
        assert labels[naming.LABEL_TASK_RUNNER] == "etl"
        assert labels[naming.LABEL_PIPELINE_TASK] == "dptr-pt"
        assert labels[naming.LABEL_COMPONENT_ID] == "ShellCommandActivityObj"
        assert annotations[naming.ANNOTATION_ATTEMPT_ID] == ATTEMPT_ID
        assert annotations[naming.ANNOTATION_INSTANCE_ID] == "@ShellCommandActivityObj_2024-05-01T00:00:00"
        assert annotations[naming.ANNOTATION_OBJECT_TYPE] == "ShellCommandActivity"
    assert TASK_ID not in json.dumps(job)  # the taskId appears nowhere in the Job


def test_command_runs_through_sh_with_arguments_as_argv() -> None:
    task_container = _containers(_render())[TASK_CONTAINER]
    # The sample has an S3 stdout path: the command runs under the log-capture wrapper,
    # which execs the same argv as "$@".
    wrapper = ["/bin/sh", "-c", TEE_WRAPPER, "dptr-capture"]
    assert task_container["command"][: len(wrapper)] == wrapper
    assert task_container["command"][len(wrapper) :] == [
        "/bin/sh",
        "-c",
        'echo "$1" "$2" "$3" > /dev/null; exit 0',
        "dptr-task",
        "--date",
        "2024-05-01 00:00",
        "it's; $(rm -rf /) `x`",
    ]
    assert "args" not in task_container
    assert task_container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert task_container["image"] == "registry.example.com/etl/job:1.4"  # myImage, allowed


def test_script_uri_is_fetched_by_an_init_container() -> None:
    job = _render(_script_task())
    containers = _containers(job)
    pod = _pod(job)
    assert [c["name"] for c in pod["initContainers"]] == [SIDECAR_CONTAINER, "dptr-fetch-script"]
    fetch = containers["dptr-fetch-script"]
    assert fetch["image"] == SIDECAR_IMAGE
    assert fetch["command"] == ["dptr-sidecar", "fetch-script"]
    assert _env(fetch)["DPTR_SCRIPT_URI"] == "s3://scripts/etl/run.py"
    assert _env(fetch)["DPTR_SCRIPT_PATH"] == SCRIPT_PATH
    assert "restartPolicy" not in fetch  # a plain init container: it must finish first
    task_container = containers[TASK_CONTAINER]
    assert task_container["command"] == [
        "/bin/sh",
        "-c",
        'exec "$0" "$@"',
        SCRIPT_PATH,
        "--day",
        "2024-05-01 00:00",
    ]
    assert task_container["image"] == "registry.example.com/etl/base:1.0"
    script_mounts = [m for m in task_container["volumeMounts"] if m["mountPath"] == "/dptr/script"]
    assert script_mounts and script_mounts[0]["readOnly"] is True
    volume_names = {v["name"] for v in pod["volumes"]}
    assert script_mounts[0]["name"] in volume_names
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == script_mounts[0]["name"])
    assert "activeDeadlineSeconds" not in job["spec"]


def test_precondition_renders_like_an_activity() -> None:
    obj = set_attempt_fields(
        task_object(),
        [
            {"key": "type", "stringValue": "ShellCommandPrecondition"},
            {"key": "command", "stringValue": "test -e /x"},
        ],
    )
    job = _render(parse_task(obj))
    argv = _containers(job)[TASK_CONTAINER]["command"]
    # The check runs under the retry loop, with the same argv an activity would get.
    assert argv[:2] == ["/bin/sh", "-c"] and argv[3] == "dptr-check"
    assert argv[2] == CHECK_LOOP
    assert argv[4:] == ["/bin/sh", "-c", "test -e /x", "dptr-task"]
    assert _env(_containers(job)[SIDECAR_CONTAINER])["DPTR_OBJECT_TYPE"] == "ShellCommandPrecondition"


def test_sidecar_is_native_and_configured_by_env() -> None:
    runner = _runner(
        endpointUrl="http://localdp:8080",
        credentials={"mode": "Secret", "secretRef": {"name": "dp-keys", "accessKeyIdKey": "id"}},
    )
    job = _render(_script_task(), runner)
    sidecar = _containers(job)[SIDECAR_CONTAINER]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["dptr-sidecar"]
    assert sidecar["image"] == SIDECAR_IMAGE
    env = _env(sidecar)
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert env["DPTR_PIPELINETASK"] == "dptr-pt"
    assert env["DPTR_TASKRUNNER"] == "etl"
    assert env["DPTR_REGION"] == "us-east-1"
    assert env["DPTR_ENDPOINT_URL"] == "http://localdp:8080"
    assert env["DPTR_HEARTBEAT_INTERVAL"] == "60"
    assert env["DPTR_MAIN_CONTAINER"] == TASK_CONTAINER
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "dp-keys", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "dp-keys", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    # ... but the task container gets no Data Pipeline credentials by default.
    task_env = _env(_containers(job)[TASK_CONTAINER])
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DPTR_ENDPOINT_URL"} & set(task_env)


def test_heartbeat_interval_follows_the_published_status_and_the_task_timeout() -> None:
    obj = task_runner_object()
    obj["status"] = {"heartbeatIntervalSeconds": 200}
    job = _render(_script_task(), runner=TaskRunner.from_k8s(obj))
    assert _env(_containers(job)[SIDECAR_CONTAINER])["DPTR_HEARTBEAT_INTERVAL"] == "200"
    obj["status"] = {"heartbeatIntervalSeconds": 600}  # more than 900/3
    task = parse_task(
        set_attempt_fields(
            task_object(),
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "command", "stringValue": "true"},
                {"key": "reportProgressTimeout", "stringValue": "15 minutes"},
            ],
        )
    )
    job = _render(task, runner=TaskRunner.from_k8s(obj))
    assert _env(_containers(job)[SIDECAR_CONTAINER])["DPTR_HEARTBEAT_INTERVAL"] == "300"


def test_pass_data_pipeline_credentials_opt_in() -> None:
    runner = _runner(
        credentials={"mode": "Secret", "secretRef": {"name": "dp-keys"}}, passDataPipelineCredentials=True
    )
    task_env = _env(_containers(_render(_script_task(), runner))[TASK_CONTAINER])
    assert task_env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "dp-keys", "key": "AWS_ACCESS_KEY_ID"}}
    assert task_env["DPTR_REGION"] == "us-east-1"


def test_pod_identity_skips_the_task_container_unless_opted_in() -> None:
    annotations = _render(_script_task())["spec"]["template"]["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/skip-containers"] == TASK_CONTAINER
    opted = _render(_script_task(), _runner(passDataPipelineCredentials=True))
    assert "eks.amazonaws.com/skip-containers" not in opted["spec"]["template"]["metadata"]["annotations"]


def test_only_the_sidecar_mounts_the_api_token() -> None:
    job = _render(_script_task())
    pod = _pod(job)
    token_volume = next(v for v in pod["volumes"] if "projected" in v)
    sources = token_volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert sources[1]["configMap"] == {
        "name": "kube-root-ca.crt",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert sources[2]["downwardAPI"]["items"][0]["path"] == "namespace"
    for name, container in _containers(job).items():
        mounts = container.get("volumeMounts", [])
        has_token = any(m["name"] == token_volume["name"] for m in mounts)
        at_default_path = any(m["mountPath"].startswith("/var/run/secrets") for m in mounts)
        if name == SIDECAR_CONTAINER:
            assert has_token
            assert any(m["mountPath"] == TOKEN_MOUNT_PATH and m["readOnly"] for m in mounts)
        else:
            assert not has_token and not at_default_path, name
    assert pod["automountServiceAccountToken"] is False


def test_task_env_documented_contract() -> None:
    job = _render()
    env_list = _containers(job)[TASK_CONTAINER]["env"]
    env = _env(_containers(job)[TASK_CONTAINER])
    assert env["DPTR_PIPELINE_ID"] == PIPELINE_ID
    assert env["DPTR_ATTEMPT_ID"] == ATTEMPT_ID
    assert env["DPTR_OBJECT_TYPE"] == "ShellCommandActivity"
    assert env["DPTR_COMPONENT_ID"] == "ShellCommandActivityObj"
    assert env["DPTR_INSTANCE_ID"] == "@ShellCommandActivityObj_2024-05-01T00:00:00"
    assert env["DPTR_FIELD_myTable"] == "events"
    assert env["DPTR_FIELD_myPartition"] == "2024-05-01\n2024-05-02"
    assert json.loads(env["DPTR_FIELDS_JSON"])["myPartition"] == ["2024-05-01", "2024-05-02"]
    assert not any("TASK_ID" in e["name"] for e in env_list)
    assert len({e["name"] for e in env_list}) == len(env_list)  # no duplicate names


def test_template_env_and_settings() -> None:
    runner = _runner(
        jobTemplate={
            "image": "registry.example.com/etl/base:1.0",
            "imagePullPolicy": "IfNotPresent",
            "serviceAccountName": "etl-tasks",
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "nodeSelector": {"pool": "batch"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
            "env": [
                {"name": "LOG_LEVEL", "value": "debug"},
                {"name": "DPTR_PIPELINE_ID", "value": "spoofed"},
            ],
            "labels": {"team": "data", naming.LABEL_ROLE: "spoofed"},
            "ttlSecondsAfterFinished": 3600,
        }
    )
    job = _render(_script_task(), runner)
    pod = _pod(job)
    task_container = _containers(job)[TASK_CONTAINER]
    env = _env(task_container)
    assert env["LOG_LEVEL"] == "debug"
    assert env["DPTR_PIPELINE_ID"] == PIPELINE_ID  # ours win
    assert task_container["imagePullPolicy"] == "IfNotPresent"
    assert task_container["resources"]["limits"] == {"memory": "1Gi"}
    assert pod["serviceAccountName"] == "etl-tasks"
    assert pod["nodeSelector"] == {"pool": "batch"}
    assert pod["tolerations"][0]["key"] == "batch"
    # The TTL starts only once the outcome is recorded (the operator patches it in then).
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "data"
    assert job["spec"]["template"]["metadata"]["labels"][naming.LABEL_ROLE] == "task"


def test_default_service_account_and_sidecar_image_override() -> None:
    job = _render(
        _script_task(),
        _runner(sidecarImage="mirror.example.com/dptr/sidecar:0.1.0"),
        service_account_name="dptr-task",
    )
    assert _pod(job)["serviceAccountName"] == "dptr-task"
    assert _containers(job)[SIDECAR_CONTAINER]["image"] == "mirror.example.com/dptr/sidecar:0.1.0"


def test_rendered_pods_pass_restricted_pss() -> None:
    assert_restricted(_pod(_render()))
    assert_restricted(_pod(_render(_script_task())))
    assert_restricted(
        _pod(_render(_script_task(), _runner(credentials={"mode": "Secret", "secretRef": {"name": "k"}})))
    )


def test_pod_security_overrides_merge() -> None:
    runner = _runner(
        jobTemplate={
            "image": "img",
            "podSecurityContext": {"runAsUser": 1000, "fsGroup": 2000},
            "containerSecurityContext": {"readOnlyRootFilesystem": True},
        }
    )
    pod = _pod(_render(_script_task(), runner))
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["runAsNonRoot"] is True
    task_sc = next(c for c in pod["containers"] if c["name"] == TASK_CONTAINER)["securityContext"]
    assert task_sc["readOnlyRootFilesystem"] is True
    assert "runAsUser" not in task_sc  # the pod-level uid applies to every container
    assert_restricted(pod)


def test_image_allow_list() -> None:
    task = parse_task(task_object())  # myImage registry.example.com/etl/job:1.4
    assert (
        _containers(
            _render(task, _runner(imagePolicy={"allowedImages": ["registry.example.com/etl/job:1.4"]}))
        )[TASK_CONTAINER]["image"]
        == "registry.example.com/etl/job:1.4"
    )
    for allowed in (
        [],
        ["registry.example.com/etl/job:1.5"],
        ["registry.example.com/other/*"],
        ["registry.example.com/etl/job"],
    ):
        with pytest.raises(TaskError) as info:
            _render(task, _runner(imagePolicy={"allowedImages": allowed}))
        assert info.value.error_id == "dptr.ImageNotAllowed"
        assert "registry.example.com/etl/job:1.4" in info.value.message


@pytest.mark.parametrize(
    ("fields", "error_id"),
    [
        (
            [{"key": "type", "stringValue": "HiveActivity"}, {"key": "command", "stringValue": "x"}],
            "dptr.NeedsManagedResource.HiveActivity",
        ),
        (
            [
                {"key": "type", "stringValue": "DynamoDBExportActivity"},
                {"key": "command", "stringValue": "x"},
            ],
            "dptr.UnknownActivityType",
        ),
        ([{"key": "type", "stringValue": "ShellCommandActivity"}], "dptr.InvalidTask.NoCommand"),
        (
            [{"key": "type", "stringValue": "ShellCommandActivity"}, {"key": "command", "stringValue": "  "}],
            "dptr.InvalidTask.NoCommand",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "command", "stringValue": "x"},
                {"key": "scriptUri", "stringValue": "s3://b/k"},
            ],
            "dptr.InvalidTask.CommandAndScriptUri",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "scriptUri", "stringValue": "https://b/k"},
            ],
            "dptr.InvalidTask.BadScriptUri",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "scriptUri", "stringValue": "s3://bucket-only"},
            ],
            "dptr.InvalidTask.BadScriptUri",
        ),
    ],
)
def test_tasks_that_cannot_run(fields: list[dict[str, str]], error_id: str) -> None:
    task = parse_task(set_attempt_fields(task_object(), fields))
    with pytest.raises(TaskError) as info:
        _render(task)
    assert info.value.error_id == error_id


def test_owner_may_be_an_owner_reference() -> None:
    ref = {"apiVersion": "dptr.dev/v1alpha1", "kind": "PipelineTask", "name": "p", "uid": "u"}
    job = render_job(
        parse_task(task_object()),
        _runner(imagePolicy={"allowedImages": ["registry.example.com/*"]}),
        sidecar_image="s",
        namespace="n",
        owner=ref,
    )
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u"
    with pytest.raises(ValueError, match="uid"):
        render_job(
            _script_task(), _runner(), sidecar_image="s", namespace="n", owner={"metadata": {"name": "p"}}
        )


# Kubelet expands $(VAR) in command and env values from the container's earlier env, and
# turns $$ into $.  Every task-derived string must reach its process exactly as written.
HOSTILE = "x/$(AWS_SECRET_ACCESS_KEY)/$(POD_NAME)/$(DPTR_PIPELINE_ID)/$$/$"


def _hostile_task(**fields: str) -> Task:
    base = [
        {"key": "type", "stringValue": "ShellCommandActivity"},
        {"key": "command", "stringValue": f"echo '{HOSTILE}' \"$$\" $$"},
        {"key": "scriptArgument", "stringValue": HOSTILE},
        {"key": "myValue", "stringValue": HOSTILE},
        {"key": "stdout", "stringValue": f"s3://logs/{HOSTILE}/out"},
        {"key": "stderr", "stringValue": f"s3://logs/{HOSTILE}/err"},
        {"key": "pipelineLogUri", "stringValue": f"s3://logs/{HOSTILE}/"},
        {"key": "@componentParent", "refValue": "Act"},
    ] + [{"key": k, "stringValue": v} for k, v in fields.items()]
    return parse_task(set_attempt_fields(task_object(), base))


def _secret_placeholders(job: dict[str, Any]) -> list[str]:
    """Values (other than the key entries themselves) in which a Secret's value would appear."""
    leaks = []
    for name, container in _containers(job).items():
        for entry in container["env"]:
            if "value" in entry and "<secretKeyRef:" in entry["value"]:
                leaks.append(f"{name} env {entry['name']}: {entry['value']}")
        leaks += [f"{name} argv: {a}" for a in container["command"] if "<secretKeyRef:" in a]
    return leaks


def test_task_strings_reach_every_process_exactly_as_written() -> None:
    runner = _runner(credentials={"mode": "Secret", "secretRef": {"name": "dp-keys"}})
    job = _render(_hostile_task(), runner)
    containers = _containers(job)
    sidecar_env = _env(containers[SIDECAR_CONTAINER])
    assert sidecar_env["DPTR_STDOUT_URI"] == f"s3://logs/{HOSTILE}/out"
    assert sidecar_env["DPTR_STDERR_URI"] == f"s3://logs/{HOSTILE}/err"
    assert sidecar_env["DPTR_PIPELINE_LOG_URI"] == f"s3://logs/{HOSTILE}/"
    task = containers[TASK_CONTAINER]
    assert task["command"][-3:] == [f"echo '{HOSTILE}' \"$$\" $$", "dptr-task", HOSTILE]
    assert _env(task)["DPTR_FIELD_myValue"] == HOSTILE
    assert json.loads(_env(task)["DPTR_FIELDS_JSON"]) == {"myValue": [HOSTILE]}
    assert _secret_placeholders(job) == []


def test_script_uri_and_staged_paths_reach_their_containers_exactly() -> None:
    runner = _runner(
        credentials={"mode": "Secret", "secretRef": {"name": "dp-keys"}},
        jobTemplate={"image": "img", "env": [{"name": "TEMPLATE_REF", "value": "$(DPTR_ATTEMPT_ID)"}]},
    )
    obj = set_attempt_fields(
        task_object(),
        [
            {"key": "type", "stringValue": "ShellCommandActivity"},
            {"key": "scriptUri", "stringValue": f"s3://scripts/{HOSTILE}"},
            {"key": "stage", "stringValue": "true"},
            {"key": "input", "refValue": "In"},
        ],
    )
    obj["objects"]["In"] = {
        "id": "In",
        "name": "In",
        "fields": [
            {"key": "type", "stringValue": "S3DataNode"},
            {"key": "filePath", "stringValue": f"s3://data/{HOSTILE}"},
        ],
    }
    job = _render(parse_task(obj), runner)
    containers = _containers(job)
    assert _env(containers["dptr-fetch-script"])["DPTR_SCRIPT_URI"] == f"s3://scripts/{HOSTILE}"
    for name in ("dptr-stage-in", SIDECAR_CONTAINER):
        plan = json.loads(_env(containers[name])["DPTR_STAGING_PLAN"])
        assert plan["nodes"][0]["uri"] == f"s3://data/{HOSTILE}", name
    # The TaskRunner author's own template env keeps kubelet's expansion (documented).
    raw_task = next(c for c in _pod(job)["containers"] if c["name"] == TASK_CONTAINER)
    assert {"name": "TEMPLATE_REF", "value": "$(DPTR_ATTEMPT_ID)"} in raw_task["env"]
    assert _secret_placeholders(job) == []


def test_credentials_come_last_in_every_container() -> None:
    runner = _runner(
        credentials={"mode": "Secret", "secretRef": {"name": "dp-keys"}}, passDataPipelineCredentials=True
    )
    pod = _pod(_render(_hostile_task(), runner, sidecar_env={"DPTR_X": "1"}))
    for container in pod["initContainers"] + pod["containers"]:
        names = [e["name"] for e in container["env"]]
        assert names[-2:] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"], (container["name"], names)


def _staged_script_task() -> Task:
    obj = set_attempt_fields(
        task_object(),
        [
            {"key": "type", "stringValue": "ShellCommandActivity"},
            {"key": "scriptUri", "stringValue": "s3://scripts/run.sh"},
            {"key": "stage", "stringValue": "true"},
            {"key": "input", "refValue": "In"},
        ],
    )
    obj["objects"]["In"] = {
        "id": "In",
        "name": "In",
        "fields": [
            {"key": "type", "stringValue": "S3DataNode"},
            {"key": "filePath", "stringValue": "s3://data/in.csv"},
        ],
    }
    return parse_task(obj)


def test_scheduling_priority_and_pull_secrets_reach_the_pod() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}
                ]
            }
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {naming.LABEL_TASK_RUNNER: "etl"}},
                    },
                }
            ]
        },
    }
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {naming.LABEL_TASK_RUNNER: "etl"}},
        }
    ]
    runner = _runner(
        jobTemplate={
            "image": "registry.example.com/etl/base:1.0",
            "affinity": affinity,
            "topologySpreadConstraints": spread,
            "priorityClassName": "batch-low",
            "imagePullSecrets": [{"name": "regcred"}, {"name": "mirror-cred"}],
        }
    )
    job = _render(_staged_script_task(), runner)
    pod = _pod(job)
    assert pod["affinity"] == affinity
    assert pod["topologySpreadConstraints"] == spread
    assert pod["priorityClassName"] == "batch-low"
    # Pod-wide: the task's image and dptr's own are pulled with them.
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-cred"}]
    # The spread and anti-affinity select on labels the task pods really carry.
    assert job["spec"]["template"]["metadata"]["labels"][naming.LABEL_TASK_RUNNER] == "etl"
    # Copies, not the model's own dicts: a later edit of the pod leaves the runner alone.
    pod["affinity"]["nodeAffinity"].clear()
    assert runner.spec.job_template.affinity == affinity
    assert_restricted(pod)
    # Unset, none of them is in the pod (the pods' ServiceAccount may still add pull secrets).
    plain = _pod(_render(_staged_script_task()))
    assert not {"affinity", "topologySpreadConstraints", "priorityClassName", "imagePullSecrets"} & set(plain)


def test_the_new_template_fields_are_checked_like_the_crd_does() -> None:
    from pydantic import ValidationError

    for bad in (
        {"priorityClassName": ""},
        {"priorityClassName": "Not_A_Name"},
        {"imagePullSecrets": [{"name": ""}]},
        {"imagePullSecrets": ["regcred"]},
        {"affinity": []},
        {"topologySpreadConstraints": {"maxSkew": 1}},
    ):
        with pytest.raises(ValidationError):
            _runner(jobTemplate={"image": "x", **bad})


def test_dptrs_containers_get_the_operators_sidecar_resources() -> None:
    default = _containers(_render(_staged_script_task()))
    for name in (SIDECAR_CONTAINER, "dptr-fetch-script", "dptr-stage-in"):
        assert default[name]["resources"] == {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        }, name
    given = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    runner = _runner(
        jobTemplate={"image": "registry.example.com/etl/base:1.0", "resources": {"limits": {"memory": "2Gi"}}}
    )
    job = _render(_staged_script_task(), runner, sidecar_resources=given)
    containers = _containers(job)
    for name in (SIDECAR_CONTAINER, "dptr-fetch-script", "dptr-stage-in"):
        assert containers[name]["resources"] == given, name
    # The task's own are the template's, never the sidecar's.
    assert containers[TASK_CONTAINER]["resources"] == {"limits": {"memory": "2Gi"}}
    # One dict per container: editing one leaves the others (and the argument) alone.
    pod = _pod(job)
    pod["initContainers"][0]["resources"]["requests"]["cpu"] = "1"
    assert given["requests"]["cpu"] == "50m"
    assert pod["initContainers"][1]["resources"]["requests"]["cpu"] == "50m"
    # An Exists check runs the sidecar's program in the task container: the same resources.
    exists = set_attempt_fields(
        task_object(),
        [
            {"key": "type", "stringValue": "Exists"},
            {"key": "preconditionTimeout", "stringValue": "1 hours"},
            {"key": "node", "refValue": "In"},
        ],
    )
    exists["objects"]["In"] = {
        "id": "In",
        "name": "In",
        "fields": [
            {"key": "type", "stringValue": "S3DataNode"},
            {"key": "filePath", "stringValue": "s3://data/in.csv"},
        ],
    }
    check = _containers(_render(parse_task(exists), sidecar_resources=given))[TASK_CONTAINER]
    assert check["command"] == ["dptr-sidecar", "check-exists"]
    assert check["resources"] == given
