"""Kubernetes Events on TaskRunners and PipelineTasks, written off the hot path.

Events are best-effort: they are queued to one background thread and dropped (with a
log line) when the queue is full, so a slow API server never slows dispatch or
heartbeats.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any, Literal

from dptr_common.kube import KubeClient
from dptr_common.models import API_VERSION, PIPELINE_TASK_KIND, TASK_RUNNER_KIND

__all__ = ["COMPONENT", "EventRecorder", "pipeline_task_ref", "task_runner_ref"]

log = logging.getLogger(__name__)

COMPONENT = "dptr-operator"
_MAX_QUEUE = 2000


def task_runner_ref(namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    ref = {"apiVersion": API_VERSION, "kind": TASK_RUNNER_KIND, "namespace": namespace, "name": name}
    if uid:
        ref["uid"] = uid
    return ref


def pipeline_task_ref(namespace: str, name: str, uid: str | None = None) -> dict[str, Any]:
    ref = {"apiVersion": API_VERSION, "kind": PIPELINE_TASK_KIND, "namespace": namespace, "name": name}
    if uid:
        ref["uid"] = uid
    return ref


class EventRecorder:
    """``emit(ref, reason, message)`` queues a core v1 Event; a daemon thread writes it."""

    def __init__(self, kube: KubeClient, instance: str) -> None:
        self._kube = kube
        self._instance = instance
        self._queue: queue.Queue[tuple[dict[str, Any], str, str, str] | None] = queue.Queue(_MAX_QUEUE)
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def emit(
        self,
        involved: Mapping[str, Any],
        reason: str,
        message: str,
        type: Literal["Normal", "Warning"] = "Normal",
    ) -> None:
        log.info("event %s %s/%s: %s", reason, involved.get("namespace"), involved.get("name"), message)
        try:
            self._queue.put_nowait((dict(involved), reason, message, type))
        except queue.Full:
            log.warning("event queue full; dropped %s for %s", reason, involved.get("name"))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ref, reason, message, type_ = item
            try:
                self._kube.create_event(
                    str(ref.get("namespace")),
                    ref,
                    reason,
                    message,
                    type="Warning" if type_ == "Warning" else "Normal",
                    component=COMPONENT,
                    reporting_instance=self._instance,
                )
            except Exception as exc:
                log.debug("could not write event %s: %s", reason, exc)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
