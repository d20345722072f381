"""Preconditions retry inside their attempt, end to end on the test bed.

The developer guide: retry logic for preconditions happens in Task Runner, which honours
``retryDelay`` and ``preconditionTimeout``.  The real operator renders the check loop,
the kubelet stand-in runs it, the real sidecar heartbeats and reports, and the local
service (default ``precondition_retries="runner"``) takes FALSE as the final answer.
At time scale 0.01, ``retryDelay`` 5 minutes is 3 s and ``preconditionTimeout``
20 minutes is 12 s.

Each check counts itself in a file on the host (the stand-in runs the pod's processes on
the host, as uid 65532), so the tests see how often the loop checked.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from parity_helpers import WORKER_GROUP, outcomes

from dptr_datapipeline import LocalDataPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def count() -> Iterator[Path]:
    """A host file the checks count themselves in.  Outside pytest's tmp_path, whose
    parents are private to the test's user: the pod's processes run as uid 65532."""
    shared = Path(tempfile.mkdtemp(prefix="dptr-checks-"))
    shared.chmod(0o777)
    try:
        yield shared / "count"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _counting_check(count: Path, holds_from: int | None) -> str:
    """A check that records its call number and holds from call ``holds_from`` on."""
    record = f'n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > {count}; echo "check $n"'
    if holds_from is None:
        return f"{record}; exit 1"
    return f'{record}; [ "$n" -ge {holds_from} ]'


def _checks(count: Path) -> int:
    try:
        return int(count.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def _attempts(dp: LocalDataPipeline, object_id: str) -> list[Any]:
    return [r for r in dp.ledger.attempts.values() if r.object_id == object_id]


def _guarded(check: dict[str, Any]) -> dict[str, Any]:
    return {
        "Ready": {
            "type": "ShellCommandPrecondition",
            "retryDelay": "5 minutes",
            "preconditionTimeout": "20 minutes",
            "maximumRetries": "0",
            **check,
        },
        "Work": {
            "type": "ShellCommandActivity",
            "command": "echo guarded work ran",
            "precondition": {"ref": "Ready"},
            "maximumRetries": "0",
        },
    }


def _instance_status(dp: LocalDataPipeline, pipeline_id: str, component: str) -> str | None:
    client = dp.client()
    ids = client.query_objects(pipelineId=pipeline_id, sphere="INSTANCE")["ids"]
    for obj in client.describe_objects(pipelineId=pipeline_id, objectIds=ids)["pipelineObjects"]:
        fields = {f["key"]: f.get("stringValue") or f.get("refValue") for f in obj["fields"]}
        if fields.get("@componentParent") == component:
            return fields.get("@status")
    return None


def test_a_precondition_that_holds_on_its_third_check_finishes_in_one_attempt(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, count: Path
) -> None:
    datapipeline.run_pipeline(
        _guarded({"command": _counting_check(count, holds_from=3)}), worker_group=WORKER_GROUP
    )
    records = outcomes(datapipeline, "Ready", "Work", timeout=90)
    assert (records["Ready"].outcome, records["Work"].outcome) == ("FINISHED", "FINISHED")
    assert len(_attempts(datapipeline, "Ready")) == 1
    assert _checks(count) == 3
    datapipeline.assert_clean()


def test_a_precondition_that_never_holds_is_false_at_its_timeout_and_guards(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, count: Path
) -> None:
    pipeline_id = datapipeline.run_pipeline(
        _guarded({"command": _counting_check(count, holds_from=None)}), worker_group=WORKER_GROUP
    )
    record = outcomes(datapipeline, "Ready", timeout=90)["Ready"]
    assert record.outcome == "FALSE", record.error_message
    assert record.error_id == "dptr.ExitCode.1"
    (attempt,) = _attempts(datapipeline, "Ready")
    # 12 s with a check every 3 s: the first check, then one after each pause, the last
    # at the deadline; a slow machine may fit one fewer.
    assert 4 <= _checks(count) <= 6, _checks(count)
    # It answered no earlier than its timeout: 12 s after the attempt began (whose
    # @actualStartTime has whole seconds).
    assert time.time() - attempt.polled_at >= 11
    wait_for(
        lambda: _instance_status(datapipeline, pipeline_id, "Work") == "CANCELED",
        timeout=20,
        what="the guarded activity CANCELED",
    )
    assert _instance_status(datapipeline, pipeline_id, "Ready") == "TIMEDOUT"
    assert not _attempts(datapipeline, "Work")
    datapipeline.assert_clean()


def test_a_cancel_during_the_wait_stops_the_checks(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, count: Path
) -> None:
    pipeline_id = datapipeline.run_pipeline(
        _guarded({"command": _counting_check(count, holds_from=None), "preconditionTimeout": "2 hours"}),
        worker_group=WORKER_GROUP,
    )
    wait_for(lambda: _checks(count) >= 2, timeout=60, what="two checks")
    (attempt,) = _attempts(datapipeline, "Ready")
    instance = attempt.instance_id
    datapipeline.client().set_status(pipelineId=pipeline_id, objectIds=[instance], status="CANCEL")
    record = outcomes(datapipeline, "Ready", timeout=30)["Ready"]
    assert record.outcome == "CANCELED"
    wait_for(lambda: not parity_runner.pods(), timeout=60, what="the pod gone after the cancel")
    seen = _checks(count)
    # No check runs once the pod is gone (a pause is 3 s: one would have by now).
    time.sleep(4)
    assert _checks(count) == seen
    assert not _attempts(datapipeline, "Work")
    datapipeline.assert_clean()


def _exists_pipeline(bucket: str, key: str, timeout: str = "20 minutes") -> dict[str, Any]:
    return {
        "Ready": {
            "type": "Exists",
            "retryDelay": "5 minutes",
            "preconditionTimeout": timeout,
            "maximumRetries": "0",
        },
        "In": {"type": "S3DataNode", "filePath": f"s3://{bucket}/{key}", "precondition": {"ref": "Ready"}},
        "Work": {
            "type": "ShellCommandActivity",
            "command": "echo input is there",
            "input": {"ref": "In"},
            "maximumRetries": "0",
        },
    }


def test_exists_holds_once_the_s3_key_arrives(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_raw: Any, s3_bucket: str
) -> None:
    datapipeline.run_pipeline(_exists_pipeline(s3_bucket, "in/late.csv"), worker_group=WORKER_GROUP)

    def check_log() -> str:
        pods = parity_runner.pods()
        if not pods:
            return ""
        name = pods[0]["metadata"]["name"]
        ns = parity_runner.namespace
        return parity_runner.testbed.kubectl("logs", "-n", ns, name, "-c", "task", check=False)

    # The object arrives only after the check has answered "not yet": it holds on a retry.
    wait_for(lambda: "does not exist yet" in check_log(), timeout=60, what="a first check that did not hold")
    s3_raw.put_object(Bucket=s3_bucket, Key="in/late.csv", Body=b"a,b\n")
    records = outcomes(datapipeline, "Ready", "Work", timeout=90)
    assert (records["Ready"].outcome, records["Work"].outcome) == ("FINISHED", "FINISHED")
    assert len(_attempts(datapipeline, "Ready")) == 1
    datapipeline.assert_clean()


def test_exists_on_an_absent_s3_key_is_false_at_the_timeout(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_bucket: str
) -> None:
    pipeline_id = datapipeline.run_pipeline(
        _exists_pipeline(s3_bucket, "in/never.csv", timeout="10 minutes"), worker_group=WORKER_GROUP
    )
    record = outcomes(datapipeline, "Ready", timeout=90)["Ready"]
    assert (record.outcome, record.error_id) == ("FALSE", "dptr.Exists.NotFound"), record.error_message
    assert f"s3://{s3_bucket}/in/never.csv" in (record.error_message or "")
    wait_for(
        lambda: _instance_status(datapipeline, pipeline_id, "Work") == "CANCELED",
        timeout=20,
        what="the guarded activity CANCELED",
    )
    assert not _attempts(datapipeline, "Work")
    datapipeline.assert_clean()
