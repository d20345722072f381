"""Realistic inputs shared by the dptr_common unit tests (plain data, no mocks)."""

from __future__ import annotations

import copy
from typing import Any

PIPELINE_ID = "df-07346251SGV6UVKGZ5ZO"
ATTEMPT_ID = "@ShellCommandActivityObj_2024-05-01T00:00:00_Attempt=1"
COMPONENT_ID = "ShellCommandActivityObj"
INSTANCE_ID = "@ShellCommandActivityObj_2024-05-01T00:00:00"
# Real task ids are long opaque tokens; this one has the shape of one.
TASK_ID = (
    "DkCq6sWUVwPzBmd8F7ux2q0uJ4Ni0kqu9pAtgvRl1fRIXmvt7PGGN3v4zJ1b1VsD4Sp4Y9dOLq5tQc0UXAMPLEb0T"
    "YJ0XdT7a9Qm1x6N4lCz8P0vQy3Jr1Kw5sH2eLq9V"
)


def poll_for_task_response() -> dict[str, Any]:
    """A PollForTask response as botocore returns it (ResponseMetadata included)."""
    return copy.deepcopy(
        {
            "taskObject": {
                "taskId": TASK_ID,
                "pipelineId": PIPELINE_ID,
                "attemptId": ATTEMPT_ID,
                "objects": {
                    ATTEMPT_ID: {
                        "id": ATTEMPT_ID,
                        "name": ATTEMPT_ID,
                        "fields": [
                            {"key": "@componentParent", "refValue": COMPONENT_ID},
                            {"key": "@instanceParent", "refValue": INSTANCE_ID},
                            {"key": "@status", "stringValue": "RUNNING"},
                            {"key": "@attemptCount", "stringValue": "1"},
                            {"key": "@scheduledStartTime", "stringValue": "2024-05-01T00:00:00"},
                            {"key": "@actualStartTime", "stringValue": "2024-05-01T00:00:04"},
                            {"key": "@headAttempt", "refValue": ATTEMPT_ID},
                            {"key": "type", "stringValue": "ShellCommandActivity"},
                            {"key": "workerGroup", "stringValue": "wg-etl"},
                            {"key": "command", "stringValue": 'echo "$1" "$2" "$3" > /dev/null; exit 0'},
                            {"key": "scriptArgument", "stringValue": "--date"},
                            {"key": "scriptArgument", "stringValue": "2024-05-01 00:00"},
                            {"key": "scriptArgument", "stringValue": "it's; $(rm -rf /) `x`"},
                            {"key": "stage", "stringValue": "false"},
                            {"key": "stdout", "stringValue": "s3://logs-bucket/etl/stdout"},
                            {"key": "stderr", "stringValue": "s3://logs-bucket/etl/stderr"},
                            {"key": "attemptTimeout", "stringValue": "2 Hours"},
                            {"key": "reportProgressTimeout", "stringValue": "15 Minutes"},
                            {"key": "maximumRetries", "stringValue": "3"},
                            {"key": "input", "refValue": "InputDataNode"},
                            {"key": "output", "refValue": "OutputDataNode"},
                            {"key": "myImage", "stringValue": "registry.example.com/etl/job:1.4"},
                            {"key": "myTable", "stringValue": "events"},
                            {"key": "myPartition", "stringValue": "2024-05-01"},
                            {"key": "myPartition", "stringValue": "2024-05-02"},
                        ],
                    },
                    "InputDataNode": {
                        "id": "InputDataNode",
                        "name": "InputDataNode",
                        "fields": [
                            {"key": "type", "stringValue": "S3DataNode"},
                            {"key": "directoryPath", "stringValue": "s3://in-bucket/2024-05-01"},
                        ],
                    },
                    "OutputDataNode": {
                        "id": "OutputDataNode",
                        "name": "OutputDataNode",
                        "fields": [
                            {"key": "type", "stringValue": "S3DataNode"},
                            {"key": "directoryPath", "stringValue": "s3://out-bucket/2024-05-01"},
                        ],
                    },
                },
            },
            "ResponseMetadata": {"RequestId": "7f1c7c58-1111-2222-3333-444455556666", "HTTPStatusCode": 200},
        }
    )


def task_object(**changes: Any) -> dict[str, Any]:
    obj = poll_for_task_response()["taskObject"]
    obj.update(changes)
    return obj


def set_attempt_fields(obj: dict[str, Any], fields: list[dict[str, str]]) -> dict[str, Any]:
    obj["objects"][obj["attemptId"]]["fields"] = fields
    return obj


def task_runner_object(**spec: Any) -> dict[str, Any]:
    """A TaskRunner as the API server returns it (defaults applied, uid set)."""
    base: dict[str, Any] = {
        "workerGroup": "wg-etl",
        "region": "us-east-1",
        "jobTemplate": {"image": "registry.example.com/etl/base:1.0"},
    }
    base.update(spec)
    return {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "TaskRunner",
        "metadata": {
            "name": "etl",
            "namespace": "data",
            "uid": "9c7e2a1e-0000-4000-8000-000000000001",
            "generation": 1,
            "resourceVersion": "100",
            "creationTimestamp": "2024-05-01T00:00:00Z",
        },
        "spec": base,
    }


def pipeline_task_owner(name: str = "dptr-pt") -> dict[str, Any]:
    return {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "metadata": {"name": name, "namespace": "data", "uid": "1f0e2a1e-0000-4000-8000-000000000002"},
    }
