"""Streaming reads from the API server: a pod watch and a bounded log tail.

:meth:`dptr_common.kube.KubeClient.request` reads whole responses, which suits objects
but not a watch (an open-ended stream) or a task's log (which may be gigabytes).  These
helpers read a :meth:`~dptr_common.kube.KubeClient.stream` (a connection of its own, with
the client's server, TLS and rotating token) incrementally, so memory stays bounded
whatever the task printed.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from dptr_common.kube import ApiError, KubeClient, NotFound, close_stream, pod_path

__all__ = ["PodWatcher", "read_log_tail", "stream_log"]

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024


def read_log_tail(
    kube: KubeClient,
    namespace: str,
    pod: str,
    container: str,
    *,
    max_bytes: int = 16 * 1024,
    tail_lines: int = 200,
    timeout: float = 20.0,
) -> bytes:
    """The last ``max_bytes`` of the container's log (at most its last ``tail_lines``
    lines), streamed so that a huge log never sits in memory; raw bytes (any encoding)."""
    query = {"container": container, "tailLines": tail_lines}
    conn, response = kube.stream(pod_path(namespace, pod, "log"), query, timeout=timeout)
    tail = bytearray()
    try:
        while True:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                break
            tail += chunk
            if len(tail) > 2 * max_bytes:
                del tail[:-max_bytes]
    finally:
        conn.close()
    return bytes(tail[-max_bytes:])


def stream_log(
    kube: KubeClient, namespace: str, pod: str, container: str, *, timeout: float = 60.0
) -> Iterator[bytes]:
    """The container's whole log, chunk by chunk (never all of it in memory)."""
    conn, response = kube.stream(pod_path(namespace, pod, "log"), {"container": container}, timeout=timeout)
    try:
        while True:
            chunk = response.read(_READ_CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        conn.close()


class PodWatcher:
    """Follows one pod and hands every version of it to ``on_pod`` (None: the pod is gone).

    GET first (the state now; or ``initial``, a version the caller has just read, which
    saves that request), then a watch from that resourceVersion; a watch that ends or
    fails starts over with a GET, with back-off after errors.  When watching is forbidden
    (an RBAC rule without ``watch``) it falls back to polling with GET.
    """

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        name: str,
        on_pod: Callable[[dict[str, Any] | None], None],
        *,
        watch_timeout: float = 240.0,
        poll_interval: float = 5.0,
        error_backoff: Callable[[int], float] = lambda attempt: min(0.5 * 2**attempt, 10.0),
        initial: dict[str, Any] | None = None,
    ) -> None:
        self._initial = initial
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.on_pod = on_pod
        self.watch_timeout = watch_timeout
        self.poll_interval = poll_interval
        self.error_backoff = error_backoff
        self.stop = threading.Event()
        self._can_watch = True
        self._stream: tuple[http.client.HTTPConnection, http.client.HTTPResponse] | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="dptr-pod-watch", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop, and end a watch blocked in the watcher's thread (returns at once)."""
        self.stop.set()
        stream = self._stream
        if stream is not None:
            close_stream(*stream)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._run()  # returns when the pod is gone, or when stopped
                return
            except Exception:  # a bug or a surprise must not leave the sidecar blind
                if self.stop.is_set():
                    return
                log.exception("the pod watcher failed; starting over")
                self.stop.wait(1.0)

    def _run(self) -> None:
        errors = 0
        while not self.stop.is_set():
            try:
                pod, self._initial = self._initial or self.kube.get(pod_path(self.namespace, self.name)), None
            except NotFound:
                self.on_pod(None)
                return
            except ApiError as exc:
                errors += 1
                log.warning("reading pod %s failed: %s", self.name, exc)
                self.stop.wait(self.error_backoff(errors))
                continue
            self.on_pod(pod)
            if not self._can_watch:
                self.stop.wait(self.poll_interval)
                continue
            rv = str((pod.get("metadata") or {}).get("resourceVersion") or "")
            try:
                for event_type, obj in self._watch(rv):
                    errors = 0
                    if event_type == "DELETED":
                        self.on_pod(obj)  # its last status may be the one we wait for
                        self.on_pod(None)
                        return
                    if event_type in ("ADDED", "MODIFIED"):
                        self.on_pod(obj)
            except ApiError as exc:
                if exc.status == 403:
                    log.warning("watching pods is forbidden; polling pod %s instead", self.name)
                    self._can_watch = False
                    continue
                if self.stop.is_set():
                    return
                errors += 1
                log.info("the watch on pod %s ended: %s", self.name, exc)
                self.stop.wait(self.error_backoff(errors))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.stop.is_set():
                    return
                errors += 1
                log.info("the watch on pod %s broke: %r", self.name, exc)
                self.stop.wait(self.error_backoff(errors))

    def _watch(self, resource_version: str) -> Iterator[tuple[str, dict[str, Any]]]:
        query = {
            "watch": True,
            "fieldSelector": f"metadata.name={self.name}",
            "resourceVersion": resource_version or None,
            "timeoutSeconds": int(self.watch_timeout),
            "allowWatchBookmarks": True,
        }
        path = pod_path(self.namespace)
        conn, response = self.kube.stream(path, query, timeout=self.watch_timeout + 30)
        self._stream = conn, response
        if self.stop.is_set():  # closed meanwhile: close() found no stream to end
            close_stream(conn, response)
            return
        try:
            while not self.stop.is_set():
                line = response.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                event_type = str(event.get("type") or "")
                obj = event.get("object") or {}
                if event_type == "ERROR":
                    # 410 Gone (resourceVersion too old) and the like: start over with a GET.
                    raise ApiError(
                        int(obj.get("code") or 500), str(obj.get("reason")), str(obj.get("message"))
                    )
                if event_type == "BOOKMARK":
                    continue
                yield event_type, obj
        finally:
            self._stream = None
            close_stream(conn, response)
