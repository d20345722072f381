"""The operator's side of an attempt's end: its fallback reports, cancels, and counting a
task's end once.

Reports go through the ledger (claim, then ``dptr_common.delivery`` for already final? and
SetTaskStatus, then record), as the sidecar's do, so the two never both report.
"""

from __future__ import annotations

import contextlib
import logging
import time

from dptr_common import ledger
from dptr_common.datapipeline import DataPipelineError, TaskGone
from dptr_common.delivery import deliver
from dptr_common.errors import Outcome
from dptr_common.kube import ApiError, NotFound, job_path
from dptr_common.logformat import log_context
from dptr_operator.events import pipeline_task_ref
from dptr_operator.index import TaskEntry
from dptr_operator.outcomes import assess_job
from dptr_operator.runners import Runners
from dptr_operator.services import Services

__all__ = ["Reporter"]

log = logging.getLogger(__name__)


def outcome_status(phase: str, reported: str | None) -> str:
    """``dptr_task_outcomes_total``'s status: the reported SetTaskStatus taskStatus, else
    ``canceled`` for a canceled attempt, else what the final phase implies."""
    if phase == "Canceled":
        return "canceled"
    if reported in ("FINISHED", "FAILED", "FALSE"):
        return reported
    return "FINISHED" if phase == "Succeeded" else "FAILED"


