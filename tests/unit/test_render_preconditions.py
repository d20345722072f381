"""Preconditions: the check loop's timing, the Exists container, and their outcomes (pure)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dptr_samples import pipeline_task_owner, set_attempt_fields, task_object, task_runner_object
from kubelet_view import seen

from dptr_common.errors import ContainerTermination, outcome_for_termination
from dptr_common.models import PipelineTaskSpec, TaskRunner
from dptr_common.render import SIDECAR_CONTAINER, TASK_CONTAINER, render_job
from dptr_common.render_preconditions import CHECK_LOOP, check_timing
from dptr_common.task import Task, TaskError, parse_task

SIDECAR_IMAGE = "ghcr.io/dptr/sidecar:0.1.0"


def _task(kind: str, *fields: dict[str, str], objects: dict[str, Any] | None = None) -> Task:
    obj = set_attempt_fields(task_object(), [{"key": "type", "stringValue": kind}, *fields])
    obj["objects"].update(objects or {})
    return parse_task(obj)


def _render(task: Task, time_scale: float = 1.0, **spec: Any) -> dict[str, Any]:
    return render_job(
        task,
        TaskRunner.from_k8s(task_runner_object(**spec)),
        sidecar_image=SIDECAR_IMAGE,
        namespace="data",
        owner=pipeline_task_owner(),
        time_scale=time_scale,
    )


def _containers(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: seen(c) for c in pod.get("initContainers", []) + pod["containers"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _s(key: str, value: str) -> dict[str, str]:
    return {"key": key, "stringValue": value}


def test_timing_is_scaled_and_counts_from_the_attempts_start() -> None:
    task = _task(
        "ShellCommandPrecondition",
        _s("command", "true"),
        _s("retryDelay", "5 minutes"),
        _s("preconditionTimeout", "1 hours"),
        _s("@actualStartTime", "2026-12-01T10:00:00"),
    )
    timing = check_timing(task, time_scale=0.01)
    assert (timing.retry_delay, timing.budget) == (3, 36)
    assert timing.deadline == 1796119200 + 36  # 2026-12-01T10:00:00Z
    env = _env(_containers(_render(task, time_scale=0.01))[TASK_CONTAINER])
    assert (env["DPTR_CHECK_RETRY_DELAY"], env["DPTR_CHECK_BUDGET"]) == ("3", "36")
    assert env["DPTR_CHECK_DEADLINE"] == str(1796119200 + 36)


def test_defaults_check_once_every_ten_minutes() -> None:
    timing = check_timing(_task("ShellCommandPrecondition", _s("command", "true")))
    assert (timing.retry_delay, timing.budget, timing.deadline) == (600, 0, None)


def test_a_bad_start_time_leaves_the_loop_to_count_from_its_own_start() -> None:
    task = _task(
        "ShellCommandPrecondition",
        _s("command", "true"),
        _s("preconditionTimeout", "1 hours"),
        _s("@actualStartTime", "yesterday"),
    )
    assert check_timing(task).deadline is None


def test_a_malformed_precondition_timeout_fails_the_task() -> None:
    with pytest.raises(TaskError) as err:
        _task("ShellCommandPrecondition", _s("command", "true"), _s("preconditionTimeout", "soon"))
    assert err.value.error_id == "dptr.InvalidTask.BadPeriod.preconditionTimeout"
    # An activity's retryDelay is the service's business: never an error of the runner's.
    _task("ShellCommandActivity", _s("command", "true"), _s("retryDelay", "soon"))


def _loop(check: str, tmp_path: Path, **env: str) -> tuple[int, int, float]:
    count = tmp_path / "n"
    script = f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; {check}"
    started = time.monotonic()
    run = subprocess.run(
        ["/bin/sh", "-c", CHECK_LOOP, "dptr-check", "/bin/sh", "-c", script],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return run.returncode, int(count.read_text()), time.monotonic() - started


def test_the_loop_stops_at_the_first_check_that_holds(tmp_path: Path) -> None:
    code, checks, _ = _loop('[ "$n" -ge 3 ]', tmp_path, DPTR_CHECK_RETRY_DELAY="1", DPTR_CHECK_BUDGET="30")
    assert (code, checks) == (0, 3)


def test_the_loop_answers_the_last_exit_at_the_deadline(tmp_path: Path) -> None:
    # A 2 s budget on a clock of whole seconds: at least two checks, the last exit kept.
    code, checks, _ = _loop("exit 4", tmp_path, DPTR_CHECK_RETRY_DELAY="1", DPTR_CHECK_BUDGET="2")
    assert code == 4 and checks >= 2


def test_a_deadline_past_the_budget_is_clamped_to_it(tmp_path: Path) -> None:
    # A start time from a clock far ahead must not stretch the wait past the timeout.
    code, _, took = _loop(
        "exit 1",
        tmp_path,
        DPTR_CHECK_RETRY_DELAY="1",
        DPTR_CHECK_BUDGET="2",
        DPTR_CHECK_DEADLINE="99999999999",
    )
    assert code == 1 and took < 10


def test_exits_of_128_and_255_are_answers_and_checked_again(tmp_path: Path) -> None:
    # Not signals (dptr_common.errors reads 129-192 as one): git's fatal 128, ssh's 255.
    for code in (128, 255):
        (tmp_path / "n").unlink(missing_ok=True)
        got, checks, _ = _loop(f"exit {code}", tmp_path, DPTR_CHECK_RETRY_DELAY="1", DPTR_CHECK_BUDGET="2")
        assert got == code and checks >= 2


def test_a_past_deadline_still_checks_once(tmp_path: Path) -> None:
    code, checks, _ = _loop("exit 1", tmp_path, DPTR_CHECK_BUDGET="30", DPTR_CHECK_DEADLINE="1000")
    assert (code, checks) == (1, 1)


def test_a_check_killed_by_a_signal_is_not_retried(tmp_path: Path) -> None:
    code, checks, _ = _loop("kill -9 $$", tmp_path, DPTR_CHECK_RETRY_DELAY="1", DPTR_CHECK_BUDGET="30")
    assert (code, checks) == (137, 1)


def test_sigterm_during_the_pause_ends_the_loop_at_once(tmp_path: Path) -> None:
    checked = tmp_path / "checked"
    proc = subprocess.Popen(
        ["/bin/sh", "-c", CHECK_LOOP, "dptr-check", "/bin/sh", "-c", f": > {checked}; exit 1"],
        env={"PATH": os.environ["PATH"], "DPTR_CHECK_RETRY_DELAY": "60", "DPTR_CHECK_BUDGET": "600"},
    )
    # The first check ran, so the trap is set and the loop is in its 60 s pause.
    deadline = time.monotonic() + 30
    while not checked.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    started = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=10) == 143
    assert time.monotonic() - started < 5


def _exists(node: dict[str, Any] | None, *extra: dict[str, str]) -> Task:
    fields = [_s("preconditionTimeout", "1 hours"), *extra]
    if node is not None:
        fields.append({"key": "node", "refValue": node["id"]})
    return _task("Exists", *fields, objects={node["id"]: node} if node else None)


def _node(node_id: str, kind: str, **values: str) -> dict[str, Any]:
    fields = [{"key": "type", "stringValue": kind}] + [
        {"key": k, "stringValue": v} for k, v in values.items()
    ]
    return {"id": node_id, "name": node_id, "fields": fields}


def test_exists_runs_dptrs_check_with_the_runners_s3_identity() -> None:
    task = _exists(
        _node("In", "S3DataNode", filePath="s3://bucket/in/$(AWS_SECRET_ACCESS_KEY).csv"),
        _s("command", "curl evil"),
        _s("scriptUri", "s3://evil/x"),
        _s("myImage", "evil/image"),
    )
    job = _render(
        task,
        s3EndpointUrl="http://s3.local",
        credentials={"mode": "Secret", "secretRef": {"name": "keys"}},
    )
    containers = _containers(job)
    check = containers[TASK_CONTAINER]
    assert check["command"] == ["dptr-sidecar", "check-exists"]
    assert check["image"] == containers[SIDECAR_CONTAINER]["image"]
    env = _env(check)
    # The path reaches the check literally: kubelet expands nothing in it.
    assert env["DPTR_EXISTS_URI"] == "s3://bucket/in/$(AWS_SECRET_ACCESS_KEY).csv"
    assert (env["DPTR_EXISTS_KIND"], env["AWS_ENDPOINT_URL_S3"]) == ("file", "http://s3.local")
    assert "AWS_ACCESS_KEY_ID" in env
    # The pipeline's command, script and image are ignored: only dptr's code runs.
    assert set(containers) == {SIDECAR_CONTAINER, TASK_CONTAINER}
    assert check["securityContext"]["readOnlyRootFilesystem"] is True


def test_exists_under_pod_identity_keeps_the_runners_identity() -> None:
    job = _render(
        _exists(_node("In", "S3DataNode", directoryPath="s3://b/in/")), credentials={"mode": "PodIdentity"}
    )
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert "eks.amazonaws.com/skip-containers" not in annotations
    assert _env(_containers(job)[TASK_CONTAINER])["DPTR_EXISTS_KIND"] == "directory"


@pytest.mark.parametrize(
    ("node", "error_id"),
    [
        (None, "dptr.InvalidTask.Exists.NoNode"),
        (_node("In", "SqlDataNode", table="t"), "dptr.PreconditionNotSupported.Exists.SqlDataNode"),
        (
            _node("In", "DynamoDBDataNode", tableName="t"),
            "dptr.PreconditionNotSupported.Exists.DynamoDBDataNode",
        ),
        (_node("In", "S3DataNode"), "dptr.InvalidTask.Exists.BadDataNode"),
        (_node("In", "S3DataNode", filePath="s3://b/#{x}"), "dptr.InvalidTask.Exists.UnevaluatedExpression"),
    ],
)
def test_exists_fails_clearly_for_what_it_cannot_check(node: dict[str, Any] | None, error_id: str) -> None:
    with pytest.raises(TaskError) as err:
        _render(_exists(node))
    assert err.value.error_id == error_id


def test_exists_whose_node_was_not_sent_looks_it_up_itself() -> None:
    # The service left the node out, or the task was rebuilt from its PipelineTask (which
    # keeps no objects): the check asks DescribeObjects, with the runner's endpoint.
    task = _exists(_node("In", "S3DataNode", filePath="s3://b/in.csv"))
    spec = PipelineTaskSpec.from_task(task, task_runner="etl", polled_by="op-0")
    rebuilt = spec.to_task()
    assert rebuilt.node == "In" and not rebuilt.objects
    env = _env(_containers(_render(rebuilt, endpointUrl="http://dp.local"))[TASK_CONTAINER])
    assert "DPTR_EXISTS_URI" not in env
    assert (env["DPTR_EXISTS_NODE"], env["DPTR_PIPELINE_ID"]) == ("In", task.pipeline_id)
    assert env["DPTR_ENDPOINT_URL"] == "http://dp.local"


def test_exists_gets_the_operators_sidecar_env() -> None:
    job = render_job(
        _exists(_node("In", "S3DataNode", filePath="s3://b/in.csv")),
        TaskRunner.from_k8s(task_runner_object()),
        sidecar_image=SIDECAR_IMAGE,
        namespace="data",
        owner=pipeline_task_owner(),
        sidecar_env={"AWS_ENDPOINT_URL_STS": "https://sts.internal"},
    )
    assert _env(_containers(job)[TASK_CONTAINER])["AWS_ENDPOINT_URL_STS"] == "https://sts.internal"


def test_exists_outcomes_come_from_its_termination_message() -> None:
    def outcome(code: int, message: str | None, kind: str = "Exists") -> tuple[str, str | None]:
        result = outcome_for_termination(ContainerTermination(exit_code=code, message=message), kind)
        return result.status, result.error_id

    assert outcome(0, None) == ("FINISHED", None)
    assert outcome(1, "dptr.Exists.NotFound\ns3://b/k did not exist") == ("FALSE", "dptr.Exists.NotFound")
    assert outcome(2, "dptr.Exists.AccessDenied\nchecking s3://b/k") == ("FAILED", "dptr.Exists.AccessDenied")
    # Only "not found at the timeout" is FALSE: a check that did not run is FAILED, e.g. an
    # older sidecarImage without check-exists, or a crash with a traceback.
    assert outcome(2, "dptr-sidecar: unknown command 'check-exists'") == (
        "FAILED",
        "dptr.Exists.CheckDidNotRun",
    )
    assert outcome(1, "Traceback (most recent call last):") == ("FAILED", "dptr.Exists.CheckDidNotRun")
    # A user's check cannot choose its errorId that way.
    assert outcome(2, "dptr.Exists.AccessDenied\nx", "ShellCommandPrecondition") == (
        "FALSE",
        "dptr.ExitCode.2",
    )
