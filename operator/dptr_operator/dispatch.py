"""A polled task, from PollForTask's answer to a running Job.

1. parse it (a malformed task is reported FAILED right away, through the ledger);
2. record it as a PipelineTask named from (pipelineId, attemptId): a repeated poll of
   the same attempt finds it (409 AlreadyExists) and creates nothing new.  Its
   finalizer keeps a user's deletion from losing the attempt (see pods.py);
3. acknowledge it with ReportTaskProgress at once, inside the 2-minute window, whatever
   the scheduling of its pod will take;
4. render and create its Job (owner: the PipelineTask, itself owned by the TaskRunner);
5. record the Job, the ack and the operator's heartbeat ownership in one status write,
   off the poller (see ``ledger.record_dispatch`` for why it cannot undo later writes).

Every refusal ends the attempt FAILED once, with an errorId that names the cause: a
PipelineTask the API server refuses (``dptr.PipelineTaskRejected.*``, reported directly:
there is no ledger to go through), a Job it refuses (``dptr.JobRejected.*``, through the
ledger), a task too large for either (``dptr.InvalidTask.TooLarge.*``).  An API server
that does not answer (connection refused, 5xx, 429 past the retries) is an outage, not a
refusal: without a PipelineTask the attempt is left unacknowledged for Data Pipeline to
give again, to this runner or another of the worker group (a ``TaskNotRecorded`` Event);
with one, the task is heartbeated and the sweep keeps trying to create its Job
(``JobPending``) for the pod create grace, then ends it ``dptr.JobRejected.Unavailable``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from dptr_common import ledger, naming
from dptr_common.bounds import check_object
from dptr_common.datapipeline import DataPipelineError, TaskGone, Throttled, TransientError, call_with_retry
from dptr_common.errors import TaskError, outcome_for_task_error
from dptr_common.kube import ApiError, Conflict, NotFound, job_path, namespaced_path, pipelinetask_path
from dptr_common.logformat import log_context
from dptr_common.models import API_VERSION, PIPELINE_TASK_KIND, PipelineTask, PipelineTaskSpec
from dptr_common.render import render_job
from dptr_common.render_activity import activity_secret, secret_name
from dptr_common.task import Task, parse_task
from dptr_operator.activities import plan_for
from dptr_operator.events import pipeline_task_ref, task_runner_ref
from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import ATTEMPT_FINALIZER, TaskEntry
from dptr_operator.pipelinelogs import CACHE_SECONDS as LOG_URI_CACHE_SECONDS
from dptr_operator.pipelinelogs import ERROR_CACHE_SECONDS as LOG_URI_ERROR_SECONDS
from dptr_operator.pipelinelogs import PipelineLogUris, with_pipeline_log_uri
from dptr_operator.polling import RunnerWorker
from dptr_operator.reporter import Reporter
from dptr_operator.services import Services

__all__ = ["Dispatcher", "JobPending", "pipeline_task_body", "rejection"]

log = logging.getLogger(__name__)


def pipeline_task_body(spec: PipelineTaskSpec, worker: RunnerWorker) -> dict[str, Any]:
    name = naming.pipeline_task_name(spec.pipeline_id, spec.attempt_id)
    labels = {
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        naming.LABEL_TASK_RUNNER: naming.label_value(worker.name),
        naming.LABEL_PIPELINE_ID: naming.label_value(spec.pipeline_id),
        naming.LABEL_ATTEMPT_ID: naming.label_value(spec.attempt_id),
    }
    annotations = {
        naming.ANNOTATION_PIPELINE_ID: spec.pipeline_id,
        naming.ANNOTATION_ATTEMPT_ID: spec.attempt_id,
    }
    if spec.activity.component_id:
        labels[naming.LABEL_COMPONENT_ID] = naming.label_value(spec.activity.component_id)
        annotations[naming.ANNOTATION_COMPONENT_ID] = spec.activity.component_id
    owner = worker.runner.owner_reference()
    owner["controller"] = True
    return {
        "apiVersion": API_VERSION,
        "kind": PIPELINE_TASK_KIND,
        "metadata": {
            "name": name,
            "namespace": worker.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner],
            # Held while the attempt is open: a deletion then reports it (pods.py).
            "finalizers": [ATTEMPT_FINALIZER],
        },
        "spec": spec.to_k8s(),
    }


def rejection(exc: ApiError, kind: str) -> TaskError:
    """The API server refused to create a task's ``kind``: an errorId naming why."""
    text = exc.message or str(exc)
    if exc.status == 403 and "exceeded quota" in text:
        cause = "Quota"
    elif exc.status == 403:
        cause = "Denied"  # an admission webhook or policy, Pod Security, RBAC
    elif exc.status in (400, 422):
        cause = "Invalid"
    elif exc.status == 413:
        cause = "TooLarge"
    elif exc.status in (0, 429, 500, 502, 503, 504):
        cause = "Unavailable"
    else:
        cause = f"HTTP{exc.status}"
    return TaskError(f"dptr.{kind}Rejected.{cause}", f"the API server refused the {kind}: {text}"[:2000])


