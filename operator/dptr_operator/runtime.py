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
from dptr_common.kube import (
    KubeClient,
    NotFound,
    pipelinetask_path,
)
from dptr_common.models import TaskRunner
from dptr_operator import history, outcomes
from dptr_operator.config import OperatorConfig
from dptr_operator.dispatch import Dispatcher
from dptr_operator.endings import FINALIZER, Endings
from dptr_operator.events import EventRecorder, task_runner_ref
from dptr_operator.health import HealthState
from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import TaskEntry, TaskIndex, TaskKey
from dptr_operator.metrics import Metrics
from dptr_operator.pods import PodTracker
from dptr_operator.polling import RunnerWorker
from dptr_operator.reporter import Reporter
from dptr_operator.runners import Runners
from dptr_operator.services import Services
from dptr_operator.statuswriter import StatusWriter
from dptr_operator.workpool import WorkPool

#: FINALIZER is endings.py's, still importable from here.
__all__ = ["FINALIZER", "Operator"]

log = logging.getLogger(__name__)


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
        self.metrics.runner_state(self.runners.samples)
        self.reporter = Reporter(self.services, self.runners)
        self.scheduler = HeartbeatScheduler(self.services, self.runners, self.reporter)
        self.dispatcher = Dispatcher(self.services, self.reporter, self.scheduler)
        self.pods = PodTracker(self.services, self.reporter)
        self._stop = threading.Event()
        self.endings = Endings(self.services, self.runners, self.reporter, self._stop)
        self._work = self.services.work
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
                    self.endings.settle_later(entry)
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
                self.endings.add_runner_finalizer,
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
            self._work.submit(self.endings.finalize_runner, key=("finalize", key), worker=worker)

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
                self.endings.settle_later(entry)
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

    def _ensure_missing_jobs(self, worker: RunnerWorker) -> None:
        """After a restart: tasks recorded but whose Job was never created get it now."""
        for entry in self.index.for_runner(worker.key):
            if not entry.terminal and not entry.job_name and not entry.busy:
                self.dispatcher.create_missing_job(worker, entry)

    def _ensure_job(self, entry: TaskEntry, *, give_up: bool) -> None:
        worker = self.runners.worker_for(entry)
        if worker is not None:
            self.dispatcher.create_missing_job(worker, entry, give_up=give_up)

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
        workers = self.runners.sweep()
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
