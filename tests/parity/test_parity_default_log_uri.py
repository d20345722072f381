"""``pipelineLogUri`` kept on the pipeline's Default object only, end to end.

Whether the service copies Default's ``pipelineLogUri`` onto each polled attempt is not
documented.  This module's service does not (``pipeline_log_uri_on_attempts=False``): the
operator must read it with DescribeObjects, and the logs still arrive; when that lookup
fails, the miss is visible (a Warning Event and a metric), and the task still runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from parity_helpers import WORKER_GROUP, keys_under, outcomes, read_gzip_object

from dptr_datapipeline import LocalDataPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster, OperatorProcess

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def datapipeline() -> Iterator[LocalDataPipeline]:
    with LocalDataPipeline(time_scale=0.01, pipeline_log_uri_on_attempts=False) as svc:
        yield svc


def _pipeline(bucket: str) -> dict[str, Any]:
    return {
        "Default": {"pipelineLogUri": f"s3://{bucket}/logs/"},
        "Echo": {"type": "ShellCommandActivity", "command": "echo from default", "maximumRetries": "0"},
    }


def _describe_calls(dp: LocalDataPipeline) -> int:
    return sum(1 for c in dp.ledger.calls if c.operation == "DescribeObjects")


def test_logs_go_to_the_default_objects_pipeline_log_uri(
    parity_runner: Cluster,
    parity_operator: OperatorProcess,
    datapipeline: LocalDataPipeline,
    s3_raw: Any,
    s3_bucket: str,
) -> None:
    pipeline_id = datapipeline.run_pipeline(_pipeline(s3_bucket), worker_group=WORKER_GROUP)
    record = outcomes(datapipeline, "Echo", timeout=90)["Echo"]
    assert record.outcome == "FINISHED", record.error_message
    # The attempt really came without it: the service kept it on Default.
    (task,) = parity_runner.tasks()
    fields = task["spec"]["fields"]
    assert fields["command"] == ["echo from default"] and "pipelineLogUri" not in fields, fields
    prefix = f"logs/{pipeline_id}/Echo/{record.instance_id}/{record.attempt_id}/"
    assert read_gzip_object(s3_raw, s3_bucket, prefix + "StdOutput.gz") == b"from default\n"
    assert keys_under(s3_raw, s3_bucket, "logs/") == [
        prefix + "Activity.log.gz",
        prefix + "StdError.gz",
        prefix + "StdOutput.gz",
    ]
    assert _describe_calls(datapipeline) == 1
    metrics = parity_operator.metrics()
    found = [
        v
        for k, v in metrics.items()
        if k.startswith("dptr_pipeline_log_uri_lookups_total{") and 'result="found"' in k
    ]
    assert found == [1.0], metrics
    datapipeline.assert_clean()


def test_a_failed_lookup_is_an_event_and_a_metric_and_the_task_still_runs(
    parity_runner: Cluster,
    parity_operator: OperatorProcess,
    datapipeline: LocalDataPipeline,
    s3_raw: Any,
    s3_bucket: str,
) -> None:
    datapipeline.set_fault("DescribeObjects", error_rate=1.0)
    datapipeline.run_pipeline(_pipeline(s3_bucket), worker_group=WORKER_GROUP)
    record = outcomes(datapipeline, "Echo", timeout=120)["Echo"]
    assert record.outcome == "FINISHED", record.error_message
    events = wait_for(
        lambda: parity_runner.events("PipelineLogUriUnknown"), timeout=30, what="the Warning Event"
    )
    assert events[0]["type"] == "Warning" and "DescribeObjects" in events[0]["message"], events
    metrics = parity_operator.metrics()
    errors = [
        v
        for k, v in metrics.items()
        if k.startswith("dptr_pipeline_log_uri_lookups_total{") and 'result="error"' in k
    ]
    assert errors == [1.0], metrics
    assert keys_under(s3_raw, s3_bucket, "logs/") == []
    datapipeline.assert_clean()
