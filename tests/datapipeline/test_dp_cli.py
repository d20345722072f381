"""The real AWS CLI against the service, and the dptr-datapipeline executable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dp_helpers import DEVELOPER_GUIDE_DEFINITION, AwsCli, field

from dptr_datapipeline import LocalDataPipeline

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def svc() -> Iterator[LocalDataPipeline]:
    """The service at 1/10 time here, not the suite's 1/100: an `aws` command between the
    poll and its first report takes longer than the 1.2 s ack window on a loaded machine
    (a CI run saw `canceled: true`); at 1/10 the window is 12 s."""
    with LocalDataPipeline(time_scale=0.1, quotas=False) as service:
        yield service


def test_cli_pipeline_lifecycle_with_a_definition_file(
    svc: LocalDataPipeline, aws: AwsCli, tmp_path: Path
) -> None:
    definition = tmp_path / "pipeline.json"
    definition.write_text(json.dumps(DEVELOPER_GUIDE_DEFINITION))
    _, created, _ = aws("create-pipeline", "--name", "guide", "--unique-id", "guide-1")
    pipeline_id = created["pipelineId"]
    _, put, _ = aws(
        "put-pipeline-definition",
        "--pipeline-id",
        pipeline_id,
        "--pipeline-definition",
        f"file://{definition}",
    )
    assert put["errored"] is False
    _, got, _ = aws("get-pipeline-definition", "--pipeline-id", pipeline_id)
    # The CLI translates back to the definition-file format.
    assert {o["id"] for o in got["objects"]} == {"Default", "CreateDirectory"}
    aws("activate-pipeline", "--pipeline-id", pipeline_id)
    _, listed, _ = aws("list-pipelines")
    assert {"id": pipeline_id, "name": "guide"} in listed["pipelineIdList"]
    _, described, _ = aws("describe-pipelines", "--pipeline-ids", pipeline_id)
    assert field(described["pipelineDescriptionList"][0], "@pipelineState") == "SCHEDULED"

    _, polled, _ = aws("poll-for-task", "--worker-group", "myWorkerGroup", "--hostname", "cli-host")
    task = polled["taskObject"]
    assert field(task["objects"][task["attemptId"]], "command") == "mkdir new-directory"
    _, progress, _ = aws("report-task-progress", "--task-id", task["taskId"])
    assert progress == {"canceled": False}
    _, instances, _ = aws("query-objects", "--pipeline-id", pipeline_id, "--sphere", "INSTANCE")
    _, objects, _ = aws("describe-objects", "--pipeline-id", pipeline_id, "--object-ids", *instances["ids"])
    assert field(objects["pipelineObjects"][0], "@status") == "RUNNING"
    aws("set-task-status", "--task-id", task["taskId"], "--task-status", "FINISHED")
    svc.assert_clean()

    _, heartbeat, _ = aws(
        "report-task-runner-heartbeat", "--taskrunner-id", "cli-runner", "--worker-group", "wg"
    )
    assert heartbeat == {"terminate": False}
    aws("add-tags", "--pipeline-id", pipeline_id, "--tags", "key=team,value=data")
    aws("deactivate-pipeline", "--pipeline-id", pipeline_id)
    aws("delete-pipeline", "--pipeline-id", pipeline_id)
    rc, _, err = aws("describe-pipelines", "--pipeline-ids", pipeline_id, check=False)
    assert rc != 0 and "PipelineDeletedException" in err


def test_cli_validation_errors_surface_as_failures(svc: LocalDataPipeline, aws: AwsCli) -> None:
    svc.run_pipeline({"E": {"type": "ShellCommandActivity", "command": "x"}}, worker_group="wg-cli")
    _, polled, _ = aws("poll-for-task", "--worker-group", "wg-cli")
    task_id = polled["taskObject"]["taskId"]
    rc, _, err = aws(
        "set-task-status",
        "--task-id",
        task_id,
        "--task-status",
        "FAILED",
        "--error-stack-trace",
        "y" * 2000,
        check=False,
    )
    assert rc != 0
    assert "InvalidRequestException" in err and "errorStackTrace" in err
    rc, _, err = aws("report-task-progress", "--task-id", "nope", check=False)
    assert rc != 0 and "TaskNotFoundException" in err


def test_served_executable_with_the_aws_executable(tmp_path: Path) -> None:
    """`dptr-datapipeline serve` in its own process, driven by the `aws` executable."""
    state = tmp_path / "state.json"
    server = subprocess.Popen(
        [
            str(VENV_BIN / "dptr-datapipeline"),
            "serve",
            "--port",
            "0",
            "--time-scale",
            "0.01",
            "--no-quotas",
            "--state-file",
            str(state),
            "--access-key",
            "AKIDCLITEST:cli-secret",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line
        endpoint = line.rsplit(" ", 1)[1].strip()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "AKIDCLITEST",
            "AWS_SECRET_ACCESS_KEY": "cli-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

        def run(*args: str) -> Any:
            done = subprocess.run(
                [
                    str(VENV_BIN / "aws"),
                    "datapipeline",
                    *args,
                    "--endpoint-url",
                    endpoint,
                    "--output",
                    "json",
                ],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout) if done.stdout.strip() else None

        pipeline_id = run("create-pipeline", "--name", "exe", "--unique-id", "exe-1")["pipelineId"]
        assert json.loads(state.read_text())["pipelines"][0]["id"] == pipeline_id
        assert run("poll-for-task", "--worker-group", "idle") in (None, {})
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0