class Reporter:
    def __init__(self, services: Services, runners: Runners) -> None:
        self.services = services
        self.runners = runners

    def report(
        self, entry: TaskEntry, outcome: Outcome, *, cause: str, stop_job: bool = False, probe: bool = True
    ) -> bool:
        """The operator's fallback SetTaskStatus for ``entry``, unless one is in progress or
        the attempt already ended.  True when this call reported (or found it reported),
        False when someone else holds the outcome."""
        if entry.busy or entry.terminal:
            return False
        entry.busy = True
        try:
            with log_context(**entry.log_fields()):
                return self._report(entry, outcome, cause=cause, stop_job=stop_job, probe=probe)
        finally:
            entry.busy = False

    def task_finished(self, entry: TaskEntry, phase: str, status: str | None = None) -> None:
        """Count a task's end once (whoever observed it first).  ``status`` is what Data
        Pipeline was told, when the caller knows it better than the entry."""
        if entry.counted:
            return
        entry.counted = True
        self.services.metrics.task_outcomes.labels(
            entry.namespace, entry.runner, outcome_status(phase, status or entry.reported_status)
        ).inc()
        worker = self.runners.worker_for(entry)
        if worker is not None:
            if phase == "Succeeded":
                worker.counts.succeeded += 1
            elif phase == "Canceled":
                worker.counts.canceled += 1
            else:
                worker.counts.failed += 1
            worker.capacity_changed()
            self.runners.request_status(worker)

    def delete_job(self, entry: TaskEntry) -> None:
        """Delete the task's Job and, with it, its pods (Background propagation)."""
        name = entry.job_name or entry.name
        with contextlib.suppress(NotFound):
            self.services.kube.delete(job_path(entry.namespace, name), propagation_policy="Background")

    def cancel(self, entry: TaskEntry, *, reason: str, message: str, over_own_claim: bool = False) -> None:
        """Data Pipeline canceled the task: see :meth:`_cancel`."""
        with log_context(**entry.log_fields()):
            self._cancel(entry, reason=reason, message=message, over_own_claim=over_own_claim)

    def _cancel(self, entry: TaskEntry, *, reason: str, message: str, over_own_claim: bool = False) -> None:
        """Data Pipeline canceled the task (or forgot it): record Canceled, then delete the Job,
        and never call SetTaskStatus.

        In that order: a crash between the two leaves a Canceled task with a live Job, which
        the next operator finishes (``on_job_event``); the other order would leave a deleted
        Job and an open attempt whose fallback reports FAILED after the cancel.  A cancel the
        ledger refuses (a report is already claimed) deletes nothing: the claim's outcome
        stands and its holder may still need the pod."""
        try:
            recorded = ledger.mark_canceled(
                self.services.kube,
                entry.namespace,
                entry.name,
                by=self.services.config.holder,
                reason=reason,
                message=message,
                over_own_claim=over_own_claim,
            )
        except NotFound:
            self.services.index.remove(entry.key)
            return
        if not recorded:
            return
        self.services.index.update(entry.key, canceled=True, phase="Canceled")
        try:
            self.delete_job(entry)
        except ApiError as exc:
            log.warning("%s/%s: deleting the Job for a cancel failed: %s", entry.namespace, entry.name, exc)
        self.services.events.emit(
            pipeline_task_ref(entry.namespace, entry.name, entry.uid), "Canceled", message
        )
        self.task_finished(entry, "Canceled")

    def _report(self, entry: TaskEntry, outcome: Outcome, *, cause: str, stop_job: bool, probe: bool) -> bool:
        """The operator's fallback SetTaskStatus, through the ledger.  Returns True when this
        call reported (or found it reported), False when someone else holds the outcome.

        1. claim the report on the PipelineTask (optimistic write), first: whoever claims
           first names the outcome, and a sidecar racing a deletion must lose;
        2. probe: a ReportTaskProgress; a task Data Pipeline canceled is canceled, not
           failed (SetTaskStatus after a cancel is a protocol violation): the cancel is
           recorded over our own claim;
        3. stop the Job if asked (a pod that never started must not start later);
        4. deliver: ask whether the attempt is already final when the claim may have been
           reported before (resumed, taken over), then SetTaskStatus, retried until
           shortly before the claim would go stale;
        5. mark it reported.
        """
        worker = self.runners.worker_for(entry)
        if worker is None:
            log.warning("%s/%s: no TaskRunner to report with", entry.namespace, entry.name)
            return False
        dp = worker.client()
        if cause in ("pod problem Ended", "pod problem Lost") and entry.job_name:
            # A pod stopped by the Job controller for activeDeadlineSeconds is a deadline,
            # whichever event arrived first.
            try:
                deadline_check = assess_job(self.services.kube.get(job_path(entry.namespace, entry.job_name)))
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
        stale_after = self.services.config.scaled(self.services.config.claim_stale_after_seconds)
        try:
            claim = ledger.claim_report(
                self.services.kube,
                entry.namespace,
                entry.name,
                holder=self.services.config.holder,
                status=outcome.status,
                error_id=outcome.error_id,
                error_message=outcome.error_message,
                stale_after=stale_after,
            )
        except NotFound:
            self.services.index.remove(entry.key)
            return False
        if claim is None:
            return False
        if probe:
            try:
                if dp.report_task_progress(entry.task_id):
                    self.cancel(
                        entry,
                        reason="Canceled",
                        message="Data Pipeline canceled the task",
                        over_own_claim=True,
                    )
                    return False
            except TaskGone as exc:
                self.cancel(
                    entry,
                    reason="TaskGone",
                    message=f"Data Pipeline no longer knows the task: {exc}",
                    over_own_claim=True,
                )
                return False
            except DataPipelineError as exc:
                log.info("%s/%s: probe before reporting failed: %s", entry.namespace, entry.name, exc)
        if stop_job:
            try:
                self.delete_job(entry)
            except ApiError as exc:
                log.warning("%s/%s: could not delete the Job: %s", entry.namespace, entry.name, exc)
        # A claim we resumed (after our own restart) or took over from a holder that went
        # silent (a sidecar killed between SetTaskStatus and mark_reported) may already have
        # been reported: ask Data Pipeline before calling SetTaskStatus a second time.
        maybe_reported = claim.resumed or claim.taken_over_from is not None
        with self.services.metrics.timed("SetTaskStatus"):
            delivery = deliver(
                dp,
                Outcome(claim.status, claim.error_id, claim.error_message),
                task_id=entry.task_id,
                pipeline_id=entry.pipeline_id,
                attempt_id=entry.attempt_id,
                maybe_reported=maybe_reported,
                deadline=time.monotonic() + max(stale_after * 0.5, 1.0),
                base=max(self.services.config.scaled(1.0), 0.05),
                cap=max(self.services.config.scaled(30.0), 0.5),
            )
        if delivery.status == "deferred":
            # Not reporting blind: the claim stays ours, heartbeats go on, and the sweep asks
            # again after the next grace (docs/operator.md).
            log.warning(
                "%s/%s: cannot tell whether the attempt was already reported (%s); asking again later",
                entry.namespace,
                entry.name,
                delivery.detail,
            )
            self.services.events.emit(
                pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                "ReportDeferred",
                f"Data Pipeline could not say whether the attempt already has its outcome ({delivery.detail}); "
                "the report waits until it can",
                "Warning",
            )
            return False
        if delivery.status in ("refused", "failed", "gone"):
            # deliver() answers instead of raising: count what metrics.timed would have.
            reason = str(getattr(delivery.error, "reason", "") or delivery.status)
            self.services.metrics.api_errors.labels("SetTaskStatus", reason).inc()
        if delivery.status in ("refused", "failed"):
            # The claim stays ours: the sweep tries again after the problem's next grace.
            log.error(
                "%s/%s: SetTaskStatus %s %s: %s",
                entry.namespace,
                entry.name,
                claim.status,
                delivery.status,
                delivery.detail,
            )
            return False
        if delivery.status == "gone":
            log.warning(
                "%s/%s: SetTaskStatus: the task is gone (%s)", entry.namespace, entry.name, delivery.detail
            )
        elif delivery.status == "repeat-refused":
            log.warning(
                "%s/%s: SetTaskStatus refused after a restart or takeover: %s",
                entry.namespace,
                entry.name,
                delivery.detail,
            )
        message = f"{cause}: {claim.status}" + (f" {claim.error_id}" if claim.error_id else "")
        ledger.mark_reported(
            self.services.kube, entry.namespace, entry.name, claim=claim, message=claim.error_message
        )
        phase = ledger.FINAL_PHASE[claim.status]
        self.services.index.update(entry.key, reported=True, phase=phase)
        ref = pipeline_task_ref(entry.namespace, entry.name, entry.uid)
        self.services.events.emit(
            ref, "Reported", f"the operator reported {message}", "Warning" if phase == "Failed" else "Normal"
        )
        self.services.metrics.fallback_reports.labels(
            entry.namespace, entry.runner, claim.error_id or claim.status
        ).inc()
        self.services.metrics.fallback_outcomes.labels(entry.namespace, entry.runner).inc()
        self.task_finished(entry, phase, claim.status)
        return True
