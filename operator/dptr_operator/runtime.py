"""The operator's state and the glue between watches, pollers and the heartbeat loop.

Threads, not coroutines, do the I/O: botocore is synchronous and so is dptr's stdlib
Kubernetes client.  kopf's event handlers only update the index and hand work to
:meth:`Operator.submit`; they never block on Data Pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pydantic

from dptr_common import ledger, naming
from dptr_common.errors import Outcome, TaskError, outcome_for_pod_failure
from dptr_common.kube import (
    ApiError,
    KubeClient,
    NotFound,
    event_path,
    job_path,
    pipelinetask_path,
    taskrunner_path,
)
from dptr_common.models import PipelineTask, TaskRunner
from dptr_common.pacing import heartbeat_interval
from dptr_operator import dispatch as dispatching
from dptr_operator import history, outcomes
from dptr_operator.config import OperatorConfig
from dptr_operator.events import EventRecorder, pipeline_task_ref, task_runner_ref
from dptr_operator.health import HealthState
from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import ATTEMPT_FINALIZER, TaskEntry, TaskIndex, TaskKey
from dptr_operator.metrics import Metrics
from dptr_operator.polling import RunnerWorker
from dptr_operator.statuswriter import StatusWriter

__all__ = ["FINALIZER", "Operator"]

log = logging.getLogger(__name__)

#: Keeps a deleted TaskRunner until its unfinished tasks are reported (see docs/operator.md).
FINALIZER = "dptr.dev/task-runner"

#: errorId of tasks failed because their TaskRunner was deleted.
RUNNER_DELETED_ERROR = "dptr.TaskRunnerDeleted"


class Operator:
    def __init__(
        self,
        config: OperatorConfig,
        kube: KubeClient,
        *,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
    ) -> None:
        self.config = config
        self.kube = kube
        self.metrics = metrics or Metrics()
        self.health = health or HealthState()
        self.index = TaskIndex()
        self.events = EventRecorder(kube, config.identity)
        self.scheduler = HeartbeatScheduler(self)
        self.status_writer = StatusWriter(kube, self.index)
        self.status_writer.on_gone = self.index.remove
        self.metrics.status_writes_pending.set_function(lambda: len(self.status_writer))
        self.workers: dict[TaskKey, RunnerWorker] = {}
        self._workers_lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max(8, config.heartbeat_workers // 2), thread_name_prefix="work")
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="sweep", daemon=True)
        self._status_dirty: set[TaskKey] = set()
        self._last_history = 0.0
        self.leading = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.leading = True
        self.metrics.leader.set(1)
        self.health.leader = True
        self.health.standby = False
        self.rebuild()
        self.status_writer.start()
        self.scheduler.start()
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        self.leading = False
        self.metrics.leader.set(0)
        with self._workers_lock:
            for worker in self.workers.values():
                worker.stop()
        self.scheduler.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.status_writer.close()
        self.events.close()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))

        self._pool.submit(run)

    def _namespaces(self) -> list[str | None]:
        return [None] if self.config.all_namespaces else list(self.config.namespaces)

    def rebuild(self) -> None:
        """Load every PipelineTask into the index and schedule the unfinished ones."""
        started = time.monotonic()
        count = 0
        for ns in self._namespaces():
            path = "/apis/dptr.dev/v1alpha1/pipelinetasks" if ns is None else pipelinetask_path(ns)
            for obj in self.kube.list(path):
                entry, _ = self.index.upsert(TaskEntry.from_k8s(obj))
                entry.extra["counted"] = entry.terminal
                count += 1
                if not entry.terminal:
                    if entry.job_name:
                        entry.job_since = time.monotonic()  # its pods get a grace from now
                    self.scheduler.schedule_new(entry)
                elif entry.finalized:
                    self._settle_later(entry)
        log.info(
            "rebuilt the index from %d PipelineTask(s) (%d active) in %.2fs",
            count,
            len(self.index.active_keys()),
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ helpers for modules

    def worker_for(self, entry: TaskEntry) -> RunnerWorker | None:
        with self._workers_lock:
            return self.workers.get(entry.runner_key)

    def interval_for(self, entry: TaskEntry) -> float:
        """The real-time heartbeat interval for a task: its runner's plan, capped by a third
        of the task's own reportProgressTimeout."""
        worker = self.worker_for(entry)
        interval = float(worker.plan.interval_seconds if worker else 60)
        if entry.report_progress_timeout:
            interval = min(interval, max(entry.report_progress_timeout / 3, 1.0))
        return max(self.config.scaled(interval), 0.02)

    def sidecar_env(self) -> dict[str, str]:
        return {**self.config.extra_sidecar_env, "DPTR_TIME_SCALE": repr(self.config.time_scale)}

    def dispatch(self, worker: RunnerWorker, raw: Mapping[str, Any], *, release: Callable[[], None]) -> None:
        try:
            dispatching.dispatch(self, worker, raw)
        finally:
            release()

    def cancel(self, entry: TaskEntry, reason: str, message: str) -> None:
        outcomes.cancel_task(self, entry, reason, message)

    def report(self, entry: TaskEntry, outcome: Outcome, cause: str, stop_job: bool, probe: bool) -> bool:
        if entry.busy or entry.terminal:
            return False
        entry.busy = True
        try:
            return outcomes.report_outcome(self, entry, outcome, cause=cause, stop_job=stop_job, probe=probe)
        finally:
            entry.busy = False

    def mark_acknowledged(self, entry: TaskEntry, when: datetime) -> None:
        self.kube.patch(
            pipelinetask_path(entry.namespace, entry.name, "status"),
            {"status": {"acknowledgedAt": ledger.format_time(when)}},
        )
        self.index.update(entry.key, acknowledged=True)

    def task_finished(self, entry: TaskEntry, phase: str) -> None:
        """Count a task's end once (whoever observed it first)."""
        if entry.extra.get("counted"):
            return
        entry.extra["counted"] = True
        runner_label = f"{entry.namespace}/{entry.runner}"
        self.metrics.tasks_finished.labels(runner_label, phase).inc()
        worker = self.worker_for(entry)
        if worker is not None:
            if phase == "Succeeded":
                worker.counts.succeeded += 1
            elif phase == "Canceled":
                worker.counts.canceled += 1
            else:
                worker.counts.failed += 1
            worker.capacity_changed()
            self.request_status(worker)

    def request_status(self, worker: RunnerWorker) -> None:
        self._status_dirty.add(worker.key)

    # ------------------------------------------------------------------ watch events

    def on_runner_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            with self._workers_lock:
                worker = self.workers.pop(key, None)
            if worker is not None:
                worker.stop()
            return
        try:
            runner = TaskRunner.from_k8s(dict(body))
        except pydantic.ValidationError as exc:
            log.warning("TaskRunner %s/%s is invalid: %s", key[0], key[1], exc)
            self.events.emit(
                task_runner_ref(key[0], key[1], meta.get("uid")), "InvalidSpec", str(exc)[:1000], "Warning"
            )
            return
        deleting = runner.metadata.deletion_timestamp is not None
        if not deleting and FINALIZER not in (meta.get("finalizers") or []):
            self.submit(
                self._add_finalizer, key, list(meta.get("finalizers") or []), meta.get("resourceVersion")
            )
        with self._workers_lock:
            worker = self.workers.get(key)
            created = worker is None
            if worker is None:
                worker = self.workers[key] = RunnerWorker(self, runner)
            else:
                worker.update(runner)
        if created:
            worker.plan = self._plan(worker)
            self.request_status(worker)
            if not deleting:
                worker.start()
            self.submit(self._ensure_missing_jobs, worker)
        if deleting and not worker.deleting:
            worker.begin_deletion()
            self.request_status(worker)
            self.events.emit(
                task_runner_ref(key[0], key[1], runner.metadata.uid),
                "Deleting",
                "polling stopped; unfinished tasks are stopped and reported FAILED (dptr.TaskRunnerDeleted)",
                "Warning",
            )
            self.submit(self._finalize_runner, worker)

    def on_task_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self.index.remove(key)
            return
        fresh = TaskEntry.from_k8s(body)
        entry, before = self.index.upsert(fresh)
        if before is None and not entry.terminal and entry is fresh:
            self.scheduler.schedule_new(entry)
        if entry.terminal:
            if not entry.extra.get("counted") and before is not None:
                self.task_finished(entry, entry.phase)
            entry.extra.setdefault("counted", True)
            worker = self.worker_for(entry)
            if worker is not None:
                worker.capacity_changed()
            if entry.finalized:
                self._settle_later(entry)
            return
        if entry.deleting:
            # Deleted by a user (or with its TaskRunner's namespace) while the attempt is
            # open: the finalizer holds the object until the attempt is reported.
            self._note_problem(
                entry,
                outcomes.Assessment(
                    problem="Deleted",
                    outcome=outcome_for_pod_failure(
                        "PipelineTaskDeleted", f"PipelineTask {entry.name} was deleted"
                    ),
                ),
            )
            if entry.problem == "Deleted":
                self._report_problem_now(entry)
        elif entry.heartbeat_owner == "sidecar":
            # The sidecar took over (or refreshed): re-check when it could go stale.
            self.scheduler.schedule_new(entry)

    def _task_for(self, labels: Mapping[str, str], namespace: str) -> TaskEntry | None:
        name = labels.get(naming.LABEL_PIPELINE_TASK)
        return self.index.get((namespace, name)) if name else None

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        entry = self._task_for(meta.get("labels") or {}, str(meta.get("namespace")))
        if entry is None or entry.terminal:
            return
        entry.pod_seen = True
        assessment = outcomes.assess_pod(body, entry.object_type, deleted=event_type == "DELETED")
        if assessment.phase == "Running" and (
            entry.phase != "Running" or entry.pod_name != assessment.pod_name
        ):
            self.index.update(entry.key, phase="Running", pod_name=assessment.pod_name)
            self.submit(self._mark_running, entry, assessment.pod_name)
        elif assessment.phase == "Pending" and assessment.pod_name and entry.pod_name != assessment.pod_name:
            self.index.update(entry.key, pod_name=assessment.pod_name)
            self.submit(self._patch_status, entry, {"podName": assessment.pod_name})
        self._note_problem(entry, assessment)

    def on_job_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        entry = self._task_for(meta.get("labels") or {}, str(meta.get("namespace")))
        if entry is None:
            return
        if entry.terminal:
            # Canceled, but its Job still there: the canceler stopped between recording the
            # cancel and deleting the Job (cancels are recorded first).  Finish it.
            alive = event_type != "DELETED" and not meta.get("deletionTimestamp")
            if entry.canceled and alive and not outcomes.job_finished(body) and not entry.stopping:
                entry.stopping = True
                self.submit(outcomes.delete_job, self, entry)
            return
        assessment = outcomes.assess_job(body, deleted=event_type == "DELETED")
        if assessment.problem is None:
            # A healthy Job says nothing about its pod: only a pod's own event may clear a
            # pod problem (a Job status update after an Unschedulable pod event once
            # cleared it, and the task was heartbeated forever).
            return
        self._note_problem(entry, assessment)
        if entry.problem == "JobDeleted":
            self._report_problem_now(entry)

    def _note_problem(self, entry: TaskEntry, assessment: outcomes.Assessment) -> None:
        with self.index.lock:
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

    def _report_problem_now(self, entry: TaskEntry) -> None:
        """A problem with no grace (a deletion): report at once rather than at the next
        sweep, so the operator's claim, naming the cause, comes before the sidecar's."""
        if entry.busy or entry.problem_outcome is None or entry.problem is None:
            return
        entry.problem_since = time.monotonic()
        stop_job = entry.problem in ("Deleted", "PodRejected")
        self.submit(self.report, entry, entry.problem_outcome, f"pod problem {entry.problem}", stop_job, True)

    def _grace(self, problem: str) -> float:
        cfg = self.config
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

    # ------------------------------------------------------------------ status writes

    def _patch_status(self, entry: TaskEntry, status: dict[str, Any]) -> None:
        with contextlib.suppress(NotFound):
            self.kube.patch(pipelinetask_path(entry.namespace, entry.name, "status"), {"status": status})

    def _mark_running(self, entry: TaskEntry, pod_name: str | None) -> None:
        try:
            obj = self.kube.get(pipelinetask_path(entry.namespace, entry.name))
        except NotFound:
            return
        status = obj.get("status") or {}
        if status.get("phase") in (None, "Pending"):
            self._patch_status(entry, {"phase": "Running", "podName": pod_name})
            self.events.emit(
                pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                "Started",
                f"pod {pod_name} is running",
            )

    def _add_finalizer(self, key: TaskKey, finalizers: list[str], resource_version: str | None) -> None:
        patch: dict[str, Any] = {"metadata": {"finalizers": [*finalizers, FINALIZER]}}
        if resource_version:
            patch["metadata"]["resourceVersion"] = resource_version
        try:
            self.kube.patch(taskrunner_path(*key), patch)
        except ApiError as exc:
            log.info("adding the finalizer to %s/%s: %s (retried on the next event)", key[0], key[1], exc)

    def _remove_finalizer(self, key: TaskKey) -> None:
        remove_finalizer(self.kube, taskrunner_path(*key), FINALIZER)

    # ------------------------------------------------------------------ background work

    def _ensure_missing_jobs(self, worker: RunnerWorker) -> None:
        """After a restart: tasks recorded but whose Job was never created get it now."""
        for entry in self.index.for_runner(worker.key):
            if entry.terminal or entry.job_name or entry.busy:
                continue
            try:
                obj = self.kube.get(pipelinetask_path(entry.namespace, entry.name))
                task = PipelineTask.from_k8s(obj).spec.to_task()
                name = dispatching.ensure_job(self, worker, entry, task, obj)
            except NotFound:
                continue
            except TaskError as exc:  # refused, or cannot run: FAILED once
                dispatching.fail_before_job(self, worker, entry, exc)
                continue
            except Exception as exc:
                log.warning("%s/%s: could not create the Job: %s", entry.namespace, entry.name, exc)
                continue
            self._patch_status(entry, {"jobName": name})
            self.index.update(entry.key, job_name=name, job_since=time.monotonic())

    def _check_podless_job(self, entry: TaskEntry) -> None:
        """A Job without a pod past its grace: gone, or refused its pods (the Job
        controller's FailedCreate Event says why).  Either ends the attempt FAILED."""
        assert entry.job_name is not None
        try:
            self.kube.get(job_path(entry.namespace, entry.job_name))
        except NotFound:
            self._note_problem(
                entry, outcomes.assess_job({"metadata": {"name": entry.job_name}}, deleted=True)
            )
            return
        pods = self.kube.list(
            f"/api/v1/namespaces/{entry.namespace}/pods",
            label_selector=f"{naming.LABEL_PIPELINE_TASK}={naming.label_value(entry.name)}",
        )
        if pods:
            entry.pod_seen = True  # the watch will tell the rest
            return
        events = self.kube.list(
            event_path(entry.namespace),
            field_selector=f"involvedObject.name={entry.job_name},involvedObject.kind=Job,reason=FailedCreate",
        )
        message = next((str(e.get("message")) for e in reversed(events) if e.get("message")), None)
        self._note_problem(
            entry, outcomes.assess_refused_pods(entry.job_name, message, self.config.pod_create_grace_seconds)
        )

    def _settle_later(self, entry: TaskEntry) -> None:
        if not entry.settled:
            entry.settled = True
            self.submit(self._settle, entry)

    def _settle(self, entry: TaskEntry) -> None:
        """After the outcome is recorded: finish a cancel's Job deletion (a canceler may
        have stopped between recording the cancel and deleting the Job), start the Job's
        TTL (never earlier, so a TTL cannot remove what an unreported attempt's fallback
        needs), then let go of the finalizer."""
        if entry.canceled and not entry.stopping:
            entry.stopping = True
            try:
                outcomes.delete_job(self, entry)
            except ApiError as exc:
                log.warning("%s/%s: deleting a canceled task's Job: %s", entry.namespace, entry.name, exc)
        worker = self.worker_for(entry)
        ttl = worker.spec.job_template.ttl_seconds_after_finished if worker is not None else None
        if ttl is not None and entry.job_name:
            with contextlib.suppress(NotFound):
                self.kube.patch(
                    job_path(entry.namespace, entry.job_name), {"spec": {"ttlSecondsAfterFinished": ttl}}
                )
        remove_finalizer(self.kube, pipelinetask_path(entry.namespace, entry.name), ATTEMPT_FINALIZER)

    def _finalize_runner(self, worker: RunnerWorker) -> None:
        """A deleted TaskRunner: stop and fail its unfinished tasks, then let it go."""
        outcome = Outcome(
            "FAILED",
            RUNNER_DELETED_ERROR,
            f"TaskRunner {worker.namespace}/{worker.name} was deleted while the task ran",
        )
        while not self._stop.is_set():
            pending = [e for e in self.index.for_runner(worker.key) if not e.terminal]
            for entry in pending:
                try:
                    self.report(entry, outcome, "TaskRunner deleted", True, True)
                except Exception as exc:
                    log.warning("%s/%s: failing on runner deletion: %s", entry.namespace, entry.name, exc)
            if not [e for e in self.index.for_runner(worker.key) if not e.terminal]:
                break
            self._stop.wait(max(self.config.scaled(5), 0.2))
        worker.stop()
        self._remove_finalizer(worker.key)
        self.events.emit(
            task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid),
            "Deleted",
            "every task is reported; the TaskRunner is released",
        )

    def _plan(self, worker: RunnerWorker) -> Any:
        entries = [self.index.get(k) for k in self.index.active_keys(worker.key)]
        timeouts = [e.report_progress_timeout for e in entries if e is not None and e.report_progress_timeout]
        hb = worker.spec.heartbeat
        return heartbeat_interval(
            len(entries), hb.budget_per_second, hb.base_interval_seconds, min(timeouts) if timeouts else None
        )

    def _sweep_loop(self) -> None:
        period = max(self.config.scaled(self.config.sweep_interval_seconds), 0.1)
        while not self._stop.wait(period):
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")

    def sweep(self) -> None:
        self.health.tick()
        now = time.monotonic()
        with self._workers_lock:
            workers = list(self.workers.values())
        for worker in workers:
            plan = self._plan(worker)
            if (
                plan.interval_seconds != worker.plan.interval_seconds
                or plan.budget_met != worker.plan.budget_met
            ):
                self.request_status(worker)
            worker.plan = plan
            worker.health.budget_message = None if plan.budget_met else plan.message
            label = f"{worker.namespace}/{worker.name}"
            self.metrics.heartbeat_interval.labels(label).set(plan.interval_seconds)
            self.metrics.tasks_active.labels(label).set(worker.active())
            if worker.key in self._status_dirty or worker.last_poll_time is not None:
                self._status_dirty.discard(worker.key)
                self.submit(worker.publish_status)
        # Pod problems past their grace.
        for entry in self.index:
            if entry.terminal or entry.busy or entry.problem is None or entry.problem_since is None:
                continue
            if now - entry.problem_since < self._grace(entry.problem):
                continue
            outcome = entry.problem_outcome
            if outcome is None:
                continue
            stop_job = entry.problem in ("ImagePull", "Unschedulable", "Deleted", "PodRejected")
            entry.problem_since = now  # retried after another grace if this attempt fails
            self.submit(self.report, entry, outcome, f"pod problem {entry.problem}", stop_job, True)
        # Jobs whose pods never appeared: refused (quota, admission, a missing account) or gone.
        pod_grace = self.config.scaled(self.config.pod_create_grace_seconds)
        for entry in self.index:
            if entry.terminal or entry.busy or entry.pod_seen or entry.problem is not None:
                continue
            if entry.job_name and entry.job_since is not None and now - entry.job_since >= pod_grace:
                entry.job_since = now  # looked at again after another grace
                self.submit(self._check_podless_job, entry)
        # History limits, every few sweeps.
        if now - self._last_history >= max(self.config.scaled(30), 1.0):
            self._last_history = now
            for worker in workers:
                for key in history.expired(self.index.for_runner(worker.key), worker.spec.history_limits):
                    self.submit(self._delete_task, key)

    def _delete_task(self, key: TaskKey) -> None:
        with contextlib.suppress(NotFound):
            self.kube.delete(pipelinetask_path(*key), propagation_policy="Background")
        self.index.remove(key)


def utc_now() -> datetime:
    return datetime.now(UTC)


def remove_finalizer(kube: KubeClient, path: str, finalizer: str) -> None:
    """Take ``finalizer`` off the object at ``path`` (conditional on the version read, so
    another controller's finalizers are never lost); gone is done."""
    for _ in range(10):
        try:
            obj = kube.get(path)
        except NotFound:
            return
        meta = obj.get("metadata") or {}
        current = meta.get("finalizers") or []
        if finalizer not in current:
            return
        kept = [f for f in current if f != finalizer]
        try:
            kube.patch(
                path, {"metadata": {"finalizers": kept, "resourceVersion": meta.get("resourceVersion")}}
            )
            return
        except NotFound:
            return
        except ApiError as exc:
            log.info("removing the finalizer %s of %s: %s", finalizer, path, exc)
            time.sleep(0.2)
