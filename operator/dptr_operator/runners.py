"""The TaskRunners this operator serves: their workers by key, the heartbeat interval
each task gets from its runner's plan, and which runners' statuses are due a write."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import UTC, datetime

from dptr_common.models import TaskRunner
from dptr_common.pacing import DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS, HeartbeatPlan, heartbeat_interval
from dptr_operator.index import TaskEntry, TaskKey
from dptr_operator.metrics import RunnerSample
from dptr_operator.polling import Dispatch, RunnerWorker, runner_ready
from dptr_operator.services import Services

__all__ = ["ACK_WINDOW_SECONDS", "Runners"]

log = logging.getLogger(__name__)

#: Protocol seconds Data Pipeline waits for the first ReportTaskProgress of a polled task.
ACK_WINDOW_SECONDS = 120


class Runners:
    def __init__(self, services: Services, *, dispatch: Dispatch) -> None:
        self.services = services
        self._dispatch = dispatch
        self._workers: dict[TaskKey, RunnerWorker] = {}
        self._lock = threading.RLock()
        self._status_due: set[TaskKey] = set()

    # ------------------------------------------------------------------ workers

    def get(self, key: TaskKey) -> RunnerWorker | None:
        with self._lock:
            return self._workers.get(key)

    def worker_for(self, entry: TaskEntry) -> RunnerWorker | None:
        return self.get(entry.runner_key)

    def all(self) -> list[RunnerWorker]:
        with self._lock:
            return list(self._workers.values())

    def upsert(self, runner: TaskRunner) -> tuple[RunnerWorker, bool]:
        """The worker for a TaskRunner seen (created on first sight: True), updated."""
        key = (str(runner.metadata.namespace), runner.metadata.name)
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None:
                worker.update(runner)
                return worker, False
            worker = self._workers[key] = RunnerWorker(
                self.services, runner, dispatch=self._dispatch, request_status=self.request_status
            )
        self.services.metrics.runner_added(*key)
        worker.plan = self.plan(worker)
        self.request_status(worker)
        return worker, True

    def remove(self, key: TaskKey) -> RunnerWorker | None:
        with self._lock:
            # Its counters stay: dropped now, the outcomes just reported for its last tasks
            # could vanish before Prometheus scraped them (and the alerts with them).
            return self._workers.pop(key, None)

    def stop_all(self) -> None:
        for worker in self.all():
            worker.stop()

    # ------------------------------------------------------------------ pacing

    def plan(self, worker: RunnerWorker) -> HeartbeatPlan:
        """The runner's heartbeat plan for the tasks it has now."""
        index = self.services.index
        entries = [index.get(k) for k in index.active_keys(worker.key)]
        timeouts = [e.report_progress_timeout for e in entries if e is not None and e.report_progress_timeout]
        hb = worker.spec.heartbeat
        return heartbeat_interval(
            len(entries), hb.budget_per_second, hb.base_interval_seconds, min(timeouts) if timeouts else None
        )

    def interval_for(self, entry: TaskEntry) -> float:
        """The real-time heartbeat interval for a task: its runner's plan, capped by a third
        of the task's own reportProgressTimeout."""
        worker = self.worker_for(entry)
        interval = float(worker.plan.interval_seconds if worker else 60)
        if entry.report_progress_timeout:
            interval = min(interval, max(entry.report_progress_timeout / 3, 1.0))
        return max(self.services.config.scaled(interval), 0.02)

    # ------------------------------------------------------------------ status

    def request_status(self, worker: RunnerWorker) -> None:
        """Write this runner's status at the next sweep."""
        with self._lock:
            self._status_due.add(worker.key)

    def take_status_request(self, key: TaskKey) -> bool:
        with self._lock:
            if key in self._status_due:
                self._status_due.discard(key)
                return True
            return False

    # ------------------------------------------------------------------ metrics

    def samples(self) -> list[RunnerSample]:
        """Each TaskRunner's state for /metrics (read at scrape time: one pass over the
        index, and a runner whose state cannot be read is left out, not the scrape)."""
        config = self.services.config
        mono, wall = time.monotonic(), datetime.now(UTC)
        by_runner: dict[TaskKey, list[TaskEntry]] = {}
        for entry in self.services.index:
            by_runner.setdefault(entry.runner_key, []).append(entry)
        rows = []
        for worker in self.all():
            try:
                rows.append(
                    self._sample(worker, by_runner.get(worker.key, []), mono, wall, config.time_scale)
                )
            except Exception:
                log.exception("%s/%s: reading its state for /metrics failed", worker.namespace, worker.name)
        return rows

    @staticmethod
    def _sample(
        worker: RunnerWorker, entries: list[TaskEntry], mono: float, wall: datetime, time_scale: float
    ) -> RunnerSample:
        oldest, ratio = 0.0, 0.0
        for entry in entries:
            if entry.terminal:
                continue
            if entry.heartbeat_seen is not None:
                age = mono - entry.heartbeat_seen
            elif entry.created_at is not None:
                age = (wall - entry.created_at).total_seconds()  # polled, never heartbeated
            else:
                continue
            # The operator's clock runs --time-scale times faster than the protocol's:
            # the gauges are in protocol seconds, like reportProgressTimeout.
            age = max(age, 0.0) / time_scale
            oldest = max(oldest, age)
            if entry.acknowledged:
                timeout = entry.report_progress_timeout or DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS
            else:
                timeout = ACK_WINDOW_SECONDS  # Data Pipeline gives an unacknowledged task away sooner
            ratio = max(ratio, age / timeout)
        active = worker.active()
        ready = runner_ready(worker.health, deleting=worker.deleting)
        last = worker.last_poll_time
        return RunnerSample(
            namespace=worker.namespace,
            name=worker.name,
            ready=ready,
            paused=bool(worker.spec.paused),
            capacity=int(worker.spec.max_concurrent_tasks),
            active=active,
            heartbeat_interval=float(worker.plan.interval_seconds),
            phases=dict(Counter(e.phase for e in entries)),
            oldest_heartbeat_age=oldest,
            heartbeat_age_ratio=ratio,
            last_successful_poll=last.timestamp() if last is not None else None,
        )

    # ------------------------------------------------------------------ the sweep

    def sweep(self) -> list[RunnerWorker]:
        """Re-plan each runner's heartbeats and write the statuses that are due (a changed
        plan, a request, or a poll time to show); returns the workers swept."""
        workers = self.all()
        for worker in workers:
            plan = self.plan(worker)
            if (
                plan.interval_seconds != worker.plan.interval_seconds
                or plan.budget_met != worker.plan.budget_met
            ):
                self.request_status(worker)
            worker.plan = plan
            worker.health.budget_message = None if plan.budget_met else plan.message
            if self.take_status_request(worker.key) or worker.last_poll_time is not None:
                self.services.work.submit(worker.publish_status, key=("runner-status", worker.key))
        return workers
