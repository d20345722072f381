"""Prometheus metrics of the operator (served on ``/metrics`` by :mod:`dptr_operator.health`).

Every name starts with ``dptr_``.  Labels are bounded: the TaskRunner as two labels
(``taskrunner_namespace``, ``taskrunner``, so alerts can route by namespace), the API
operation, a Data Pipeline status, a phase or an error reason; never a task or pipeline id.

The per-TaskRunner state (ready, paused, capacity, tasks by phase, heartbeat age) is read
at scrape time from :class:`RunnerSample` rows rather than kept in gauges, so a deleted
TaskRunner's series disappear with it instead of freezing at their last value.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dptr_common.version import VERSION

__all__ = ["OUTCOME_STATUSES", "PHASES", "Metrics", "RunnerSample"]

T = TypeVar("T")
log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100)
RUNNER_LABELS = ("taskrunner_namespace", "taskrunner")
#: A PipelineTask's phases, each exported (0 included) so a panel never shows "no data".
PHASES = ("Pending", "Running", "Succeeded", "Failed", "Canceled")
#: ``dptr_task_outcomes_total``'s ``status``: what Data Pipeline was told (SetTaskStatus'
#: taskStatus), or ``canceled`` when it canceled the task and nothing was reported.
OUTCOME_STATUSES = ("FINISHED", "FAILED", "FALSE", "canceled")
#: Why a SetTaskStatus can fail (dptr_common.datapipeline's error reasons).
SET_TASK_STATUS_REASONS = (
    "Throttled",
    "TransientError",
    "EndpointUnreachable",
    "InvalidCredentials",
    "InvalidRequest",
    "TaskGone",
    "DataPipelineError",
)


@dataclass(frozen=True)
class RunnerSample:
    """One TaskRunner's state at scrape time."""

    namespace: str
    name: str
    ready: bool
    paused: bool
    capacity: int
    active: int
    heartbeat_interval: float
    phases: dict[str, int] = field(default_factory=dict)
    #: Seconds since the oldest heartbeat among its open tasks (0 with none).
    oldest_heartbeat_age: float = 0.0
    #: The largest heartbeat age over its task's reportProgressTimeout (15 min unset; 0 with none).
    heartbeat_age_ratio: float = 0.0
    #: Unix time of the last PollForTask that Data Pipeline answered (None: not yet).
    last_successful_poll: float | None = None


class _RunnerCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[RunnerSample]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = list(RUNNER_LABELS)
        ready = GaugeMetricFamily("dptr_taskrunner_ready", "1 while the TaskRunner is Ready.", labels=labels)
        paused = GaugeMetricFamily(
            "dptr_taskrunner_paused", "1 while the TaskRunner has spec.paused.", labels=labels
        )
        capacity = GaugeMetricFamily(
            "dptr_taskrunner_capacity", "The TaskRunner's maxConcurrentTasks.", labels=labels
        )
        active = GaugeMetricFamily("dptr_tasks_active", "PipelineTasks not yet finished.", labels=labels)
        interval = GaugeMetricFamily(
            "dptr_heartbeat_interval_seconds",
            "The paced heartbeat interval published for each TaskRunner (protocol seconds).",
            labels=labels,
        )
        phases = GaugeMetricFamily(
            "dptr_tasks", "PipelineTasks this operator knows, by phase.", labels=[*labels, "phase"]
        )
        age = GaugeMetricFamily(
            "dptr_oldest_heartbeat_age_seconds",
            "Seconds since the oldest last heartbeat among the TaskRunner's open tasks.",
            labels=labels,
        )
        ratio = GaugeMetricFamily(
            "dptr_heartbeat_age_ratio",
            "The largest heartbeat age among open tasks as a fraction of that task's"
            " reportProgressTimeout (1 is when Data Pipeline gives the task up).",
            labels=labels,
        )
        last_poll = GaugeMetricFamily(
            "dptr_last_successful_poll_timestamp_seconds",
            "Unix time of the TaskRunner's last PollForTask that Data Pipeline answered"
            " (absent before the first).",
            labels=labels,
        )
        try:
            samples = list(self._source())
        except Exception:  # a scrape must answer; the next one tries again
            log.exception("reading the TaskRunners' state for /metrics failed")
            samples = []
        for s in samples:
            values = [s.namespace, s.name]
            ready.add_metric(values, 1.0 if s.ready else 0.0)
            paused.add_metric(values, 1.0 if s.paused else 0.0)
            capacity.add_metric(values, float(s.capacity))
            active.add_metric(values, float(s.active))
            interval.add_metric(values, s.heartbeat_interval)
            age.add_metric(values, s.oldest_heartbeat_age)
            ratio.add_metric(values, s.heartbeat_age_ratio)
            if s.last_successful_poll is not None:
                last_poll.add_metric(values, s.last_successful_poll)
            for phase in PHASES:
                phases.add_metric([*values, phase], float(s.phases.get(phase, 0)))
        yield from (ready, paused, capacity, active, interval, phases, age, ratio, last_poll)


