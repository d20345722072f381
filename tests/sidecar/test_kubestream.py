"""The sidecar's pod watch against the real API server: closing it ends it at once.

The watcher's thread spends its life blocked reading the watch; ``close()`` comes from
the main thread once the task is reported.  ``HTTPConnection.close()`` alone waited for
that read (up to the watch's ``timeoutSeconds``), so every sidecar hung after reporting
until kubelet killed it at the end of the pod's grace period.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dptr_common.kube import KubeClient, pod_path
from dptr_sidecar.kubestream import PodWatcher
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "watched"},
    # Never scheduled (no node has this name): the pod just sits there, watched.
    "spec": {"nodeName": "no-such-node", "containers": [{"name": "c", "image": "none"}]},
}


def test_closing_a_pod_watch_ends_it_at_once(testbed: RunningTestbed, namespace: str) -> None:
    kube = KubeClient.from_kubeconfig(testbed.kubeconfig)
    pod = kube.create(pod_path(namespace), POD)
    seen: list[dict[str, Any] | None] = []
    watcher = PodWatcher(kube, namespace, "watched", seen.append, watch_timeout=60.0, initial=pod)
    thread = watcher.start()
    # The initial version was handed over without a GET, and the watch is open.
    wait_for(lambda: seen and watcher._stream is not None, timeout=10, what="the watch open")
    assert seen[0] is pod
    time.sleep(0.5)  # blocked in its read by now

    started = time.monotonic()
    watcher.close()
    thread.join(10)
    took = time.monotonic() - started
    assert not thread.is_alive(), "the watcher's thread still runs 10 s after close()"
    assert took < 2.0, f"close() took {took:.1f}s"


def test_the_watch_still_follows_the_pod(testbed: RunningTestbed, namespace: str) -> None:
    kube = KubeClient.from_kubeconfig(testbed.kubeconfig)
    pod = kube.create(pod_path(namespace), POD)
    seen: list[dict[str, Any] | None] = []
    lock = threading.Lock()

    def on_pod(obj: dict[str, Any] | None) -> None:
        with lock:
            seen.append(obj)

    watcher = PodWatcher(kube, namespace, "watched", on_pod, watch_timeout=60.0, initial=pod)
    watcher.start()
    try:
        wait_for(lambda: watcher._stream is not None, timeout=10, what="the watch open")
        kube.patch(pod_path(namespace, "watched"), {"metadata": {"labels": {"step": "two"}}})
        wait_for(
            lambda: any(o and (o["metadata"].get("labels") or {}).get("step") == "two" for o in seen),
            timeout=10,
            what="the labelled version delivered",
        )
        kube.delete(pod_path(namespace, "watched"), grace_period_seconds=0)
        wait_for(lambda: seen[-1] is None, timeout=20, what="the deletion delivered as None")
    finally:
        watcher.close()
