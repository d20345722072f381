"""The pipeline half: definitions, activation, dependencies, preconditions, objects."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from dp_helpers import DEVELOPER_GUIDE_DEFINITION, field, status_of

from dptr_datapipeline import LocalDataPipeline, definition_file_to_api
from dptr_testbed.waiting import wait_for

SCALE = 0.01


def _create(dp: Any, name: str = "p") -> str:
    return str(dp.create_pipeline(name=name, uniqueId=f"{name}-{time.monotonic_ns()}")["pipelineId"])


def test_developer_guide_definition_loads_and_queues(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = _create(dp, "guide")
    result = dp.put_pipeline_definition(
        pipelineId=pipeline_id, **definition_file_to_api(DEVELOPER_GUIDE_DEFINITION)
    )
    assert result["errored"] is False
    dp.activate_pipeline(pipelineId=pipeline_id)
    task = dp.poll_for_task(workerGroup="myWorkerGroup")["taskObject"]
    attempt = task["objects"][task["attemptId"]]
    assert field(attempt, "command") == "mkdir new-directory"
    assert field(attempt, "role") == "DataPipelineDefaultRole"


def test_create_pipeline_is_idempotent_on_name_and_unique_id(dp: Any) -> None:
    first = dp.create_pipeline(
        name="same", uniqueId="token-1", description="d", tags=[{"key": "a", "value": "1"}]
    )
    again = dp.create_pipeline(name="same", uniqueId="token-1")
    other = dp.create_pipeline(name="same", uniqueId="token-2")
    assert first["pipelineId"] == again["pipelineId"] != other["pipelineId"]
    assert first["pipelineId"].startswith("df-")
    listed = dp.list_pipelines()["pipelineIdList"]
    assert {"id": first["pipelineId"], "name": "same"} in listed
    described = dp.describe_pipelines(pipelineIds=[first["pipelineId"]])["pipelineDescriptionList"][0]
    assert (described["description"], described["tags"]) == ("d", [{"key": "a", "value": "1"}])
    assert field(described, "@pipelineState") == "PENDING"


def test_validation_errors_for_unknown_refs_and_missing_command(dp: Any) -> None:
    pipeline_id = _create(dp)
    bad = definition_file_to_api(
        {
            "Default": {"workerGroup": "wg"},
            "NoCommand": {"type": "ShellCommandActivity"},
            "Dangling": {"type": "ShellCommandActivity", "command": "true", "dependsOn": {"ref": "Missing"}},
        }
    )
    checked = dp.validate_pipeline_definition(pipelineId=pipeline_id, **bad)
    errors = {e["id"]: " ".join(e["errors"]) for e in checked["validationErrors"]}
    assert checked["errored"] is True
    assert "command" in errors["NoCommand"] and "scriptUri" in errors["NoCommand"]
    assert "Missing" in errors["Dangling"]
    # Put stores it but activation is refused until it is fixed.
    assert dp.put_pipeline_definition(pipelineId=pipeline_id, **bad)["errored"] is True
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.activate_pipeline(pipelineId=pipeline_id)
    good = definition_file_to_api(
        {"Default": {"workerGroup": "wg"}, "Ok": {"type": "ShellCommandActivity", "command": "true"}}
    )
    checked = dp.validate_pipeline_definition(pipelineId=pipeline_id, **good)
    assert checked["errored"] is False and "validationErrors" not in checked
    assert dp.put_pipeline_definition(pipelineId=pipeline_id, **good)["errored"] is False
    dp.activate_pipeline(pipelineId=pipeline_id)


def test_get_pipeline_definition_round_trips_fields_and_parameters(dp: Any) -> None:
    pipeline_id = _create(dp)
    definition = definition_file_to_api(
        {
            "objects": [
                {"id": "Default", "workerGroup": "wg"},
                {
                    "id": "Run",
                    "type": "ShellCommandActivity",
                    "command": "#{myCmd}",
                    "scriptArgument": ["1", "2"],
                },
            ],
            "parameters": [{"id": "myCmd", "type": "String", "default": "echo default"}],
            "values": {"myCmd": "echo given"},
        }
    )
    dp.put_pipeline_definition(pipelineId=pipeline_id, **definition)
    got = dp.get_pipeline_definition(pipelineId=pipeline_id)
    assert got["pipelineObjects"] == definition["pipelineObjects"]
    assert got["parameterObjects"] == definition["parameterObjects"]
    assert got["parameterValues"] == [{"id": "myCmd", "stringValue": "echo given"}]
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.get_pipeline_definition(pipelineId=pipeline_id, version="active")
    dp.activate_pipeline(
        pipelineId=pipeline_id, parameterValues=[{"id": "myCmd", "stringValue": "echo at-activation"}]
    )
    assert dp.get_pipeline_definition(pipelineId=pipeline_id, version="active")["pipelineObjects"]
    task = dp.poll_for_task(workerGroup="wg")["taskObject"]
    # Activation values beat put values, which beat the default.
    assert field(task["objects"][task["attemptId"]], "command") == "echo at-activation"


def test_encrypted_parameters_and_a_parameterised_worker_group(dp: Any) -> None:
    """The guide's ``*myPassword`` parameters (``#{*myPassword}``) and a workerGroup given
    by a parameter, as docs/examples/copy-mysql-to-s3.json writes them."""
    pipeline_id = _create(dp)
    definition = definition_file_to_api(
        {
            "objects": [
                {"id": "Default", "workerGroup": "#{myWorkerGroup}"},
                {
                    "id": "Run",
                    "type": "ShellCommandActivity",
                    "command": "true",
                    "*password": "#{*myPassword}",
                },
            ],
            "parameters": [
                {"id": "*myPassword", "type": "String"},
                {"id": "myWorkerGroup", "type": "String"},
            ],
            "values": {"*myPassword": "pa55", "myWorkerGroup": "wg-from-param"},
        }
    )
    checked = dp.validate_pipeline_definition(pipelineId=pipeline_id, **definition)
    assert checked["errored"] is False, checked.get("validationErrors")
    dp.put_pipeline_definition(pipelineId=pipeline_id, **definition)
    dp.activate_pipeline(pipelineId=pipeline_id)
    task = dp.poll_for_task(workerGroup="wg-from-param")["taskObject"]
    assert field(task["objects"][task["attemptId"]], "*password") == "pa55"
    bad = definition_file_to_api({"objects": [{"id": "Default"}], "parameters": [{"id": "*password"}]})
    errors = dp.validate_pipeline_definition(pipelineId=pipeline_id, **bad)["validationErrors"]
    assert "must start with 'my'" in errors[0]["errors"][0]


def test_depends_on_orders_the_work(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {
            "First": {"type": "ShellCommandActivity", "command": "echo 1"},
            "Second": {"type": "ShellCommandActivity", "command": "echo 2", "dependsOn": {"ref": "First"}},
        },
        worker_group="wg-dep",
    )
    first = dp.poll_for_task(workerGroup="wg-dep")["taskObject"]
    assert first["attemptId"].startswith("@First_")
    second_instance = first["attemptId"].replace("@First_", "@Second_").removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, second_instance) == "WAITING_ON_DEPENDENCIES"
    waiting = dp.describe_objects(pipelineId=pipeline_id, objectIds=[second_instance])["pipelineObjects"][0]
    assert field(waiting, "@waitingOn") == first["attemptId"].removesuffix("_Attempt=1")
    dp.set_task_status(taskId=first["taskId"], taskStatus="FINISHED")
    second = dp.poll_for_task(workerGroup="wg-dep")["taskObject"]
    assert second["attemptId"].startswith("@Second_")


def test_failure_cascades_to_dependents(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {
            "First": {"type": "ShellCommandActivity", "command": "false", "maximumRetries": "0"},
            "Second": {"type": "ShellCommandActivity", "command": "echo 2", "dependsOn": {"ref": "First"}},
        },
        worker_group="wg-cascade",
    )
    first = dp.poll_for_task(workerGroup="wg-cascade")["taskObject"]
    dp.set_task_status(taskId=first["taskId"], taskStatus="FAILED", errorId="E")
    second_instance = first["attemptId"].replace("@First_", "@Second_").removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, second_instance) == "CASCADE_FAILED"
    health = dp.describe_pipelines(pipelineIds=[pipeline_id])["pipelineDescriptionList"][0]
    assert field(health, "@healthStatus") == "ERROR"

    # RERUN resets the failed instance and what cascaded from it.
    first_instance = first["attemptId"].removesuffix("_Attempt=1")
    dp.set_status(pipelineId=pipeline_id, objectIds=[first_instance], status="RERUN")
    assert status_of(dp, pipeline_id, second_instance) == "WAITING_ON_DEPENDENCIES"
    rerun = dp.poll_for_task(workerGroup="wg-cascade")["taskObject"]
    assert rerun["attemptId"] == first_instance + "_Attempt=2"
    dp.set_task_status(taskId=rerun["taskId"], taskStatus="FINISHED")
    assert dp.poll_for_task(workerGroup="wg-cascade")["taskObject"]["attemptId"].startswith("@Second_")


def _guarded(timeout: str | None = None) -> dict[str, Any]:
    check: dict[str, Any] = {
        "type": "ShellCommandPrecondition",
        "command": "test -f /tmp/x",
        "retryDelay": "1 minutes",
    }
    if timeout is not None:
        check["preconditionTimeout"] = timeout
    return {
        "Ready": check,
        "Work": {"type": "ShellCommandActivity", "command": "echo go", "precondition": {"ref": "Ready"}},
    }


@pytest.fixture
def service_retries() -> Any:
    """A service that re-schedules a FALSE check itself (--precondition-retries service)."""
    with LocalDataPipeline(time_scale=SCALE, quotas=False, precondition_retries="service") as service:
        yield service, service.client(retries={"total_max_attempts": 1})


def test_false_is_final_when_the_runner_retries(svc: LocalDataPipeline, dp: Any) -> None:
    # The default, the developer guide's reading: the runner re-checked until
    # preconditionTimeout, so FALSE times the precondition out and cancels what it guards.
    pipeline_id = svc.run_pipeline(_guarded(timeout="1 hours"), worker_group="wg-final")
    check = dp.poll_for_task(workerGroup="wg-final")["taskObject"]
    dp.set_task_status(taskId=check["taskId"], taskStatus="FALSE")
    ready_instance = check["attemptId"].removesuffix("_Attempt=1")
    work_instance = ready_instance.replace("@Ready_", "@Work_")
    assert status_of(dp, pipeline_id, ready_instance) == "TIMEDOUT"
    assert status_of(dp, pipeline_id, work_instance) == "CANCELED"
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-final")
    assert svc.ledger.outcomes() == {check["attemptId"]: "FALSE"}


def test_the_service_does_not_time_out_a_check_the_runner_is_running(svc: LocalDataPipeline, dp: Any) -> None:
    # preconditionTimeout 5 minutes is 3 s here; the runner is still checking at 4 s (the
    # service's backstop is at twice the timeout, 6 s).
    pipeline_id = svc.run_pipeline(_guarded(timeout="5 minutes"), worker_group="wg-running")
    check = dp.poll_for_task(workerGroup="wg-running")["taskObject"]
    dp.report_task_progress(taskId=check["taskId"])
    time.sleep(4)
    assert dp.report_task_progress(taskId=check["taskId"])["canceled"] is False
    dp.set_task_status(taskId=check["taskId"], taskStatus="FINISHED")
    work = dp.poll_for_task(workerGroup="wg-running")["taskObject"]
    assert work["attemptId"].startswith("@Work_")
    assert status_of(dp, pipeline_id, check["attemptId"].removesuffix("_Attempt=1")) == "FINISHED"


def test_a_check_running_past_twice_its_timeout_is_stopped_by_the_service(
    svc: LocalDataPipeline, dp: Any
) -> None:
    # A runner whose clock is wrong must not hold the pipeline: 1 minute is 0.6 s here.
    pipeline_id = svc.run_pipeline(_guarded(timeout="1 minutes"), worker_group="wg-backstop")
    check = dp.poll_for_task(workerGroup="wg-backstop")["taskObject"]
    # Acknowledged, so the 2-minute ack deadline (1.2 s here, the backstop's time too)
    # cannot reassign it first: a CI run saw that race.
    dp.report_task_progress(taskId=check["taskId"])
    ready = check["attemptId"].removesuffix("_Attempt=1")
    wait_for(lambda: status_of(dp, pipeline_id, ready) == "TIMEDOUT", timeout=10, what="the backstop")
    assert dp.report_task_progress(taskId=check["taskId"])["canceled"] is True
    assert svc.ledger.outcomes()[check["attemptId"]] == "CANCELED"


def test_exists_on_a_data_node_is_sent_with_its_node(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(
        {
            "Ready": {"type": "Exists", "preconditionTimeout": "1 hours"},
            "In": {"type": "S3DataNode", "filePath": "s3://b/in.csv", "precondition": {"ref": "Ready"}},
            "Work": {"type": "ShellCommandActivity", "command": "true", "input": {"ref": "In"}},
        },
        worker_group="wg-exists",
    )
    check = dp.poll_for_task(workerGroup="wg-exists")["taskObject"]
    attempt = check["objects"][check["attemptId"]]
    assert field(attempt, "type") == "Exists"
    assert next(f["refValue"] for f in attempt["fields"] if f["key"] == "node") == "In"
    assert field(check["objects"]["In"], "filePath") == "s3://b/in.csv"
    # The activity reading the node waits for the node's precondition.
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-exists")
    dp.set_task_status(taskId=check["taskId"], taskStatus="FINISHED")
    assert dp.poll_for_task(workerGroup="wg-exists")["taskObject"]["attemptId"].startswith("@Work_")


def test_activity_waits_for_its_precondition(service_retries: Any) -> None:
    svc, dp = service_retries
    pipeline_id = svc.run_pipeline(_guarded(), worker_group="wg-pre")
    check = dp.poll_for_task(workerGroup="wg-pre")["taskObject"]
    assert field(check["objects"][check["attemptId"]], "type") == "ShellCommandPrecondition"
    work_instance = check["attemptId"].replace("@Ready_", "@Work_").removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, work_instance) == "WAITING_ON_DEPENDENCIES"
    # FALSE: the check is retried after retryDelay (1 min -> 0.6 s).
    dp.set_task_status(taskId=check["taskId"], taskStatus="FALSE")
    started = time.monotonic()
    retry = dp.poll_for_task(workerGroup="wg-pre")["taskObject"]
    assert time.monotonic() - started >= 0.5
    assert retry["attemptId"] == check["attemptId"].replace("_Attempt=1", "_Attempt=2")
    dp.set_task_status(taskId=retry["taskId"], taskStatus="FINISHED")
    work = dp.poll_for_task(workerGroup="wg-pre")["taskObject"]
    assert work["attemptId"].startswith("@Work_")
    assert svc.ledger.outcomes()[check["attemptId"]] == "FALSE"


def test_precondition_timeout_cancels_the_activity(service_retries: Any) -> None:
    svc, dp = service_retries
    pipeline_id = svc.run_pipeline(_guarded(timeout="1 minutes"), worker_group="wg-pretime")
    check = dp.poll_for_task(workerGroup="wg-pretime")["taskObject"]
    dp.set_task_status(taskId=check["taskId"], taskStatus="FALSE")
    work_instance = check["attemptId"].replace("@Ready_", "@Work_").removesuffix("_Attempt=1")
    wait_for(
        lambda: status_of(dp, pipeline_id, work_instance) == "CANCELED",
        timeout=3,
        what="the Work instance CANCELED",
        interval=0.02,
    )
    ready_instance = check["attemptId"].removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, ready_instance) == "TIMEDOUT"
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-pretime")


def test_describe_objects_and_evaluate_expressions(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {
            "In": {"type": "S3DataNode", "directoryPath": "s3://bucket/#{myDay}"},
            "Run": {
                "type": "ShellCommandActivity",
                "command": "ls #{input.directoryPath}",
                "input": {"ref": "In"},
            },
        },
        worker_group="wg-expr",
        parameter_values=None,
    )
    raw = dp.describe_objects(pipelineId=pipeline_id, objectIds=["Run"])["pipelineObjects"][0]
    assert field(raw, "command") == "ls #{input.directoryPath}"
    assert field(raw, "@sphere") == "COMPONENT"
    evaluated = dp.describe_objects(pipelineId=pipeline_id, objectIds=["Run"], evaluateExpressions=True)
    # #{myDay} is undefined, so it is left as written.
    assert field(evaluated["pipelineObjects"][0], "command") == "ls s3://bucket/#{myDay}"
    task = dp.poll_for_task(workerGroup="wg-expr")["taskObject"]
    # Input data nodes travel with the task so runners can stage them.
    assert field(task["objects"]["In"], "directoryPath") == "s3://bucket/#{myDay}"
    answer = dp.evaluate_expression(pipelineId=pipeline_id, objectId="Run", expression="#{command}!")
    assert answer["evaluatedExpression"] == "ls #{input.directoryPath}!"


def test_query_objects_lists_instances_and_attempts(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {f"S{i}": {"type": "ShellCommandActivity", "command": "true"} for i in range(3)}, worker_group="wg-q"
    )
    task = dp.poll_for_task(workerGroup="wg-q")["taskObject"]
    instances = dp.query_objects(pipelineId=pipeline_id, sphere="INSTANCE")["ids"]
    assert len(instances) == 3 and all(i.startswith("@S") for i in instances)
    attempts = dp.query_objects(pipelineId=pipeline_id, sphere="ATTEMPT")["ids"]
    assert task["attemptId"] in attempts and len(attempts) == 3
    running = dp.query_objects(
        pipelineId=pipeline_id,
        sphere="ATTEMPT",
        query={"selectors": [{"fieldName": "@status", "operator": {"type": "EQ", "values": ["RUNNING"]}}]},
    )["ids"]
    assert running == [task["attemptId"]]
    components = dp.query_objects(pipelineId=pipeline_id, sphere="COMPONENT")["ids"]
    assert set(components) == {"Default", "S0", "S1", "S2"}
    page = dp.query_objects(pipelineId=pipeline_id, sphere="INSTANCE", limit=2)
    assert page["hasMoreResults"] is True
    rest = dp.query_objects(pipelineId=pipeline_id, sphere="INSTANCE", limit=2, marker=page["marker"])
    assert page["ids"] + rest["ids"] == instances
    # boto3's paginator follows the markers.
    paged = [
        i
        for p in dp.get_paginator("query_objects").paginate(
            pipelineId=pipeline_id, sphere="INSTANCE", PaginationConfig={"PageSize": 1}
        )
        for i in p["ids"]
    ]
    assert paged == instances


def test_pause_and_resume_components(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {"Held": {"type": "ShellCommandActivity", "command": "true"}}, worker_group="wg-pause"
    )
    dp.set_status(pipelineId=pipeline_id, objectIds=["Held"], status="PAUSE")
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-pause")
    dp.set_status(pipelineId=pipeline_id, objectIds=["Held"], status="RESUME")
    assert "taskObject" in dp.poll_for_task(workerGroup="wg-pause")
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.set_status(pipelineId=pipeline_id, objectIds=["Held"], status="RERUN")


def test_tags_and_not_found_errors(dp: Any) -> None:
    pipeline_id = _create(dp)
    dp.add_tags(
        pipelineId=pipeline_id, tags=[{"key": "team", "value": "data"}, {"key": "env", "value": "dev"}]
    )
    dp.remove_tags(pipelineId=pipeline_id, tagKeys=["env"])
    described = dp.describe_pipelines(pipelineIds=[pipeline_id])["pipelineDescriptionList"][0]
    assert described["tags"] == [{"key": "team", "value": "data"}]
    with pytest.raises(dp.exceptions.PipelineNotFoundException):
        dp.describe_pipelines(pipelineIds=["df-NOSUCHPIPELINE0000"])
    dp.delete_pipeline(pipelineId=pipeline_id)
    with pytest.raises(dp.exceptions.PipelineDeletedException):
        dp.describe_pipelines(pipelineIds=[pipeline_id])
    with pytest.raises(dp.exceptions.PipelineNotFoundException):
        dp.delete_pipeline(pipelineId=pipeline_id)
    assert pipeline_id not in {p["id"] for p in dp.list_pipelines()["pipelineIdList"]}


def test_state_file_keeps_pipelines_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "dp-state.json"
    with LocalDataPipeline(time_scale=0.01, quotas=False, state_file=state) as svc:
        pipeline_id = svc.run_pipeline(
            {"Echo": {"type": "ShellCommandActivity", "command": "echo"}}, worker_group="wg-state"
        )
    with LocalDataPipeline(time_scale=0.01, quotas=False, state_file=state) as svc:
        dp = svc.client(retries={"total_max_attempts": 1})
        assert pipeline_id in {p["id"] for p in dp.list_pipelines()["pipelineIdList"]}
        assert dp.get_pipeline_definition(pipelineId=pipeline_id)["pipelineObjects"]
        # The run in flight is not persisted; activating starts a fresh one.
        dp.activate_pipeline(pipelineId=pipeline_id)
        assert "taskObject" in dp.poll_for_task(workerGroup="wg-state")
