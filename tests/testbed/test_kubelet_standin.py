"""What the kubelet stand-in does for a pod, checked through the API only."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from testbed_helpers import Kube, PodEvents

from dptr_testbed import controlplane
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "probe"}, "annotations": {"note": 'say "hi"'}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": list(containers),
            **spec,
        },
    }


def container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", "command": ["sh", "-c", script], **extra}


def terminated(p: dict[str, Any], name: str) -> dict[str, Any]:
    for status in p["status"].get("containerStatuses", []) + p["status"].get("initContainerStatuses", []):
        if status["name"] == name:
            return dict(status["state"]["terminated"])
    raise AssertionError(f"no status for {name}")


def test_env_and_downward_api_resolve(kube: Kube, ns: str, python: str) -> None:
    kube.core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cfg"}, "data": {"color": "blue", "size": "L"}}
    )
    kube.core.create_namespaced_secret(
        ns, {"metadata": {"name": "sec"}, "stringData": {"password": "s3cret"}}
    )
    env = [
        {"name": "PLAIN", "value": "plain"},
        {"name": "EXPANDED", "value": "$(PLAIN)-and-$(MISSING)-$$(PLAIN)"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "COLOR", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "color"}}},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}},
    ]
    script = (
        "import json, os, socket; "
        "print(json.dumps({**{k: v for k, v in os.environ.items()}, 'hostname': socket.gethostname(),"
        " 'labels': open('/etc/podinfo/labels').read(), 'cwd': os.getcwd()}))"
    )
    spec = pod(
        "env",
        {
            "name": "c",
            "image": "python",
            "command": [python, "-c", script],
            "workingDir": "/tmp",
            "env": env,
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "resources": {"limits": {"memory": "64Mi"}},
            "volumeMounts": [{"name": "podinfo", "mountPath": "/etc/podinfo"}],
        },
        volumes=[
            {
                "name": "podinfo",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            }
        ],
    )
    created = kube.create_pod(ns, spec)
    kube.wait_phase(ns, "env", "Succeeded", "Failed")
    out = json.loads(kube.logs(ns, "env", "c"))
    assert out["PLAIN"] == "plain"
    assert out["EXPANDED"] == "plain-and-$(MISSING)-$(PLAIN)"
    assert out["POD_NAME"] == "env"
    assert out["POD_NS"] == ns
    assert out["POD_UID"] == created["metadata"]["uid"]
    assert out["NODE"] == "node-1"
    assert out["SA"] == "default"
    assert out["POD_IP"] == "127.0.0.1"
    assert out["APP"] == "probe"
    assert out["NOTE"] == 'say "hi"'
    assert out["MEM"] == "64"
    assert out["COLOR"] == "blue"
    assert out["PASSWORD"] == "s3cret"
    assert "OPTIONAL" not in out
    assert (out["CFG_color"], out["CFG_size"]) == ("blue", "L")
    assert out["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert out["HOSTNAME"] == out["hostname"] == "env"
    assert out["labels"] == 'app="probe"'
    assert out["cwd"] == "/tmp"


def test_a_missing_secret_is_a_config_error_until_it_exists(kube: Kube, ns: str) -> None:
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "x"}}}]
    kube.create_pod(ns, pod("waits", container("c", "echo $X", env=env)))

    waiting = kube.wait_pod(
        ns,
        "waits",
        lambda p: (
            (p["status"].get("containerStatuses") or [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CreateContainerConfigError"
        ),
        what="CreateContainerConfigError",
    )
    assert (
        waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"] == 'secret "later" not found'
    )
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "later"}, "stringData": {"x": "now"}})
    kube.wait_phase(ns, "waits", "Succeeded")
    assert kube.logs(ns, "waits", "c") == "now\n"


def test_active_deadline_fails_the_pod_with_deadline_exceeded(kube: Kube, ns: str) -> None:
    kube.create_pod(
        ns,
        pod("slow", container("c", "sleep 60"), activeDeadlineSeconds=2, terminationGracePeriodSeconds=1),
    )
    failed = kube.wait_phase(ns, "slow", "Failed", "Succeeded", timeout=30)
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["reason"] == "DeadlineExceeded"
    # `sleep` as PID 1 ignores SIGTERM, so it is killed after the grace period.
    assert terminated(failed, "c")["exitCode"] == 137


def test_termination_messages_come_from_the_file_or_the_log_tail(kube: Kube, ns: str) -> None:
    lines = "; ".join(f"echo line{i}" for i in range(100))
    kube.create_pod(
        ns,
        pod(
            "messages",
            container("file", "echo all good > /dev/termination-log"),
            container("fallback", f"{lines}; exit 2", terminationMessagePolicy="FallbackToLogsOnError"),
            container("quiet", "echo some output; exit 1"),
        ),
    )
    done = kube.wait_phase(ns, "messages", "Failed", "Succeeded")
    assert terminated(done, "file")["message"] == "all good\n"
    fallback = terminated(done, "fallback")
    assert fallback["exitCode"] == 2
    assert fallback["message"] == "".join(f"line{i}\n" for i in range(20, 100))
    assert "message" not in terminated(done, "quiet")


def test_a_container_without_command_fails_to_start(kube: Kube, ns: str) -> None:
    kube.create_pod(ns, pod("nocmd", {"name": "c", "image": "busybox"}))
    done = kube.wait_phase(ns, "nocmd", "Failed", "Succeeded")
    term = terminated(done, "c")
    assert (term["exitCode"], term["reason"]) == (128, "StartError")
    assert "command" in term["message"]


def test_run_as_non_root_without_a_user_is_refused(kube: Kube, ns: str) -> None:
    spec = pod("rootish", container("c", "true"), securityContext={"runAsNonRoot": True})
    kube.create_pod(ns, spec)
    stuck = kube.wait_pod(
        ns,
        "rootish",
        lambda p: (
            (p["status"].get("containerStatuses") or [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CreateContainerConfigError"
        ),
    )
    message = stuck["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    assert "runAsNonRoot" in message
    assert stuck["status"]["phase"] == "Pending"


def test_kubectl_logs_reads_the_container_log(bed: controlplane.Testbed, kube: Kube, ns: str) -> None:
    kube.create_pod(
        ns, pod("talks", container("c", "for i in 1 2 3 4 5; do echo line$i; done; echo to-stderr >&2"))
    )
    kube.wait_phase(ns, "talks", "Succeeded")
    assert bed.kubectl("logs", "-n", ns, "talks") == "line1\nline2\nline3\nline4\nline5\nto-stderr\n"
    assert bed.kubectl("logs", "-n", ns, "talks", "--tail=2") == "line5\nto-stderr\n"
    assert bed.kubectl("logs", "-n", ns, "talks", "--limit-bytes=8") == "line1\nli"


def test_kubectl_logs_follow_streams_until_the_container_exits(
    bed: controlplane.Testbed, kube: Kube, ns: str
) -> None:
    kube.create_pod(ns, pod("ticks", container("c", "for i in 1 2 3; do echo tick$i; sleep 0.5; done")))
    kube.wait_phase(ns, "ticks", "Running")
    assert bed.kubectl("logs", "-n", ns, "ticks", "-f") == "tick1\ntick2\ntick3\n"


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(
    kube: Kube, ns: str, pod_events: PodEvents
) -> None:
    kube.create_pod(
        ns,
        pod(
            "doomed",
            container("polite", "trap 'exit 42' TERM; echo trap-set; while :; do sleep 0.1; done"),
            container("stubborn", "trap '' TERM; echo trap-set; while :; do sleep 0.1; done"),
            terminationGracePeriodSeconds=3,
        ),
    )
    kube.wait_pod(
        ns, "doomed", lambda p: all(s.get("started") for s in p["status"].get("containerStatuses") or [{}])
    )
    # A shell is PID 1 without a handler (ignoring SIGTERM) until its trap is set.
    for name in ("polite", "stubborn"):
        wait_for(
            lambda name=name: "trap-set" in kube.core.read_namespaced_pod_log("doomed", ns, container=name),
            timeout=30,
            what=f"{name}'s trap",
            interval=0.3,
        )
    start = time.time()
    kube.core.delete_namespaced_pod("doomed", ns)
    wait_for(lambda: kube.pod(ns, "doomed") is None, timeout=30, what="the pod to be removed", interval=0.3)
    elapsed = time.time() - start
    wait_for(
        lambda: any(t == "DELETED" for t, _ in pod_events.of("doomed")),
        timeout=10,
        what="the DELETED event",
        interval=0.3,
    )

    final = next(
        p
        for t, p in reversed(pod_events.of("doomed"))
        if t == "MODIFIED" and p["status"]["phase"] == "Failed"
    )
    assert terminated(final, "polite")["exitCode"] == 42  # it got SIGTERM and handled it
    stubborn = terminated(final, "stubborn")
    assert (stubborn["exitCode"], stubborn.get("signal")) == (137, 9)  # SIGKILL after the grace period
    assert 3 <= elapsed < 20


def test_init_containers_run_in_order_before_the_main_container(kube: Kube, ns: str) -> None:
    shared = [{"name": "work", "mountPath": "/work-dir"}]
    kube.create_pod(
        ns,
        pod(
            "ordered",
            container("main", "cat /work-dir/order", volumeMounts=shared),
            initContainers=[
                container("first", "echo first >> /work-dir/order", volumeMounts=shared),
                container("second", "echo second >> /work-dir/order", volumeMounts=shared),
            ],
            volumes=[{"name": "work", "emptyDir": {}}],
        ),
    )
    done = kube.wait_phase(ns, "ordered", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded"
    assert kube.logs(ns, "ordered", "main") == "first\nsecond\n"
    assert [s["state"]["terminated"]["reason"] for s in done["status"]["initContainerStatuses"]] == [
        "Completed",
        "Completed",
    ]


def test_a_failed_init_container_fails_the_pod(kube: Kube, ns: str) -> None:
    kube.create_pod(
        ns, pod("badinit", container("main", "echo never"), initContainers=[container("init", "exit 5")])
    )
    done = kube.wait_phase(ns, "badinit", "Failed", "Succeeded")
    assert terminated(done, "init")["exitCode"] == 5
    assert "waiting" in done["status"]["containerStatuses"][0]["state"]


def test_read_only_mounts_and_run_as_user(kube: Kube, ns: str) -> None:
    kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "conf"}, "data": {"a.txt": "A"}})
    script = "id -u; cat /conf/a.txt; echo; touch /conf/new 2>/dev/null && echo writable || echo read-only; touch /scratch/x && echo scratch-ok"
    kube.create_pod(
        ns,
        pod(
            "ro",
            container(
                "c",
                script,
                securityContext={"runAsUser": 4242, "runAsGroup": 4242},
                volumeMounts=[
                    {"name": "conf", "mountPath": "/conf", "readOnly": True},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            ),
            volumes=[{"name": "conf", "configMap": {"name": "conf"}}, {"name": "scratch", "emptyDir": {}}],
        ),
    )
    kube.wait_phase(ns, "ro", "Succeeded", "Failed")
    assert kube.logs(ns, "ro", "c") == "4242\nA\nread-only\nscratch-ok\n"


def test_pods_survive_an_api_server_restart(bed: controlplane.Testbed, kube: Kube, ns: str) -> None:
    kube.create_pod(ns, pod("steady", container("c", "sleep 4; echo done")))
    kube.wait_phase(ns, "steady", "Running")
    bed.restart_apiserver()
    done = kube.wait_phase(ns, "steady", "Succeeded", "Failed", timeout=60)
    assert done["status"]["phase"] == "Succeeded"
    # Watches are re-established: new pods still run.
    kube.create_pod(ns, pod("after", container("c", "echo after")))
    kube.wait_phase(ns, "after", "Succeeded")
