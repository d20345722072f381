"""KubeClient against the test bed's real API server.  No mocks."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dptr_common.kube import (
    ApiUnavailable,
    Conflict,
    Forbidden,
    Invalid,
    KubeClient,
    KubeConfig,
    NotFound,
    Unauthorized,
    event_path,
    job_path,
    namespaced_path,
    pod_path,
)
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def cm_path(ns: str, name: str | None = None) -> str:
    return namespaced_path("api/v1", "configmaps", ns, name)


def configmap(
    name: str, data: dict[str, str] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels or {}},
        "data": data or {},
    }


@pytest.fixture
def kube(testbed: RunningTestbed) -> KubeClient:
    return KubeClient.from_kubeconfig(testbed.kubeconfig, timeout=15)


def test_version_and_from_env(testbed: RunningTestbed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(testbed.kubeconfig))
    client = KubeClient.from_env()
    version = client.get("/version")
    assert version["gitVersion"].startswith("v1.")


def test_crud_and_errors(kube: KubeClient, namespace: str) -> None:
    with pytest.raises(NotFound) as missing:
        kube.get(cm_path(namespace, "nope"))
    assert missing.value.status == 404 and missing.value.reason == "NotFound"

    created = kube.create(cm_path(namespace), configmap("a", {"k": "1"}, {"app": "x"}))
    assert created["metadata"]["resourceVersion"]
    with pytest.raises(Conflict) as exists:
        kube.create(cm_path(namespace), configmap("a"))
    assert exists.value.reason == "AlreadyExists"

    kube.create(cm_path(namespace), configmap("b", labels={"app": "y"}))
    items = kube.list(cm_path(namespace), label_selector="app=x")
    assert [i["metadata"]["name"] for i in items] == ["a"]
    assert items[0]["kind"] == "ConfigMap" and items[0]["apiVersion"] == "v1"
    assert {i["metadata"]["name"] for i in kube.list(cm_path(namespace), label_selector="app")} == {"a", "b"}

    merged = kube.patch(cm_path(namespace, "a"), {"data": {"m": "2"}})
    assert merged["data"] == {"k": "1", "m": "2"}
    jsoned = kube.patch(cm_path(namespace, "a"), [{"op": "remove", "path": "/data/k"}], patch_type="json")
    assert jsoned["data"] == {"m": "2"}
    strategic = kube.patch(
        cm_path(namespace, "a"), {"metadata": {"labels": {"s": "1"}}}, patch_type="strategic"
    )
    assert strategic["metadata"]["labels"] == {"app": "x", "s": "1"}

    # Optimistic concurrency: a PUT carrying a stale resourceVersion is refused.
    stale = created
    stale["data"] = {"stale": "yes"}
    with pytest.raises(Conflict) as conflict:
        kube.replace(cm_path(namespace, "a"), stale)
    assert conflict.value.reason == "Conflict"
    fresh = kube.get(cm_path(namespace, "a"))
    fresh["data"] = {"fresh": "yes"}
    assert kube.replace(cm_path(namespace, "a"), fresh)["data"] == {"fresh": "yes"}

    with pytest.raises(Invalid):
        kube.create(cm_path(namespace), configmap("Not_A_Valid_Name"))

    # A delete precondition on a stale uid is a Conflict; a plain delete works.
    with pytest.raises(Conflict):
        kube.delete(cm_path(namespace, "b"), preconditions={"uid": str(uuid.uuid4())})
    kube.delete(cm_path(namespace, "b"), grace_period_seconds=0)
    with pytest.raises(NotFound):
        kube.delete(cm_path(namespace, "b"))


def test_list_follows_continue(kube: KubeClient, namespace: str) -> None:
    for i in range(7):
        kube.create(cm_path(namespace), configmap(f"page-{i}", labels={"paged": "1"}))
    items = kube.list(cm_path(namespace), label_selector="paged=1", page_size=3)
    assert sorted(i["metadata"]["name"] for i in items) == [f"page-{i}" for i in range(7)]


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"dptr.dev/test": "1"}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"dptr.dev/test": "1"}},
                "spec": {
                    "restartPolicy": "Never",
                    # sleep as PID 1 ignores SIGTERM, as in a real container: keep the kill quick.
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}],
                },
            },
        },
    }


def test_job_delete_background_removes_pods(kube: KubeClient, namespace: str) -> None:
    kube.create(job_path(namespace), job("j1"))
    pods = wait_for(
        lambda: kube.list(pod_path(namespace), label_selector="job-name=j1"),
        timeout=30,
        interval=0.2,
        what="the Job's pod",
    )
    assert len(pods) == 1
    kube.delete(job_path(namespace, "j1"), propagation_policy="Background")

    def job_gone() -> bool:
        try:
            kube.get(job_path(namespace, "j1"))
        except NotFound:
            return True
        return False

    wait_for(job_gone, timeout=30, interval=0.2, what="the Job to be deleted")
    wait_for(
        lambda: not kube.list(pod_path(namespace), label_selector="job-name=j1"),
        timeout=30,
        interval=0.2,
        what="the garbage collector to delete the Job's pod",
    )


def test_read_log_of_missing_pod(kube: KubeClient, namespace: str) -> None:
    with pytest.raises(NotFound):
        kube.read_log(namespace, "no-such-pod", "main", tail_lines=10)


def ready_nodes(kube: KubeClient) -> list[str]:
    nodes = kube.list("/api/v1/nodes")
    return [
        n["metadata"]["name"]
        for n in nodes
        if any(
            c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", [])
        )
    ]


def test_read_log_bytes(kube: KubeClient, namespace: str) -> None:
    """A container's output comes back as raw bytes, invalid UTF-8 and all (through the
    kubelet stand-in, which serves logs as kubelet does)."""
    # The suite's bed always runs kubelet stand-ins; no node is a broken bed.
    assert ready_nodes(kube), "the test bed has no Ready node to run a pod"
    kube.create(
        pod_path(namespace),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "talker"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "command": [
                            "sh",
                            "-c",
                            "for i in 1 2 3 4 5; do echo line$i; done; printf 'bad \\377\\376 end\\n'",
                        ],
                    }
                ],
            },
        },
    )

    def finished() -> bool:
        phase = kube.get(pod_path(namespace, "talker")).get("status", {}).get("phase")
        return phase in ("Succeeded", "Failed")

    wait_for(finished, timeout=60, interval=0.2, what="the pod to finish")
    log = kube.read_log(namespace, "talker", "main")
    assert log.startswith(b"line1\n")
    assert log.endswith(b"bad \xff\xfe end\n")
    assert kube.read_log(namespace, "talker", "main", tail_lines=1) == b"bad \xff\xfe end\n"
    assert kube.read_log(namespace, "talker", "main", limit_bytes=3) == b"lin"


def test_create_event(kube: KubeClient, namespace: str) -> None:
    obj = kube.create(cm_path(namespace), configmap("evented"))
    event = kube.create_event(
        namespace,
        obj,
        "Reported",
        "SetTaskStatus FINISHED " + "x" * 2000,
        type="Warning",
        component="dptr-sidecar",
        reporting_instance="pod-1",
    )
    assert event["involvedObject"]["uid"] == obj["metadata"]["uid"]
    events = kube.list(event_path(namespace), field_selector="involvedObject.name=evented")
    assert len(events) == 1
    ev = events[0]
    assert (ev["reason"], ev["type"], ev["reportingComponent"], ev["reportingInstance"]) == (
        "Reported",
        "Warning",
        "dptr-sidecar",
        "pod-1",
    )
    assert len(ev["message"]) <= 1024
    # The same Event through events.k8s.io/v1, as newer tools read it.
    modern = kube.list(f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")
    assert modern[0]["regarding"]["name"] == "evented"
    assert modern[0]["reportingController"] == "dptr-sidecar"
    # kubectl describe shows it.
    # (kept as a plain API check: the describe output format is kubectl's business)


def test_token_auth_forbidden_and_rotation(
    testbed: RunningTestbed, kube: KubeClient, namespace: str, tmp_path: Path
) -> None:
    kube.create(namespaced_path("api/v1", "serviceaccounts", namespace), {"metadata": {"name": "nobody"}})
    request = kube.create(
        namespaced_path("api/v1", "serviceaccounts", namespace, "nobody", "token"),
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 600},
        },
    )
    token = request["status"]["token"]
    kubeconfig = json.loads(testbed.kubeconfig.read_text())
    ca = kubeconfig["clusters"][0]["cluster"]["certificate-authority"]
    token_file = tmp_path / "token"
    token_file.write_text("not-a-valid-token")
    sa = KubeClient(
        KubeConfig(server=testbed.server, ca_file=ca, token_file=str(token_file), namespace=namespace)
    )
    with pytest.raises(Unauthorized):
        sa.get(pod_path(namespace))
    # The token file is rotated under the client's feet: the next call uses it.
    new = tmp_path / "token.new"
    new.write_text(token)
    new.replace(token_file)
    with pytest.raises(Forbidden) as forbidden:
        sa.list(pod_path(namespace))
    assert "nobody" in forbidden.value.message


def test_timeouts_and_unreachable(kube: KubeClient, testbed: RunningTestbed, namespace: str) -> None:
    started = time.monotonic()
    with pytest.raises(ApiUnavailable) as timed_out:
        # A watch holds the connection open with no data: the timeout must fire.
        kube.request("GET", pod_path(namespace), query={"watch": True, "timeoutSeconds": 30}, timeout=0.5)
    assert timed_out.value.reason == "Timeout"
    assert time.monotonic() - started < 5
    # The client recovers on a new connection.
    assert kube.get("/version")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = json.loads(testbed.kubeconfig.read_text())
    ca = kubeconfig["clusters"][0]["cluster"]["certificate-authority"]
    closed = KubeClient(KubeConfig(server=f"https://127.0.0.1:{port}", ca_file=ca), timeout=2)
    with pytest.raises(ApiUnavailable) as refused:
        closed.get("/version")
    assert refused.value.status == 0


def test_threads_share_a_client(kube: KubeClient, namespace: str) -> None:
    kube.create(cm_path(namespace), configmap("counter", {"n": "0"}))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                kube.get(cm_path(namespace, "counter"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
