"""How a task's pod and Job are doing, and the operator's fallback outcomes.

The sidecar reports how the task container ended.  The operator reports only when the
sidecar cannot have: the pod was evicted, never got scheduled or never pulled its image
within a grace, the Job's activeDeadlineSeconds (attemptTimeout) passed, or the pod (or
its node) vanished.  The assessment here is pure (dicts in, :class:`Assessment` out); the
reporting goes through :func:`report_outcome` and the ledger, so the sidecar and the
operator never both report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dptr_common import ledger
from dptr_common.datapipeline import (
    DataPipelineClient,
    DataPipelineError,
    InvalidRequest,
    TaskGone,
    call_with_retry,
)
from dptr_common.errors import (
    ContainerTermination,
    Outcome,
    outcome_for_pod_failure,
    outcome_for_termination,
)
from dptr_common.kube import ApiError, NotFound, job_path
from dptr_common.render import TASK_CONTAINER
from dptr_operator.events import pipeline_task_ref
from dptr_operator.index import TaskEntry

if TYPE_CHECKING:
    from dptr_operator.runtime import Operator

__all__ = ["Assessment", "assess_job", "assess_pod", "cancel_task", "report_outcome"]

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


# --------------------------------------------------------------------------- actions


def delete_job(op: Operator, entry: TaskEntry) -> None:
    """Delete the task's Job and, with it, its pods (Background propagation)."""
    name = entry.job_name or entry.name
    with contextlib.suppress(NotFound):
        op.kube.delete(job_path(entry.namespace, name), propagation_policy="Background")


def cancel_task(
    op: Operator, entry: TaskEntry, reason: str, message: str, *, over_own_claim: bool = False
) -> None:
    """Data Pipeline canceled the task (or forgot it): record Canceled, then delete the Job,
    and never call SetTaskStatus.

    In that order: a crash between the two leaves a Canceled task with a live Job, which
    the next operator finishes (``on_job_event``); the other order would leave a deleted
    Job and an open attempt whose fallback reports FAILED after the cancel.  A cancel the
    ledger refuses (a report is already claimed) deletes nothing: the claim's outcome
    stands and its holder may still need the pod."""
    try:
        recorded = ledger.mark_canceled(
            op.kube,
            entry.namespace,
            entry.name,
            by=op.config.holder,
            reason=reason,
            message=message,
            over_own_claim=over_own_claim,
        )
    except NotFound:
        op.index.remove(entry.key)
        return
    if not recorded:
        return
    op.index.update(entry.key, canceled=True, phase="Canceled")
    try:
        delete_job(op, entry)
    except ApiError as exc:
        log.warning("%s/%s: deleting the Job for a cancel failed: %s", entry.namespace, entry.name, exc)
    op.events.emit(pipeline_task_ref(entry.namespace, entry.name, entry.uid), "Canceled", message)
    op.task_finished(entry, "Canceled")


class FinalityUnknown(Exception):  # noqa: N818 - reads as what it is
    """Data Pipeline could not say whether the attempt already has its final status."""


def _already_final(op: Operator, dp: DataPipelineClient, entry: TaskEntry, deadline: float) -> bool:
    """Whether Data Pipeline already has a final status for the attempt (after a restart
    between SetTaskStatus and recording it).  Retried until ``deadline``; when it cannot
    be answered, raises :class:`FinalityUnknown`: guessing "no" could report twice."""
    try:
        return call_with_retry(
            lambda: dp.attempt_is_final(entry.pipeline_id, entry.attempt_id),
            deadline=deadline,
            base=max(op.config.scaled(1.0), 0.05),
            cap=max(op.config.scaled(30.0), 0.5),
        )
    except DataPipelineError as exc:
        raise FinalityUnknown(str(exc)) from exc


