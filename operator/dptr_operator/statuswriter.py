"""Background PipelineTask status writes for the operator's own heartbeats, coalesced per task.

Why: a heartbeat is a ReportTaskProgress (a few ms) and a status write recording it.  When
the heartbeat worker waited for the write, the API server's latency set the heartbeat
rate: thousands of tasks on a busy control plane could not be heartbeated at the budget
rate, and tasks went past their reportProgressTimeout.  The write only serves two
purposes: ``kubectl get`` shows the last heartbeat, and a restarted operator re-schedules
each task from it.  Neither needs it synchronously, and a ``lastAt`` that lags behind the
truth only makes a restarted operator heartbeat a task sooner than necessary (the safe
direction).  So heartbeats queue their patch here and go on; while a task's patch waits,
a newer one is merged into it (RFC 7386 patches compose), so the backlog is at most one
write per task however far the API server falls behind.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from dptr_common.kube import ApiError, KubeClient, NotFound, pipelinetask_path
from dptr_operator.index import TaskIndex, TaskKey

__all__ = ["StatusWriter", "merge_patches"]

log = logging.getLogger(__name__)


def merge_patches(older: Mapping[str, Any], newer: Mapping[str, Any]) -> dict[str, Any]:
    """One merge patch with the effect of applying ``older`` then ``newer``.

    Objects merge key by key and ``newer`` wins; a ``None`` stays ``None`` (it deletes the
    key in both orders).  Raises ValueError for the one sequence a single merge patch
    cannot express: an object deleted (or replaced by a scalar) and then patched, which
    ends with only the new members, where the patch alone would keep the old ones."""
    merged = dict(older)
    for key, value in newer.items():
        if key not in merged:
            merged[key] = value
            continue
        previous = merged[key]
        if isinstance(value, Mapping):
            if not isinstance(previous, Mapping):
                raise ValueError(f"{key}: a patch of a member the earlier patch replaced")
            merged[key] = merge_patches(previous, value)
        else:
            merged[key] = value
    return merged


class StatusWriter:
    """A FIFO of tasks with a pending ``status`` merge patch, drained by a few threads."""

    def __init__(self, kube: KubeClient, index: TaskIndex, *, threads: int = 2) -> None:
        self._kube = kube
        self._index = index
        self._pending: dict[TaskKey, dict[str, Any]] = {}
        self._order: collections.deque[TaskKey] = collections.deque()
        self._busy = 0
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"status-writer-{i}", daemon=True) for i in range(threads)
        ]
        self.on_gone: Callable[[TaskKey], object] = lambda key: None
        self.written = 0
        self.coalesced = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        with self._cv:
            return len(self._pending)

    def put(self, key: TaskKey, status: Mapping[str, Any]) -> None:
        """Queue ``{"status": status}`` for the PipelineTask ``key``."""
        with self._cv:
            if self._closed:
                return
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = dict(status)
                self._order.append(key)
                self._cv.notify()
                return
            try:
                self._pending[key] = merge_patches(pending, status)
                self.coalesced += 1
                return
            except ValueError:
                pass  # not expressible as one patch: write both, in order, here
            del self._pending[key]
            self._order.remove(key)
        self._write(key, pending)
        self._write(key, dict(status))

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then stop."""
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._order.clear()
            self._cv.notify_all()

    def _take(self) -> tuple[TaskKey, dict[str, Any]] | None:
        with self._cv:
            while not self._order and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            key = self._order.popleft()
            self._busy += 1
            return key, self._pending.pop(key)

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            key, status = item
            try:
                self._write(key, status)
            except Exception:
                log.exception("status write for %s/%s failed", *key)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def _write(self, key: TaskKey, status: dict[str, Any]) -> None:
        entry = self._index.get(key)
        if entry is None or entry.terminal:
            return  # gone or ended: its last heartbeat no longer matters
        if entry.heartbeat_owner == "sidecar" and "heartbeat" in status:
            # The sidecar took over since: its own heartbeat record is the newer truth.
            status = {k: v for k, v in status.items() if k != "heartbeat"}
            if not status:
                return
        try:
            self._kube.patch(pipelinetask_path(key[0], key[1], "status"), {"status": status})
            self.written += 1
        except NotFound:
            self.on_gone(key)
        except ApiError as exc:
            log.warning("%s/%s: recording the heartbeat failed: %s", key[0], key[1], exc)
