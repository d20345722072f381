"""render_staging: the pod layout for staging and S3 logs (pure, no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubelet_view import seen

from dptr_common.errors import TaskError
from dptr_common.models import TaskRunner
from dptr_common.render import (
    FETCH_CONTAINER,
    SIDECAR_CONTAINER,
    TASK_CONTAINER,
    TOKEN_VOLUME,
    render_base_job,
    render_job,
)
from dptr_common.render_staging import (
    LOG_DIR,
    STAGE_IN_CONTAINER,
    TEE_WRAPPER,
    render_staging,
)
from dptr_common.staging_plan import STAGING_ROOT, StagingPlan, plan_staging, substitute_staging_references
from dptr_common.task import PipelineObject, Task, TaskField
from dptr_sidecar.logs import LogTargets

PIPELINE_ID = "df-0123456789ABCDEFGHIJ"
ATTEMPT_ID = "@Transform_2024-05-01T00:00:00_Attempt=1"
INSTANCE_ID = "@Transform_2024-05-01T00:00:00"


def _runner(**spec: Any) -> TaskRunner:
    base: dict[str, Any] = {
        "workerGroup": "wg",
        "region": "us-east-1",
        "endpointUrl": "http://dp.example:8080",
        "s3EndpointUrl": "http://s3.example:9000",
        "credentials": {"mode": "Secret", "secretRef": {"name": "aws"}},
        "jobTemplate": {"image": "registry.example.com/etl:1"},
    }
    base.update(spec)
    return TaskRunner.from_k8s(
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": "etl", "namespace": "data", "uid": "u-1", "generation": 1},
            "spec": base,
        }
    )


def _node(node_id: str, **fields: str) -> PipelineObject:
    return PipelineObject(
        id=node_id, name=node_id, fields=tuple(TaskField(key=k, string_value=v) for k, v in fields.items())
    )


def _task(*, objects: dict[str, PipelineObject] | None = None, **extra: Any) -> Task:
    fields = [
        TaskField(key="type", string_value="ShellCommandActivity"),
        TaskField(key="@componentParent", ref_value="Transform"),
        TaskField(key="@instanceParent", ref_value=INSTANCE_ID),
    ]
    for key, value in extra.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                fields.append(TaskField(key=key, ref_value=item["ref"]))
            else:
                fields.append(TaskField(key=key, string_value=item))
    if objects is None:
        objects = {
            "In": _node("In", type="S3DataNode", filePath="s3://data/in/input.csv"),
            "Out": _node("Out", type="S3DataNode", directoryPath="s3://data/out/2024-05-01"),
        }
    return Task.from_fields(
        task_id="t-1", pipeline_id=PIPELINE_ID, attempt_id=ATTEMPT_ID, fields=fields, objects=objects
    )


def _staged_task(**extra: Any) -> Task:
    args = {
        "command": 'tr a-z A-Z < "${INPUT1_STAGING_DIR}/input.csv" > "$OUTPUT1_STAGING_DIR/out.csv"',
        "stage": "true",
        "input": {"ref": "In"},
        "output": {"ref": "Out"},
    }
    args.update(extra)
    return _task(**args)


def _render(task: Task, runner: TaskRunner | None = None) -> dict[str, Any]:
    """The product path: render_job renders the whole Job, staging included."""
    runner = runner or _runner()
    return render_job(
        task,
        runner,
        sidecar_image="ghcr.io/dptr/sidecar:1",
        namespace="data",
        owner={"metadata": {"name": "pt-1", "uid": "uid-1"}},
    )


def test_render_job_is_render_staging_over_the_base_job() -> None:
    task = _staged_task(stdout="s3://logs/out")
    runner = _runner()
    args: dict[str, Any] = {
        "sidecar_image": "ghcr.io/dptr/sidecar:1",
        "namespace": "data",
        "owner": {"metadata": {"name": "pt-1", "uid": "uid-1"}},
    }
    job = render_job(task, runner, **args)
    staged = render_staging(render_base_job(task, runner, **args), task, runner)
    # ... with the grace the uploads need on top.
    pod = staged["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    pod["terminationGracePeriodSeconds"] = 330
    assert job == staged


def test_the_grace_covers_the_uploads_or_is_the_task_runners() -> None:
    args: dict[str, Any] = {
        "sidecar_image": "i",
        "namespace": "data",
        "owner": {"metadata": {"name": "p", "uid": "u"}},
    }
    grace = lambda job: job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]  # noqa: E731
    assert grace(render_job(_task(command="true"), _runner(), **args)) == 30
    assert grace(render_job(_staged_task(), _runner(), **args)) == 330
    assert grace(render_job(_task(command="true", stdout="s3://l/o"), _runner(), **args)) == 330
    own = _runner(jobTemplate={"image": "x", "terminationGracePeriodSeconds": 900})
    assert grace(render_job(_staged_task(), own, **args)) == 900


def test_sidecar_env_reaches_every_init_container_of_ours_but_not_the_task() -> None:
    task = _staged_task(scriptUri="s3://b/run.sh", command="")
    job = render_job(
        task,
        _runner(),
        sidecar_image="img",
        namespace="data",
        owner={"metadata": {"name": "p", "uid": "u"}},
        sidecar_env={"DPTR_TIME_SCALE": "0.01"},
    )
    containers = _containers(job)
    for name in (SIDECAR_CONTAINER, FETCH_CONTAINER, STAGE_IN_CONTAINER):
        assert _env(containers[name])["DPTR_TIME_SCALE"] == "0.01", name
    assert "DPTR_TIME_SCALE" not in _env(containers[TASK_CONTAINER])


def _containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each container as its process sees it, after kubelet's $(VAR) expansion."""
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: seen(c) for c in pod["initContainers"] + pod["containers"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def test_nothing_asked_nothing_changed() -> None:
    task = _task(command="echo hi")
    runner = _runner()
    job = render_base_job(
        task, runner, sidecar_image="img", namespace="data", owner={"metadata": {"name": "p", "uid": "u"}}
    )
    assert render_staging(job, task, runner) == job
    assert (
        render_job(
            task, runner, sidecar_image="img", namespace="data", owner={"metadata": {"name": "p", "uid": "u"}}
        )
        == job
    )


def test_stage_false_means_no_staging_even_with_data_nodes() -> None:
    job = _render(_staged_task(stage="false"))
    assert STAGE_IN_CONTAINER not in _containers(job)


def test_staging_adds_an_init_container_after_the_sidecar_and_the_script_fetcher() -> None:
    task = _staged_task(command=None, scriptUri="s3://scripts/run.sh")
    pod = _render(task)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == [
        SIDECAR_CONTAINER,
        FETCH_CONTAINER,
        STAGE_IN_CONTAINER,
    ]
    stage_in = seen(pod["initContainers"][2])
    assert stage_in["command"] == ["dptr-sidecar", "stage-in"]
    assert stage_in["image"] == "ghcr.io/dptr/sidecar:1"
    env = _env(stage_in)
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3.example:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "aws", "key": "AWS_ACCESS_KEY_ID"}}
    # Both data nodes came with the task: no Data Pipeline endpoint needed.
    assert "DPTR_ENDPOINT_URL" not in env
    plan = StagingPlan.from_json(env["DPTR_STAGING_PLAN"])
    assert [(n.env_name, n.uri, n.kind) for n in plan.nodes] == [
        ("INPUT1_STAGING_DIR", "s3://data/in/input.csv", "file"),
        ("OUTPUT1_STAGING_DIR", "s3://data/out/2024-05-01", "directory"),
    ]
    assert stage_in["securityContext"]["runAsNonRoot"] is True
    assert stage_in["securityContext"]["allowPrivilegeEscalation"] is False
    assert _mounts(stage_in)["dptr-staging"]["readOnly"] is False
    assert TOKEN_VOLUME not in _mounts(stage_in)