def report_outcome(
    op: Operator,
    entry: TaskEntry,
    outcome: Outcome,
    *,
    cause: str,
    stop_job: bool = False,
    probe: bool = True,
) -> bool:
    """The operator's fallback SetTaskStatus, through the ledger.  Returns True when this
    call reported (or found it reported), False when someone else holds the outcome.

    1. claim the report on the PipelineTask (optimistic write), first: whoever claims
       first names the outcome, and a sidecar racing a deletion must lose;
    2. probe: a ReportTaskProgress; a task Data Pipeline canceled is canceled, not
       failed (SetTaskStatus after a cancel is a protocol violation): the cancel is
       recorded over our own claim;
    3. stop the Job if asked (a pod that never started must not start later);
    4. SetTaskStatus, retried until shortly before the claim would go stale;
    5. mark it reported.
    """
    worker = op.worker_for(entry)
    if worker is None:
        log.warning("%s/%s: no TaskRunner to report with", entry.namespace, entry.name)
        return False
    dp = worker.client()
    if cause in ("pod problem Ended", "pod problem Lost") and entry.job_name:
        # A pod stopped by the Job controller for activeDeadlineSeconds is a deadline,
        # whichever event arrived first.
        try:
            deadline_check = assess_job(op.kube.get(job_path(entry.namespace, entry.job_name)))
            if deadline_check.problem == "Deadline" and deadline_check.outcome is not None:
                outcome = deadline_check.outcome
        except ApiError:
            pass
    if outcome.status == "FINISHED" and entry.staged_outputs:
        # Only the sidecar uploads staged outputs, and it did not confirm them: reporting
        # FINISHED here would tell downstream activities data is there when it may not be.
        outcome = Outcome(
            "FAILED",
            "dptr.StagingFailed.Incomplete",
            "the task exited 0, but its staged outputs were not confirmed uploaded by the sidecar",
        )
    stale_after = op.config.scaled(op.config.claim_stale_after_seconds)
    try:
        claim = ledger.claim_report(
            op.kube,
            entry.namespace,
            entry.name,
            holder=op.config.holder,
            status=outcome.status,
            error_id=outcome.error_id,
            error_message=outcome.error_message,
            stale_after=stale_after,
        )
    except NotFound:
        op.index.remove(entry.key)
        return False
    if claim is None:
        return False
    if probe:
        try:
            if dp.report_task_progress(entry.task_id):
                cancel_task(op, entry, "Canceled", "Data Pipeline canceled the task", over_own_claim=True)
                return False
        except TaskGone as exc:
            cancel_task(
                op, entry, "TaskGone", f"Data Pipeline no longer knows the task: {exc}", over_own_claim=True
            )
            return False
        except DataPipelineError as exc:
            log.info("%s/%s: probe before reporting failed: %s", entry.namespace, entry.name, exc)
    if stop_job:
        try:
            delete_job(op, entry)
        except ApiError as exc:
            log.warning("%s/%s: could not delete the Job: %s", entry.namespace, entry.name, exc)
    # A claim we resumed (after our own restart) or took over from a holder that went
    # silent (a sidecar killed between SetTaskStatus and mark_reported) may already have
    # been reported: ask Data Pipeline before calling SetTaskStatus a second time.
    maybe_reported = claim.resumed or claim.taken_over_from is not None
    deadline = time.monotonic() + max(stale_after * 0.5, 1.0)
    try:
        reported_already = maybe_reported and _already_final(op, dp, entry, deadline)
    except FinalityUnknown as exc:
        # Not reporting blind: the claim stays ours, heartbeats go on, and the sweep asks
        # again after the next grace (docs/operator.md).
        log.warning(
            "%s/%s: cannot tell whether the attempt was already reported (%s); asking again later",
            entry.namespace,
            entry.name,
            exc,
        )
        op.events.emit(
            pipeline_task_ref(entry.namespace, entry.name, entry.uid),
            "ReportDeferred",
            f"Data Pipeline could not say whether the attempt already has its outcome ({exc}); "
            "the report waits until it can",
            "Warning",
        )
        return False
    if not reported_already:
        kwargs = Outcome(claim.status, claim.error_id, claim.error_message).set_task_status_kwargs(
            entry.task_id
        )
        try:
            with op.metrics.timed("SetTaskStatus"):
                call_with_retry(
                    lambda: dp.set_task_status(
                        entry.task_id,
                        claim.status,
                        kwargs.get("errorId"),
                        kwargs.get("errorMessage"),
                    ),
                    deadline=deadline,
                    base=max(op.config.scaled(1.0), 0.05),
                    cap=max(op.config.scaled(30.0), 0.5),
                )
        except TaskGone as exc:
            log.warning("%s/%s: SetTaskStatus: the task is gone (%s)", entry.namespace, entry.name, exc)
        except InvalidRequest as exc:
            if not maybe_reported:
                raise
            log.warning(
                "%s/%s: SetTaskStatus refused after a restart or takeover: %s",
                entry.namespace,
                entry.name,
                exc,
            )
    message = f"{cause}: {claim.status}" + (f" {claim.error_id}" if claim.error_id else "")
    ledger.mark_reported(op.kube, entry.namespace, entry.name, claim=claim, message=claim.error_message)
    phase = ledger.FINAL_PHASE[claim.status]
    op.index.update(entry.key, reported=True, phase=phase)
    ref = pipeline_task_ref(entry.namespace, entry.name, entry.uid)
    op.events.emit(
        ref, "Reported", f"the operator reported {message}", "Warning" if phase == "Failed" else "Normal"
    )
    op.metrics.fallback_reports.labels(
        f"{entry.namespace}/{entry.runner}", claim.error_id or claim.status
    ).inc()
    op.task_finished(entry, phase)
    return True
