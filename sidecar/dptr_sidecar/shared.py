"""What the sidecar's roles share: the task they work for, and retried calls.

* :class:`TaskInfo`, the PipelineTask's identity, read once at start-up and never changed;
* :class:`DataPipeline`, the one Data Pipeline client (made on first use, thread-safe),
  with :meth:`DataPipeline.call` retrying throttling and 5xx with back-off;
* :func:`retry_kube`, for API server writes that must not be lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dptr_common.datapipeline import DataPipelineClient, call_with_retry
from dptr_common.kube import ApiError

from .config import SidecarConfig

__all__ = ["CANCELED", "RETRY_BASE", "RETRY_CAP", "DataPipeline", "TaskInfo", "retry_kube"]

log = logging.getLogger("dptr.sidecar")

#: Back-off for retried Data Pipeline calls, in protocol seconds.
RETRY_BASE, RETRY_CAP = 1.0, 30.0

#: The cancel reason and detail for ``canceled: true``.
CANCELED = ("Canceled", "ReportTaskProgress answered canceled: true")


@dataclass(frozen=True)
class TaskInfo:
    """The task, from its PipelineTask's spec."""

    task_id: str
    pipeline_id: str
    attempt_id: str
    #: reportProgressTimeout, protocol seconds.
    timeout: float
    #: The PipelineTask's ObjectReference (Events are about it).
    ref: dict[str, Any] = field(default_factory=dict)


class DataPipeline:
    """The Data Pipeline client, made on first use, and calls retried within a deadline."""

    def __init__(self, factory: Callable[[], DataPipelineClient], config: SidecarConfig) -> None:
        self._factory = factory
        self._config = config
        self._client: DataPipelineClient | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> DataPipelineClient:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def call(self, fn: Callable[[DataPipelineClient], Any], deadline: float) -> Any:
        """``fn(client)``, retried (full-jitter back-off) on throttling, 5xx and connection
        errors until ``deadline`` (monotonic)."""

        def on_retry(error: BaseException, wait: float) -> None:
            log.info("%s; retrying in %.2fs", error, wait)

        return call_with_retry(
            lambda: fn(self.client),
            deadline=deadline,
            base=self._config.scaled(RETRY_BASE),
            cap=self._config.scaled(RETRY_CAP),
            on_retry=on_retry,
        )


def retry_kube(fn: Callable[[], Any], what: str, budget: float = 60.0) -> Any:
    """API server calls that must not be lost (start-up, the ledger after the task ended):
    retried while the API server is unreachable or overloaded, never after a 4xx answer."""
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return fn()
        except ApiError as exc:
            if exc.status not in (0, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                raise
            attempt += 1
            log.info("%s failed (%s); retrying", what, exc)
            time.sleep(min(0.2 * 2**attempt, 5.0))