def test_task_container_gets_staging_dirs_but_no_credentials_or_token() -> None:
    containers = _containers(_render(_staged_task()))
    task = containers[TASK_CONTAINER]
    env = _env(task)
    assert env["INPUT1_STAGING_DIR"] == f"{STAGING_ROOT}/input1"
    assert env["OUTPUT1_STAGING_DIR"] == f"{STAGING_ROOT}/output1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DPTR_STAGING_PLAN"} & env.keys()
    assert TOKEN_VOLUME not in _mounts(task)
    assert _mounts(task)["dptr-staging"]["readOnly"] is False
    sidecar = containers[SIDECAR_CONTAINER]
    assert _mounts(sidecar)["dptr-staging"]["readOnly"] is True
    assert "DPTR_STAGING_PLAN" in _env(sidecar)
    # The resolved plan travels from stage-in to the sidecar where the task cannot write.
    assert "dptr-plan" not in _mounts(task)
    assert _mounts(sidecar)["dptr-plan"]["readOnly"] is True
    assert _mounts(containers[STAGE_IN_CONTAINER])["dptr-plan"]["readOnly"] is False
    assert _env(sidecar)["DPTR_PLAN_DIR"] == _env(containers[STAGE_IN_CONTAINER])["DPTR_PLAN_DIR"]


def test_unresolved_data_node_gives_stage_in_the_data_pipeline_endpoint() -> None:
    stage_in = _containers(_render(_staged_task().model_copy(update={"objects": {}})))[STAGE_IN_CONTAINER]
    env = _env(stage_in)
    assert env["DPTR_ENDPOINT_URL"] == "http://dp.example:8080"
    assert StagingPlan.from_json(env["DPTR_STAGING_PLAN"]).unresolved == ["In", "Out"]


