"""The sidecar: heartbeat the task, honour a cancel, report how the task container ended.

One process per task pod, three threads:

* the **main thread** decides: it reads the PipelineTask (the ledger shared with the
  operator), takes over heartbeats, then waits for one of: the task container's final
  status (report it), a cancel (delete the Job, record Canceled), SIGTERM (keep going
  until the final status is seen or the grace period runs out);
* the **heartbeat thread** calls ReportTaskProgress on the paced interval, retrying
  throttling and 5xx with back-off but never past the task's reportProgressTimeout,
  and re-reads the interval the operator publishes on the TaskRunner;
* the **pod watcher** follows the sidecar's own pod (GET + watch).

Exactly one outcome per task (design invariant 1): the report is claimed on the
PipelineTask with an optimistic write before SetTaskStatus, as the operator does; a
cancel is recorded only while no report is claimed; and before any SetTaskStatus a last
ReportTaskProgress asks the service whether the task was canceled meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dptr_common.errors import (
    ContainerTermination,
    Outcome,
    fit_api_string,
    outcome_for_pod_failure,
    outcome_for_termination,
)
from dptr_common.kube import (
    ApiError,
    KubeClient,
    NotFound,
    job_path,
    object_reference,
    pipelinetask_path,
    pod_path,
    taskrunner_path,
)
from dptr_common.ledger import (
    Claim,
    claim_report,
    mark_canceled,
    mark_reported,
    record_heartbeat,
    revise_claim,
    sidecar_holder,
    take_over_heartbeats,
)
from dptr_common.pacing import jittered

from .config import DEFAULT_REPORT_PROGRESS_TIMEOUT, DEFAULT_TERMINATION_GRACE, SidecarConfig
from .kubestream import PodWatcher, read_log_tail, stream_log

if TYPE_CHECKING:
    from dptr_common.datapipeline import DataPipelineClient

__all__ = ["FETCH_CONTAINER", "INIT_CONTAINERS", "STAGE_IN_CONTAINER", "Sidecar", "TaskEnd", "task_end"]

log = logging.getLogger("dptr.sidecar")

FETCH_CONTAINER = "dptr-fetch-script"
STAGE_IN_CONTAINER = "dptr-stage-in"
#: dptr's init containers that run before the task; one failing means the task never ran.
INIT_CONTAINERS = (FETCH_CONTAINER, STAGE_IN_CONTAINER)
#: The outcome claimed while staged outputs upload: if the sidecar dies meanwhile, whoever
#: takes the claim over reports this (the data did not arrive), never FINISHED.
UPLOAD_INTERRUPTED = Outcome(
    "FAILED",
    "dptr.StagingFailed.Interrupted",
    "the sidecar stopped while uploading the staged outputs; they may be incomplete",
)
COMPONENT = "dptr-sidecar"

#: A heartbeat must land this fraction of reportProgressTimeout before it runs out.
HEARTBEAT_MARGIN = 0.1
#: The interval is never longer than this fraction of reportProgressTimeout.
MAX_INTERVAL_FRACTION = 1 / 3
#: Re-read the TaskRunner's published interval every this many heartbeats.
INTERVAL_REFRESH_BEATS = 5
#: Protocol seconds SetTaskStatus (and the last cancel check) may be retried for.
REPORT_RETRY_BUDGET = 120.0
#: Protocol seconds after which another holder's unreported claim counts as abandoned.
#: Well above REPORT_RETRY_BUDGET, so a live holder still retrying is never overtaken.
CLAIM_STALE_AFTER = 600.0
#: Back-off for retried Data Pipeline calls, in protocol seconds.
RETRY_BASE, RETRY_CAP = 1.0, 30.0

#: The cancel reason and detail for ``canceled: true``.
CANCELED = ("Canceled", "ReportTaskProgress answered canceled: true")


@dataclass(frozen=True)
class TaskEnd:
    """How the task ended, as seen on the pod."""

    outcome: Outcome
    container: str
    summary: str
    #: Whether the pod was being deleted when the container ended (maybe a cancel).
    pod_deleting: bool


def _container_status(pod: dict[str, Any], key: str, name: str) -> dict[str, Any] | None:
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
    status = _container_status(pod, "containerStatuses", main_container)
    terminated = ((status or {}).get("state") or {}).get("terminated")
    if terminated:
        termination = ContainerTermination.from_k8s(terminated)
        summary = f"exit code {termination.exit_code}"
        if termination.reason:
            summary += f", {termination.reason}"
        return TaskEnd(outcome_for_termination(termination, object_type), main_container, summary, deleting)
    for name in INIT_CONTAINERS:
        init = _container_status(pod, "initContainerStatuses", name)
        init_terminated = ((init or {}).get("state") or {}).get("terminated") or {}
        if init_terminated and init_terminated.get("exitCode") not in (None, 0):
            from .staging import outcome_for_init_failure

            code = init_terminated.get("exitCode")
            outcome = outcome_for_init_failure(name, init_terminated)
            return TaskEnd(outcome, name, f"{name} exit code {code}", deleting)
    return None


class Sidecar:
    """One run of the sidecar in its pod; :meth:`run` returns the process exit code."""

    def __init__(
        self,
        config: SidecarConfig,
        kube: KubeClient,
        dp_factory: Callable[[], DataPipelineClient],
        *,
        sigterm: threading.Event | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        #: The pod's environment: where staged outputs and logs go (``render_staging``).
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.kube = kube
        self._dp_factory = dp_factory
        self._dp: DataPipelineClient | None = None
        self.sigterm = sigterm or threading.Event()
        self.holder = sidecar_holder(config.pod_name)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stop_heartbeats = threading.Event()
        self.task_id = ""
        self.pipeline_id = ""
        self.attempt_id = ""
        self.timeout = DEFAULT_REPORT_PROGRESS_TIMEOUT  # protocol seconds
        self.interval = config.heartbeat_interval  # protocol seconds
        self.last_beat = time.monotonic()
        self._pt_ref: dict[str, Any] = {}
        self._job_name: str | None = None
        self._grace = DEFAULT_TERMINATION_GRACE
        self._latest_pod: dict[str, Any] | None = None

    # ---------------------------------------------------------------- helpers

    @property
    def dp(self) -> DataPipelineClient:
        if self._dp is None:
            self._dp = self._dp_factory()
        return self._dp

    def scaled(self, seconds: float) -> float:
        return self.config.scaled(seconds)

    def _event(self, reason: str, message: str, type_: Literal["Normal", "Warning"] = "Normal") -> None:
        if not self._pt_ref:
            return
        try:
            self.kube.create_event(
                self.config.namespace,
                self._pt_ref,
                reason,
                message,
                type_,
                COMPONENT,
                reporting_instance=self.config.pod_name,
            )
        except ApiError as exc:
            log.warning("could not record Event %s: %s", reason, exc)

    def _retry_kube(self, fn: Callable[[], Any], what: str, budget: float = 60.0) -> Any:
        """API server calls that must not be lost (start-up, the ledger after the task ended):
        retried while the API server is unreachable or overloaded, never after a 4xx answer."""
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                return fn()
            except ApiError as exc:
                if exc.status not in (0, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                    raise
                attempt += 1
                log.info("%s failed (%s); retrying", what, exc)
                time.sleep(min(0.2 * 2**attempt, 5.0))

    def _already_final(self, deadline: float) -> bool | None:
        """Ask Data Pipeline whether our attempt already has its final status (retried until
        ``deadline``); None when it cannot say."""
        from dptr_common.datapipeline import DataPipelineError

        try:
            return bool(
                self._call_dp(lambda: self.dp.attempt_is_final(self.pipeline_id, self.attempt_id), deadline)
            )
        except DataPipelineError as exc:
            log.warning("could not ask whether the attempt is already final (%s); not reporting", exc)
            return None

    def _call_dp(self, fn: Callable[[], Any], deadline: float) -> Any:
        from dptr_common.datapipeline import call_with_retry

        def on_retry(error: BaseException, wait: float) -> None:
            log.info("%s; retrying in %.2fs", error, wait)

        return call_with_retry(
            fn,
            deadline=deadline,
            base=self.scaled(RETRY_BASE),
            cap=self.scaled(RETRY_CAP),
            on_retry=on_retry,
        )

    # ---------------------------------------------------------------- start

    def run(self) -> int:
        cfg = self.config
        try:
            pt = self._retry_kube(
                lambda: self.kube.get(pipelinetask_path(cfg.namespace, cfg.pipeline_task)),
                "reading the PipelineTask",
            )
        except NotFound:
            log.warning("PipelineTask %s/%s does not exist; nothing to do", cfg.namespace, cfg.pipeline_task)
            return 0
        self._pt_ref = object_reference(pt)
        spec, status = pt.get("spec") or {}, pt.get("status") or {}
        self.task_id = str(spec.get("taskId") or "")
        self.pipeline_id = str(spec.get("pipelineId") or "")
        self.attempt_id = str(spec.get("attemptId") or "")
        if not self.task_id:
            log.error("PipelineTask %s has no spec.taskId", cfg.pipeline_task)
            return 1
        self.timeout = float(spec.get("reportProgressTimeoutSeconds") or DEFAULT_REPORT_PROGRESS_TIMEOUT)
        self._job_name = status.get("jobName")
        if _settled(status):
            log.info("the task is already %s; nothing left to do", _settled(status))
            if _settled(status) == "canceled":
                # The canceler may have stopped between recording the cancel and deleting
                # the Job (cancels are recorded first): finish its work.
                self._delete_job()
            return 0
        claim = (status.get("report") or {}).get("claimedBy")

        # The pod: its grace period, its Job, and perhaps the task's end already.
        try:
            pod = self._retry_kube(
                lambda: self.kube.get(pod_path(cfg.namespace, cfg.pod_name)), "reading the pod"
            )
        except NotFound:
            log.warning("pod %s does not exist; exiting", cfg.pod_name)
            return 0
        self._note_pod(pod)

        if claim and claim != self.holder:
            log.info("the report is claimed by %s; leaving it to them", claim)
            return 0
        if claim == self.holder:
            log.info("resuming our claimed report after a restart")
            end = task_end(pod, cfg.main_container, cfg.object_type)
            if end is not None:
                return self._report(end)

        # The operator heartbeated until now; from here on it is ours.
        status = self._retry_kube(
            lambda: take_over_heartbeats(
                self.kube, cfg.namespace, cfg.pipeline_task, "sidecar", cfg.pod_name
            ),
            "taking over heartbeats",
        )
        if _settled(status):
            return 0
        log.info(
            "took over heartbeats of %s (task timeout %.0fs, interval %.0fs, time scale %g)",
            cfg.pipeline_task,
            self.timeout,
            self.interval,
            cfg.time_scale,
        )

        watcher = PodWatcher(
            self.kube,
            cfg.namespace,
            cfg.pod_name,
            lambda obj: self.events.put(("pod", obj)),
            watch_timeout=240.0,
            poll_interval=max(min(self.scaled(5.0), 5.0), 0.2),
        )
        watcher.start()
        beats = threading.Thread(target=self._heartbeat_loop, name="dptr-heartbeat", daemon=True)
        beats.start()
        try:
            return self._main_loop()
        finally:
            self.stop_heartbeats.set()
            watcher.close()

    def _note_pod(self, pod: dict[str, Any]) -> None:
        self._latest_pod = pod
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
        if self.config.termination_grace is not None:
            self._grace = self.config.termination_grace
        elif grace is not None:
            # kubelet enforces the pod's real grace period; keep a margin for our exit.
            self._grace = max(float(grace) * 0.9 - 1.0, 1.0)
        if not self._job_name:
            for owner in (pod.get("metadata") or {}).get("ownerReferences") or []:
                if owner.get("kind") == "Job":
                    self._job_name = owner.get("name")

    # ---------------------------------------------------------------- main loop

    def _main_loop(self) -> int:
        cfg = self.config
        grace_deadline: float | None = None
        while True:
            if self.sigterm.is_set() and grace_deadline is None:
                grace_deadline = time.monotonic() + self._grace
                log.info("SIGTERM: waiting up to %.1fs for the task container's final status", self._grace)
            if grace_deadline is not None and time.monotonic() > grace_deadline:
                log.warning(
                    "the grace period ended before the task container's final status was seen; "
                    "not reporting (the operator reports what the pod shows)"
                )
                return 0
            try:
                kind, value = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "pod":
                if value is None:
                    log.warning("pod %s is gone; exiting without a report", cfg.pod_name)
                    return 0
                self._note_pod(value)
                end = task_end(value, cfg.main_container, cfg.object_type)
                if end is not None:
                    return self._report(end)
            elif kind == "cancel":
                return self._cancel(*value)

    # ---------------------------------------------------------------- heartbeats

    def _heartbeat_loop(self) -> None:
        beats = 0
        wait = 0.0  # beat at once: it also tells us early if the task was canceled
        while not self.stop_heartbeats.wait(wait):
            if beats and beats % INTERVAL_REFRESH_BEATS == 0:
                self._refresh_interval()
            beats += 1
            ok = self._beat()
            interval = self._effective_interval()
            # After a failed beat, try again sooner (the deadline keeps running).
            wait = self.scaled(jittered(interval if ok else interval / 4))

    def _effective_interval(self) -> float:
        return max(min(self.interval, self.timeout * MAX_INTERVAL_FRACTION), 1.0)

    def _refresh_interval(self) -> None:
        if not self.config.task_runner:
            return
        try:
            runner = self.kube.get(taskrunner_path(self.config.namespace, self.config.task_runner))
        except ApiError as exc:
            log.debug("could not read TaskRunner %s: %s", self.config.task_runner, exc)
            return
        published = (runner.get("status") or {}).get("heartbeatIntervalSeconds")
        if isinstance(published, int | float) and published > 0 and published != self.interval:
            log.info("heartbeat interval %.0fs -> %.0fs (TaskRunner status)", self.interval, published)
            self.interval = float(published)

    def _beat_deadline(self) -> float:
        timeout = self.scaled(self.timeout)
        deadline = self.last_beat + timeout * (1 - HEARTBEAT_MARGIN)
        # Late already (a long outage): still try for a while rather than give up.
        return max(deadline, time.monotonic() + self.scaled(RETRY_CAP))

    def _beat(self) -> bool:
        """One heartbeat (with retries); False when it failed."""
        from dptr_common.datapipeline import DataPipelineError, TaskGone

        if self.stop_heartbeats.is_set():
            return True
        try:
            canceled = self._call_dp(
                lambda: self.dp.report_task_progress(self.task_id), self._beat_deadline()
            )
        except TaskGone as exc:
            self.events.put(("cancel", (exc.code or "TaskGone", exc.message)))
            self.stop_heartbeats.set()
            return True
        except DataPipelineError as exc:
            log.warning("heartbeat failed: %s", exc)
            self._record_heartbeat(error=fit_api_string(str(exc), limit=512, keep="head"))
            return False
        self.last_beat = time.monotonic()
        if canceled:
            self.events.put(("cancel", CANCELED))
            self.stop_heartbeats.set()
            return True
        self._record_heartbeat()
        return True

    def _record_heartbeat(self, error: str | None = None) -> None:
        try:
            record_heartbeat(
                self.kube,
                self.config.namespace,
                self.config.pipeline_task,
                by=self.config.pod_name,
                error=error,
            )
        except ApiError as exc:
            log.info("could not record the heartbeat on the PipelineTask: %s", exc)

    # ---------------------------------------------------------------- cancel

    def _cancel(self, reason: str, detail: str, *, over_own_claim: bool = False) -> int:
        """Record the cancel, then delete the Job: a crash in between leaves a Canceled task
        whose Job the operator (or this sidecar, restarted) finishes; never a deleted Job
        under an open attempt.  A cancel the ledger refuses deletes nothing."""
        cfg = self.config
        self.stop_heartbeats.set()
        log.info("the task was canceled (%s: %s)", reason, detail)
        try:
            recorded = self._retry_kube(
                lambda: mark_canceled(
                    self.kube,
                    cfg.namespace,
                    cfg.pipeline_task,
                    by=self.holder,
                    reason=reason,
                    message=f"canceled at Data Pipeline ({detail}); the sidecar deleted the Job",
                    over_own_claim=over_own_claim,
                ),
                "recording the cancel",
            )
        except NotFound:
            return 0
        if recorded:
            self._delete_job()
            self._event("Canceled", f"canceled at Data Pipeline ({detail}); Job {self._job_name} deleted")
        return 0

    def _deletion_outcome(self) -> Outcome | None:
        """The pod is being deleted as the task ends.  dptr's own deletions (a cancel, a
        report that stops the Job) are in the ledger before the Job goes, and the claim
        below then loses to them; anything else is a user's: the PipelineTask being
        deleted, or the Job.  Name that, not the SIGTERM the task died of."""
        cfg = self.config
        try:
            pt = self.kube.get(pipelinetask_path(cfg.namespace, cfg.pipeline_task))
            if (pt.get("metadata") or {}).get("deletionTimestamp"):
                return outcome_for_pod_failure(
                    "PipelineTaskDeleted", f"PipelineTask {cfg.pipeline_task} was deleted"
                )
            if not self._job_name:
                return None
            job = self.kube.get(job_path(cfg.namespace, self._job_name))
            if (job.get("metadata") or {}).get("deletionTimestamp"):
                return outcome_for_pod_failure("JobDeleted", f"Job {self._job_name} was deleted")
        except NotFound:
            return outcome_for_pod_failure("JobDeleted", f"Job {self._job_name} was deleted")
        except ApiError as exc:
            log.info("could not tell why the pod is being deleted: %s", exc)
        return None

    def _delete_job(self) -> None:
        if not self._job_name:
            return
        log.info("deleting Job %s", self._job_name)
        try:
            self.kube.delete(job_path(self.config.namespace, self._job_name), propagation_policy="Background")
        except NotFound:
            pass
        except ApiError as exc:
            log.error("could not delete Job %s: %s", self._job_name, exc)

    # ---------------------------------------------------------------- report

    def _report(self, end: TaskEnd) -> int:
        from dptr_common.datapipeline import DataPipelineError, InvalidRequest, TaskGone

        cfg = self.config
        task_io = wants_task_io(self.env)
        if not task_io:
            self.stop_heartbeats.set()
        # With uploads to do, heartbeats go on until they are done: a large output must
        # not make the task miss its reportProgressTimeout.
        outcome = end.outcome
        log.info("%s ended (%s): %s %s", end.container, end.summary, outcome.status, outcome.error_id or "")
        if end.pod_deleting:
            outcome = self._deletion_outcome() or outcome

        # Claim first, before anything slow: from here on nobody else reports, and with
        # staged outputs to upload after exit 0 the claim says "interrupted" until they
        # are in S3, so nobody taking it over could report FINISHED without them.  The
        # only window before it is this one API write.
        uploading_outputs = task_io and outcome.status == "FINISHED" and _has_staged_outputs(self.env)
        provisional = UPLOAD_INTERRUPTED if uploading_outputs else outcome
        # Ledger writes after the task's end are retried while the API server is away (a
        # restart): a sidecar that gave up here could not be restarted in a finishing pod.
        try:
            claim = self._retry_kube(
                lambda: claim_report(
                    self.kube,
                    cfg.namespace,
                    cfg.pipeline_task,
                    holder=self.holder,
                    status=provisional.status,
                    error_id=provisional.error_id,
                    error_message=provisional.error_message,
                    stale_after=self.scaled(CLAIM_STALE_AFTER),
                ),
                "claiming the report",
            )
        except NotFound:
            log.warning("the PipelineTask is gone; not reporting")
            self.stop_heartbeats.set()
            return 0
        if claim is None:
            log.info("not reporting: someone else holds or made the report, or the task is canceled")
            self.stop_heartbeats.set()
            return 0

        # Last word from the service: a task canceled meanwhile must get no SetTaskStatus.
        # (When the pod is deleted because of a cancel, the task container is killed
        # first; this is what keeps that exit from being reported.)  A cancel drops our
        # own claim.
        deadline = time.monotonic() + self.scaled(REPORT_RETRY_BUDGET)
        try:
            if self._call_dp(lambda: self.dp.report_task_progress(self.task_id), deadline):
                return self._cancel(*CANCELED, over_own_claim=True)
        except TaskGone as exc:
            return self._cancel(exc.code or "TaskGone", exc.message, over_own_claim=True)
        except DataPipelineError as exc:
            log.warning("the last cancel check failed (%s); reporting anyway", exc)

        trace: bytes | None = None
        # A resumed claim was revised (and maybe reported) before a restart, unless it still
        # says the uploads were interrupted: then they are done again (uploads overwrite).
        if task_io and (not claim.resumed or claim.error_id == UPLOAD_INTERRUPTED.error_id):
            try:
                revised = self._finish_task_io(end, outcome, claim)
            except NotFound:
                log.warning("the PipelineTask is gone; not reporting")
                return 0
            finally:
                self.stop_heartbeats.set()
            if revised is None:
                log.info("not reporting: the claim is no longer ours, or the task was canceled")
                return 0
            claim, trace = revised
        self.stop_heartbeats.set()

        if claim.status != "FINISHED" and trace is None:
            try:
                trace = read_log_tail(self.kube, cfg.namespace, cfg.pod_name, end.container)
            except ApiError as exc:
                log.warning("could not read the %s log: %s", end.container, exc)

        kwargs = Outcome(claim.status, claim.error_id, claim.error_message).set_task_status_kwargs(
            self.task_id, trace
        )
        note = ""
        report_deadline = deadline + self.scaled(REPORT_RETRY_BUDGET)
        # Restarted between SetTaskStatus and recording it? Reporting again would
        # be a second final status.
        already = False
        if claim.resumed:
            known = self._already_final(report_deadline)
            if known is None:
                # Never report blind: the claim stays ours, and the operator takes it over
                # once it sees it unchanged long enough, and asks again.
                self._event(
                    "ReportDeferred",
                    "Data Pipeline could not say whether the attempt already has its outcome; "
                    "leaving the report to the operator",
                    "Warning",
                )
                return 0
            already = known
        if already:
            note = " (already recorded by Data Pipeline before a restart)"
        try:
            if not already:
                self._call_dp(
                    lambda: self.dp.set_task_status(
                        self.task_id,
                        claim.status,
                        kwargs.get("errorId"),
                        kwargs.get("errorMessage"),
                        kwargs.get("errorStackTrace"),
                    ),
                    report_deadline,
                )
        except InvalidRequest as exc:
            if not claim.resumed:
                log.error("SetTaskStatus %s was refused: %s", claim.status, exc)
                self._event("ReportFailed", f"SetTaskStatus {claim.status} was refused: {exc}", "Warning")
                return 1
            # We claimed and maybe reported before a restart; the service refuses a second one.
            note = f" (the service refused a repeat: {exc.message})"
            log.warning("SetTaskStatus after a restart was refused (%s); taking it as done", exc)
        except TaskGone as exc:
            log.warning("SetTaskStatus: the task is gone (%s)", exc)
            self._event("ReportFailed", f"SetTaskStatus {claim.status}: {exc}", "Warning")
            return 0
        except DataPipelineError as exc:
            log.error("SetTaskStatus %s failed: %s", claim.status, exc)
            self._event("ReportFailed", f"SetTaskStatus {claim.status} failed: {exc}", "Warning")
            return 1

        message = f"{end.container} ended ({end.summary}); reported {claim.status}"
        if claim.error_id:
            message += f" {claim.error_id}"
        message += note
        self._patch_exit(end)  # first: whoever sees the report recorded sees the exit code too
        try:
            self._retry_kube(
                lambda: mark_reported(
                    self.kube, cfg.namespace, cfg.pipeline_task, claim=claim, message=message
                ),
                "recording the report",
            )
        except ApiError as exc:
            log.error("reported, but could not record it on the PipelineTask: %s", exc)
        self._event("Reported", message, "Normal" if claim.status == "FINISHED" else "Warning")
        log.info("%s", message)
        return 0

    def _finish_task_io(
        self, end: TaskEnd, outcome: Outcome, claim: Claim
    ) -> tuple[Claim, bytes | None] | None:
        """Upload staged outputs (after exit 0) and the logs, then record the outcome they
        decide on the claim.  Returns the revised claim and, when the uploads failed the
        attempt, the activity log as the stack trace; None when the claim is no longer ours."""
        from .logs import ActivityLog, finish_task_io

        cfg = self.config
        activity = ActivityLog(echo=lambda line: log.info("task I/O: %s", line))
        exit_code: int | None = None
        if end.container == cfg.main_container:
            exit_code = _exit_code(self._latest_pod or {}, end.container)
        else:
            activity(f"{end.container} failed: {outcome.error_id}: {outcome.error_message}")

        def combined_output() -> Iterator[bytes]:
            # Only when the wrapper could not split the streams (no tee/mkfifo in the image).
            return stream_log(self.kube, cfg.namespace, cfg.pod_name, cfg.main_container)

        done = threading.Event()

        def keep_claim_fresh() -> None:
            # A long upload must not let the claim look abandoned to the operator.
            while not done.wait(self.scaled(CLAIM_STALE_AFTER) / 4):
                try:
                    revise_claim(self.kube, claim)
                except ApiError as exc:
                    log.info("could not refresh the report claim: %s", exc)

        refresher = threading.Thread(target=keep_claim_fresh, name="dptr-claim", daemon=True)
        refresher.start()
        try:
            result = finish_task_io(
                self.env,
                exit_code=exit_code,
                combined_output=combined_output if exit_code is not None else None,
                activity_log=activity,
            )
        except Exception as exc:  # never lose the report over an upload bug
            log.exception("uploading outputs and logs failed")
            from dptr_common.errors import TaskError

            from .logs import TaskIOResult

            result = TaskIOResult(
                error=TaskError("dptr.StagingFailed.Unexpected", f"{type(exc).__name__}: {exc}")
                if exit_code == 0 and _has_staged_outputs(self.env)
                else None,
                problems=[] if exit_code == 0 else [f"uploading logs failed: {type(exc).__name__}: {exc}"],
            )
        finally:
            done.set()
            refresher.join(timeout=5)

        final = outcome
        trace: bytes | None = None
        if result.error is not None and outcome.status == "FINISHED":
            final = Outcome("FAILED", result.error.error_id, result.error.message)
            trace = activity.text()
        if result.uploaded:
            log.info("uploaded %d staged output object(s)", len(result.uploaded))
        if result.problems:
            problems = "; ".join(result.problems)
            log.warning("log upload problems: %s", problems)
            self._event("LogUploadFailed", problems, "Warning")
            note = f"log upload problems: {problems}"
            final = Outcome(
                final.status,
                final.error_id,
                f"{final.error_message}; {note}" if final.error_message else note,
            )
        revised = self._retry_kube(
            lambda: revise_claim(
                self.kube,
                claim,
                status=final.status,
                error_id=final.error_id,
                error_message=final.error_message,
            ),
            "recording the outcome of the uploads",
        )
        return None if revised is None else (revised, trace)

    def _patch_exit(self, end: TaskEnd) -> None:
        """Fill ``status.exitCode``/``podName`` (the Exit printer column)."""
        pod = self._latest_pod or {}
        status = _container_status(pod, "containerStatuses", end.container) or _container_status(
            pod, "initContainerStatuses", end.container
        )
        terminated = ((status or {}).get("state") or {}).get("terminated") or {}
        patch: dict[str, Any] = {"podName": self.config.pod_name}
        if terminated.get("exitCode") is not None:
            patch["exitCode"] = terminated["exitCode"]
        if terminated.get("reason"):
            patch["reason"] = terminated["reason"]
        try:
            self.kube.patch(
                pipelinetask_path(self.config.namespace, self.config.pipeline_task, "status"),
                {"status": patch},
            )
        except ApiError as exc:
            log.info("could not record the exit code: %s", exc)


def wants_task_io(env: Mapping[str, str]) -> bool:
    """Whether this pod stages data or uploads logs (``render_staging`` set it up)."""
    return bool(env.get("DPTR_STAGING_PLAN") or env.get("DPTR_LOG_DIR"))


def _has_staged_outputs(env: Mapping[str, str]) -> bool:
    try:
        nodes = json.loads(env.get("DPTR_STAGING_PLAN") or "{}").get("nodes") or []
    except (ValueError, AttributeError):
        return False
    return any(isinstance(n, dict) and n.get("direction") == "output" for n in nodes)


def _exit_code(pod: dict[str, Any], container: str) -> int | None:
    status = _container_status(pod, "containerStatuses", container) or {}
    code = ((status.get("state") or {}).get("terminated") or {}).get("exitCode")
    return int(code) if code is not None else None


def _settled(status: dict[str, Any]) -> str:
    """Why nothing is left to do ("reported", "canceled"), or "" while the task is open."""
    if (status.get("report") or {}).get("reportedAt"):
        return "reported"
    if status.get("phase") == "Canceled" or (status.get("canceled") or {}).get("at"):
        return "canceled"
    return ""
