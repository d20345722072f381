"""Helpers for the test-bed tests: wait loops and a dict-speaking kube client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch

from dptr_testbed.controlplane import Testbed
from dptr_testbed.waiting import wait_for

JSON = dict[str, Any]


class Kube:
    """Thin helpers over the kubernetes client, speaking plain dicts."""

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.client = config.new_client_from_config(str(bed.kubeconfig))
        self.core = client.CoreV1Api(self.client)
        self.batch = client.BatchV1Api(self.client)
        self.rbac = client.RbacAuthorizationV1Api(self.client)

    def plain(self, obj: Any) -> JSON:
        data: JSON = self.client.sanitize_for_serialization(obj)
        return data

    def pod(self, ns: str, name: str) -> JSON | None:
        try:
            return self.plain(self.core.read_namespaced_pod(name, ns))
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def pods(self, ns: str, selector: str = "") -> list[JSON]:
        items = self.core.list_namespaced_pod(ns, label_selector=selector).items
        return [self.plain(p) for p in items]

    def job(self, ns: str, name: str) -> JSON:
        return self.plain(self.batch.read_namespaced_job(name, ns))

    def create_pod(self, ns: str, pod: JSON) -> JSON:
        return self.plain(self.core.create_namespaced_pod(ns, pod))

    def create_job(self, ns: str, job: JSON) -> JSON:
        return self.plain(self.batch.create_namespaced_job(ns, job))

    def wait_pod(
        self, ns: str, name: str, pred: Callable[[JSON], bool], timeout: float = 60, what: str = ""
    ) -> JSON:
        def check() -> JSON | None:
            pod = self.pod(ns, name)
            return pod if pod is not None and pred(pod) else None

        return wait_for(check, timeout=timeout, what=what or f"pod {ns}/{name}", interval=0.3)

    def wait_phase(self, ns: str, name: str, *phases: str, timeout: float = 60) -> JSON:
        return self.wait_pod(
            ns, name, lambda p: p["status"].get("phase") in phases, timeout, f"pod {name} in phase {phases}"
        )

    def job_condition(self, ns: str, name: str, timeout: float = 90) -> str:
        """Wait until the Job is Complete or Failed; return which."""

        def check() -> str | None:
            for cond in self.job(ns, name).get("status", {}).get("conditions") or []:
                if cond["type"] in ("Complete", "Failed") and cond["status"] == "True":
                    return str(cond["type"])
            return None

        return wait_for(check, timeout=timeout, what=f"job {name} to finish", interval=0.3)

    def logs(self, ns: str, pod: str, container: str, **kw: Any) -> str:
        text: str = self.core.read_namespaced_pod_log(pod, ns, container=container, **kw)
        return text


class PodEvents:
    """Records every watch event of a namespace's pods from before a test creates them."""

    def __init__(self, kube: Kube, ns: str) -> None:
        self.kube = kube
        self.ns = ns
        self.events: list[tuple[str, JSON]] = []
        self._watch = watch.Watch()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        version = self.kube.core.list_namespaced_pod(self.ns).metadata.resource_version
        self._ready.set()
        try:
            for event in self._watch.stream(
                self.kube.core.list_namespaced_pod, self.ns, resource_version=version, timeout_seconds=300
            ):
                self.events.append((event["type"], self.kube.plain(event["object"])))
        except Exception:  # the stream ends when the test stops it
            pass

    def of(self, name_prefix: str) -> list[tuple[str, JSON]]:
        return [(t, p) for t, p in self.events if p["metadata"]["name"].startswith(name_prefix)]

    def phases(self, name_prefix: str) -> list[str]:
        out: list[str] = []
        for _, pod in self.of(name_prefix):
            phase = (pod.get("status") or {}).get("phase")
            if phase and (not out or out[-1] != phase):
                out.append(phase)
        return out

    def stop(self) -> None:
        self._watch.stop()
