"""The operator's own heartbeats: one scheduler thread, one heap, a small worker pool.

The operator heartbeats (ReportTaskProgress) every unfinished task whose sidecar has not
taken over - while the pod is Pending, pulling, unschedulable - and every task whose
sidecar's heartbeats went stale (then it takes them back, and says so in an Event).

Cost model for thousands of tasks: each task is one heap item (no thread, no coroutine,
no kopf daemon); a due item is checked against the index (cheap), and a heartbeat is
submitted to a bounded pool only when a token of the runner's pacing budget is free.
Items are spread: a new task's first heartbeat is at a random point of its interval,
and the token bucket turns any backlog (after a restart) into an even stream at the
budget rate instead of a burst.  A due task that finds no token waits in its runner's
queue, ordered by deadline (last heartbeat + reportProgressTimeout), and one wake-up per
runner drains it as tokens free up: a backlog costs O(log n) per token rather than
re-scheduling every waiting task on each one, and the task closest to being given away
is always served first.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import NamedTuple

from dptr_common import ledger
from dptr_common.datapipeline import CredentialsError, DataPipelineError, TaskGone
from dptr_common.kube import ApiError, NotFound, pipelinetask_path
from dptr_common.logformat import log_context
from dptr_common.pacing import DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS, full_jitter_delay, jittered
from dptr_operator.events import pipeline_task_ref
from dptr_operator.index import TaskEntry, TaskKey
from dptr_operator.reporter import Reporter
from dptr_operator.runners import Runners
from dptr_operator.services import Services

__all__ = ["HeartbeatScheduler", "TokenBucket", "sidecar_stale_after"]

log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (not thread-safe: one user)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def configure(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)

    def take(self, now: float) -> float:
        """Take a token: 0 when taken, else the seconds until one is free (none taken)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class _Drain(NamedTuple):
    """Heap item: a token of this runner's budget is free; drain its waiting queue."""

    runner_key: TaskKey


def _seen_age(entry: TaskEntry) -> float:
    """Seconds since this operator saw the task's heartbeat time change (its own monotonic
    clock: the sidecar's timestamp is another node's clock)."""
    if entry.heartbeat_seen is None:
        entry.heartbeat_seen = time.monotonic()
    return time.monotonic() - entry.heartbeat_seen


def sidecar_stale_after(interval: float) -> float:
    """Sidecar heartbeats older than this are stale: 1.5 intervals, so with an interval of
    at most a third of reportProgressTimeout the operator is back within half of it."""
    return interval * 1.5


