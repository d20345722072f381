"""The report protocol, run by the main thread once the task's end or a cancel is known.

:class:`Reporter` owns the sequence that gives each task exactly one outcome (design
invariant 1): claim the report on the PipelineTask (an optimistic write, as the operator
does), a last ReportTaskProgress (a task canceled meanwhile gets no SetTaskStatus), the
staged outputs and logs (with a thread keeping the claim fresh meanwhile), then
``dptr_common.delivery`` (DescribeObjects when a resumed claim may already have been
reported, SetTaskStatus), which the operator's fallback shares, and the record of it.
A cancel is recorded only while no report is claimed, and the Job deleted after it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from dptr_common.datapipeline import DataPipelineError, TaskGone
from dptr_common.delivery import deliver
from dptr_common.errors import Outcome, TaskError, outcome_for_pod_failure
from dptr_common.kube import ApiError, KubeClient, NotFound, job_path, pipelinetask_path
from dptr_common.ledger import Claim, claim_report, mark_canceled, mark_reported, revise_claim

from .config import SidecarConfig
from .kubestream import read_log_tail, stream_log
from .podstate import TaskEnd, container_status, exit_code, owning_job
from .shared import CANCELED, RETRY_BASE, RETRY_CAP, DataPipeline, TaskInfo, retry_kube

__all__ = [
    "CLAIM_STALE_AFTER",
    "COMPONENT",
    "REPORT_RETRY_BUDGET",
    "UPLOAD_INTERRUPTED",
    "Reporter",
    "wants_task_io",
]

log = logging.getLogger("dptr.sidecar")

#: The outcome claimed while staged outputs upload: if the sidecar dies meanwhile, whoever
#: takes the claim over reports this (the data did not arrive), never FINISHED.
UPLOAD_INTERRUPTED = Outcome(
    "FAILED",
    "dptr.StagingFailed.Interrupted",
    "the sidecar stopped while uploading the staged outputs; they may be incomplete",
)
COMPONENT = "dptr-sidecar"

#: Protocol seconds SetTaskStatus (and the last cancel check) may be retried for.
REPORT_RETRY_BUDGET = 120.0
#: Protocol seconds after which another holder's unreported claim counts as abandoned.
#: Well above REPORT_RETRY_BUDGET, so a live holder still retrying is never overtaken.
CLAIM_STALE_AFTER = 600.0


def wants_task_io(env: Mapping[str, str]) -> bool:
    """Whether this pod stages data or uploads logs (``render_staging`` set it up)."""
    return bool(env.get("DPTR_STAGING_PLAN") or env.get("DPTR_LOG_DIR"))


def _has_staged_outputs(env: Mapping[str, str]) -> bool:
    try:
        nodes = json.loads(env.get("DPTR_STAGING_PLAN") or "{}").get("nodes") or []
    except (ValueError, AttributeError):
        return False
    return any(isinstance(n, dict) and n.get("direction") == "output" for n in nodes)


class _ClaimRefresher:
    """While the uploads run, a thread revises the claim every ``every`` seconds: a long
    upload must not let the claim look abandoned to the operator."""

    def __init__(self, kube: KubeClient, claim: Claim, every: float) -> None:
        self._kube = kube
        self._claim = claim
        self._every = every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dptr-claim", daemon=True)

    def __enter__(self) -> _ClaimRefresher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._done.wait(self._every):
            try:
                revise_claim(self._kube, self._claim)
            except ApiError as exc:
                log.info("could not refresh the report claim: %s", exc)


class Reporter:
    """Reports the task's end, or honours a cancel; each returns the process exit code.

    ``stop_heartbeats`` is called as soon as heartbeats are no longer wanted (with uploads
    to do, only after them).  :meth:`note_pod` keeps the latest pod seen (its Job, the exit
    code to record).
    """

    def __init__(
        self,
        config: SidecarConfig,
        kube: KubeClient,
        dp: DataPipeline,
        task: TaskInfo,
        *,
        holder: str,
        env: Mapping[str, str],
        stop_heartbeats: Callable[[], None],
        job_name: str | None,
    ) -> None:
        self._config = config
        self._kube = kube
        self._dp = dp
        self._task = task
        self._holder = holder
        #: The pod's environment: where staged outputs and logs go (``render_staging``).
        self._env = env
        self._stop_heartbeats = stop_heartbeats
        self._job_name = job_name
        self._latest_pod: dict[str, Any] | None = None

    def note_pod(self, pod: dict[str, Any]) -> None:
        self._latest_pod = pod
        if not self._job_name:
            job = owning_job(pod)
            if job is not None:
                self._job_name = job

    def scaled(self, seconds: float) -> float:
        return self._config.scaled(seconds)

    def _event(self, reason: str, message: str, type_: Literal["Normal", "Warning"] = "Normal") -> None:
        if not self._task.ref:
            return
        try:
            self._kube.create_event(
                self._config.namespace,
                self._task.ref,
                reason,
                message,
                type_,
                COMPONENT,
                reporting_instance=self._config.pod_name,
            )
        except ApiError as exc:
            log.warning("could not record Event %s: %s", reason, exc)

    # ---------------------------------------------------------------- cancel

    def cancel(self, reason: str, detail: str, *, over_own_claim: bool = False) -> int:
        """Record the cancel, then delete the Job: a crash in between leaves a Canceled task
        whose Job the operator (or this sidecar, restarted) finishes; never a deleted Job
        under an open attempt.  A cancel the ledger refuses deletes nothing."""
        cfg = self._config
        self._stop_heartbeats()
        log.info("the task was canceled (%s: %s)", reason, detail)
        try:
            recorded = retry_kube(
                lambda: mark_canceled(
                    self._kube,
                    cfg.namespace,
                    cfg.pipeline_task,
                    by=self._holder,
                    reason=reason,
                    message=f"canceled at Data Pipeline ({detail}); the sidecar deleted the Job",
                    over_own_claim=over_own_claim,
                ),
                "recording the cancel",
            )
        except NotFound:
            return 0
        if recorded:
            self.delete_job()
            self._event("Canceled", f"canceled at Data Pipeline ({detail}); Job {self._job_name} deleted")
        return 0

    def delete_job(self) -> None:
        if not self._job_name:
            return
        log.info("deleting Job %s", self._job_name)
        try:
            self._kube.delete(
                job_path(self._config.namespace, self._job_name), propagation_policy="Background"
            )
        except NotFound:
            pass
        except ApiError as exc:
            log.error("could not delete Job %s: %s", self._job_name, exc)

    def _deletion_outcome(self) -> Outcome | None:
        """The pod is being deleted as the task ends.  dptr's own deletions (a cancel, a
        report that stops the Job) are in the ledger before the Job goes, and the claim
        below then loses to them; anything else is a user's: the PipelineTask being
        deleted, or the Job.  Name that, not the SIGTERM the task died of."""
        cfg = self._config
        try:
            pt = self._kube.get(pipelinetask_path(cfg.namespace, cfg.pipeline_task))
            if (pt.get("metadata") or {}).get("deletionTimestamp"):
                return outcome_for_pod_failure(
                    "PipelineTaskDeleted", f"PipelineTask {cfg.pipeline_task} was deleted"
                )
            if not self._job_name:
                return None
            job = self._kube.get(job_path(cfg.namespace, self._job_name))
            if (job.get("metadata") or {}).get("deletionTimestamp"):
                return outcome_for_pod_failure("JobDeleted", f"Job {self._job_name} was deleted")
        except NotFound:
            return outcome_for_pod_failure("JobDeleted", f"Job {self._job_name} was deleted")
        except ApiError as exc:
            log.info("could not tell why the pod is being deleted: %s", exc)
        return None

    # ---------------------------------------------------------------- report

    def report(self, end: TaskEnd) -> int:
        cfg = self._config
        task = self._task
        task_io = wants_task_io(self._env)
        if not task_io:
            self._stop_heartbeats()
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
        uploading_outputs = task_io and outcome.status == "FINISHED" and _has_staged_outputs(self._env)
        provisional = UPLOAD_INTERRUPTED if uploading_outputs else outcome
        # Ledger writes after the task's end are retried while the API server is away (a
        # restart): a sidecar that gave up here could not be restarted in a finishing pod.
        try:
            claim = retry_kube(
                lambda: claim_report(
                    self._kube,
                    cfg.namespace,
                    cfg.pipeline_task,
                    holder=self._holder,
                    status=provisional.status,
                    error_id=provisional.error_id,
                    error_message=provisional.error_message,
                    stale_after=self.scaled(CLAIM_STALE_AFTER),
                ),
                "claiming the report",
            )
        except NotFound:
            log.warning("the PipelineTask is gone; not reporting")
            self._stop_heartbeats()
            return 0
        if claim is None:
            log.info("not reporting: someone else holds or made the report, or the task is canceled")
            self._stop_heartbeats()
            return 0

        # Last word from the service: a task canceled meanwhile must get no SetTaskStatus.
        # (When the pod is deleted because of a cancel, the task container is killed
        # first; this is what keeps that exit from being reported.)  A cancel drops our
        # own claim.
        deadline = time.monotonic() + self.scaled(REPORT_RETRY_BUDGET)
        try:
            if self._dp.call(lambda dp: dp.report_task_progress(task.task_id), deadline):
                return self.cancel(*CANCELED, over_own_claim=True)
        except TaskGone as exc:
            return self.cancel(exc.code or "TaskGone", exc.message, over_own_claim=True)
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
                self._stop_heartbeats()
            if revised is None:
                log.info("not reporting: the claim is no longer ours, or the task was canceled")
                return 0
            claim, trace = revised
        self._stop_heartbeats()

        if claim.status != "FINISHED" and trace is None:
            try:
                trace = read_log_tail(self._kube, cfg.namespace, cfg.pod_name, end.container)
            except ApiError as exc:
                log.warning("could not read the %s log: %s", end.container, exc)

        # Restarted between SetTaskStatus and recording it? Reporting again would be a
        # second final status: deliver asks Data Pipeline first (dptr_common.delivery).
        delivery = deliver(
            self._dp.client,
            Outcome(claim.status, claim.error_id, claim.error_message),
            task_id=task.task_id,
            pipeline_id=task.pipeline_id,
            attempt_id=task.attempt_id,
            maybe_reported=claim.resumed,
            deadline=deadline + self.scaled(REPORT_RETRY_BUDGET),
            base=self.scaled(RETRY_BASE),
            cap=self.scaled(RETRY_CAP),
            stack_trace=trace,
            on_retry=lambda error, wait: log.info("%s; retrying in %.2fs", error, wait),
        )
        note = ""
        if delivery.status == "deferred":
            log.warning(
                "could not ask whether the attempt is already final (%s); not reporting", delivery.error
            )
            # Never report blind: the claim stays ours, and the operator takes it over
            # once it sees it unchanged long enough, and asks again.
            self._event(
                "ReportDeferred",
                "Data Pipeline could not say whether the attempt already has its outcome; "
                "leaving the report to the operator",
                "Warning",
            )
            return 0
        if delivery.status == "already-final":
            note = " (already recorded by Data Pipeline before a restart)"
        elif delivery.status == "repeat-refused":
            # We claimed and maybe reported before a restart; the service refuses a second one.
            assert delivery.error is not None
            note = f" (the service refused a repeat: {delivery.error.message})"
            log.warning("SetTaskStatus after a restart was refused (%s); taking it as done", delivery.error)
        elif delivery.status == "refused":
            log.error("SetTaskStatus %s was refused: %s", claim.status, delivery.error)
            self._event(
                "ReportFailed", f"SetTaskStatus {claim.status} was refused: {delivery.error}", "Warning"
            )
            return 1
        elif delivery.status == "gone":
            log.warning("SetTaskStatus: the task is gone (%s)", delivery.error)
            self._event("ReportFailed", f"SetTaskStatus {claim.status}: {delivery.error}", "Warning")
            return 0
        elif delivery.status == "failed":
            log.error("SetTaskStatus %s failed: %s", claim.status, delivery.error)
            self._event("ReportFailed", f"SetTaskStatus {claim.status} failed: {delivery.error}", "Warning")
            return 1

        message = f"{end.container} ended ({end.summary}); reported {claim.status}"
        if claim.error_id:
            message += f" {claim.error_id}"
        message += note
        try:
            retry_kube(
                lambda: mark_reported(
                    self._kube,
                    cfg.namespace,
                    cfg.pipeline_task,
                    claim=claim,
                    message=message,
                    exit_status=self._exit_status(end),
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
        # Lazy: .logs loads .staging and pydantic (about 11 MB); only pods with task I/O need it.
        from .logs import ActivityLog, TaskIOResult, finish_task_io

        cfg = self._config
        activity = ActivityLog(echo=lambda line: log.info("task I/O: %s", line))
        code: int | None = None
        if end.container == cfg.main_container:
            code = exit_code(self._latest_pod or {}, end.container)
        else:
            activity(f"{end.container} failed: {outcome.error_id}: {outcome.error_message}")

        def combined_output() -> Iterator[bytes]:
            # Only when the wrapper could not split the streams (no tee/mkfifo in the image).
            return stream_log(self._kube, cfg.namespace, cfg.pod_name, cfg.main_container)

        with _ClaimRefresher(self._kube, claim, self.scaled(CLAIM_STALE_AFTER) / 4):
            try:
                result = finish_task_io(
                    self._env,
                    exit_code=code,
                    combined_output=combined_output if code is not None else None,
                    activity_log=activity,
                )
            except Exception as exc:  # never lose the report over an upload bug
                log.exception("uploading outputs and logs failed")
                result = TaskIOResult(
                    error=TaskError("dptr.StagingFailed.Unexpected", f"{type(exc).__name__}: {exc}")
                    if code == 0 and _has_staged_outputs(self._env)
                    else None,
                    problems=[] if code == 0 else [f"uploading logs failed: {type(exc).__name__}: {exc}"],
                )

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
        revised = retry_kube(
            lambda: revise_claim(
                self._kube,
                claim,
                status=final.status,
                error_id=final.error_id,
                error_message=final.error_message,
            ),
            "recording the outcome of the uploads",
        )
        return None if revised is None else (revised, trace)

    def _exit_status(self, end: TaskEnd) -> dict[str, Any]:
        """``status.exitCode``/``reason``/``podName`` (the Exit printer column)."""
        pod = self._latest_pod or {}
        status = container_status(pod, "containerStatuses", end.container) or container_status(
            pod, "initContainerStatuses", end.container
        )
        terminated = ((status or {}).get("state") or {}).get("terminated") or {}
        patch: dict[str, Any] = {"podName": self._config.pod_name}
        if terminated.get("exitCode") is not None:
            patch["exitCode"] = terminated["exitCode"]
        if terminated.get("reason"):
            patch["reason"] = terminated["reason"]
        return patch
