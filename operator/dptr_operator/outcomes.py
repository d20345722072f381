"""How a task's pod and Job are doing, and the operator's fallback outcomes.

The sidecar reports how the task container ended.  The operator reports only when the
sidecar cannot have: the pod was evicted, never got scheduled or never pulled its image
within a grace, the Job's activeDeadlineSeconds (attemptTimeout) passed, or the pod (or
its node) vanished.  The assessment here is pure (dicts in, :class:`Assessment` out); the
reporting goes through ``reporter.Reporter`` and the ledger, so the sidecar and the
operator never both report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dptr_common.errors import (
    ContainerTermination,
    Outcome,
    outcome_for_pod_failure,
    outcome_for_termination,
)
from dptr_common.render import TASK_CONTAINER

__all__ = ["PROBLEM_RANK", "Assessment", "assess_job", "assess_pod", "assess_refused_pods"]

log = logging.getLogger(__name__)

ProblemKind = Literal[
    "ImagePull", "Unschedulable", "Ended", "Deadline", "Lost", "Deleted", "JobDeleted", "PodRejected"
]

#: Which problem decides the outcome when there are several (lower wins): a deleted
#: PipelineTask, a passed deadline, the task's own end (its exit is known), a deleted Job,
#: refused pods, a lost pod, then what may still resolve itself.
PROBLEM_RANK: dict[str, int] = {
    "Deleted": 0,
    "Deadline": 1,
    "Ended": 2,
    "JobDeleted": 3,
    "PodRejected": 4,
    "Lost": 5,
    "ImagePull": 6,
    "Unschedulable": 6,
}

_IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})


@dataclass(frozen=True)
class Assessment:
    """What a pod (or Job) says about its task.

    ``phase``: the PipelineTask phase it implies (Pending/Running), if any.
    ``problem``: why the operator may have to report, with the outcome it would report;
    the caller applies the grace for the kind (ImagePull, Unschedulable: configurable;
    Ended, Lost: the sidecar's chance to report; Deadline: none).
    """

    phase: str | None = None
    pod_name: str | None = None
    problem: ProblemKind | None = None
    outcome: Outcome | None = None
    message: str | None = None


def _task_status(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == TASK_CONTAINER:
            return status  # type: ignore[no-any-return]
    return None


def assess_pod(pod: Mapping[str, Any], object_type: str | None, *, deleted: bool = False) -> Assessment:
    """Assess a task pod from its status (pure)."""
    meta = pod.get("metadata") or {}
    name = meta.get("name")
    status = pod.get("status") or {}
    phase = status.get("phase")
    reason = status.get("reason")
    message = status.get("message")
    task = _task_status(pod)
    terminated = ((task or {}).get("state") or {}).get("terminated")

    if phase in ("Failed", "Succeeded"):
        if reason in ("Evicted", "DeadlineExceeded", "Preempted", "NodeLost", "Shutdown", "Terminated"):
            pod_reason = "NodeLost" if reason in ("NodeLost", "Shutdown", "Terminated") else reason
            outcome = outcome_for_pod_failure(pod_reason, message)
        elif terminated:
            outcome = outcome_for_termination(ContainerTermination.from_k8s(terminated), object_type)
        else:
            outcome = outcome_for_pod_failure(reason or "PodFailed", message)
        return Assessment(None, name, "Ended", outcome, message or reason)

    if deleted:
        if terminated:
            return Assessment(
                None,
                name,
                "Lost",
                outcome_for_termination(ContainerTermination.from_k8s(terminated), object_type),
            )
        return Assessment(None, name, "Lost", outcome_for_pod_failure("PodLost", f"pod {name} was deleted"))

    # Not ended: Pending or Running, perhaps stuck.
    for group in ("initContainerStatuses", "containerStatuses"):
        for cstatus in status.get(group) or []:
            waiting = (cstatus.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _IMAGE_PULL_REASONS:
                detail = (
                    f"{cstatus.get('name')}: {waiting.get('reason')}: {waiting.get('message') or ''}".strip()
                )
                return Assessment(
                    "Pending",
                    name,
                    "ImagePull",
                    outcome_for_pod_failure(str(waiting.get("reason")), detail),
                    detail,
                )
    for condition in status.get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            return Assessment(
                "Pending",
                name,
                "Unschedulable",
                outcome_for_pod_failure("Unschedulable", condition.get("message")),
                condition.get("message"),
            )
    if terminated and phase != "Pending":
        # The task container ended, the pod has not (the sidecar is still reporting).
        return Assessment(
            "Running",
            name,
            "Ended",
            outcome_for_termination(ContainerTermination.from_k8s(terminated), object_type),
        )
    running = ((task or {}).get("state") or {}).get("running")
    if phase == "Running" and running is not None:
        return Assessment("Running", name)
    return Assessment("Pending", name)


def assess_job(job: Mapping[str, Any], *, deleted: bool = False) -> Assessment:
    """Assess a task Job (pure): a passed deadline is the operator's to report at once."""
    name = (job.get("metadata") or {}).get("name")
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        # FailureTarget comes first (before the pods are stopped), Failed after.
        if (
            condition.get("type") in ("Failed", "FailureTarget")
            and condition.get("reason") == "DeadlineExceeded"
        ):
            return Assessment(
                None, None, "Deadline", outcome_for_pod_failure("DeadlineExceeded", condition.get("message"))
            )
    if deleted:
        return Assessment(
            None, None, "JobDeleted", outcome_for_pod_failure("JobDeleted", f"Job {name} was deleted")
        )
    return Assessment()


def job_finished(job: Mapping[str, Any]) -> bool:
    """Whether the Job is Complete or Failed (its pods are done)."""
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


#: What a FailedCreate message says about why the Job controller could not make the pod.
_POD_REFUSALS = (
    ("exceeded quota", "Quota"),
    ("violates PodSecurity", "PodSecurity"),
    ("serviceaccount", "ServiceAccount"),
    ("denied the request", "Denied"),
)


def assess_refused_pods(job_name: str, message: str | None, grace: float) -> Assessment:
    """A Job that has had no pod for its whole grace: FAILED ``dptr.PodRejected.<cause>``,
    with the Job controller's own FailedCreate message when there is one."""
    if not message:
        return Assessment(
            None,
            None,
            "PodRejected",
            Outcome(
                "FAILED",
                "dptr.PodRejected.NoPod",
                f"Job {job_name} made no pod within {grace:.0f}s and recorded no reason",
            ),
        )
    lowered = message.lower()
    cause = next((c for needle, c in _POD_REFUSALS if needle.lower() in lowered), "FailedCreate")
    return Assessment(
        None,
        None,
        "PodRejected",
        Outcome(
            "FAILED", f"dptr.PodRejected.{cause}", f"the Job controller could not create the pod: {message}"
        ),
        message,
    )
