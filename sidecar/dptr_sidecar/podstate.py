"""Reading the task pod and the PipelineTask status: pure functions, no API calls.

How the task ended (:func:`task_end`), its exit code, the pod's grace period and Job, and
whether the PipelineTask has anything left to do (:func:`settled`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dptr_common.errors import ContainerTermination, Outcome, outcome_for_termination

__all__ = [
    "FETCH_CONTAINER",
    "INIT_CONTAINERS",
    "STAGE_IN_CONTAINER",
    "TaskEnd",
    "container_status",
    "exit_code",
    "owning_job",
    "settled",
    "task_end",
    "termination_grace",
]

FETCH_CONTAINER = "dptr-fetch-script"
STAGE_IN_CONTAINER = "dptr-stage-in"
#: dptr's init containers that run before the task; one failing means the task never ran.
INIT_CONTAINERS = (FETCH_CONTAINER, STAGE_IN_CONTAINER)


@dataclass(frozen=True)
class TaskEnd:
    """How the task ended, as seen on the pod."""

    outcome: Outcome
    container: str
    summary: str
    #: Whether the pod was being deleted when the container ended (maybe a cancel).
    pod_deleting: bool


def container_status(pod: dict[str, Any], key: str, name: str) -> dict[str, Any] | None:
    """The status of container ``name`` in ``status.<key>`` (``containerStatuses`` or
    ``initContainerStatuses``)."""
    for status in (pod.get("status") or {}).get(key) or []:
        if status.get("name") == name:
            found: dict[str, Any] = status
            return found
    return None


def task_end(pod: dict[str, Any], main_container: str, object_type: str | None) -> TaskEnd | None:
    """The outcome if the pod shows the task's end: the main container's final state, or
    the failure of ``dptr-fetch-script`` or ``dptr-stage-in`` (the task never ran; the
    outcome comes from their ``<errorId>\\n<message>`` termination message).  None while
    the task runs."""
    deleting = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    status = container_status(pod, "containerStatuses", main_container)
    terminated = ((status or {}).get("state") or {}).get("terminated")
    if terminated:
        termination = ContainerTermination.from_k8s(terminated)
        summary = f"exit code {termination.exit_code}"
        if termination.reason:
            summary += f", {termination.reason}"
        return TaskEnd(outcome_for_termination(termination, object_type), main_container, summary, deleting)
    for name in INIT_CONTAINERS:
        init = container_status(pod, "initContainerStatuses", name)
        init_terminated = ((init or {}).get("state") or {}).get("terminated") or {}
        if init_terminated and init_terminated.get("exitCode") not in (None, 0):
            # Lazy: .staging loads pydantic (about 11 MB), which the idle sidecar never needs.
            from .staging import outcome_for_init_failure

            code = init_terminated.get("exitCode")
            outcome = outcome_for_init_failure(name, init_terminated)
            return TaskEnd(outcome, name, f"{name} exit code {code}", deleting)
    return None


def exit_code(pod: dict[str, Any], container: str) -> int | None:
    """The exit code of a terminated (non-init) container, or None."""
    status = container_status(pod, "containerStatuses", container) or {}
    code = ((status.get("state") or {}).get("terminated") or {}).get("exitCode")
    return int(code) if code is not None else None


def termination_grace(pod: dict[str, Any]) -> float | None:
    """Real seconds the sidecar may take after SIGTERM, from the pod's
    ``terminationGracePeriodSeconds`` (None when the pod does not say)."""
    grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    if grace is None:
        return None
    # kubelet enforces the pod's real grace period; keep a margin for our exit.
    return max(float(grace) * 0.9 - 1.0, 1.0)


def owning_job(pod: dict[str, Any]) -> str | None:
    """The name of the Job that owns the pod (the last Job owner reference), or None."""
    job: str | None = None
    for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("kind") == "Job":
            job = owner.get("name")
    return job


def settled(status: dict[str, Any]) -> str:
    """Why nothing is left to do ("reported", "canceled"), or "" while the task is open."""
    if (status.get("report") or {}).get("reportedAt"):
        return "reported"
    if status.get("phase") == "Canceled" or (status.get("canceled") or {}).get("at"):
        return "canceled"
    return ""
