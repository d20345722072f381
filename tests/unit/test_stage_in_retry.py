"""Stage-in's DescribeObjects: a transient failure is retried, a refusal is not (the
chaos test saw one injected 5xx fail a staged attempt that was built to succeed)."""

from __future__ import annotations

from typing import Any

import pytest

from dptr_common.datapipeline import InvalidRequest, TransientError
from dptr_common.errors import TaskError
from dptr_common.staging_plan import StagedNode, StagingPlan
from dptr_sidecar.staging import resolve_plan

PLAN = StagingPlan("df-1", (StagedNode("input", 1, "In", "/dptr/staging/input1"),))
NODE = {
    "id": "In",
    "fields": [
        {"key": "type", "stringValue": "S3DataNode"},
        {"key": "directoryPath", "stringValue": "s3://b/in"},
    ],
}


class FlakyClient:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    def describe_objects(self, pipeline_id: str, ids: list[str], evaluate_expressions: bool) -> list[Any]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return [NODE]


def test_transient_failures_are_retried_within_the_budget() -> None:
    client = FlakyClient([TransientError("InternalServiceError"), TransientError("InternalServiceError")])
    resolved = resolve_plan(PLAN, client, budget=5.0)
    assert client.calls == 3
    assert resolved.nodes[0].uri == "s3://b/in"


def test_a_refusal_fails_at_once() -> None:
    client = FlakyClient([InvalidRequest("no such pipeline")])
    with pytest.raises(TaskError) as caught:
        resolve_plan(PLAN, client, budget=5.0)
    assert client.calls == 1
    assert caught.value.error_id == "dptr.StagingFailed.DescribeObjects.InvalidRequest"


def test_a_transient_failure_past_the_budget_fails_naming_it() -> None:
    client = FlakyClient([TransientError("InternalServiceError") for _ in range(1000)])
    with pytest.raises(TaskError) as caught:
        resolve_plan(PLAN, client, budget=0.3)
    assert client.calls > 1
    assert caught.value.error_id == "dptr.StagingFailed.DescribeObjects.TransientError"