class Metrics:
    """All metrics, on their own registry (so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = list(RUNNER_LABELS)
        self.build_info = Gauge(
            "dptr_build_info",
            "Always 1; the labels say which dptr is running.",
            ["version", "python_version"],
            registry=r,
        )
        self.build_info.labels(VERSION, platform.python_version()).set(1)
        self.tasks_polled = Counter(
            "dptr_tasks_polled_total", "Tasks received from PollForTask.", labels, registry=r
        )
        self.task_outcomes = Counter(
            "dptr_task_outcomes_total",
            "Attempts that ended, by what Data Pipeline was told: FINISHED, FAILED, FALSE (a"
            " precondition that did not hold), or canceled (Data Pipeline canceled it).",
            [*labels, "status"],
            registry=r,
        )
        self.pipeline_log_uri_lookups = Counter(
            "dptr_pipeline_log_uri_lookups_total",
            "DescribeObjects calls for a pipeline's Default.pipelineLogUri (attempts without one),"
            " by result (found, none, error); error means that attempt's logs are not uploaded.",
            [*labels, "result"],
            registry=r,
        )
        self.fallback_reports = Counter(
            "dptr_operator_reports_total",
            "SetTaskStatus calls made by the operator (fallback outcomes: a pod that ended"
            " without a report, evictions, OOM kills, image pulls), by errorId.",
            [*labels, "error_id"],
            registry=r,
        )
        self.fallback_outcomes = Counter(
            "dptr_operator_outcomes_total",
            "Outcomes the operator reported itself, per TaskRunner (from 0: what alerts"
            " count; dptr_operator_reports_total has them by errorId).",
            labels,
            registry=r,
        )
        self.poll_duration = Histogram(
            "dptr_poll_duration_seconds",
            "PollForTask call duration (long polls included), by result (task, empty, error).",
            [*labels, "result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.api_duration = Histogram(
            "dptr_api_call_duration_seconds",
            "Data Pipeline and Kubernetes call duration by operation (retries included).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.api_errors = Counter(
            "dptr_api_call_errors_total",
            "Data Pipeline and Kubernetes calls that failed after their retries, by operation and reason.",
            ["operation", "reason"],
            registry=r,
        )
        # From 0, so an alert sees the first failure as an increase.
        for reason in SET_TASK_STATUS_REASONS:
            self.api_errors.labels("SetTaskStatus", reason)
        self.api_throttled = Counter(
            "dptr_api_throttled_total",
            "Data Pipeline answers that were throttling errors, by operation; each try counts,"
            " also when a retry then succeeds.",
            ["operation"],
            registry=r,
        )
        self.heartbeat_lag = Histogram(
            "dptr_heartbeat_lag_seconds",
            "How late the operator's heartbeats are against their schedule.",
            buckets=(0, 0.1, 0.5, 1, 5, 15, 60, 300),
            registry=r,
        )
        self.heartbeats = Counter(
            "dptr_operator_heartbeats_total",
            "ReportTaskProgress calls made by the operator, by result.",
            ["result"],
            registry=r,
        )
        self.dispatch_duration = Histogram(
            "dptr_dispatch_duration_seconds",
            "From PollForTask returning a task to its Job being created.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.leader = Gauge("dptr_leader", "1 while this replica holds the leader Lease.", registry=r)
        self.lease_transitions = Gauge(
            "dptr_lease_transitions",
            "The leader Lease's leaseTransitions as this replica last read it: how often the"
            " leader changed, cluster wide (a restarted leader that takes its own Lease back"
            " is not a change).",
            registry=r,
        )
        self.status_writes_pending = Gauge(
            "dptr_status_writes_pending",
            "PipelineTasks with a heartbeat record queued for the API server (grows when it lags).",
            registry=r,
        )
        self._runner_lock = threading.Lock()
        self._runner_collector: _RunnerCollector | None = None

    def runner_added(self, namespace: str, name: str) -> None:
        """Start a TaskRunner's counters at 0, so the first poll and outcome show as an
        increase (a labelled counter otherwise appears on its first inc, at 1)."""
        self.tasks_polled.labels(namespace, name)
        self.fallback_outcomes.labels(namespace, name)
        for status in OUTCOME_STATUSES:
            self.task_outcomes.labels(namespace, name, status)

    def runner_state(self, source: Callable[[], Iterable[RunnerSample]]) -> None:
        """Export each TaskRunner's state from ``source`` at every scrape (one source)."""
        with self._runner_lock:
            if self._runner_collector is not None:
                self.registry.unregister(self._runner_collector)
            self._runner_collector = _RunnerCollector(source)
            self.registry.register(self._runner_collector)

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        """Time a call; count it as an error (with the exception's reason) if it raises."""
        start = time.monotonic()
        try:
            yield
        except Exception as exc:
            reason = str(getattr(exc, "reason", "") or type(exc).__name__)
            self.api_errors.labels(operation, reason).inc()
            raise
        finally:
            self.api_duration.labels(operation).observe(time.monotonic() - start)

    def call(self, operation: str, fn: Callable[[], T]) -> T:
        with self.timed(operation):
            return fn()

    def attempt_failed(self, operation: str, reason: str) -> None:
        """One Data Pipeline try failed (the client's hook): count throttling at once."""
        if reason == "Throttled":
            self.api_throttled.labels(operation).inc()
