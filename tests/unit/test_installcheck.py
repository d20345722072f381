"""dptr-install-check's verdicts on Deployment and TaskRunner states (the bed test runs
the real hook against the chart's Deployment; these name each state it must tell apart)."""

from __future__ import annotations

from typing import Any

import pytest

from dptr_common.kube import KubeClient, NotFound
from dptr_operator.installcheck import check_deployment, check_taskrunner


class _Objects:
    """What ``KubeClient.get`` answers for the paths the checks read."""

    def __init__(self, obj: dict[str, Any] | None) -> None:
        self.obj = obj

    def get(self, path: str) -> dict[str, Any]:
        if self.obj is None:
            raise NotFound(404, "NotFound", path)
        return self.obj


def _deployment(status: dict[str, int], replicas: int = 1) -> KubeClient:
    obj = {"metadata": {"generation": 2}, "spec": {"replicas": replicas}, "status": status}
    return _Objects(obj)  # type: ignore[return-value]


ROLLED_OUT = {
    "observedGeneration": 2,
    "replicas": 1,
    "updatedReplicas": 1,
    "readyReplicas": 1,
    "availableReplicas": 1,
}


def test_a_rolled_out_deployment_passes() -> None:
    result = check_deployment(_deployment(ROLLED_OUT), "ns", "dptr")
    assert result.ok, result.message
    assert result.message == "the operator Deployment ns/dptr has 1/1 available replicas of its current spec"


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        # An old ready pod beside a new one that cannot start (maxUnavailable 0).
        (
            dict(ROLLED_OUT, replicas=2, updatedReplicas=1, availableReplicas=1),
            "pods of an older spec still run (1 of 2)",
        ),
        # The old pod alone, before the controller made the new ReplicaSet.
        (dict(ROLLED_OUT, observedGeneration=1), "the controller has not seen generation 2 yet (observed 1)"),
        (dict(ROLLED_OUT, updatedReplicas=0), "0/1 replicas are of the current spec"),
        (
            dict(ROLLED_OUT, availableReplicas=0, readyReplicas=0),
            "0/1 replicas of the current spec are available",
        ),
        ({}, "the controller has not seen generation 2 yet (observed 0)"),
    ],
)
def test_a_deployment_that_has_not_rolled_out_fails(status: dict[str, int], problem: str) -> None:
    result = check_deployment(_deployment(status), "ns", "dptr")
    assert not result.ok
    assert result.message == f"the operator Deployment ns/dptr: {problem}"


def test_zero_replicas_and_no_deployment_fail() -> None:
    scaled = check_deployment(_deployment(dict(ROLLED_OUT, replicas=0), replicas=0), "ns", "dptr")
    assert (scaled.ok, scaled.message) == (False, "the operator Deployment ns/dptr is scaled to 0 replicas")
    gone = check_deployment(_Objects(None), "ns", "dptr")  # type: ignore[arg-type]
    assert (gone.ok, gone.message) == (False, "the operator Deployment ns/dptr does not exist")


def _runner(conditions: list[dict[str, str]], **status: Any) -> KubeClient:
    obj = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 3, "conditions": conditions, **status},
    }
    return _Objects(obj)  # type: ignore[return-value]


def test_taskrunner_verdicts() -> None:
    ready = {"type": "Ready", "status": "True", "reason": "Polling"}
    degraded = {"type": "Degraded", "status": "True", "reason": "InvalidCredentials", "message": "refused"}
    polled = check_taskrunner(_runner([ready], lastPollTime="2026-12-02T00:00:00Z"), "a", "etl")
    assert (polled.ok, polled.message) == (True, "TaskRunner a/etl is Ready (last poll 2026-12-02T00:00:00Z)")
    unpolled = check_taskrunner(_runner([ready]), "a", "etl")
    assert (unpolled.ok, unpolled.message) == (
        False,
        "TaskRunner a/etl is Ready but has not polled Data Pipeline yet",
    )
    bad = check_taskrunner(_runner([dict(ready, status="False"), degraded]), "a", "etl")
    assert (bad.ok, bad.message) == (True, "TaskRunner a/etl is Degraded: InvalidCredentials: refused")
    unseen = check_taskrunner(_runner([ready], observedGeneration=2, lastPollTime="t"), "a", "etl")
    assert not unseen.ok and "has not seen generation 3" in unseen.message
    new = check_taskrunner(_runner([]), "a", "etl")
    assert (new.ok, new.message) == (
        False,
        "TaskRunner a/etl has no conditions: the operator has not served it",
    )