_TRANSIENT = (0, 429, 500, 502, 503, 504)


class JobPending(Exception):  # noqa: N818 - a state, not a failure
    """The API server did not answer while the Job was being created."""

    def __init__(self, message: str, error: ApiError) -> None:
        super().__init__(message)
        self.error = error


class Dispatcher:
    """Turns PollForTask answers into PipelineTasks, acks and Jobs."""

    def __init__(self, services: Services, reporter: Reporter, scheduler: HeartbeatScheduler) -> None:
        self.services = services
        self.reporter = reporter
        self.scheduler = scheduler
        self.log_uris = PipelineLogUris(
            services.config.scaled(LOG_URI_CACHE_SECONDS),
            error_seconds=services.config.scaled(LOG_URI_ERROR_SECONDS),
        )

    def _create_pipeline_task(self, body: Mapping[str, Any], deadline: float) -> tuple[dict[str, Any], bool]:
        ns = body["metadata"]["namespace"]
        name = body["metadata"]["name"]
        while True:
            try:
                with self.services.metrics.timed("CreatePipelineTask"):
                    return self.services.kube.create(pipelinetask_path(ns), body), True
            except Conflict as exc:
                if exc.reason != "AlreadyExists":
                    raise
                return self.services.kube.get(pipelinetask_path(ns, name)), False
            except ApiError as exc:
                if exc.status not in _TRANSIENT or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def dispatch(
        self, worker: RunnerWorker, raw: Mapping[str, Any], release: Callable[[], None] | None = None
    ) -> None:
        """Turn one PollForTask answer into a PipelineTask, an ack and a Job; ``release``
        (the poller's slot) is called once it is done, whatever happened."""
        try:
            attempt = raw.get("attemptId")
            with log_context(
                taskrunner=f"{worker.namespace}/{worker.name}",
                pipeline=str(raw.get("pipelineId") or "") or None,
                attempt=str(attempt) if attempt else None,
                task=naming.pipeline_task_name(str(raw.get("pipelineId") or ""), str(attempt))
                if attempt and raw.get("pipelineId")
                else None,
            ):
                self._dispatch(worker, raw)
        finally:
            if release is not None:
                release()

    def _dispatch(self, worker: RunnerWorker, raw: Mapping[str, Any]) -> None:
        started = time.monotonic()
        self.services.metrics.tasks_polled.labels(worker.namespace, worker.name).inc()
        worker.counts.polled += 1
        try:
            task = parse_task(raw)
        except TaskError as err:
            self._report_unparseable(worker, raw, err)
            return
        spec = PipelineTaskSpec.from_task(
            task, task_runner=worker.name, polled_by=self.services.config.holder
        )
        body = pipeline_task_body(spec, worker)
        try:
            check_object(body, "PipelineTask")
            # The ack deadline is 2 minutes after the poll: keep a margin for the ack itself.
            obj, created = self._create_pipeline_task(body, started + self.services.config.scaled(60))
        except ApiError as exc:
            if exc.status in _TRANSIENT:
                self._not_recorded(worker, task.attempt_id, exc)
                return
            # No PipelineTask, so no ledger: nobody else knows this attempt; report it here, once.
            self._report_without_ledger(
                worker, task.task_id, rejection(exc, "PipelineTask"), f"attempt {task.attempt_id}"
            )
            return
        except TaskError as exc:
            refused = exc
            self._report_without_ledger(worker, task.task_id, refused, f"attempt {task.attempt_id}")
            return
        entry, _ = self.services.index.upsert(TaskEntry.from_k8s(obj))
        # This dispatch creates the Job: the watch may have seen the PipelineTask first and
        # marked it as missing one (runtime.on_task_event), and the sweep must not create
        # it meanwhile (CI saw a Job made while the ack was in flight, then canceled).
        entry.job_pending_since = None
        worker.capacity_changed()
        if not created:
            log.info(
                "%s/%s: attempt %s polled again; nothing new created",
                entry.namespace,
                entry.name,
                task.attempt_id,
            )
        if entry.terminal:
            return

        acked_at = self._ack(worker, entry)
        current = self.services.index.get(entry.key)
        if acked_at is None and current is not None and current.terminal:
            return  # canceled during the ack

        try:
            job_name = self.ensure_job(worker, entry, task, obj)
        except TaskError as err:
            self.fail_before_job(worker, entry, err)
            return
        except JobPending as exc:
            # Acked and heartbeated meanwhile; the sweep creates the Job once the API
            # server answers again (runtime: Jobs that were never created).
            log.warning("%s/%s: %s", entry.namespace, entry.name, exc)
            self.services.events.emit(
                pipeline_task_ref(entry.namespace, entry.name, entry.uid), "JobPending", str(exc), "Warning"
            )
            self.services.index.update(entry.key, job_pending_since=time.monotonic())
            self.scheduler.schedule_new(entry)
            return
        self.services.index.update(
            entry.key,
            job_name=job_name,
            job_since=time.monotonic(),
            acknowledged=entry.acknowledged or acked_at is not None,
            heartbeat_last_at=acked_at or entry.heartbeat_last_at,
            heartbeat_seen=time.monotonic() if acked_at else entry.heartbeat_seen,
        )
        # Off the poller: the record is not needed to go on (a restarted operator finds the
        # Job by name and one more ack is harmless), and it is a third of a dispatch's time.
        self.services.work.submit(
            self._record_dispatch, entry=entry, obj=obj, job_name=job_name, acked_at=acked_at
        )
        self.scheduler.schedule_new(entry)
        self.services.metrics.dispatch_duration.observe(time.monotonic() - started)

    def _record_dispatch(
        self, entry: TaskEntry, obj: Mapping[str, Any], job_name: str, acked_at: datetime | None
    ) -> None:
        try:
            ledger.record_dispatch(
                self.services.kube,
                obj,
                job_name=job_name,
                acknowledged_at=acked_at,
                by=self.services.config.holder,
            )
        except (ApiError, ledger.LedgerConflictError) as exc:
            log.warning("%s/%s: status write after dispatch failed: %s", entry.namespace, entry.name, exc)

    def _ack(self, worker: RunnerWorker, entry: TaskEntry) -> datetime | None:
        """ReportTaskProgress now; None when it failed (the heartbeat loop retries at once)."""
        try:
            with self.services.metrics.timed("ReportTaskProgress"):
                canceled = call_with_retry(
                    lambda: worker.client().report_task_progress(entry.task_id),
                    deadline=time.monotonic() + self.services.config.scaled(30),
                    retry_on=(Throttled, TransientError),
                    base=max(self.services.config.scaled(0.5), 0.01),
                    cap=max(self.services.config.scaled(5), 0.05),
                )
        except TaskGone as exc:
            self.reporter.cancel(
                entry, reason="TaskGone", message=f"Data Pipeline no longer knows the task: {exc}"
            )
            return None
        except DataPipelineError as exc:
            log.warning(
                "%s/%s: ack failed (%s); the heartbeat loop retries", entry.namespace, entry.name, exc
            )
            return None
        if canceled:
            self.reporter.cancel(
                entry, reason="Canceled", message="Data Pipeline canceled the task before it started"
            )
            return None
        return datetime.now(UTC)

    def ensure_job(self, worker: RunnerWorker, entry: TaskEntry, task: Task, owner: dict[str, Any]) -> str:
        """Create the task's Job (409 AlreadyExists is success); raises TaskError for a task
        that cannot run (nothing is created then), JobPending while the API server does not
        answer."""
        runner = worker.runner.model_copy(deep=False)
        runner.status = runner.status.model_copy(
            update={"heartbeat_interval_seconds": worker.plan.interval_seconds}
        )
        task = self._with_log_uri(worker, entry, task)
        plan = plan_for(task, worker.client(), budget=self.services.config.scaled(30))
        job = render_job(
            task,
            runner,
            sidecar_image=self.services.config.sidecar_image,
            namespace=entry.namespace,
            owner=owner,
            service_account_name=self.services.config.sidecar_service_account,
            sidecar_env=self.services.config.sidecar_container_env,
            time_scale=self.services.config.time_scale,
            proxy=self.services.config.proxy,
            activity_image=self.services.config.activity_image,
            activity_plan=plan,
            sidecar_resources=self.services.config.sidecar_resources.to_k8s(),
        )
        name = str(job["metadata"]["name"])
        deadline = time.monotonic() + self.services.config.scaled(30)
        if plan is not None:
            # Before the Job: a pod whose Secret is missing would wait in ContainerCreating.
            secret = activity_secret(
                plan,
                name=secret_name(name, plan),
                namespace=entry.namespace,
                owner_ref=job["metadata"]["ownerReferences"][0],
                labels=job["metadata"]["labels"],
            )
            self._create(
                secret, namespaced_path("api/v1", "secrets", entry.namespace), "Secret", worker, deadline
            )
        while True:
            try:
                with self.services.metrics.timed("CreateJob"):
                    self.services.kube.create(job_path(entry.namespace), job)
                self.services.events.emit(
                    pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                    "JobCreated",
                    f"Job {name} created for attempt {task.attempt_id} of pipeline {task.pipeline_id}",
                )
                return name
            except Conflict as exc:
                if exc.reason == "AlreadyExists":
                    return name
                raise rejection(exc, "Job") from exc
            except ApiError as exc:
                if exc.status in _TRANSIENT and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if exc.status in _TRANSIENT:
                    # An outage, not a refusal: the task has its PipelineTask and its
                    # heartbeats, so it can wait for the API server rather than fail.
                    raise JobPending(
                        f"the API server did not answer for the Job ({exc}); it is created later", exc
                    ) from exc
                if exc.status == 403 and "exceeded quota" in exc.message:
                    # The namespace is full: polling more would only fail more attempts.
                    worker.hold_polling(
                        self.services.config.scaled(30), f"the namespace's quota refused a Job: {exc}"
                    )
                raise rejection(exc, "Job") from exc

    def _create(
        self, body: dict[str, Any], path: str, kind: str, worker: RunnerWorker, deadline: float
    ) -> None:
        """Create one object the Job needs (AlreadyExists is success: an earlier try of this
        attempt made it); raises TaskError for a refusal, JobPending while the API server
        does not answer."""
        while True:
            try:
                with self.services.metrics.timed(f"Create{kind}"):
                    self.services.kube.create(path, body)
                return
            except Conflict as exc:
                if exc.reason == "AlreadyExists":
                    return
                raise rejection(exc, kind) from exc
            except ApiError as exc:
                if exc.status in _TRANSIENT and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                if exc.status in _TRANSIENT:
                    raise JobPending(
                        f"the API server did not answer for the {kind} ({exc}); it is created later", exc
                    ) from exc
                raise rejection(exc, kind) from exc

    def _with_log_uri(self, worker: RunnerWorker, entry: TaskEntry, task: Task) -> Task:
        """The task with its pipeline's ``Default.pipelineLogUri`` when the attempt lacks one
        (:mod:`dptr_operator.pipelinelogs`); a failed lookup is an Event and a metric."""
        if task.attempt.first("pipelineLogUri"):
            return task
        spec = worker.runner.spec
        scope = (worker.key, spec.endpoint_url, spec.region)
        found = self.log_uris.lookup(worker.client(), task.pipeline_id, scope)
        if not found.cached:
            result = "error" if found.problem else ("found" if found.uri else "none")
            self.services.metrics.pipeline_log_uri_lookups.labels(worker.namespace, worker.name, result).inc()
        if found.problem:
            log.warning("%s/%s: %s", entry.namespace, entry.name, found.problem)
            self.services.events.emit(
                pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                "PipelineLogUriUnknown",
                f"the attempt's logs may not reach the pipeline's pipelineLogUri: {found.problem}"[:1000],
                "Warning",
            )
            return task
        return with_pipeline_log_uri(task, found.uri) if found.uri else task

    def _not_recorded(self, worker: RunnerWorker, attempt_id: str, exc: ApiError) -> None:
        """The API server did not answer for the PipelineTask within the ack window: an
        outage, not a refusal.  Nothing is reported (no ledger to report through, and the
        attempt never started): unacknowledged, Data Pipeline gives it to a runner again
        after its ack window.  Had the create landed after all, the PipelineTask's watch
        event brings it back into the index, and the sweep creates its Job."""
        log.warning("%s/%s: attempt %s not recorded: %s", worker.namespace, worker.name, attempt_id, exc)
        self.services.events.emit(
            task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid),
            "TaskNotRecorded",
            f"attempt {attempt_id}: the API server did not answer ({exc}); Data Pipeline gives "
            "the attempt again after its ack window",
            "Warning",
        )

    def create_missing_job(self, worker: RunnerWorker, entry: TaskEntry, *, give_up: bool = False) -> None:
        """Create the Job of a recorded task that has none: after a restart, an API outage
        during its dispatch (``JobPending``), or a PipelineTask whose create was answered
        with an error but landed.  With ``give_up`` (the pod create grace has passed) an
        API server that still does not answer ends the attempt FAILED
        ``dptr.JobRejected.Unavailable``: no attempt is heartbeated without a Job forever."""
        # A claimed report (ours being made, or one from before a restart) is the outcome
        # already: a Job now would run an attempt that is being reported.
        if entry.terminal or entry.job_name or entry.busy or entry.report_claimed_by:
            return
        try:
            obj = self.services.kube.get(pipelinetask_path(entry.namespace, entry.name))
            if ((obj.get("status") or {}).get("report") or {}).get("claimedBy"):
                return
            task = PipelineTask.from_k8s(obj).spec.to_task()
            name = self.ensure_job(worker, entry, task, obj)
        except NotFound:
            return
        except TaskError as exc:  # refused, or cannot run: FAILED once
            self.fail_before_job(worker, entry, exc)
            return
        except (JobPending, ApiError) as exc:  # the API server still away
            if give_up:
                error = exc.error if isinstance(exc, JobPending) else exc
                self.fail_before_job(worker, entry, rejection(error, "Job"))
            else:
                log.warning("%s/%s: could not create the Job yet: %s", entry.namespace, entry.name, exc)
            return
        if entry.terminal or entry.busy:
            # Reported (or being reported) while the create was in flight: no attempt for it.
            with contextlib.suppress(ApiError):
                self.reporter.delete_job(entry)
            return
        with contextlib.suppress(NotFound):
            self.services.kube.patch(
                pipelinetask_path(entry.namespace, entry.name, "status"), {"status": {"jobName": name}}
            )
        self.services.index.update(
            entry.key, job_name=name, job_since=time.monotonic(), job_pending_since=None
        )

    def fail_before_job(self, worker: RunnerWorker, entry: TaskEntry, err: TaskError) -> None:
        """A task that gets no Job (invalid, too large, or its Job refused): Events on the
        PipelineTask and the TaskRunner, and FAILED through the ledger, once."""
        entry.job_pending_since = None  # no Job is coming: the report below is the outcome
        reason = (
            "JobRejected"
            if err.error_id.startswith(("dptr.JobRejected.", "dptr.SecretRejected."))
            else "InvalidTask"
        )
        ref = pipeline_task_ref(entry.namespace, entry.name, entry.uid)
        self.services.events.emit(ref, reason, f"{err.error_id}: {err.message}", "Warning")
        self.services.events.emit(
            task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid),
            reason,
            f"{entry.name}: {err.error_id}: {err.message}",
            "Warning",
        )
        self.services.work.submit(
            self.reporter.report,
            key=("report", entry.key, "no Job"),
            entry=entry,
            outcome=outcome_for_task_error(err),
            cause="no Job",
            probe=reason == "JobRejected",
        )

    def _report_unparseable(self, worker: RunnerWorker, raw: Mapping[str, Any], err: TaskError) -> None:
        """A task that cannot even be parsed: record it if its ids allow, then report FAILED."""
        runner_ref = task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid)
        task_id = raw.get("taskId") if isinstance(raw, Mapping) else None
        pipeline_id = raw.get("pipelineId") if isinstance(raw, Mapping) else None
        attempt_id = raw.get("attemptId") if isinstance(raw, Mapping) else None
        self.services.events.emit(runner_ref, "InvalidTask", f"{err.error_id}: {err.message}", "Warning")
        if not isinstance(task_id, str) or not task_id:
            log.error("%s/%s: polled a task without a taskId: %s", worker.namespace, worker.name, err)
            return
        if isinstance(pipeline_id, str) and pipeline_id and isinstance(attempt_id, str) and attempt_id:
            try:
                spec = PipelineTaskSpec(
                    task_runner=worker.name,
                    task_id=task_id,
                    pipeline_id=pipeline_id[:1024],
                    attempt_id=attempt_id[:1024],
                    polled_by=self.services.config.holder,
                    polled_at=datetime.now(UTC).replace(microsecond=0),
                )
                obj, _ = self._create_pipeline_task(pipeline_task_body(spec, worker), time.monotonic() + 5)
                entry, _ = self.services.index.upsert(TaskEntry.from_k8s(obj))
                if not entry.terminal:
                    self.services.work.submit(
                        self.reporter.report,
                        key=("report", entry.key, "invalid task"),
                        entry=entry,
                        outcome=outcome_for_task_error(err),
                        cause="invalid task",
                        probe=False,
                    )
                return
            except (ApiError, ValueError) as exc:
                log.warning("could not record the malformed task: %s", exc)
        self._report_without_ledger(worker, task_id, err, "a malformed task", event=False)

    def _report_without_ledger(
        self, worker: RunnerWorker, task_id: str, err: TaskError, what: str, *, event: bool = True
    ) -> None:
        """FAILED for an attempt that has no PipelineTask (so no ledger): nobody else knows it,
        so it is reported here, once, with retries; if that fails too, Data Pipeline times the
        attempt out (its ack never came) and retries it as a new one."""
        runner_ref = task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid)
        if event:
            self.services.events.emit(
                runner_ref, "TaskRejected", f"{what}: {err.error_id}: {err.message}", "Warning"
            )
        kwargs = outcome_for_task_error(err).set_task_status_kwargs(task_id)
        try:
            with self.services.metrics.timed("SetTaskStatus"):
                call_with_retry(
                    lambda: worker.client().set_task_status(
                        task_id, "FAILED", kwargs.get("errorId"), kwargs.get("errorMessage")
                    ),
                    deadline=time.monotonic() + self.services.config.scaled(60),
                    base=max(self.services.config.scaled(1.0), 0.05),
                    cap=max(self.services.config.scaled(10.0), 0.1),
                )
        except DataPipelineError as exc:
            log.error("%s/%s: could not report %s: %s", worker.namespace, worker.name, what, exc)
