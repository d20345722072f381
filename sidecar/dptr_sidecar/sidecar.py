"""The sidecar: heartbeat the task, honour a cancel, report how the task container ended.

One process per task pod, four threads, each with its own object:

* the **main thread** (:class:`Sidecar`) decides: it reads the PipelineTask (the ledger
  shared with the operator), takes over heartbeats, then waits for one of: the task
  container's final status (report it), a cancel (delete the Job, record Canceled),
  SIGTERM (keep going until the final status is seen or the grace period runs out).
  Reporting and cancelling are :class:`~dptr_sidecar.reporting.Reporter`'s, what a pod
  shows is :mod:`dptr_sidecar.podstate`'s;
* the **heartbeat thread** (:class:`~dptr_sidecar.heartbeats.Heartbeater`) calls
  ReportTaskProgress on the paced interval, retrying throttling and 5xx with back-off but
  never past the task's reportProgressTimeout, and re-reads the interval the operator
  publishes on the TaskRunner;
* the **pod watcher** (:class:`~dptr_sidecar.kubestream.PodWatcher`) follows the
  sidecar's own pod (GET + watch);
* while staged outputs and logs upload, a thread of the Reporter keeps its claim fresh.

The heartbeat thread and the pod watcher speak to the main thread only through its
event queue.

Exactly one outcome per task (design invariant 1): the report is claimed on the
PipelineTask with an optimistic write before SetTaskStatus, as the operator does; a
cancel is recorded only while no report is claimed; and before any SetTaskStatus a last
ReportTaskProgress asks the service whether the task was canceled meanwhile.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dptr_common.datapipeline import DataPipelineClient
from dptr_common.kube import KubeClient, NotFound, object_reference, pipelinetask_path, pod_path
from dptr_common.ledger import sidecar_holder, take_over_heartbeats

from .config import DEFAULT_REPORT_PROGRESS_TIMEOUT, DEFAULT_TERMINATION_GRACE, SidecarConfig
from .heartbeats import Heartbeater
from .kubestream import PodWatcher
from .podstate import settled, task_end, termination_grace
from .reporting import Reporter
from .shared import DataPipeline, TaskInfo, retry_kube

__all__ = ["Sidecar"]

log = logging.getLogger("dptr.sidecar")


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
        self.dp = DataPipeline(dp_factory, config)
        self.sigterm = sigterm or threading.Event()
        self.holder = sidecar_holder(config.pod_name)
        #: ("pod", pod or None) from the pod watcher, ("cancel", (reason, detail)) from heartbeats.
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        #: Until the sidecar's first successful heartbeat, its deadline counts from here.
        self._started = time.monotonic()
        self._grace = DEFAULT_TERMINATION_GRACE

    def scaled(self, seconds: float) -> float:
        return self.config.scaled(seconds)

    # ---------------------------------------------------------------- start

    def run(self) -> int:
        cfg = self.config
        try:
            pt = retry_kube(
                lambda: self.kube.get(pipelinetask_path(cfg.namespace, cfg.pipeline_task)),
                "reading the PipelineTask",
            )
        except NotFound:
            log.warning("PipelineTask %s/%s does not exist; nothing to do", cfg.namespace, cfg.pipeline_task)
            return 0
        ref = object_reference(pt)
        spec, status = pt.get("spec") or {}, pt.get("status") or {}
        task_id = str(spec.get("taskId") or "")
        if not task_id:
            log.error("PipelineTask %s has no spec.taskId", cfg.pipeline_task)
            return 1
        task = TaskInfo(
            task_id=task_id,
            pipeline_id=str(spec.get("pipelineId") or ""),
            attempt_id=str(spec.get("attemptId") or ""),
            timeout=float(spec.get("reportProgressTimeoutSeconds") or DEFAULT_REPORT_PROGRESS_TIMEOUT),
            ref=ref,
        )
        heartbeats = Heartbeater(
            cfg,
            self.kube,
            self.dp,
            task,
            lambda reason, detail: self.events.put(("cancel", (reason, detail))),
            since=self._started,
        )
        reporter = Reporter(
            cfg,
            self.kube,
            self.dp,
            task,
            holder=self.holder,
            env=self.env,
            stop_heartbeats=heartbeats.stop,
            job_name=status.get("jobName"),
        )
        if settled(status):
            log.info("the task is already %s; nothing left to do", settled(status))
            if settled(status) == "canceled":
                # The canceler may have stopped between recording the cancel and deleting
                # the Job (cancels are recorded first): finish its work.
                reporter.delete_job()
            return 0
        claim = (status.get("report") or {}).get("claimedBy")

        # The pod: its grace period, its Job, and perhaps the task's end already.
        try:
            pod = retry_kube(lambda: self.kube.get(pod_path(cfg.namespace, cfg.pod_name)), "reading the pod")
        except NotFound:
            log.warning("pod %s does not exist; exiting", cfg.pod_name)
            return 0
        self._note_pod(pod, reporter)

        if claim and claim != self.holder:
            log.info("the report is claimed by %s; leaving it to them", claim)
            return 0
        if claim == self.holder:
            log.info("resuming our claimed report after a restart")
            end = task_end(pod, cfg.main_container, cfg.object_type)
            if end is not None:
                return reporter.report(end)

        # The operator heartbeated until now; from here on it is ours.
        status = retry_kube(
            lambda: take_over_heartbeats(
                self.kube, cfg.namespace, cfg.pipeline_task, "sidecar", cfg.pod_name
            ),
            "taking over heartbeats",
        )
        heartbeats.note_recorded()
        if settled(status):
            return 0
        log.info(
            "took over heartbeats of %s (task timeout %.0fs, interval %.0fs, time scale %g)",
            cfg.pipeline_task,
            task.timeout,
            heartbeats.interval,
            cfg.time_scale,
        )

        watcher = PodWatcher(
            self.kube,
            cfg.namespace,
            cfg.pod_name,
            lambda obj: self.events.put(("pod", obj)),
            watch_timeout=240.0,
            poll_interval=max(min(self.scaled(5.0), 5.0), 0.2),
            initial=pod,  # read above: the watch starts from it
        )
        watcher.start()
        heartbeats.start()
        try:
            return self._main_loop(reporter)
        finally:
            heartbeats.stop()
            watcher.close()

    def _note_pod(self, pod: dict[str, Any], reporter: Reporter) -> None:
        reporter.note_pod(pod)
        if self.config.termination_grace is not None:
            self._grace = self.config.termination_grace
        else:
            grace = termination_grace(pod)
            if grace is not None:
                self._grace = grace

    # ---------------------------------------------------------------- main loop

    def _main_loop(self, reporter: Reporter) -> int:
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
                self._note_pod(value, reporter)
                end = task_end(value, cfg.main_container, cfg.object_type)
                if end is not None:
                    return reporter.report(end)
            elif kind == "cancel":
                return reporter.cancel(*value)
