"""Prometheus metrics of the operator (served on ``/metrics`` by :mod:`dptr_operator.health`).

Labels are bounded: the TaskRunner (``namespace/name``), the API operation, an outcome
or an error reason; never a task id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

T = TypeVar("T")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100)


class Metrics:
    """All metrics, on their own registry (so tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_polled = Counter(
            "dptr_tasks_polled_total", "Tasks received from PollForTask.", ["runner"], registry=r
        )
        self.tasks_active = Gauge(
            "dptr_tasks_active", "PipelineTasks not yet finished.", ["runner"], registry=r
        )
        self.tasks_finished = Counter(
            "dptr_tasks_finished_total",
            "Tasks that reached a final phase, by outcome (Succeeded, Failed, Canceled).",
            ["runner", "outcome"],
            registry=r,
        )
        self.pipeline_log_uri_lookups = Counter(
            "dptr_pipeline_log_uri_lookups_total",
            "DescribeObjects calls for a pipeline's Default.pipelineLogUri (attempts without one),"
            " by result (found, none, error); error means that attempt's logs are not uploaded.",
            ["runner", "result"],
            registry=r,
        )
        self.fallback_reports = Counter(
            "dptr_operator_reports_total",
            "SetTaskStatus calls made by the operator (fallback outcomes), by errorId.",
            ["runner", "error_id"],
            registry=r,
        )
        self.poll_duration = Histogram(
            "dptr_poll_duration_seconds",
            "PollForTask call duration (long polls included).",
            ["runner", "result"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.api_duration = Histogram(
            "dptr_api_call_duration_seconds",
            "Data Pipeline and Kubernetes call duration by operation.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.api_errors = Counter(
            "dptr_api_call_errors_total",
            "Failed Data Pipeline and Kubernetes calls by operation and reason.",
            ["operation", "reason"],
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
        self.heartbeat_interval = Gauge(
            "dptr_heartbeat_interval_seconds",
            "The paced heartbeat interval published for each TaskRunner (protocol seconds).",
            ["runner"],
            registry=r,
        )
        self.dispatch_duration = Histogram(
            "dptr_dispatch_duration_seconds",
            "From PollForTask returning a task to its Job being created.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.leader = Gauge("dptr_leader", "1 while this replica holds the leader Lease.", registry=r)
        self.status_writes_pending = Gauge(
            "dptr_status_writes_pending",
            "PipelineTasks with a heartbeat record queued for the API server (grows when it lags).",
            registry=r,
        )

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
