"""Failure: the nodes' clocks disagree.

A sidecar writes ``claimedAt`` and ``heartbeat.lastAt`` with its node's clock; the
operator reads them on another node.  With the writer twenty minutes behind, a wall-clock
comparison sees a live claim as abandoned (and takes it over: two reports) and live
heartbeats as stale; with the writer ahead, it sees a dead sidecar's heartbeats as fresh
(and Data Pipeline gives the task away).  The real operator runs here against a
"sidecar" played by the test, whose clock is skewed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from op_helpers import Cluster

from dptr_common import ledger
from dptr_common.kube import KubeClient
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

ECHO = {"type": "ShellCommandActivity", "command": "echo hi", "maximumRetries": "0"}
SKEW = timedelta(minutes=20)


def skewed(offset: timedelta) -> Callable[[], datetime]:
    return lambda: datetime.now(UTC) + offset


class SkewedSidecar:
    """Does what the sidecar does for one task, with a clock ``offset`` off: takes over the
    heartbeats, beats, and (``claim()``) claims the report and keeps the claim fresh."""

    def __init__(self, cluster: Cluster, dp: Any, task: dict[str, Any], pod: str, offset: timedelta) -> None:
        self.kube: KubeClient = cluster.kube
        self.ns, self.name = cluster.namespace, task["metadata"]["name"]
        self.task_id = task["spec"]["taskId"]
        self.dp, self.pod, self.clock = dp, pod, skewed(offset)
        self.holder = ledger.sidecar_holder(pod)
        self.claim: ledger.Claim | None = None
        self.stop = threading.Event()
        ledger.take_over_heartbeats(self.kube, self.ns, self.name, "sidecar", pod, clock=self.clock)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.3):  # the scaled interval is 0.6 s
            self.dp.report_task_progress(taskId=self.task_id)
            ledger.record_heartbeat(self.kube, self.ns, self.name, by=self.pod, clock=self.clock)
            if self.claim is not None:
                self.claim = ledger.revise_claim(self.kube, self.claim, clock=self.clock) or self.claim

    def claim_report(self) -> None:
        self.claim = ledger.claim_report(
            self.kube,
            self.ns,
            self.name,
            holder=self.holder,
            status="FINISHED",
            stale_after=600,
            clock=self.clock,
        )
        assert self.claim is not None

    def die(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def running_task(
    secure_cluster: Cluster, start_operator: Any, datapipeline: LocalDataPipeline
) -> Iterator[tuple[dict[str, Any], str]]:
    # Graces scaled by 0.01: the fallback waits 1 s after the task container ends, and a
    # claim must look unchanged for 6 s before it is taken over.
    start_operator(
        "--sidecar-report-grace-seconds",
        "100",
        "--claim-stale-after-seconds",
        "600",
        "--unschedulable-grace-seconds",
        "100000",
        "--image-pull-grace-seconds",
        "100000",
    )
    secure_cluster.create_runner(datapipeline, "wg-skew")
    datapipeline.run_pipeline({"Echo": ECHO}, worker_group="wg-skew")
    pod = wait_for(secure_cluster.pods, timeout=20, what="the task pod")[0]["metadata"]["name"]
    task = wait_for(
        lambda: [t for t in secure_cluster.tasks() if (t.get("status") or {}).get("acknowledgedAt")],
        timeout=20,
        what="the acknowledged PipelineTask",
    )[0]
    yield task, pod


def _task_ended(cluster: Cluster, pod: str) -> None:
    """The task container has exited 0 (the pod never left the scheduler here, so it is
    shown as ended, the operator's cue to report if no live claim holder does)."""
    cluster.patch_pod_status(
        pod,
        {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "task",
                    "image": "debian:bookworm",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
        },
    )


def test_a_writer_clock_behind_takes_over_no_live_claim_and_no_live_heartbeats(
    secure_cluster: Cluster, datapipeline: LocalDataPipeline, running_task: tuple[dict[str, Any], str]
) -> None:
    task, pod = running_task
    sidecar = SkewedSidecar(secure_cluster, datapipeline.client(), task, pod, -SKEW)
    sidecar.claim_report()  # claimed 20 minutes "ago", and refreshed all along
    _task_ended(secure_cluster, pod)
    # Three times the stale-claim window, ten times the grace: a wall-clock operator would
    # have taken both the heartbeats and the claim over at once.
    threading.Event().wait(18)
    status = next(t for t in secure_cluster.tasks() if t["metadata"]["name"] == task["metadata"]["name"])
    assert status["status"]["report"]["claimedBy"] == sidecar.holder, status["status"]
    assert not datapipeline.ledger.calls_to("SetTaskStatus")
    assert not secure_cluster.events("HeartbeatsResumed")
    # The holder dies without reporting: now, and only now, the operator takes over.
    sidecar.die()
    wait_for(lambda: datapipeline.ledger.calls_to("SetTaskStatus"), timeout=60, what="the takeover report")
    record = next(iter(datapipeline.ledger.attempts.values()))
    assert (record.outcome, record.error_id) == ("FINISHED", None)
    assert len(datapipeline.ledger.calls_to("SetTaskStatus")) == 1
    assert secure_cluster.events("HeartbeatsResumed")
    datapipeline.assert_clean()


def test_a_writer_clock_ahead_does_not_hide_a_dead_sidecar(
    secure_cluster: Cluster, datapipeline: LocalDataPipeline, running_task: tuple[dict[str, Any], str]
) -> None:
    task, pod = running_task
    sidecar = SkewedSidecar(secure_cluster, datapipeline.client(), task, pod, SKEW)
    threading.Event().wait(2)
    sidecar.die()  # its last heartbeat says "20 minutes from now"
    # The task's reportProgressTimeout is 9 s (scaled): the operator must beat it again
    # well before that, judging by when it saw the last beat, not by the beat's timestamp.
    wait_for(lambda: secure_cluster.events("HeartbeatsResumed"), timeout=9, what="heartbeats resumed")
    threading.Event().wait(12)
    assert not datapipeline.ledger.reassignments, datapipeline.ledger.reassignments
    client = datapipeline.client()
    record = next(iter(datapipeline.ledger.attempts.values()))
    client.set_status(pipelineId=record.pipeline_id, objectIds=[record.instance_id], status="CANCEL")
    wait_for(lambda: record.outcome == "CANCELED", timeout=30, what="the cancel honoured")
    datapipeline.assert_clean()
