"""The top of the operator's stack (see services.py for its layers): builds them, routes
watch events, sweeps for what has waited too long, and handles finalizers.

Threads, not coroutines, do the I/O: botocore is synchronous and so is dptr's stdlib
Kubernetes client.  The ``on_*_event`` methods run in kopf's event loop: they only read
and update the index and hand work to the work pool; they never block on an API.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from dptr_common import naming
from dptr_common.errors import Outcome, TaskError
from dptr_common.kube import (
    ApiError,
    KubeClient,
    NotFound,
    job_path,
    pipelinetask_path,
    taskrunner_path,
)
from dptr_common.models import PipelineTask, TaskRunner
from dptr_operator import history, outcomes
from dptr_operator.config import OperatorConfig
from dptr_operator.dispatch import Dispatcher, JobPending, rejection
from dptr_operator.events import EventRecorder, task_runner_ref
from dptr_operator.finalizers import remove_finalizer
from dptr_operator.health import HealthState
from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import ATTEMPT_FINALIZER, TaskEntry, TaskIndex, TaskKey
from dptr_operator.metrics import Metrics
from dptr_operator.pods import PodTracker
from dptr_operator.polling import RunnerWorker
from dptr_operator.reporter import Reporter
from dptr_operator.runners import Runners
from dptr_operator.services import Services
from dptr_operator.statuswriter import StatusWriter
from dptr_operator.workpool import WorkPool

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
        status_writer = StatusWriter(kube, self.index)
        status_writer.on_gone = self.index.remove
        self.metrics.status_writes_pending.set_function(lambda: len(status_writer))
        self.services = Services(
            config=config,
            kube=kube,
            index=self.index,
            metrics=self.metrics,
            events=self.events,
            status_writer=status_writer,
            work=WorkPool(max(8, config.heartbeat_workers // 2)),
        )
        # Built bottom up; the pollers reach the dispatcher (built last) through a callable.
        self.runners = Runners(self.services, dispatch=self._dispatch)
        self.reporter = Reporter(self.services, self.runners)
        self.scheduler = HeartbeatScheduler(self.services, self.runners, self.reporter)
        self.dispatcher = Dispatcher(self.services, self.reporter, self.scheduler)
        self.pods = PodTracker(self.services, self.reporter)
        self._work = self.services.work
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="sweep", daemon=True)
        self._last_history = 0.0

    @property
    def leading(self) -> bool:
        return self.services.leading.is_set()

    def _dispatch(self, worker: RunnerWorker, raw: Mapping[str, Any], release: Callable[[], None]) -> None:
        self.dispatcher.dispatch(worker, raw, release)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.services.leading.set()
        self.metrics.leader.set(1)
        self.health.leader = True
        self.health.standby = False
        self.rebuild()
        self.services.status_writer.start()
        self.scheduler.start()
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        self.services.leading.clear()
        self.metrics.leader.set(0)
        self.runners.stop_all()
        self.scheduler.stop()
        self._work.shutdown()
        self.services.status_writer.close()
        self.events.close()

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
                entry.counted = entry.terminal
                count += 1
                if not entry.terminal:
                    if entry.job_name:
                        entry.job_since = time.monotonic()  # its pods get a grace from now
                    else:
                        entry.job_pending_since = time.monotonic()
                    self.scheduler.schedule_new(entry)
                elif entry.finalized:
                    self._settle_later(entry)
        log.info(
            "rebuilt the index from %d PipelineTask(s) (%d active) in %.2fs",
            count,
            len(self.index.active_keys()),
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ watch events

    def on_runner_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            gone = self.runners.remove(key)
            if gone is not None:
                gone.stop()
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
            # Keyed: a runner's events until the finalizer lands queue one write, not one each.
            self._work.submit(
                self._add_finalizer,
                key=("finalizer", key),
                runner_key=key,
                finalizers=list(meta.get("finalizers") or []),
                resource_version=meta.get("resourceVersion"),
            )
        worker, created = self.runners.upsert(runner)
        if created:
            if not deleting:
                worker.start()
            self._work.submit(self._ensure_missing_jobs, key=("missing-jobs", key), worker=worker)
        if deleting and not worker.deleting:
            worker.begin_deletion()
            self.runners.request_status(worker)
            self.events.emit(
                task_runner_ref(key[0], key[1], runner.metadata.uid),
                "Deleting",
                "polling stopped; unfinished tasks are stopped and reported FAILED (dptr.TaskRunnerDeleted)",
                "Warning",
            )
            self._work.submit(self._finalize_runner, key=("finalize", key), worker=worker)

    def on_task_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self.index.remove(key)
            return
        fresh = TaskEntry.from_k8s(body)
        entry, before = self.index.upsert(fresh)
        if before is None and not entry.terminal and entry is fresh:
            # Not from this process's dispatch (which indexes its tasks first): a create
            # answered with an error that landed anyway, or another replica's.
            if not entry.job_name:
                entry.job_pending_since = time.monotonic()
            self.scheduler.schedule_new(entry)
        if entry.terminal:
            if not entry.counted and before is not None:
                self.reporter.task_finished(entry, entry.phase)
            entry.counted = True
            worker = self.runners.worker_for(entry)
            if worker is not None:
                worker.capacity_changed()
            if entry.finalized:
                self._settle_later(entry)
            return
        if entry.deleting:
            # Deleted by a user (or with its TaskRunner's namespace) while the attempt is
            # open: the finalizer holds the object until the attempt is reported.
            self.pods.task_deleted(entry)
        elif entry.heartbeat_owner == "sidecar":
            # The sidecar took over (or refreshed): re-check when it could go stale.
            self.scheduler.schedule_new(entry)

    def _task_for(self, labels: Mapping[str, str], namespace: str) -> TaskEntry | None:
        name = labels.get(naming.LABEL_PIPELINE_TASK)
        return self.index.get((namespace, name)) if name else None

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        entry = self._task_for(meta.get("labels") or {}, str(meta.get("namespace")))
        if entry is not None and not entry.terminal:
            self.pods.on_pod(entry, event_type, body)

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
                self._work.submit(self.reporter.delete_job, entry=entry)
            return
        self.pods.on_job(entry, event_type, body)

    def _add_finalizer(
        self, runner_key: TaskKey, finalizers: list[str], resource_version: str | None
    ) -> None:
        patch: dict[str, Any] = {"metadata": {"finalizers": [*finalizers, FINALIZER]}}
        if resource_version:
            patch["metadata"]["resourceVersion"] = resource_version
        try:
            self.kube.patch(taskrunner_path(*runner_key), patch)
        except ApiError as exc:
            log.info(
                "adding the finalizer to %s/%s: %s (retried on the next event)",
                runner_key[0],
                runner_key[1],
                exc,
            )

    def _remove_finalizer(self, key: TaskKey) -> None:
        remove_finalizer(self.kube, taskrunner_path(*key), FINALIZER)

    # ------------------------------------------------------------------ background work

    def _ensure_missing_jobs(self, worker: RunnerWorker) -> None:
        """After a restart: tasks recorded but whose Job was never created get it now."""
        for entry in self.index.for_runner(worker.key):
            if not entry.terminal and not entry.job_name and not entry.busy:
                self._ensure_job(entry=entry, worker=worker)

    def _ensure_job(
        self, entry: TaskEntry, worker: RunnerWorker | None = None, *, give_up: bool = False
    ) -> None:
        """Create the Job of a recorded task that has none: after a restart, an API outage
        during its dispatch (``JobPending``), or a PipelineTask whose create was answered
        with an error but landed.  With ``give_up`` (the pod create grace has passed) an
        API server that still does not answer ends the attempt FAILED
        ``dptr.JobRejected.Unavailable``: no attempt is heartbeated without a Job forever."""
        worker = worker or self.runners.worker_for(entry)
        # A claimed report (ours being made, or one from before a restart) is the outcome
        # already: a Job now would run an attempt that is being reported.
        if worker is None or entry.terminal or entry.job_name or entry.busy or entry.report_claimed_by:
            return
        try:
            obj = self.kube.get(pipelinetask_path(entry.namespace, entry.name))
            if ((obj.get("status") or {}).get("report") or {}).get("claimedBy"):
                return
            task = PipelineTask.from_k8s(obj).spec.to_task()
            name = self.dispatcher.ensure_job(worker, entry, task, obj)
        except NotFound:
            return
        except TaskError as exc:  # refused, or cannot run: FAILED once
            self.dispatcher.fail_before_job(worker, entry, exc)
            return
        except (JobPending, ApiError) as exc:  # the API server still away
            if give_up:
                error = exc.error if isinstance(exc, JobPending) else exc
                self.dispatcher.fail_before_job(worker, entry, rejection(error, "Job"))
            else:
                log.warning("%s/%s: could not create the Job yet: %s", entry.namespace, entry.name, exc)
            return
        if entry.terminal or entry.busy:
            # Reported (or being reported) while the create was in flight: no attempt for it.
            with contextlib.suppress(ApiError):
                self.reporter.delete_job(entry)
            return
        self.pods.patch_status(entry, {"jobName": name})
        self.index.update(entry.key, job_name=name, job_since=time.monotonic(), job_pending_since=None)

    def _settle_later(self, entry: TaskEntry) -> None:
        if not entry.settled:
            entry.settled = True
            self._work.submit(self._settle, entry=entry)

    def _settle(self, entry: TaskEntry) -> None:
        """After the outcome is recorded: finish a cancel's Job deletion (a canceler may
        have stopped between recording the cancel and deleting the Job), start the Job's
        TTL (never earlier, so a TTL cannot remove what an unreported attempt's fallback
        needs), then let go of the finalizer."""
        if entry.canceled and not entry.stopping:
            entry.stopping = True
            try:
                self.reporter.delete_job(entry)
            except ApiError as exc:
                log.warning("%s/%s: deleting a canceled task's Job: %s", entry.namespace, entry.name, exc)
        worker = self.runners.worker_for(entry)
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
                    self.reporter.report(entry, outcome, cause="TaskRunner deleted", stop_job=True)
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
        workers = self.runners.all()
        for worker in workers:
            plan = self.runners.plan(worker)
            if (
                plan.interval_seconds != worker.plan.interval_seconds
                or plan.budget_met != worker.plan.budget_met
            ):
                self.runners.request_status(worker)
            worker.plan = plan
            worker.health.budget_message = None if plan.budget_met else plan.message
            label = f"{worker.namespace}/{worker.name}"
            self.metrics.heartbeat_interval.labels(label).set(plan.interval_seconds)
            self.metrics.tasks_active.labels(label).set(worker.active())
            if self.runners.take_status_request(worker.key) or worker.last_poll_time is not None:
                self._work.submit(worker.publish_status, key=("runner-status", worker.key))
        self.pods.sweep(now)
        # Recorded tasks known to have no Job (TaskEntry.job_pending_since): tried five
        # times over the pod create grace, then ended if the API server still cannot.
        grace = self.config.scaled(self.config.pod_create_grace_seconds)
        for entry in self.index:
            since = entry.job_pending_since
            if since is None or entry.terminal or entry.busy or entry.job_name:
                continue
            if now - (entry.job_checked or since) < grace / 5:
                continue
            entry.job_checked = now
            self._work.submit(
                self._ensure_job, key=("ensure-job", entry.key), entry=entry, give_up=now - since >= grace
            )
        # History limits, every few sweeps.
        if now - self._last_history >= max(self.config.scaled(30), 1.0):
            self._last_history = now
            for worker in workers:
                for key in history.expired(self.index.for_runner(worker.key), worker.spec.history_limits):
                    self._work.submit(self._delete_task, key=("delete", key), task_key=key)

    def _delete_task(self, task_key: TaskKey) -> None:
        with contextlib.suppress(NotFound):
            self.kube.delete(pipelinetask_path(*task_key), propagation_policy="Background")
        self.index.remove(task_key)
