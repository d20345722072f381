"""What a task's pods and Job say, and the operator's fallback reports for problems the
sidecar cannot report itself: a pod that never gets scheduled, pulled or created, a pod
or Job that vanished, a passed deadline, a PipelineTask deleted while its attempt runs.

Each problem waits out its grace (none for deletions and deadlines) and is then reported
through the reporter; the assessment of pods and Jobs is pure (``outcomes``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from dptr_common import naming
from dptr_common.errors import Outcome, outcome_for_pod_failure
from dptr_common.kube import NotFound, event_path, job_path, pipelinetask_path
from dptr_operator import outcomes
from dptr_operator.events import pipeline_task_ref
from dptr_operator.index import TaskEntry
from dptr_operator.reporter import Reporter
from dptr_operator.services import Services

__all__ = ["PodTracker"]

log = logging.getLogger(__name__)


class PodTracker:
    def __init__(self, services: Services, reporter: Reporter) -> None:
        self.services = services
        self.reporter = reporter

    # ------------------------------------------------------------------ events

    def on_pod(self, entry: TaskEntry, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A pod of an unfinished task changed (runs in kopf's event loop: index and queue only)."""
        entry.pod_seen = True
        assessment = outcomes.assess_pod(body, entry.object_type, deleted=event_type == "DELETED")
        if assessment.phase == "Running" and (
            entry.phase != "Running" or entry.pod_name != assessment.pod_name
        ):
            known_pod = entry.pod_name == assessment.pod_name
            self.services.index.update(entry.key, phase="Running", pod_name=assessment.pod_name)
            if assessment.problem != "Ended":
                self.services.work.submit(self._mark_running, entry=entry, pod_name=assessment.pod_name)
            elif not known_pod:
                # The first Running pod seen has a task container that has ended already
                # (a short task): the report follows at once, and a Running phase and a
                # Started Event would say nothing it does not; the pod's name still helps.
                self.services.work.submit(
                    self.patch_status, entry=entry, status={"podName": assessment.pod_name}
                )
        elif assessment.phase == "Pending" and assessment.pod_name and entry.pod_name != assessment.pod_name:
            self.services.index.update(entry.key, pod_name=assessment.pod_name)
            self.services.work.submit(self.patch_status, entry=entry, status={"podName": assessment.pod_name})
        self.note(entry, assessment)

    def on_job(self, entry: TaskEntry, event_type: str | None, body: Mapping[str, Any]) -> None:
        """The Job of an unfinished task changed (kopf's event loop: index and queue only)."""
        assessment = outcomes.assess_job(body, deleted=event_type == "DELETED")
        if assessment.problem is None:
            # A healthy Job says nothing about its pod: only a pod's own event may clear a
            # pod problem (a Job status update after an Unschedulable pod event once
            # cleared it, and the task was heartbeated forever).
            return
        self.note(entry, assessment)
        if entry.problem == "JobDeleted":
            self.report_now(entry)

    def task_deleted(self, entry: TaskEntry) -> None:
        """Deleted by a user (or with its TaskRunner's namespace) while the attempt is open:
        the finalizer holds the object until the attempt is reported."""
        self.note(
            entry,
            outcomes.Assessment(
                problem="Deleted",
                outcome=outcome_for_pod_failure(
                    "PipelineTaskDeleted", f"PipelineTask {entry.name} was deleted"
                ),
            ),
        )
        if entry.problem == "Deleted":
            self.report_now(entry)

    def note(self, entry: TaskEntry, assessment: outcomes.Assessment) -> None:
        with self.services.index.lock:
            if assessment.problem is None:
                if entry.problem in ("ImagePull", "Unschedulable"):
                    entry.problem = None
                    entry.problem_since = None
                return
            # What decides the outcome when several things are wrong: a deleted PipelineTask
            # above all, then a passed deadline, then the task's own end (its exit is
            # known), then a deleted Job, then the rest.
            rank = outcomes.PROBLEM_RANK
            if entry.problem is not None and rank.get(assessment.problem, 9) > rank.get(entry.problem, 9):
                return
            if entry.problem != assessment.problem:
                entry.problem = assessment.problem
                entry.problem_since = time.monotonic()
            entry.problem_outcome = assessment.outcome
            entry.problem_message = assessment.message

    def report_now(self, entry: TaskEntry) -> None:
        """A problem with no grace (a deletion): report at once rather than at the next
        sweep, so the operator's claim, naming the cause, comes before the sidecar's."""
        if entry.busy or entry.problem_outcome is None or entry.problem is None:
            return
        entry.problem_since = time.monotonic()
        stop_job = entry.problem in ("Deleted", "PodRejected")
        self._submit_report(
            entry, entry.problem_outcome, cause=f"pod problem {entry.problem}", stop_job=stop_job
        )

    def _submit_report(self, entry: TaskEntry, outcome: Outcome, *, cause: str, stop_job: bool) -> None:
        self.services.work.submit(
            self.reporter.report,
            key=("report", entry.key, cause),
            entry=entry,
            outcome=outcome,
            cause=cause,
            stop_job=stop_job,
            probe=True,
        )

    def grace(self, problem: str) -> float:
        cfg = self.services.config
        graces = {
            "ImagePull": cfg.image_pull_grace_seconds,
            "Unschedulable": cfg.unschedulable_grace_seconds,
            "Ended": cfg.sidecar_report_grace_seconds,
            "Lost": cfg.sidecar_report_grace_seconds,
            "Deadline": 0.0,
            "Deleted": 0.0,
            "JobDeleted": 0.0,
            "PodRejected": 0.0,
        }
        return cfg.scaled(graces.get(problem, cfg.sidecar_report_grace_seconds))

    # ------------------------------------------------------------------ the sweep

    def sweep(self, now: float) -> None:
        # Pod problems past their grace.
        for entry in self.services.index:
            if entry.terminal or entry.busy or entry.problem is None or entry.problem_since is None:
                continue
            if now - entry.problem_since < self.grace(entry.problem):
                continue
            outcome = entry.problem_outcome
            if outcome is None:
                continue
            stop_job = entry.problem in ("ImagePull", "Unschedulable", "Deleted", "PodRejected")
            entry.problem_since = now  # retried after another grace if this attempt fails
            self._submit_report(entry, outcome, cause=f"pod problem {entry.problem}", stop_job=stop_job)
        # Jobs whose pods never appeared: refused (quota, admission, a missing account) or gone.
        pod_grace = self.services.config.scaled(self.services.config.pod_create_grace_seconds)
        for entry in self.services.index:
            if entry.terminal or entry.busy or entry.pod_seen or entry.problem is not None:
                continue
            if entry.job_name and entry.job_since is not None and now - entry.job_since >= pod_grace:
                entry.job_since = now  # looked at again after another grace
                self.services.work.submit(self.check_podless_job, key=("podless", entry.key), entry=entry)

    def check_podless_job(self, entry: TaskEntry) -> None:
        """A Job without a pod past its grace: gone, or refused its pods (the Job
        controller's FailedCreate Event says why).  Either ends the attempt FAILED."""
        assert entry.job_name is not None
        try:
            self.services.kube.get(job_path(entry.namespace, entry.job_name))
        except NotFound:
            self.note(entry, outcomes.assess_job({"metadata": {"name": entry.job_name}}, deleted=True))
            return
        pods = self.services.kube.list(
            f"/api/v1/namespaces/{entry.namespace}/pods",
            label_selector=f"{naming.LABEL_PIPELINE_TASK}={naming.label_value(entry.name)}",
        )
        if pods:
            entry.pod_seen = True  # the watch will tell the rest
            return
        events = self.services.kube.list(
            event_path(entry.namespace),
            field_selector=f"involvedObject.name={entry.job_name},involvedObject.kind=Job,reason=FailedCreate",
        )
        message = next((str(e.get("message")) for e in reversed(events) if e.get("message")), None)
        self.note(
            entry,
            outcomes.assess_refused_pods(
                entry.job_name, message, self.services.config.pod_create_grace_seconds
            ),
        )

    # ------------------------------------------------------------------ status writes

    def patch_status(self, entry: TaskEntry, status: dict[str, Any]) -> None:
        with contextlib.suppress(NotFound):
            self.services.kube.patch(
                pipelinetask_path(entry.namespace, entry.name, "status"), {"status": status}
            )

    def _mark_running(self, entry: TaskEntry, pod_name: str | None) -> None:
        try:
            obj = self.services.kube.get(pipelinetask_path(entry.namespace, entry.name))
        except NotFound:
            return
        status = obj.get("status") or {}
        # A claimed report means the task has ended already (a short task's pod can be seen
        # running after that): a Running phase and a Started Event would say nothing new.
        if status.get("phase") in (None, "Pending") and not (status.get("report") or {}).get("claimedBy"):
            self.patch_status(entry, {"phase": "Running", "podName": pod_name})
            self.services.events.emit(
                pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                "Started",
                f"pod {pod_name} is running",
            )
