"""The task-runner half: polling, ack and heartbeat deadlines, cancel, final status."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from dp_helpers import field, fields_of, status_of

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

ECHO = {"Echo": {"type": "ShellCommandActivity", "command": "echo hi"}}


def test_poll_returns_the_attempt_in_the_real_shape(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {
            "Default": {"stage": "true", "reportProgressTimeout": "20 minutes"},
            "Base": {"myShared": "from-parent", "stdout": "s3://bucket/out"},
            "Job": {
                "type": "ShellCommandActivity",
                "parent": {"ref": "Base"},
                "scriptUri": "s3://bucket/run.sh",
                "scriptArgument": ["--day", "#{@scheduledStartTime}", "#{myColour}"],
                "myColour": "blue",
                "maximumRetries": "1",
            },
        },
        worker_group="wg-shape",
    )
    task = dp.poll_for_task(workerGroup="wg-shape", hostname="runner-1")["taskObject"]

    assert task["pipelineId"] == pipeline_id
    assert len(task["taskId"]) > 200, "task ids are long and opaque"
    attempt_id = task["attemptId"]
    assert attempt_id.startswith("@Job_") and attempt_id.endswith("_Attempt=1")
    attempt = task["objects"][attempt_id]
    assert attempt["id"] == attempt_id
    pairs = fields_of(attempt)
    assert field(attempt, "@componentParent") == "Job"
    assert field(attempt, "@instanceParent") == attempt_id.removesuffix("_Attempt=1")
    assert field(attempt, "@sphere") == "ATTEMPT"
    assert field(attempt, "@status") == "RUNNING"
    scheduled = field(attempt, "@scheduledStartTime")
    assert scheduled is not None and len(scheduled) == 19
    assert field(attempt, "type") == "ShellCommandActivity"
    assert field(attempt, "scriptUri") == "s3://bucket/run.sh"
    # Repeated fields stay an ordered multimap, with expressions evaluated.
    assert [v for k, v in pairs if k == "scriptArgument"] == ["--day", scheduled, "blue"]
    # Inherited from parent and from Default; the object's own value wins.
    assert field(attempt, "myShared") == "from-parent"
    assert field(attempt, "stdout") == "s3://bucket/out"
    assert field(attempt, "stage") == "true"
    assert field(attempt, "reportProgressTimeout") == "20 minutes"
    assert field(attempt, "workerGroup") == "wg-shape"
    assert field(attempt, "hostname") == "runner-1"
    assert "parent" not in dict(pairs)
    refs = {f["key"] for f in attempt["fields"] if "refValue" in f}
    assert {"@componentParent", "@instanceParent"} <= refs


def test_long_poll_waits_then_returns_empty(svc: LocalDataPipeline, dp: Any) -> None:
    started = time.monotonic()
    answer = dp.poll_for_task(workerGroup="nobody-home")
    elapsed = time.monotonic() - started
    assert "taskObject" not in answer
    # 90 s scaled by 0.01 is 0.9 s.
    assert 0.8 <= elapsed < 3.0


def test_long_poll_returns_work_that_arrives_while_waiting(svc: LocalDataPipeline, dp: Any) -> None:
    result: dict[str, Any] = {}

    def poll() -> None:
        result.update(dp.poll_for_task(workerGroup="wg-late"))

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.2)
    svc.run_pipeline(ECHO, worker_group="wg-late")
    poller.join(5)
    assert result["taskObject"]["attemptId"].startswith("@Echo_")


def test_worker_groups_are_exact_matches(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(ECHO, worker_group="wg-A")
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-a")
    assert "taskObject" in dp.poll_for_task(workerGroup="wg-A")


def test_finished_task_gets_exactly_one_outcome(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(ECHO, worker_group="wg-ok")
    task = dp.poll_for_task(workerGroup="wg-ok")["taskObject"]
    assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is False
    dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")

    assert svc.ledger.outcomes() == {task["attemptId"]: "FINISHED"}
    svc.assert_clean()
    assert status_of(dp, pipeline_id, task["attemptId"]) == "FINISHED"
    instance = task["attemptId"].removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, instance) == "FINISHED"
    state = dp.describe_pipelines(pipelineIds=[pipeline_id])["pipelineDescriptionList"][0]
    assert field(state, "@pipelineState") == "FINISHED"


def test_failed_status_records_error_details_and_retries(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {
            "Echo": {
                "type": "ShellCommandActivity",
                "command": "false",
                "maximumRetries": "1",
                "retryDelay": "1 minutes",
            }
        },
        worker_group="wg-fail",
    )
    first = dp.poll_for_task(workerGroup="wg-fail")["taskObject"]
    dp.report_task_progress(taskId=first["taskId"])
    dp.set_task_status(
        taskId=first["taskId"],
        taskStatus="FAILED",
        errorId="ExitCode1",
        errorMessage="command exited 1",
        errorStackTrace="line 1\nline 2",
    )
    record = svc.ledger.attempts[first["attemptId"]]
    assert (record.outcome, record["errorId"], record.error_message) == (
        "FAILED",
        "ExitCode1",
        "command exited 1",
    )
    attempt = dp.describe_objects(pipelineId=pipeline_id, objectIds=[first["attemptId"]])["pipelineObjects"][
        0
    ]
    assert field(attempt, "errorStackTrace") == "line 1\nline 2"
    assert field(attempt, "@status") == "FAILED"

    # maximumRetries 1: one more attempt, after retryDelay (1 min -> 0.6 s).
    failed_at = time.monotonic()
    second = dp.poll_for_task(workerGroup="wg-fail")["taskObject"]
    assert time.monotonic() - failed_at >= 0.5
    assert second["attemptId"].endswith("_Attempt=2")
    dp.set_task_status(taskId=second["taskId"], taskStatus="FAILED", errorId="ExitCode1")
    instance = first["attemptId"].removesuffix("_Attempt=1")
    assert status_of(dp, pipeline_id, instance) == "FAILED"
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-fail")
    svc.assert_clean()


def test_second_final_status_is_refused_and_recorded(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(ECHO, worker_group="wg-twice")
    task = dp.poll_for_task(workerGroup="wg-twice")["taskObject"]
    dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.set_task_status(taskId=task["taskId"], taskStatus="FAILED")
    assert [v.kind for v in svc.ledger.violations] == ["second_final_status"]
    assert svc.ledger.outcomes()[task["attemptId"]] == "FINISHED"
    with pytest.raises(AssertionError, match="second_final_status"):
        svc.assert_clean()


def test_missed_ack_reassigns_as_a_new_attempt(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(ECHO, worker_group="wg-ack")
    lost = dp.poll_for_task(workerGroup="wg-ack")["taskObject"]
    polled = time.monotonic()
    # Nothing else is offered before the 1.2 s ack deadline passes...
    again = dp.poll_for_task(workerGroup="wg-ack")
    if "taskObject" not in again:
        again = dp.poll_for_task(workerGroup="wg-ack")
    elapsed = time.monotonic() - polled
    retry = again["taskObject"]
    assert 1.1 <= elapsed < 4.0, elapsed
    # ...then the same work comes back as attempt 2 with a new task id.
    assert retry["attemptId"] == lost["attemptId"].replace("_Attempt=1", "_Attempt=2")
    assert retry["taskId"] != lost["taskId"]
    [reassignment] = svc.ledger.reassignments
    assert (reassignment.attempt_id, reassignment.reason) == (lost["attemptId"], "ack_timeout")
    assert reassignment.new_attempt_id == retry["attemptId"]

    # The lost runner is told to stop, and may not report any more.
    assert dp.report_task_progress(taskId=lost["taskId"])["canceled"] is True
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.set_task_status(taskId=lost["taskId"], taskStatus="FINISHED")
    assert svc.ledger.violations[-1].kind == "status_after_reassignment"
    dp.set_task_status(taskId=retry["taskId"], taskStatus="FINISHED")
    problems = svc.ledger.problems()
    assert any("reassigned (ack_timeout)" in p for p in problems)


def test_acked_task_survives_the_ack_deadline_while_heartbeating(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(
        {"Echo": {"type": "ShellCommandActivity", "command": "sleep", "reportProgressTimeout": "1 minutes"}},
        worker_group="wg-beat",
    )
    task = dp.poll_for_task(workerGroup="wg-beat")["taskObject"]
    end = time.monotonic() + 1.6  # past both the ack deadline and reportProgressTimeout (0.6 s)
    while time.monotonic() < end:
        assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is False
        time.sleep(0.15)
    assert svc.ledger.reassignments == []
    dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
    assert svc.ledger.attempts[task["attemptId"]].progress_calls >= 5
    svc.assert_clean()


def test_silence_after_ack_reassigns_after_report_progress_timeout(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(
        {
            "Echo": {
                "type": "ShellCommandActivity",
                "command": "sleep",
                "reportProgressTimeout": "1 minutes",
                "maximumRetries": "0",
            }
        },
        worker_group="wg-silent",
    )
    task = dp.poll_for_task(workerGroup="wg-silent")["taskObject"]
    acked = time.monotonic()
    dp.report_task_progress(taskId=task["taskId"])
    wait_for(lambda: svc.ledger.reassignments, timeout=3, what="a reassignment", interval=0.02)
    # 1 minute scaled is 0.6 s; the ack deadline (1.2 s) does not apply once acked.
    assert 0.55 <= time.monotonic() - acked < 1.15
    [reassignment] = svc.ledger.reassignments
    assert reassignment.reason == "progress_timeout"
    # maximumRetries 0: nothing is reassigned and the instance times out.
    assert reassignment.new_attempt_id is None
    instance = task["attemptId"].removesuffix("_Attempt=1")
    assert status_of(dp, task["pipelineId"], instance) == "TIMEDOUT"
    assert status_of(dp, task["pipelineId"], task["attemptId"]) == "TIMEDOUT"


def test_set_status_cancel_answers_canceled_and_counts_as_the_outcome(
    svc: LocalDataPipeline, dp: Any
) -> None:
    pipeline_id = svc.run_pipeline(ECHO, worker_group="wg-cancel")
    task = dp.poll_for_task(workerGroup="wg-cancel")["taskObject"]
    assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is False
    instance = task["attemptId"].removesuffix("_Attempt=1")
    dp.set_status(pipelineId=pipeline_id, objectIds=[instance], status="CANCEL")
    assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is True
    assert status_of(dp, pipeline_id, instance) == "CANCELED"
    assert svc.ledger.outcomes() == {task["attemptId"]: "CANCELED"}
    assert svc.ledger.attempts[task["attemptId"]].cancel_seen
    svc.assert_clean()
    # Reporting a status after the cancel is a protocol violation.
    with pytest.raises(dp.exceptions.InvalidRequestException):
        dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
    assert [v.kind for v in svc.ledger.violations] == ["status_after_cancel"]


def test_deactivation_cancels_running_work(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(ECHO, worker_group="wg-deact")
    task = dp.poll_for_task(workerGroup="wg-deact")["taskObject"]
    dp.deactivate_pipeline(pipelineId=pipeline_id)
    assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is True
    state = dp.describe_pipelines(pipelineIds=[pipeline_id])["pipelineDescriptionList"][0]
    assert field(state, "@pipelineState") == "INACTIVE"
    svc.assert_clean()


def test_deactivation_without_cancel_active_lets_running_work_finish(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(
        {**ECHO, "Next": {"type": "ShellCommandActivity", "command": "echo 2", "dependsOn": {"ref": "Echo"}}},
        worker_group="wg-soft",
    )
    task = dp.poll_for_task(workerGroup="wg-soft")["taskObject"]
    dp.deactivate_pipeline(pipelineId=pipeline_id, cancelActive=False)
    assert dp.report_task_progress(taskId=task["taskId"])["canceled"] is False
    dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
    # The dependent is ready but not handed out while the pipeline is inactive.
    assert "taskObject" not in dp.poll_for_task(workerGroup="wg-soft")
    dp.activate_pipeline(pipelineId=pipeline_id)
    nxt = dp.poll_for_task(workerGroup="wg-soft")["taskObject"]
    assert nxt["attemptId"].startswith("@Next_")


def test_deleted_pipeline_and_unknown_task_errors(svc: LocalDataPipeline, dp: Any) -> None:
    pipeline_id = svc.run_pipeline(ECHO, worker_group="wg-del")
    task = dp.poll_for_task(workerGroup="wg-del")["taskObject"]
    dp.delete_pipeline(pipelineId=pipeline_id)
    with pytest.raises(dp.exceptions.PipelineDeletedException):
        dp.report_task_progress(taskId=task["taskId"])
    with pytest.raises(dp.exceptions.PipelineDeletedException):
        dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
    with pytest.raises(dp.exceptions.TaskNotFoundException):
        dp.report_task_progress(taskId="no-such-task")
    with pytest.raises(dp.exceptions.TaskNotFoundException):
        dp.set_task_status(taskId="no-such-task", taskStatus="FINISHED")
    # Deletion cancels the attempt: that is its one outcome.
    assert svc.ledger.outcomes() == {task["attemptId"]: "CANCELED"}


def test_runner_heartbeat_is_recorded_and_can_ask_runners_to_terminate(
    svc: LocalDataPipeline, dp: Any
) -> None:
    answer = dp.report_task_runner_heartbeat(taskrunnerId="tr-1", workerGroup="wg", hostname="node-1")
    assert answer["terminate"] is False
    svc.set_runner_terminate(True)
    assert dp.report_task_runner_heartbeat(taskrunnerId="tr-1", workerGroup="wg")["terminate"] is True
    runner = svc.ledger.runners["tr-1"]
    assert (runner.heartbeats, runner.worker_group) == (2, "wg")


def test_service_reserved_error_ids_are_refused(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline(ECHO, worker_group="wg-reserved")
    task = dp.poll_for_task(workerGroup="wg-reserved")["taskObject"]
    with pytest.raises(dp.exceptions.InvalidRequestException, match="Service_"):
        dp.set_task_status(taskId=task["taskId"], taskStatus="FAILED", errorId="Service_Oops")
    # A refused call changes nothing: the real report still goes through.
    dp.set_task_status(taskId=task["taskId"], taskStatus="FAILED", errorId="Oops")
    assert svc.ledger.outcomes()[task["attemptId"]] == "FAILED"


def test_concurrent_pollers_never_share_a_task(svc: LocalDataPipeline) -> None:
    tasks = 30
    svc.run_pipeline(
        {f"Step{i}": {"type": "ShellCommandActivity", "command": f"echo {i}"} for i in range(tasks)},
        worker_group="wg-many",
    )
    got: list[str] = []
    lock = threading.Lock()

    def runner() -> None:
        client = svc.client(retries={"total_max_attempts": 1})
        while True:
            answer = client.poll_for_task(workerGroup="wg-many")
            if "taskObject" not in answer:
                return
            task = answer["taskObject"]
            client.report_task_progress(taskId=task["taskId"])
            client.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")
            with lock:
                got.append(task["attemptId"])

    threads = [threading.Thread(target=runner) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(got) == tasks == len(set(got))
    svc.assert_clean()
