"""The stand-in's Node: registration, status heartbeats and the node Lease.

While the stand-in runs, the node controller sees a healthy node (a Ready
condition and a Lease renewed every few seconds); when it dies, both go
stale and the node lifecycle controller marks the node NotReady (and, after
the toleration time, evicts its pods), as it does for a lost node.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
import uuid
from typing import Any

from . import spec
from .api import STRATEGIC_MERGE_PATCH, Api, ApiError

JSON = dict[str, Any]
log = logging.getLogger("dptr_testbed.kubelet")

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40
LEASE_EVERY = 5.0
STATUS_EVERY = 10.0
RUNTIME_VERSION = "dptr-testbed://0.1.0"


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


class NodeAgent:
    def __init__(self, api: Api, name: str, kubelet_port: int) -> None:
        self.api = api
        self.name = name
        self.kubelet_port = kubelet_port
        self.boot_id = str(uuid.uuid4())
        self.ready_since = spec.now()
        self.node_uid: str | None = None
        self.kubelet_version = "v0.0.0"

    # ---- objects -------------------------------------------------------------
    def node_object(self) -> JSON:
        arch = _arch()
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch,
                    "beta.kubernetes.io/os": "linux",
                    "beta.kubernetes.io/arch": arch,
                    "node.kubernetes.io/instance-type": "dptr-testbed",
                },
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {},
        }

    def node_status(self) -> JSON:
        now = spec.now()
        resources = {
            "cpu": spec.NODE_CPU,
            "memory": spec.NODE_MEMORY,
            "pods": spec.NODE_PODS,
            "ephemeral-storage": spec.NODE_EPHEMERAL_STORAGE,
        }

        def cond(ctype: str, status: str, reason: str, message: str) -> JSON:
            return {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self.ready_since,
            }

        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond(
                    "PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"
                ),
                cond(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "kubelet is posting ready status (dptr test bed stand-in)",
                ),
            ],
            "addresses": [{"type": "InternalIP", "address": spec.HOST_IP}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": self.boot_id.replace("-", ""),
                "systemUUID": self.boot_id,
                "bootID": self.boot_id,
                "kernelVersion": platform.release(),
                "osImage": "dptr test bed (commands run on the host)",
                "containerRuntimeVersion": RUNTIME_VERSION,
                "kubeletVersion": self.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _arch(),
            },
        }

    # ---- API calls -------------------------------------------------------------
    def register(self) -> None:
        with contextlib.suppress(ApiError):
            self.kubelet_version = str(self.api.get("/version").get("gitVersion", "v0.0.0"))
        try:
            node = self.api.request("POST", "/api/v1/nodes", body=self.node_object())
            log.info("registered node %s", self.name)
        except ApiError as err:
            if err.status != 409:
                raise
            node = self.api.request(
                "PATCH",
                f"/api/v1/nodes/{self.name}",
                body={"metadata": {"labels": self.node_object()["metadata"]["labels"]}},
                content_type=STRATEGIC_MERGE_PATCH,
            )
        self.node_uid = node["metadata"]["uid"]
        self.post_status()
        self.renew_lease()

    def post_status(self) -> None:
        try:
            self.api.request(
                "PATCH",
                f"/api/v1/nodes/{self.name}/status",
                body={"status": self.node_status()},
                content_type=STRATEGIC_MERGE_PATCH,
            )
        except ApiError as err:
            if err.status == 404:
                # Someone deleted the Node: register again, as kubelet does on restart.
                self.register()
                return
            raise

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.name}"
        spec_ = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": LEASE_DURATION,
            "renewTime": spec.now_micro(),
        }
        try:
            self.api.request("PATCH", path, body={"spec": spec_}, content_type="application/merge-patch+json")
        except ApiError as err:
            if err.status != 404:
                raise
            lease: JSON = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE},
                "spec": spec_,
            }
            if self.node_uid:
                lease["metadata"]["ownerReferences"] = [
                    {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}
                ]
            self.api.request(
                "POST", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", body=lease
            )

    def heartbeat(self, stopping: threading.Event) -> None:
        """Renew the Lease and post the status until ``stopping`` is set."""
        next_status = time.monotonic() + STATUS_EVERY
        while not stopping.wait(LEASE_EVERY):
            try:
                self.renew_lease()
                if time.monotonic() >= next_status:
                    self.post_status()
                    next_status = time.monotonic() + STATUS_EVERY
            except (ApiError, OSError, KeyError) as err:
                log.warning("node heartbeat failed (will retry): %s", err)


def register_until_done(agent: NodeAgent, stopping: threading.Event) -> None:
    """Register, retrying while the API server is not reachable."""
    delay = 0.5
    while not stopping.is_set():
        try:
            agent.register()
            return
        except (ApiError, OSError, KeyError) as err:
            log.warning("node registration failed (will retry): %s", err)
            stopping.wait(delay)
            delay = min(5.0, delay * 2)
