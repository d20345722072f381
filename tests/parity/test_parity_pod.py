"""Scripts, staging and logs through the real code paths: the local Data Pipeline service
hands out the task, render_job builds the pod (staging included), the pod's containers run
as local processes (parity_helpers.run_pod_locally) against moto's S3, and the sidecar's
after-exit step (finish_task_io) uploads outputs and logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from parity_helpers import ParityS3, run_pod_locally

from dptr_common.datapipeline import DataPipelineClient, StaticCredentials
from dptr_common.errors import TaskError
from dptr_common.models import TaskRunner
from dptr_common.render import render_job
from dptr_common.staging_plan import plan_staging
from dptr_common.task import Task, parse_task
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_sidecar.logs import finish_task_io
from dptr_sidecar.staging import outcome_for_init_failure, resolve_plan, stage_in

SECRETS = {"AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_ACCESS_KEY}

SCRIPT = b"""#!/bin/sh
i=0
for a in "$@"; do i=$((i+1)); printf '%s:<%s>\\n' "$i" "$a"; done
echo "script stderr" >&2
"""

TRICKY_ARGS = ["two words", "it's", 'say "hi"', "$HOME `id` $(id)", "", "  lead and trail  ", "*"]


def _runner(dp: LocalDataPipeline, s3_endpoint: str) -> TaskRunner:
    return TaskRunner.from_k8s(
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": "etl", "namespace": "data", "uid": "u-1", "generation": 1},
            "spec": {
                "workerGroup": "wg-parity",
                "region": "us-east-1",
                "endpointUrl": dp.endpoint_url,
                "s3EndpointUrl": s3_endpoint,
                "credentials": {"mode": "Secret", "secretRef": {"name": "aws"}},
                "jobTemplate": {"image": "registry.example.com/etl:1"},
            },
        }
    )


def _poll(dp: LocalDataPipeline, objects: dict[str, Any]) -> tuple[Task, str]:
    dp.run_pipeline(objects, worker_group="wg-parity")
    client = dp.client()
    response = client.poll_for_task(workerGroup="wg-parity", hostname="parity-test")
    task_object = response["taskObject"]
    client.report_task_progress(taskId=task_object["taskId"])
    return parse_task(task_object), task_object["taskId"]


def _run(task: Task, dp: LocalDataPipeline, s3: ParityS3, tmp_path: Path) -> tuple[Any, Any]:
    job = render_job(
        task,
        _runner(dp, s3.endpoint),
        sidecar_image="sidecar:test",
        namespace="data",
        owner={"metadata": {"name": "pt", "uid": "u"}},
    )
    pod = run_pod_locally(job, tmp_path / "pod", s3.env, SECRETS)
    result = None
    if pod.task_exit is not None:
        result = finish_task_io(pod.sidecar_env, exit_code=pod.task_exit)
    return pod, result


@pytest.fixture
def dp() -> Any:
    svc = LocalDataPipeline(time_scale=1.0, quotas=False)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_script_uri_runs_with_arguments_exactly_as_given_in_order(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    parity_s3.put("scripts/echo args.sh", SCRIPT)
    task, _ = _poll(
        dp,
        {
            "Default": {"pipelineLogUri": parity_s3.uri("logs")},
            "Script": {
                "type": "ShellCommandActivity",
                "scriptUri": parity_s3.uri("scripts/echo args.sh"),
                "scriptArgument": TRICKY_ARGS,
            },
        },
    )
    assert task.script_arguments == tuple(TRICKY_ARGS)
    pod, result = _run(task, dp, parity_s3, tmp_path)
    assert pod.init_exit == {"dptr-fetch-script": 0}
    expected = "".join(f"{i}:<{a}>\n" for i, a in enumerate(TRICKY_ARGS, start=1)).encode()
    assert pod.task_exit == 0
    assert pod.task_stdout == expected  # tee'd through to the container's own stdout
    assert pod.task_stderr == b"script stderr\n"
    assert result.error is None and result.problems == []
    prefix = f"logs/{task.pipeline_id}/Script/{task.instance_id}/{task.attempt_id}/"
    assert parity_s3.read_gzip(prefix + "StdOutput.gz") == expected
    assert parity_s3.read_gzip(prefix + "StdError.gz") == b"script stderr\n"


def test_missing_script_fails_the_fetch_with_a_clear_error_id(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    task, _ = _poll(dp, {"Script": {"type": "ShellCommandActivity", "scriptUri": parity_s3.uri("nope.sh")}})
    pod, _ = _run(task, dp, parity_s3, tmp_path)
    assert pod.init_exit == {"dptr-fetch-script": 1}
    outcome = outcome_for_init_failure(
        "dptr-fetch-script", {"exitCode": 1, "message": pod.termination_messages["dptr-fetch-script"]}
    )
    assert (outcome.status, outcome.error_id) == ("FAILED", "dptr.ScriptFetchFailed.NoSuchKey")
    assert "nope.sh" in (outcome.error_message or "")


def _staged_pipeline(bucket: str, command: str, **activity: Any) -> dict[str, Any]:
    return {
        "Default": {"pipelineLogUri": f"s3://{bucket}/pipeline-logs/"},
        "Transform": {
            "type": "ShellCommandActivity",
            "command": command,
            "stage": "true",
            "input": {"ref": "In"},
            "output": {"ref": "Out"},
            "stdout": f"s3://{bucket}/activity/stdout.txt",
            "stderr": f"s3://{bucket}/activity/stderr.txt",
            **activity,
        },
        "In": {"type": "S3DataNode", "filePath": f"s3://{bucket}/input/data.bin"},
        "Out": {
            "type": "S3DataNode",
            "directoryPath": f"s3://{bucket}/output/#{{myRunDate}}",
            "myRunDate": "2024-05-01",
        },
    }


TRANSFORM = (
    'tr a-z A-Z < "${INPUT1_STAGING_DIR}/data.bin" > "$OUTPUT1_STAGING_DIR/upper.bin"; '
    'mkdir -p "$OUTPUT1_STAGING_DIR/nested" && printf "\\000\\377" > "$OUTPUT1_STAGING_DIR/nested/raw"; '
    'echo "transformed $(wc -c < "${INPUT1_STAGING_DIR}/data.bin") bytes"; echo "a warning" >&2'
)


def test_staged_input_transform_staged_output_byte_for_byte(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    data = b"hello, staging\n" * 1000 + bytes(range(256))
    parity_s3.put("input/data.bin", data)
    task, _ = _poll(dp, _staged_pipeline(parity_s3.bucket, TRANSFORM))
    pod, result = _run(task, dp, parity_s3, tmp_path)
    assert pod.init_exit == {"dptr-stage-in": 0}
    assert pod.task_exit == 0, pod.task_stderr
    assert result.error is None and result.problems == []
    out = "output/2024-05-01/"
    assert parity_s3.keys(out) == [out + "nested/raw", out + "upper.bin"]
    upper = bytes(data).translate(
        bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    )
    assert parity_s3.read(out + "upper.bin") == upper
    assert parity_s3.read(out + "nested/raw") == b"\x00\xff"
    # stdout/stderr where the activity says, and under pipelineLogUri with the runner's names.
    stdout = f"transformed {len(data)} bytes\n".encode()
    assert parity_s3.read("activity/stdout.txt") == stdout
    assert parity_s3.read("activity/stderr.txt") == b"a warning\n"
    prefix = f"pipeline-logs/{task.pipeline_id}/Transform/{task.instance_id}/{task.attempt_id}/"
    assert parity_s3.keys("pipeline-logs/") == [
        prefix + "Activity.log.gz",
        prefix + "StdError.gz",
        prefix + "StdOutput.gz",
    ]
    assert parity_s3.read_gzip(prefix + "StdOutput.gz") == stdout
    assert b"upper.bin" in parity_s3.read_gzip(prefix + "Activity.log.gz")


def test_failed_command_uploads_logs_but_no_outputs(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    parity_s3.put("input/data.bin", b"x")
    command = 'echo partial > "$OUTPUT1_STAGING_DIR/partial"; echo out; echo "it broke" >&2; exit 3'
    task, _ = _poll(dp, _staged_pipeline(parity_s3.bucket, command))
    pod, result = _run(task, dp, parity_s3, tmp_path)
    assert pod.task_exit == 3
    assert result.error is None and result.problems == []
    assert parity_s3.keys("output/") == []
    assert parity_s3.read("activity/stdout.txt") == b"out\n"
    assert parity_s3.read("activity/stderr.txt") == b"it broke\n"
    prefix = f"pipeline-logs/{task.pipeline_id}/Transform/{task.instance_id}/{task.attempt_id}/"
    assert parity_s3.read_gzip(prefix + "StdError.gz") == b"it broke\n"
    assert b"exited with code 3" in parity_s3.read_gzip(prefix + "Activity.log.gz")


def test_missing_input_object_fails_stage_in_with_no_such_key(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    task, _ = _poll(dp, _staged_pipeline(parity_s3.bucket, "true"))
    pod, result = _run(task, dp, parity_s3, tmp_path)
    assert pod.init_exit == {"dptr-stage-in": 1}
    assert pod.task_exit is None and result is None  # the task container never ran
    message = pod.termination_messages["dptr-stage-in"]
    outcome = outcome_for_init_failure("dptr-stage-in", {"exitCode": 1, "message": message})
    assert (outcome.status, outcome.error_id) == ("FAILED", "dptr.StagingFailed.NoSuchKey")
    assert parity_s3.uri("input/data.bin") in (outcome.error_message or "")


def test_log_upload_failure_is_reported_not_raised(
    dp: LocalDataPipeline, parity_s3: ParityS3, tmp_path: Path
) -> None:
    task, _ = _poll(
        dp,
        {
            "Echo": {
                "type": "ShellCommandActivity",
                "command": "echo fine",
                "stdout": "s3://no-such-bucket-parity/stdout",
                # A local path the task container cannot write: reported, never silent.
                "stderr": "/nonexistent-dptr-dir/stderr.log",
            }
        },
    )
    pod, result = _run(task, dp, parity_s3, tmp_path)
    assert pod.task_exit == 0
    assert result.error is None
    assert len(result.problems) == 2
    assert any("NoSuchBucket" in p for p in result.problems), result.problems
    assert any(
        "stderr was not written to the local path '/nonexistent-dptr-dir/stderr.log'" in p
        for p in result.problems
    ), result.problems


def test_data_nodes_missing_from_the_task_are_resolved_with_describe_objects(
    dp: LocalDataPipeline, s3: Any, parity_s3: ParityS3, tmp_path: Path
) -> None:
    parity_s3.put("input/data.bin", b"abc")
    task, _ = _poll(dp, _staged_pipeline(parity_s3.bucket, "true"))
    bare = task.model_copy(update={"objects": {}})
    plan = plan_staging(bare, root=str(tmp_path / "staging"))
    assert plan is not None and plan.unresolved == ["In", "Out"]
    before = (
        len([c for c in dp.ledger.calls if c["operation"] == "DescribeObjects"])
        if isinstance(dp.ledger.calls[0], dict)
        else None
    )
    client = DataPipelineClient(
        "us-east-1", dp.endpoint_url, StaticCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY)
    )
    with client:
        resolved = resolve_plan(plan, client)
    assert [(n.ref, n.uri) for n in resolved.nodes] == [
        ("In", parity_s3.uri("input/data.bin")),
        ("Out", parity_s3.uri("output/2024-05-01")),  # expression evaluated by the service
    ]
    if before is not None:
        after = len([c for c in dp.ledger.calls if c["operation"] == "DescribeObjects"])
        assert after - before == 1
    env = stage_in(resolved, s3)
    assert (Path(env["INPUT1_STAGING_DIR"]) / "data.bin").read_bytes() == b"abc"
    assert Path(env["OUTPUT1_STAGING_DIR"]).is_dir()


def test_unknown_data_node_in_describe_objects_is_a_clear_error(
    dp: LocalDataPipeline, parity_s3: ParityS3
) -> None:
    task, _ = _poll(dp, _staged_pipeline(parity_s3.bucket, "true"))
    plan = plan_staging(task.model_copy(update={"objects": {}}))
    assert plan is not None
    plan = type(plan)(
        plan.pipeline_id,
        tuple(n if n.ref != "In" else type(n)(**{**n.__dict__, "ref": "Gone"}) for n in plan.nodes),
    )
    client = DataPipelineClient(
        "us-east-1", dp.endpoint_url, StaticCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY)
    )
    with client, pytest.raises(TaskError) as caught:
        resolve_plan(plan, client)
    assert caught.value.error_id == "dptr.StagingFailed.DataNodeNotFound"