def test_script_arguments_get_staging_references_substituted_and_nothing_else() -> None:
    args = [
        "${INPUT1_STAGING_DIR}/a b.csv",
        "$OUTPUT1_STAGING_DIR",
        'it\'s "quoted" $HOME ${INPUT9_STAGING_DIR}',
    ]
    task = _staged_task(command=None, scriptUri="s3://scripts/run.sh", scriptArgument=args)
    command = _containers(_render(task))[TASK_CONTAINER]["command"]
    assert command[-3:] == [
        f"{STAGING_ROOT}/input1/a b.csv",
        f"{STAGING_ROOT}/output1",
        'it\'s "quoted" $HOME ${INPUT9_STAGING_DIR}',
    ]


def test_non_s3_data_nodes_keep_their_number_but_are_not_staged() -> None:
    objects = {
        "Sql": _node("Sql", type="SqlDataNode", table="t"),
        "In": _node("In", type="S3DataNode", directoryPath="s3://data/in"),
    }
    task = _task(stage="true", command="true", input=[{"ref": "Sql"}, {"ref": "In"}], objects=objects)
    plan = plan_staging(task)
    assert plan is not None
    assert plan.env() == {"INPUT2_STAGING_DIR": f"{STAGING_ROOT}/input2"}


@pytest.mark.parametrize(
    ("fields", "error_id"),
    [
        ({"type": "S3DataNode"}, "dptr.StagingFailed.BadDataNode"),
        (
            {"type": "S3DataNode", "filePath": "s3://a/b", "directoryPath": "s3://a/c"},
            "dptr.StagingFailed.BadDataNode",
        ),
        ({"type": "S3DataNode", "directoryPath": "/local/dir"}, "dptr.StagingFailed.BadDataNode"),
        ({"type": "S3DataNode", "manifestFilePath": "s3://a/m"}, "dptr.StagingFailed.ManifestNotSupported"),
        (
            {"type": "S3DataNode", "directoryPath": "s3://a/#{format(@scheduledStartTime,'YYYY')}"},
            "dptr.StagingFailed.UnevaluatedExpression",
        ),
    ],
)
def test_unstageable_data_nodes_fail_before_anything_is_created(
    fields: dict[str, str], error_id: str
) -> None:
    task = _task(stage="true", command="true", input={"ref": "In"}, objects={"In": _node("In", **fields)})
    with pytest.raises(TaskError) as caught:
        _render(task)
    assert caught.value.error_id == error_id


def test_log_capture_wraps_the_command_and_tells_the_sidecar_where_logs_go() -> None:
    task = _task(
        command="echo hi",
        scriptArgument=["a b"],
        stdout="s3://logs/out.txt",
        stderr="s3://logs/err.txt",
        pipelineLogUri="s3://logs/pipeline/",
    )
    containers = _containers(_render(task))
    main = containers[TASK_CONTAINER]
    assert main["command"][:4] == ["/bin/sh", "-c", TEE_WRAPPER, "dptr-capture"]
    assert main["command"][4:] == ["/bin/sh", "-c", "echo hi", "dptr-task", "a b"]
    assert _mounts(main)["dptr-logs"] == {"name": "dptr-logs", "mountPath": LOG_DIR, "readOnly": False}
    sidecar = containers[SIDECAR_CONTAINER]
    assert _mounts(sidecar)["dptr-logs"]["readOnly"] is True
    targets = LogTargets.from_env({k: v for k, v in _env(sidecar).items() if isinstance(v, str)})
    assert targets == LogTargets(
        pipeline_id=PIPELINE_ID,
        attempt_id=ATTEMPT_ID,
        component_id="Transform",
        instance_id=INSTANCE_ID,
        pipeline_log_uri="s3://logs/pipeline/",
        stdout_uri="s3://logs/out.txt",
        stderr_uri="s3://logs/err.txt",
    )
    assert (
        str(targets.attempt_prefix())
        == f"s3://logs/pipeline/{PIPELINE_ID}/Transform/{INSTANCE_ID}/{ATTEMPT_ID}/"
    )


def test_render_staging_does_not_modify_its_input() -> None:
    task = _staged_task(stdout="s3://logs/out")
    runner = _runner()
    job = render_base_job(
        task, runner, sidecar_image="i", namespace="d", owner={"metadata": {"name": "p", "uid": "u"}}
    )
    before = json.dumps(job, sort_keys=True)
    render_staging(job, task, runner)
    assert json.dumps(job, sort_keys=True) == before


def test_substitution_leaves_unknown_names_and_other_variables() -> None:
    env = {"INPUT1_STAGING_DIR": "/s/in1"}
    assert substitute_staging_references(
        "${INPUT1_STAGING_DIR}x $INPUT1_STAGING_DIRx $INPUT1_STAGING_DIR", env
    ) == ("/s/in1x $INPUT1_STAGING_DIRx /s/in1")
