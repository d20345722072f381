"""The PipelineTask status as the exactly-once ledger, on the test bed's real API server
(real optimistic concurrency, real CRD schema and status subresource).  No mocks."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dptr_common.kube import KubeClient, NotFound, pipelinetask_path
from dptr_common.ledger import (
    Claim,
    StalenessObserver,
    claim_report,
    mark_canceled,
    mark_reported,
    operator_holder,
    parse_time,
    record_dispatch,
    record_heartbeat,
    revise_claim,
    sidecar_holder,
    take_over_heartbeats,
)
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def kube(crds: RunningTestbed) -> KubeClient:
    """A client for the bed, with the CRDs installed (the suite's ``crds`` fixture)."""
    return KubeClient.from_kubeconfig(crds.kubeconfig, timeout=15)


def create_task(kube: KubeClient, namespace: str, name: str | None = None) -> str:
    name = name or "pt-" + uuid.uuid4().hex[:10]
    body = {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "metadata": {"name": name},
        "spec": {
            "taskRunner": "runner",
            "taskId": "task-" + name,
            "pipelineId": "df-0123456789",
            "attemptId": "@Echo_2025-01-01T00:00:00_Attempt=1",
        },
    }
    # The CRD was just established; its REST endpoint may lag by a moment (NotFound).
    wait_for(
        lambda: kube.create(pipelinetask_path(namespace), body),
        timeout=30,
        interval=0.2,
        tolerate=(NotFound,),
        what=f"PipelineTask {name} created",
    )
    return name


def status_of(kube: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kube.get(pipelinetask_path(namespace, name)).get("status") or {}
    return status


def race(*fns: Callable[[], Any]) -> list[Any]:
    """Run ``fns`` in threads released together; their results (or exceptions)."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_two_claimers_exactly_one_wins(kube: KubeClient, namespace: str) -> None:
    sidecar, operator = sidecar_holder("task-pod"), operator_holder("operator-0")
    for _ in range(25):
        name = create_task(kube, namespace)
        results = race(
            lambda name=name: claim_report(
                kube, namespace, name, holder=sidecar, status="FINISHED", stale_after=60
            ),
            lambda name=name: claim_report(
                kube,
                namespace,
                name,
                holder=operator,
                status="FAILED",
                error_id="dptr.PodLost",
                stale_after=60,
            ),
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        claim: Claim = winners[0]
        report = status_of(kube, namespace, name)["report"]
        assert report["claimedBy"] == claim.holder
        assert report["status"] == claim.status
        assert "reportedAt" not in report


def forced_race(kube: KubeClient, namespace: str, name: str) -> None:
    barrier = threading.Barrier(2)
    decisions: dict[str, int] = {}

    def gated_clock(holder: str) -> Callable[[], datetime]:
        def clock() -> datetime:
            decisions[holder] = decisions.get(holder, 0) + 1
            if decisions[holder] == 1:
                barrier.wait(10)  # both have read the same version; now both write
            return datetime.now(UTC)

        return clock

    a, b = sidecar_holder("p"), operator_holder("o")
    results = race(
        lambda: claim_report(
            kube, namespace, name, holder=a, status="FINISHED", stale_after=60, clock=gated_clock(a)
        ),
        lambda: claim_report(
            kube, namespace, name, holder=b, status="FAILED", stale_after=60, clock=gated_clock(b)
        ),
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    loser = b if winners[0].holder == a else a
    assert decisions[winners[0].holder] == 1
    assert decisions[loser] == 2  # it decided again after its 409


def test_forced_interleaving_loser_sees_conflict(kube: KubeClient, namespace: str) -> None:
    """Both claimers read the same resourceVersion before either writes: one PUT gets 409,
    re-reads, and backs off."""
    for _ in range(5):
        forced_race(kube, namespace, create_task(kube, namespace))


def test_many_claimers_one_winner(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    holders = [sidecar_holder(f"pod-{i}") for i in range(3)] + [operator_holder(f"op-{i}") for i in range(3)]
    results = race(
        *[
            (lambda h=h: claim_report(kube, namespace, name, holder=h, status="FAILED", stale_after=60))
            for h in holders
        ]
    )
    assert sum(r is not None for r in results) == 1


def test_same_holder_resumes_its_claim(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    me = sidecar_holder("pod-a")
    first = claim_report(
        kube, namespace, name, holder=me, status="FAILED", error_id="dptr.ExitCode.3", stale_after=60
    )
    assert first is not None and not first.resumed
    again = claim_report(kube, namespace, name, holder=me, status="FINISHED", stale_after=60)
    assert again is not None and again.resumed
    assert again.resource_version == first.resource_version
    # The first claim's outcome stands.
    assert (again.status, again.error_id) == ("FAILED", "dptr.ExitCode.3")


def test_stale_claim_is_taken_over(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    dead, operator = sidecar_holder("dead-pod"), operator_holder("op-1")
    observed = [1000.0]
    observer = StalenessObserver(clock=lambda: observed[0])
    first = claim_report(
        kube,
        namespace,
        name,
        holder=dead,
        status="FAILED",
        error_id="dptr.OOMKilled",
        error_message="ran out of memory",
        stale_after=60,
    )
    assert first is not None

    def claim(stale_after: float) -> Claim | None:
        return claim_report(
            kube,
            namespace,
            name,
            holder=operator,
            status="FAILED",
            error_id="dptr.PodLost",
            stale_after=stale_after,
            observer=observer,
        )

    assert claim(60) is None  # first seen now
    observed[0] += 59
    assert claim(60) is None  # unchanged for 59 s as seen here: not yet
    observed[0] += 2
    assert claim(600) is None  # ... not for a generous stale_after either
    # ... stale for a shorter one: taken over, keeping the dead holder's outcome.
    taken = claim(60)
    assert taken is not None
    assert taken.taken_over_from == dead
    assert (taken.status, taken.error_id, taken.error_message) == (
        "FAILED",
        "dptr.OOMKilled",
        "ran out of memory",
    )
    report = status_of(kube, namespace, name)["report"]
    assert report["claimedBy"] == operator
    # And the original holder, back from the dead, no longer owns it.
    assert claim_report(kube, namespace, name, holder=dead, status="FAILED", stale_after=60) is None


def test_a_skewed_writer_clock_never_makes_a_live_claim_stale(kube: KubeClient, namespace: str) -> None:
    """claimedAt is the writer's clock: an hour behind or ahead, it decides nothing."""
    for skew in (-3600, 3600):
        name = create_task(kube, namespace)
        live = sidecar_holder(f"pod{skew}")
        skewed = lambda skew=skew: datetime.now(UTC) + timedelta(seconds=skew)  # noqa: E731
        claim = claim_report(
            kube, namespace, name, holder=live, status="FINISHED", stale_after=60, clock=skewed
        )
        assert claim is not None
        observed = [0.0]
        observer = StalenessObserver(clock=lambda observed=observed: observed[0])
        for _ in range(5):
            assert (
                claim_report(
                    kube,
                    namespace,
                    name,
                    holder=operator_holder("o"),
                    status="FAILED",
                    stale_after=60,
                    observer=observer,
                )
                is None
            )
            observed[0] += 50  # the holder refreshes within every 60 s
            claim = revise_claim(kube, claim, clock=skewed)
            assert claim is not None
        assert status_of(kube, namespace, name)["report"]["claimedBy"] == live


def test_stale_claim_takeover_after_real_wait(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    assert claim_report(kube, namespace, name, holder=sidecar_holder("x"), status="FINISHED", stale_after=1)
    assert (
        claim_report(kube, namespace, name, holder=operator_holder("y"), status="FAILED", stale_after=1)
        is None
    )
    time.sleep(1.2)
    taken = claim_report(kube, namespace, name, holder=operator_holder("y"), status="FAILED", stale_after=1)
    assert taken is not None and taken.status == "FINISHED"


def test_reported_task_refuses_claims(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    me = sidecar_holder("pod-r")
    claim = claim_report(
        kube, namespace, name, holder=me, status="FALSE", error_id="dptr.ExitCode.1", stale_after=60
    )
    assert claim is not None
    assert mark_reported(kube, namespace, name, claim=claim, message="precondition does not hold") is True
    status = status_of(kube, namespace, name)
    assert status["phase"] == "Failed"
    assert status["report"]["reportedBy"] == me
    assert status["report"]["status"] == "FALSE"
    assert parse_time(status["report"]["reportedAt"]) is not None
    assert status["message"] == "precondition does not hold"
    # Nobody may claim it again, not even after any staleness, not even the holder.
    assert (
        claim_report(kube, namespace, name, holder=operator_holder("o"), status="FAILED", stale_after=0)
        is None
    )
    assert claim_report(kube, namespace, name, holder=me, status="FALSE", stale_after=0) is None
    assert mark_reported(kube, namespace, name, claim=claim) is False
    assert mark_canceled(kube, namespace, name, by=me, reason="canceled") is False


def test_finished_report_sets_succeeded(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    claim = claim_report(kube, namespace, name, holder=sidecar_holder("p"), status="FINISHED", stale_after=60)
    assert claim is not None
    assert mark_reported(kube, namespace, name, claim=claim)
    assert status_of(kube, namespace, name)["phase"] == "Succeeded"


def test_canceled_task_refuses_claims(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    assert mark_canceled(
        kube, namespace, name, by=sidecar_holder("p"), reason="canceled", message="canceled at Data Pipeline"
    )
    status = status_of(kube, namespace, name)
    assert status["phase"] == "Canceled"
    assert status["canceled"]["by"] == "sidecar/p"
    assert status["canceled"]["reason"] == "canceled"
    assert (
        claim_report(kube, namespace, name, holder=operator_holder("o"), status="FAILED", stale_after=0)
        is None
    )
    assert (
        mark_canceled(kube, namespace, name, by=operator_holder("o"), reason="TaskNotFound") is True
    )  # idempotent
    assert status_of(kube, namespace, name)["canceled"]["by"] == "sidecar/p"


def test_cancel_refused_after_claim(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    assert claim_report(kube, namespace, name, holder=sidecar_holder("p"), status="FINISHED", stale_after=60)
    assert mark_canceled(kube, namespace, name, by=operator_holder("o"), reason="canceled") is False
    assert status_of(kube, namespace, name).get("phase") != "Canceled"


def test_cancel_and_claim_race_exactly_one_outcome(kube: KubeClient, namespace: str) -> None:
    for _ in range(15):
        name = create_task(kube, namespace)
        canceled, claim = race(
            lambda name=name: mark_canceled(
                kube, namespace, name, by=operator_holder("o"), reason="canceled"
            ),
            lambda name=name: claim_report(
                kube, namespace, name, holder=sidecar_holder("p"), status="FINISHED", stale_after=60
            ),
        )
        assert canceled != (claim is not None), (canceled, claim)


def test_heartbeats(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    assert not status_of(kube, namespace, name).get("heartbeat")
    status = take_over_heartbeats(kube, namespace, name, owner="sidecar", by="task-pod")
    assert status["heartbeat"]["owner"] == "sidecar"
    assert status["heartbeat"]["by"] == "task-pod"
    first = parse_time(status["heartbeat"]["lastAt"])
    assert first is not None

    later = datetime.now(UTC) + timedelta(seconds=5)
    record_heartbeat(kube, namespace, name, by="task-pod", at=later)
    hb = status_of(kube, namespace, name)["heartbeat"]
    assert parse_time(hb["lastAt"]) == later.replace(microsecond=later.microsecond)
    assert hb["owner"] == "sidecar"

    record_heartbeat(kube, namespace, name, by="task-pod", error="Throttled: Rate exceeded")
    hb = status_of(kube, namespace, name)["heartbeat"]
    assert hb["lastError"] == "Throttled: Rate exceeded"
    assert parse_time(hb["lastAt"]) == later  # a failed heartbeat does not move lastAt

    record_heartbeat(kube, namespace, name, by="task-pod")
    hb = status_of(kube, namespace, name)["heartbeat"]
    assert "lastError" not in hb

    # The operator resumes when the sidecar's heartbeats go stale.
    status = take_over_heartbeats(kube, namespace, name, owner="operator", by="operator-0")
    assert (status["heartbeat"]["owner"], status["heartbeat"]["by"]) == ("operator", "operator-0")


def test_dispatch_record_on_a_fresh_task(kube: KubeClient, namespace: str) -> None:
    name = create_task(kube, namespace)
    obj = kube.get(pipelinetask_path(namespace, name))
    acked = datetime.now(UTC).replace(microsecond=0)
    record_dispatch(kube, obj, job_name="job-1", acknowledged_at=acked, by="operator-0")
    status = status_of(kube, namespace, name)
    assert (status["jobName"], status["phase"]) == ("job-1", "Pending")
    assert parse_time(status["acknowledgedAt"]) == acked
    assert (status["heartbeat"]["owner"], status["heartbeat"]["by"]) == ("operator", "operator-0")


def test_a_late_dispatch_record_undoes_nothing(kube: KubeClient, namespace: str) -> None:
    # The record is written off the poller, so the pod may have started, its sidecar
    # taken the heartbeats over, and the task even been reported before it lands.
    name = create_task(kube, namespace)
    stale = kube.get(pipelinetask_path(namespace, name))
    take_over_heartbeats(kube, namespace, name, owner="sidecar", by="task-pod")
    claim = claim_report(kube, namespace, name, holder=sidecar_holder("p"), status="FINISHED", stale_after=60)
    assert claim is not None and mark_reported(kube, namespace, name, claim=claim)

    after = record_dispatch(kube, stale, job_name="job-1", acknowledged_at=datetime.now(UTC), by="operator-0")
    status = status_of(kube, namespace, name)
    assert status == after["status"]
    assert status["phase"] == "Succeeded"
    assert (status["heartbeat"]["owner"], status["heartbeat"]["by"]) == ("sidecar", "task-pod")
    assert status["jobName"] == "job-1"  # only what was missing is added
    assert "acknowledgedAt" in status


def test_missing_pipelinetask(kube: KubeClient, namespace: str) -> None:
    with pytest.raises(NotFound):
        claim_report(kube, namespace, "nope", holder="sidecar/x", status="FINISHED", stale_after=60)
    with pytest.raises(NotFound):
        mark_canceled(kube, namespace, "nope", by="sidecar/x", reason="canceled")
