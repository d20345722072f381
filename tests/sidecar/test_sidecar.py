"""The sidecar end to end: the real ``dptr-sidecar`` process run by the kubelet stand-in
in a real Job pod on the test bed, against the local Data Pipeline service, time-scaled
100x (the 15-minute reportProgressTimeout is 9 s, a heartbeat every 0.6 s).

Each scenario ends with ``datapipeline.assert_clean()`` (exactly one outcome per
attempt, no protocol violation) and the expected outcome in the service's ledger.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from dptr_common.kube import NotFound
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

from .conftest import RunningTask, SidecarHarness, dump, sidecar_pids

pytestmark = pytest.mark.cluster


def set_task_status_calls(datapipeline: LocalDataPipeline, running: RunningTask) -> int:
    return sum(1 for c in datapipeline.ledger.calls_to("SetTaskStatus") if c.task_id == running.task.task_id)


def finish(
    datapipeline: LocalDataPipeline, running: RunningTask, expected: str, timeout: float = 90
) -> object:
    try:
        record = running.wait_outcome(timeout)
        assert record.outcome == expected
        if expected != "CANCELED":
            status = running.wait_reported(30)
            assert status["report"]["status"] == expected
            assert status["report"]["reportedBy"].startswith("sidecar/")
        datapipeline.assert_clean()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(running)}") from exc
    return record


def test_exit_0_reports_finished(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("echo hello; sleep 1")
    status = running.wait_sidecar_took_over()
    assert status["heartbeat"]["by"] == running.pod_name()
    record = finish(datapipeline, running, "FINISHED")
    assert record.error_id is None  # type: ignore[attr-defined]
    assert set_task_status_calls(datapipeline, running) == 1
    status = running.status()
    assert status["phase"] == "Succeeded" and status["exitCode"] == 0
    # The Event follows the PipelineTask's report (the record of truth) with its own write.
    wait_for(
        lambda: any(e["reason"] == "Reported" for e in running.events()),
        timeout=15,
        what="the Reported Event",
    )


def test_the_sidecar_exits_by_itself_once_it_has_reported(
    harness: SidecarHarness, datapipeline: LocalDataPipeline
) -> None:
    """Once the task container has ended, kubelet asks the native sidecar to stop; having
    reported, it must exit 0 on its own, not hang until the end of the pod's 30 s grace
    period and be killed (exit 137), keeping the pod and its Job unfinished meanwhile."""
    running = harness.start("echo done")
    finish(datapipeline, running, "FINISHED")
    terminated = wait_for(
        lambda: running.container_state("dptr-sidecar").get("terminated"),
        timeout=15,
        interval=0.2,
        what="the sidecar container ended",
    )
    assert terminated["exitCode"] == 0, terminated
    assert "exiting: peak RSS" in running.sidecar_log()


def test_exit_3_reports_failed_with_exit_code(
    harness: SidecarHarness, datapipeline: LocalDataPipeline
) -> None:
    running = harness.start("echo 'something broke' >&2; exit 3")
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id == "dptr.ExitCode.3"  # type: ignore[attr-defined]
    assert "exited with code 3" in record.error_message  # type: ignore[attr-defined]
    assert "something broke" in (record.error_stack_trace or "")  # type: ignore[attr-defined]
    assert running.status()["phase"] == "Failed"


def test_precondition_exit_1_reports_false(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("exit 1", object_type="ShellCommandPrecondition")
    record = finish(datapipeline, running, "FALSE")
    assert record.error_id == "dptr.ExitCode.1"  # type: ignore[attr-defined]


def test_killed_by_signal(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    # The task's own PID 1 ignores signals it does not handle (as in a container), so a
    # child is killed and its status (128 + 9) becomes the task's exit code.
    running = harness.start("sleep 0.5; python3 -c 'import os; os.kill(os.getpid(), 9)'; exit $?")
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id == "dptr.Signal.SIGKILL", record  # type: ignore[attr-defined]


def test_one_megabyte_of_output(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("head -c 1048576 /dev/zero | tr '\\0' x; echo; echo the-last-line; exit 2")
    record = finish(datapipeline, running, "FAILED")
    trace = record.error_stack_trace or ""  # type: ignore[attr-defined]
    assert 0 < len(trace) <= 1024
    assert trace.rstrip().endswith("the-last-line")


def test_invalid_utf8_output(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("printf 'bad \\377\\376 bytes \\001\\033[31m red\\n'; exit 4")
    record = finish(datapipeline, running, "FAILED")
    trace = record.error_stack_trace or ""  # type: ignore[attr-defined]
    assert "\ufffd" in trace and "bytes" in trace and "red" in trace
    assert "\x01" not in trace and "\x1b" not in trace


def test_cancel_mid_run(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("sleep 300")
    running.wait_sidecar_took_over()
    harness.cancel(running)
    try:
        wait_for(lambda: not running.job_exists(), timeout=60, what="the Job deleted")
        wait_for(lambda: not running.pods(), timeout=90, what="the pod gone")
        status = running.status()
        assert status["phase"] == "Canceled" and status["canceled"]["by"].startswith("sidecar/")
        wait_for(
            lambda: any(e["reason"] == "Canceled" for e in running.events()),
            timeout=15,
            what="the Canceled Event",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(running)}") from exc
    finish(datapipeline, running, "CANCELED")
    assert set_task_status_calls(datapipeline, running) == 0


def test_pipeline_deleted_is_a_cancel(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("sleep 300")
    running.wait_sidecar_took_over()
    harness.dp.delete_pipeline(pipelineId=running.pipeline_id)
    wait_for(lambda: not running.job_exists(), timeout=60, what="the Job deleted")
    wait_for(lambda: running.status().get("phase") == "Canceled", timeout=30, what="phase Canceled")
    assert running.status()["canceled"]["reason"] in ("PipelineDeletedException", "TaskNotFoundException")
    wait_for(lambda: not running.pods(), timeout=90, what="the pod gone")
    finish(datapipeline, running, "CANCELED")
    assert set_task_status_calls(datapipeline, running) == 0


def test_throttling_storm(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    # Every ReportTaskProgress throttled for 5 s (more than half the 9 s timeout), then
    # 5xx half of the time: the task must not be reassigned, and must end FINISHED.
    running = harness.start("sleep 10")
    running.wait_sidecar_took_over()
    datapipeline.set_fault("ReportTaskProgress", throttle=True)
    time.sleep(5)
    datapipeline.set_fault("ReportTaskProgress", error_rate=0.5)
    time.sleep(3)
    datapipeline.clear_faults()
    finish(datapipeline, running, "FINISHED")
    throttled = [
        c
        for c in datapipeline.ledger.calls_to("ReportTaskProgress")
        if c.task_id == running.task.task_id and c.error == "ThrottlingException"
    ]
    assert len(throttled) >= 3
    assert not datapipeline.ledger.reassignments


def test_paced_interval_from_the_taskrunner(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    # The operator publishes 200 s (2 s scaled): after the refresh, heartbeats slow down.
    harness.publish_interval(200)
    running = harness.start("sleep 14")
    running.wait_sidecar_took_over()
    time.sleep(6)  # five 0.6 s beats, then the TaskRunner is read
    before = running.record().progress_calls
    time.sleep(6)
    slow = running.record().progress_calls - before
    assert slow <= 5, f"{slow} heartbeats in 6 s at a 2 s interval"
    finish(datapipeline, running, "FINISHED")


def test_sidecar_killed_and_restarted(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    running = harness.start("sleep 6; exit 7")
    running.wait_sidecar_took_over()
    pod = running.pod_name()
    pids = wait_for(lambda: sidecar_pids(pod), timeout=10, what="the sidecar process")
    os.kill(pids[0], signal.SIGKILL)
    # The stand-in restarts it (a native sidecar has restartPolicy Always); it resumes.
    wait_for(lambda: [p for p in sidecar_pids(pod) if p not in pids], timeout=30, what="a restarted sidecar")
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id == "dptr.ExitCode.7"  # type: ignore[attr-defined]
    assert set_task_status_calls(datapipeline, running) == 1
    assert not datapipeline.ledger.reassignments


def test_sigterm_before_the_main_container_exits(
    harness: SidecarHarness, datapipeline: LocalDataPipeline
) -> None:
    # SIGTERM reaches the sidecar while the task still runs: it keeps going until the
    # task's final status and reports that (never FINISHED for a non-zero exit).
    running = harness.start("sleep 2; exit 5")
    running.wait_sidecar_took_over()
    pod = running.pod_name()
    pid = wait_for(lambda: sidecar_pids(pod), timeout=10, what="the sidecar process")[0]
    os.kill(pid, signal.SIGTERM)
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id == "dptr.ExitCode.5"  # type: ignore[attr-defined]


def test_sigterm_racing_a_quick_exit(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    # The task exits at once; the stand-in sends SIGTERM to the sidecar right after,
    # likely before the final status reached the API server.
    running = harness.start("exit 6")
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id == "dptr.ExitCode.6"  # type: ignore[attr-defined]


def task_log(harness: SidecarHarness, running: RunningTask) -> bytes:
    """The task container's log so far; empty until the kubelet serves it (it answers
    404 while the container has not started, which it may not have when the sidecar
    has already taken over)."""
    try:
        log: bytes = harness.kube.read_log(harness.namespace, running.pod_name(), "task")
    except NotFound:
        return b""
    return log


def test_pod_deleted_while_running(harness: SidecarHarness, datapipeline: LocalDataPipeline) -> None:
    # Not a cancel (eviction, drain): the task is stopped with SIGTERM and that is reported.
    # (A task that ignores SIGTERM is killed at the end of the grace period, together
    # with the sidecar: that pod ends unreported and the operator reports it.)
    running = harness.start("trap 'exit 143' TERM; echo trap-set; sleep 300 & wait")
    running.wait_sidecar_took_over()
    running.pod()
    # Only once the trap is set: before that the shell is a PID 1 without a handler,
    # which ignores SIGTERM, and the pod would end at SIGKILL, unreported by design.
    wait_for(lambda: b"trap-set" in task_log(harness, running), timeout=60, what="the task's SIGTERM trap")
    harness.kube.delete(f"/api/v1/namespaces/{harness.namespace}/pods/{running.pod_name()}")
    record = finish(datapipeline, running, "FAILED")
    assert record.error_id.startswith("dptr.Signal.")  # type: ignore[attr-defined]
