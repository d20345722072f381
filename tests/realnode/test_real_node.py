"""End to end on a real node: locally built images run as real containers.

The node registers and is Ready on containerd; a pod from a locally built
image runs to completion under the restricted Pod Security Standard, reaches
the API server through the ``kubernetes`` Service with its own token, and its
exit code is the pod's; the sidecar image has no kopf.

test_e2e.py: the chart, the operator pod and a pipeline's outcomes through the
sidecar in real task pods.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dptr_testbed import images

from .conftest import PROBE_IMAGE, RealBed, restricted_security_context

# A cold machine first builds kubelet, kube-proxy and every image (fixture setup
# counts against pytest-timeout's limit).
pytestmark = [pytest.mark.realnode, pytest.mark.timeout(2400)]


def probe_pod(namespace: str, name: str, exit_code: int, service_account: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "probe",
                    "image": PROBE_IMAGE,
                    "imagePullPolicy": "Never",
                    "env": [
                        {"name": "EXIT_CODE", "value": str(exit_code)},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                    ],
                    "securityContext": restricted_security_context(),
                }
            ],
        },
    }


def test_node_is_ready_on_containerd(real_bed: RealBed) -> None:
    node = json.loads(real_bed.kubectl("get", "node", real_bed.node_name, "-o", "json"))
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready.get("Ready") == "True", node["status"]["conditions"]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses.get("InternalIP") == real_bed.node_address
    # The kubernetes Service has a real endpoint: the API server on the node's address.
    slice_ = json.loads(real_bed.kubectl("get", "endpointslice", "-n", "default", "kubernetes", "-o", "json"))
    assert [ep["addresses"] for ep in slice_["endpoints"]] == [[real_bed.node_address]]


@pytest.mark.parametrize("exit_code", [0, 3])
def test_pod_reaches_api_server_through_service_and_exits(real_bed: RealBed, exit_code: int) -> None:
    namespace = real_bed.namespace("rn-probe")
    try:
        # Just enough RBAC for the probe to read its own pod.
        real_bed.kubectl("create", "serviceaccount", "-n", namespace, "probe")
        real_bed.kubectl("create", "role", "-n", namespace, "read-pods", "--verb=get", "--resource=pods")
        real_bed.kubectl(
            "create",
            "rolebinding",
            "-n",
            namespace,
            "probe",
            "--role=read-pods",
            f"--serviceaccount={namespace}:probe",
        )
        result = real_bed.run_pod(probe_pod(namespace, "probe", exit_code, "probe"))

        assert result.exit_code == exit_code, result.logs
        assert result.phase == ("Succeeded" if exit_code == 0 else "Failed")
        seen = result.json_line()
        # In-cluster config: the Service's address, TLS checked against the
        # cluster CA, the pod's own token; the API server answered about this pod.
        assert seen["url"].startswith("https://10.96.0.1:443/"), seen
        assert seen["status"] == 200, seen
        assert seen["pod"] == "probe"
        assert seen["node"] == real_bed.node_name
        # Non-root, read-only root filesystem, as the restricted namespace demands.
        assert seen["uid"] == 65532
        assert seen["rootfs_writable"] is False
        pod_ip = result.pod["status"].get("podIP", "")
        assert pod_ip.startswith("10.244."), result.pod["status"]
    finally:
        real_bed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_sidecar_image_runs_without_kopf(real_bed: RealBed) -> None:
    namespace = real_bed.namespace("rn-sidecar")
    try:
        check = (
            "import importlib.util as u, dptr_sidecar, dptr_common, boto3, pydantic; "
            "print('kopf' if u.find_spec('kopf') else 'no-kopf', "
            "'kubernetes' if u.find_spec('kubernetes') else 'no-kubernetes')"
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sidecar", "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "sidecar",
                        "image": images.SIDECAR_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["python", "-c", check],
                        "securityContext": restricted_security_context(),
                    }
                ],
            },
        }
        result = real_bed.run_pod(pod)
        assert result.exit_code == 0, result.logs
        assert result.logs.split() == ["no-kopf", "no-kubernetes"]
    finally:
        real_bed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
