"""A polled task, from PollForTask's answer to a running Job.

1. parse it (a malformed task is reported FAILED right away, through the ledger);
2. record it as a PipelineTask named from (pipelineId, attemptId): a repeated poll of
   the same attempt finds it (409 AlreadyExists) and creates nothing new.  Its
   finalizer keeps a user's deletion from losing the attempt (see runtime.py);
3. acknowledge it with ReportTaskProgress at once, inside the 2-minute window, whatever
   the scheduling of its pod will take;
4. render and create its Job (owner: the PipelineTask, itself owned by the TaskRunner);
5. record the Job, the ack and the operator's heartbeat ownership in one status write,
   off the poller (see ``ledger.record_dispatch`` for why it cannot undo later writes).

Every refusal ends the attempt FAILED once, with an errorId that names the cause: a
PipelineTask the API server refuses (``dptr.PipelineTaskRejected.*``, reported directly:
there is no ledger to go through), a Job it refuses (``dptr.JobRejected.*``, through the
ledger), a task too large for either (``dptr.InvalidTask.TooLarge.*``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dptr_common import ledger, naming
from dptr_common.bounds import check_object
from dptr_common.datapipeline import DataPipelineError, TaskGone, Throttled, TransientError, call_with_retry
from dptr_common.errors import TaskError, outcome_for_task_error
from dptr_common.kube import ApiError, Conflict, job_path, pipelinetask_path
from dptr_common.models import API_VERSION, PIPELINE_TASK_KIND, PipelineTaskSpec
from dptr_common.render import render_job
from dptr_common.task import Task, parse_task
from dptr_operator.events import pipeline_task_ref, task_runner_ref
from dptr_operator.index import ATTEMPT_FINALIZER, TaskEntry

if TYPE_CHECKING:
    from dptr_operator.polling import RunnerWorker
    from dptr_operator.runtime import Operator

__all__ = ["dispatch", "ensure_job", "pipeline_task_body"]

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
            # Held while the attempt is open: a deletion then reports it (runtime.py).
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


def _create_pipeline_task(
    op: Operator, body: Mapping[str, Any], deadline: float
) -> tuple[dict[str, Any], bool]:
    ns = body["metadata"]["namespace"]
    name = body["metadata"]["name"]
    while True:
        try:
            with op.metrics.timed("CreatePipelineTask"):
                return op.kube.create(pipelinetask_path(ns), body), True
        except Conflict as exc:
            if exc.reason != "AlreadyExists":
                raise
            return op.kube.get(pipelinetask_path(ns, name)), False
        except ApiError as exc:
            if exc.status not in _TRANSIENT or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def dispatch(op: Operator, worker: RunnerWorker, raw: Mapping[str, Any]) -> None:
    """Turn one PollForTask answer into a PipelineTask, an ack and a Job."""
    started = time.monotonic()
    runner_label = f"{worker.namespace}/{worker.name}"
    op.metrics.tasks_polled.labels(runner_label).inc()
    worker.counts.polled += 1
    try:
        task = parse_task(raw)
    except TaskError as err:
        _report_unparseable(op, worker, raw, err)
        return
    spec = PipelineTaskSpec.from_task(task, task_runner=worker.name, polled_by=op.config.holder)
    body = pipeline_task_body(spec, worker)
    try:
        check_object(body, "PipelineTask")
        # The ack deadline is 2 minutes after the poll: keep a margin for the ack itself.
        obj, created = _create_pipeline_task(op, body, started + op.config.scaled(60))
    except (TaskError, ApiError) as exc:
        # No PipelineTask, so no ledger: nobody else knows this attempt; report it here, once.
        refused = exc if isinstance(exc, TaskError) else rejection(exc, "PipelineTask")
        _report_without_ledger(op, worker, task.task_id, refused, f"attempt {task.attempt_id}")
        return
    entry, _ = op.index.upsert(TaskEntry.from_k8s(obj))
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

    acked_at = _ack(op, worker, entry)
    if acked_at is None and op.index.get(entry.key) is not None and op.index.get(entry.key).terminal:  # type: ignore[union-attr]
        return  # canceled during the ack

    try:
        job_name = ensure_job(op, worker, entry, task, obj)
    except TaskError as err:
        fail_before_job(op, worker, entry, err)
        return
    op.index.update(
        entry.key,
        job_name=job_name,
        job_since=time.monotonic(),
        acknowledged=entry.acknowledged or acked_at is not None,
        heartbeat_last_at=acked_at or entry.heartbeat_last_at,
        heartbeat_seen=time.monotonic() if acked_at else entry.heartbeat_seen,
    )
    # Off the poller: the record is not needed to go on (a restarted operator finds the
    # Job by name and one more ack is harmless), and it is a third of a dispatch's time.
    op.submit(_record_dispatch, op, entry, obj, job_name, acked_at)
    op.scheduler.schedule_new(entry)
    op.metrics.dispatch_duration.observe(time.monotonic() - started)


def _record_dispatch(
    op: Operator, entry: TaskEntry, obj: Mapping[str, Any], job_name: str, acked_at: datetime | None
) -> None:
    try:
        ledger.record_dispatch(op.kube, obj, job_name=job_name, acknowledged_at=acked_at, by=op.config.holder)
    except (ApiError, ledger.LedgerConflictError) as exc:
        log.warning("%s/%s: status write after dispatch failed: %s", entry.namespace, entry.name, exc)


def _ack(op: Operator, worker: RunnerWorker, entry: TaskEntry) -> datetime | None:
    """ReportTaskProgress now; None when it failed (the heartbeat loop retries at once)."""
    try:
        with op.metrics.timed("ReportTaskProgress"):
            canceled = call_with_retry(
                lambda: worker.client().report_task_progress(entry.task_id),
                deadline=time.monotonic() + op.config.scaled(30),
                retry_on=(Throttled, TransientError),
                base=max(op.config.scaled(0.5), 0.01),
                cap=max(op.config.scaled(5), 0.05),
            )
    except TaskGone as exc:
        op.cancel(entry, "TaskGone", f"Data Pipeline no longer knows the task: {exc}")
        return None
    except DataPipelineError as exc:
        log.warning("%s/%s: ack failed (%s); the heartbeat loop retries", entry.namespace, entry.name, exc)
        return None
    if canceled:
        op.cancel(entry, "Canceled", "Data Pipeline canceled the task before it started")
        return None
    return datetime.now(UTC)


def ensure_job(
    op: Operator, worker: RunnerWorker, entry: TaskEntry, task: Task, owner: dict[str, Any]
) -> str:
    """Create the task's Job (409 AlreadyExists is success); raises TaskError for a task
    that cannot run (nothing is created then)."""
    runner = worker.runner.model_copy(deep=False)
    runner.status = runner.status.model_copy(
        update={"heartbeat_interval_seconds": worker.plan.interval_seconds}
    )
    job = render_job(
        task,
        runner,
        sidecar_image=op.config.sidecar_image,
        namespace=entry.namespace,
        owner=owner,
        service_account_name=op.config.sidecar_service_account,
        sidecar_env=op.sidecar_env(),
    )
    name = str(job["metadata"]["name"])
    deadline = time.monotonic() + op.config.scaled(30)
    while True:
        try:
            with op.metrics.timed("CreateJob"):
                op.kube.create(job_path(entry.namespace), job)
            op.events.emit(
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
            if exc.status == 403 and "exceeded quota" in exc.message:
                # The namespace is full: polling more would only fail more attempts.
                worker.hold_polling(op.config.scaled(30), f"the namespace's quota refused a Job: {exc}")
            raise rejection(exc, "Job") from exc


def fail_before_job(op: Operator, worker: RunnerWorker, entry: TaskEntry, err: TaskError) -> None:
    """A task that gets no Job (invalid, too large, or its Job refused): Events on the
    PipelineTask and the TaskRunner, and FAILED through the ledger, once."""
    reason = "JobRejected" if err.error_id.startswith("dptr.JobRejected.") else "InvalidTask"
    ref = pipeline_task_ref(entry.namespace, entry.name, entry.uid)
    op.events.emit(ref, reason, f"{err.error_id}: {err.message}", "Warning")
    op.events.emit(
        task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid),
        reason,
        f"{entry.name}: {err.error_id}: {err.message}",
        "Warning",
    )
    op.submit(op.report, entry, outcome_for_task_error(err), "no Job", False, reason == "JobRejected")


def _report_unparseable(op: Operator, worker: RunnerWorker, raw: Mapping[str, Any], err: TaskError) -> None:
    """A task that cannot even be parsed: record it if its ids allow, then report FAILED."""
    runner_ref = task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid)
    task_id = raw.get("taskId") if isinstance(raw, Mapping) else None
    pipeline_id = raw.get("pipelineId") if isinstance(raw, Mapping) else None
    attempt_id = raw.get("attemptId") if isinstance(raw, Mapping) else None
    op.events.emit(runner_ref, "InvalidTask", f"{err.error_id}: {err.message}", "Warning")
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
                polled_by=op.config.holder,
                polled_at=datetime.now(UTC).replace(microsecond=0),
            )
            obj, _ = _create_pipeline_task(op, pipeline_task_body(spec, worker), time.monotonic() + 5)
            entry, _ = op.index.upsert(TaskEntry.from_k8s(obj))
            if not entry.terminal:
                op.submit(op.report, entry, outcome_for_task_error(err), "invalid task", False, False)
            return
        except (ApiError, ValueError) as exc:
            log.warning("could not record the malformed task: %s", exc)
    _report_without_ledger(op, worker, task_id, err, "a malformed task", event=False)


def _report_without_ledger(
    op: Operator, worker: RunnerWorker, task_id: str, err: TaskError, what: str, *, event: bool = True
) -> None:
    """FAILED for an attempt that has no PipelineTask (so no ledger): nobody else knows it,
    so it is reported here, once, with retries; if that fails too, Data Pipeline times the
    attempt out (its ack never came) and retries it as a new one."""
    runner_ref = task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid)
    if event:
        op.events.emit(runner_ref, "TaskRejected", f"{what}: {err.error_id}: {err.message}", "Warning")
    kwargs = outcome_for_task_error(err).set_task_status_kwargs(task_id)
    try:
        with op.metrics.timed("SetTaskStatus"):
            call_with_retry(
                lambda: worker.client().set_task_status(
                    task_id, "FAILED", kwargs.get("errorId"), kwargs.get("errorMessage")
                ),
                deadline=time.monotonic() + op.config.scaled(60),
                base=max(op.config.scaled(1.0), 0.05),
                cap=max(op.config.scaled(10.0), 0.1),
            )
    except DataPipelineError as exc:
        log.error("%s/%s: could not report %s: %s", worker.namespace, worker.name, what, exc)