class HeartbeatScheduler:
    def __init__(self, services: Services, runners: Runners, reporter: Reporter) -> None:
        self.services = services
        self.runners = runners
        self.reporter = reporter
        self._heap: list[tuple[float, int, TaskKey | _Drain]] = []
        self._scheduled: dict[TaskKey, float] = {}
        self._seq = itertools.count()
        self._head_seq = itertools.count(-1, -1)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(services.config.heartbeat_workers, thread_name_prefix="heartbeat")
        self._buckets: dict[TaskKey, TokenBucket] = {}
        self._failures: dict[TaskKey, int] = {}
        #: Per runner: due tasks waiting for a token, as a heap of (deadline, seq, key):
        #: the task closest to its reportProgressTimeout first (scheduler thread only).
        self._waiting: dict[TaskKey, list[tuple[float, int, TaskKey]]] = {}
        self._waiting_keys: set[TaskKey] = set()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        with self._cv:
            return len(self._scheduled) + len(self._waiting_keys)

    # ------------------------------------------------------------------ scheduling

    def schedule(self, key: TaskKey, delay: float) -> None:
        """Check ``key`` in ``delay`` seconds (an earlier existing time wins)."""
        due = time.monotonic() + max(delay, 0.0)
        with self._cv:
            current = self._scheduled.get(key)
            if current is not None and current <= due:
                return
            self._scheduled[key] = due
            heapq.heappush(self._heap, (due, next(self._seq), key))
            if self._heap[0][2] == key:
                self._cv.notify()

    def schedule_new(self, entry: TaskEntry) -> None:
        """A task seen for the first time (dispatch or rebuild): first check spread evenly."""
        interval = self.runners.interval_for(entry)
        if not entry.acknowledged:
            self.schedule(entry.key, 0)
            return
        last = entry.heartbeat_last_at
        if last is None:
            self.schedule(entry.key, random.random() * interval)
            return
        if entry.heartbeat_owner == "sidecar":
            self.schedule(entry.key, max(sidecar_stale_after(interval) - _seen_age(entry), 0) + 0.01)
        else:
            age = (datetime.now(UTC) - last).total_seconds()  # our own clock wrote it
            self.schedule(entry.key, max(interval - age, 0) * random.uniform(0.9, 1.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:
                now = time.monotonic()
                if not self._heap:
                    self._cv.wait(1.0)
                    continue
                due, _, key = self._heap[0]
                if due > now:
                    self._cv.wait(min(due - now, 1.0))
                    continue
                heapq.heappop(self._heap)
                if isinstance(key, _Drain):
                    pass
                elif self._scheduled.get(key) != due:
                    continue  # superseded by an earlier schedule
                else:
                    del self._scheduled[key]
            if isinstance(key, _Drain):
                self._drain(key.runner_key, now)
                continue
            if key in self._waiting_keys:
                continue  # already queued for a token
            try:
                self._check(key, now)
            except Exception:
                log.exception("heartbeat scheduling of %s failed", key)
                self.schedule(key, 5.0)

    def _drain(self, runner_key: TaskKey, now: float) -> None:
        """Give free tokens to the runner's waiting tasks, earliest deadline first."""
        queue = self._waiting.get(runner_key)
        while queue:
            _, _, key = heapq.heappop(queue)
            self._waiting_keys.discard(key)
            try:
                if not self._check(key, now, waited=True):
                    return  # no token: back at the head, and a wake-up is scheduled
            except Exception:
                log.exception("heartbeat scheduling of %s failed", key)
                self.schedule(key, 5.0)
        self._waiting.pop(runner_key, None)

    def _deadline(self, entry: TaskEntry) -> float:
        """When Data Pipeline would give the task away (epoch seconds, real time); 0 for a
        task not yet heartbeated, whose 2-minute ack window is the tightest of all.

        Why deadlines and not due times: due times come from intervals planned at
        different moments (a task scheduled when 1,000 ran got 125 s, one scheduled when
        5,000 ran got 300 s), so serving by due time can make a task wait while its
        timeout runs out behind tasks that still have minutes to spare."""
        if entry.heartbeat_last_at is None or not entry.acknowledged:
            return 0.0
        timeout = float(entry.report_progress_timeout or DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS)
        return entry.heartbeat_last_at.timestamp() + self.services.config.scaled(timeout)

    def _wait_for_token(self, entry: TaskEntry, wait: float, *, head: bool) -> None:
        runner_key = entry.runner_key
        queue = self._waiting.get(runner_key)
        if queue is None:
            queue = self._waiting[runner_key] = []
        first = not queue
        # Back at the head (of its deadline's ties) when it was already first in line.
        seq = next(self._head_seq) if head else next(self._seq)
        heapq.heappush(queue, (self._deadline(entry), seq, entry.key))
        self._waiting_keys.add(entry.key)
        if first or head:
            with self._cv:
                heapq.heappush(self._heap, (time.monotonic() + wait, next(self._seq), _Drain(runner_key)))

    def _check(self, key: TaskKey, now: float, *, waited: bool = False) -> bool:
        """Heartbeat a due task if its runner has a token; False when it has to wait for one."""
        entry = self.services.index.get(key)
        if entry is None or entry.terminal:
            self._failures.pop(key, None)
            return True
        if not self.services.leading.is_set():
            self.schedule(key, 1.0)
            return True
        interval = self.runners.interval_for(entry)
        if entry.heartbeat_owner == "sidecar" and entry.heartbeat_last_at is not None:
            age = _seen_age(entry)
            stale = sidecar_stale_after(interval)
            if age < stale:
                self.schedule(key, stale - age + 0.01)
                return True
        if not waited and self._waiting.get(entry.runner_key):
            self._wait_for_token(entry, 0.0, head=False)  # in deadline order with the others
            return False
        bucket = self._bucket(entry)
        wait = bucket.take(now)
        if wait > 0:
            self._wait_for_token(entry, wait, head=waited)
            return False
        if entry.heartbeat_last_at is not None and entry.acknowledged:
            late = (datetime.now(UTC) - entry.heartbeat_last_at).total_seconds() - interval
            self.services.metrics.heartbeat_lag.observe(max(late, 0.0))
        self._pool.submit(self._beat, key)
        return True

    def _bucket(self, entry: TaskEntry) -> TokenBucket:
        worker = self.runners.worker_for(entry)
        budget = worker.spec.heartbeat.budget_per_second if worker is not None else 8.0
        rate = budget / self.services.config.time_scale
        bucket = self._buckets.get(entry.runner_key)
        if bucket is None:
            bucket = self._buckets[entry.runner_key] = TokenBucket(rate, max(rate, 1.0))
        elif bucket.rate != rate:
            bucket.configure(rate, max(rate, 1.0))
        return bucket

    # ------------------------------------------------------------------ one heartbeat

    def _beat(self, key: TaskKey) -> None:
        entry = self.services.index.get(key)
        with log_context(**(entry.log_fields() if entry is not None else {})):
            self._beat_task(key)

    def _beat_task(self, key: TaskKey) -> None:
        entry = self.services.index.get(key)
        if entry is None or entry.terminal or entry.busy:
            if entry is not None and entry.busy:
                self.schedule(key, self.runners.interval_for(entry) / 4)
            return
        worker = self.runners.worker_for(entry)
        interval = self.runners.interval_for(entry)
        if worker is None:
            self.schedule(key, min(interval, 1.0))
            return
        took_over = entry.heartbeat_owner == "sidecar"
        try:
            with self.services.metrics.timed("ReportTaskProgress"):
                canceled = worker.client().report_task_progress(entry.task_id)
        except TaskGone as exc:
            self.services.metrics.heartbeats.labels("gone").inc()
            self.reporter.cancel(
                entry, reason="TaskGone", message=f"Data Pipeline no longer knows the task: {exc}"
            )
            return
        except DataPipelineError as exc:
            self.services.metrics.heartbeats.labels(exc.reason).inc()
            if isinstance(exc, CredentialsError):
                worker.refresh_credentials()
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            retry = full_jitter_delay(
                failures, base=max(self.services.config.scaled(2.0), 0.02), cap=interval / 2
            )
            log.info(
                "%s/%s: heartbeat failed (%s); retrying in %.2fs", entry.namespace, entry.name, exc, retry
            )
            self.services.status_writer.put(key, ledger.heartbeat_status(error=str(exc)[:500]))
            self.schedule(key, max(retry, 0.01))
            return
        self._failures.pop(key, None)
        self.services.metrics.heartbeats.labels("ok").inc()
        if canceled:
            self.reporter.cancel(entry, reason="Canceled", message="Data Pipeline canceled the task")
            return
        now = datetime.now(UTC)
        try:
            if took_over:
                ledger.take_over_heartbeats(
                    self.services.kube,
                    entry.namespace,
                    entry.name,
                    owner="operator",
                    by=self.services.config.holder,
                )
                self.services.events.emit(
                    pipeline_task_ref(entry.namespace, entry.name, entry.uid),
                    "HeartbeatsResumed",
                    "the sidecar's heartbeats went stale; the operator heartbeats the task again",
                    "Warning",
                )
            else:
                self.services.status_writer.put(
                    key, ledger.heartbeat_status(by=self.services.config.holder, at=now)
                )
            if not entry.acknowledged:
                self._mark_acknowledged(entry, now)
        except NotFound:
            self.services.index.remove(key)
            return
        except ApiError as exc:
            log.warning("%s/%s: recording the heartbeat failed: %s", entry.namespace, entry.name, exc)
        self.services.index.update(
            key, heartbeat_last_at=now, heartbeat_seen=time.monotonic(), heartbeat_owner="operator"
        )
        self.schedule(key, jittered(interval, fraction=0.1))

    def _mark_acknowledged(self, entry: TaskEntry, when: datetime) -> None:
        self.services.kube.patch(
            pipelinetask_path(entry.namespace, entry.name, "status"),
            {"status": {"acknowledgedAt": ledger.format_time(when)}},
        )
        self.services.index.update(entry.key, acknowledged=True)
