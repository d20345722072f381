"""The test bed is real: Jobs, garbage collection, native sidecars, Pod
Security admission and ServiceAccount tokens behave as on a cluster."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from testbed_helpers import Kube, PodEvents

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def job(name: str, command: list[str], **pod_spec: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "containers": [{"name": "main", "image": "busybox", "command": command}],
    }
    spec.update(pod_spec)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": spec}},
    }


def test_a_failing_job_goes_pending_running_failed(kube: Kube, ns: str, pod_events: PodEvents) -> None:
    kube.create_job(ns, job("fails", ["sh", "-c", "echo hi; sleep 1; exit 3"]))

    assert kube.job_condition(ns, "fails") == "Failed"
    (pod,) = kube.pods(ns, "job-name=fails")
    name = pod["metadata"]["name"]
    wait_for(
        lambda: pod_events.phases(name)[-1:] == ["Failed"], timeout=10, what="the Failed event", interval=0.3
    )
    assert pod_events.phases(name) == ["Pending", "Running", "Failed"]
    (status,) = pod["status"]["containerStatuses"]
    term = status["state"]["terminated"]
    assert term["exitCode"] == 3
    assert term["reason"] == "Error"
    assert term["startedAt"] <= term["finishedAt"]
    assert kube.logs(ns, name, "main") == "hi\n"


def test_a_succeeding_job_completes(kube: Kube, ns: str) -> None:
    kube.create_job(ns, job("works", ["sh", "-c", "echo hi; exit 0"]))

    assert kube.job_condition(ns, "works") == "Complete"
    (pod,) = kube.pods(ns, "job-name=works")
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")


def test_background_deletion_of_a_job_removes_its_pods(kube: Kube, ns: str) -> None:
    # The container handles SIGTERM (it is PID 1, which ignores it otherwise).
    kube.create_job(ns, job("long", ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]))
    (pod,) = wait_for(lambda: kube.pods(ns, "job-name=long"), timeout=30, what="the Job's pod", interval=0.3)
    kube.wait_phase(ns, pod["metadata"]["name"], "Running")

    kube.batch.delete_namespaced_job("long", ns, propagation_policy="Background")

    wait_for(
        lambda: not kube.pods(ns, "job-name=long"),
        timeout=60,
        what="the garbage collector to remove the pod",
        interval=0.3,
    )
    with pytest.raises(client.ApiException) as err:
        kube.job(ns, "long")
    assert err.value.status == 404


def test_a_native_sidecar_starts_first_runs_alongside_and_stops_after(kube: Kube, ns: str) -> None:
    shared = {"name": "shared", "mountPath": "/shared"}
    sidecar = {
        "name": "sidecar",
        "image": "busybox",
        "restartPolicy": "Always",
        "volumeMounts": [shared],
        "command": [
            "sh",
            "-c",
            "echo up > /shared/sidecar-up; echo started; "
            "trap 'test -e /shared/main-done && echo stopped-after-main; exit 0' TERM; "
            "while :; do sleep 0.1; done",
        ],
    }
    main = {
        "name": "main",
        "image": "busybox",
        "volumeMounts": [shared],
        "command": [
            "sh",
            "-c",
            # Without a startupProbe a sidecar counts as started once it runs,
            # so the main container may begin before the sidecar's first line.
            "for i in $(seq 50); do test -e /shared/sidecar-up && break; sleep 0.1; done; "
            "test -e /shared/sidecar-up && echo sidecar-was-up; sleep 2; echo done > /shared/main-done",
        ],
    }
    kube.create_job(
        ns,
        job(
            "with-sidecar",
            [],
            initContainers=[sidecar],
            containers=[main],
            volumes=[{"name": "shared", "emptyDir": {}}],
        ),
    )

    assert kube.job_condition(ns, "with-sidecar") == "Complete"
    (pod,) = kube.pods(ns, "job-name=with-sidecar")
    assert pod["status"]["phase"] == "Succeeded"
    side = pod["status"]["initContainerStatuses"][0]["state"]["terminated"]
    main_term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert main_term["exitCode"] == 0
    assert side["startedAt"] <= main_term["startedAt"]
    assert side["finishedAt"] >= main_term["finishedAt"]
    name = pod["metadata"]["name"]
    assert kube.logs(ns, name, "main") == "sidecar-was-up\n"
    assert kube.logs(ns, name, "sidecar") == "started\nstopped-after-main\n"


def test_privileged_pod_is_rejected_in_a_restricted_namespace(kube: Kube, ns: str) -> None:
    kube.core.patch_namespace(
        ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    privileged = {
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["true"],
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    with pytest.raises(client.ApiException) as err:
        kube.create_pod(ns, privileged)
    assert err.value.status == 403
    assert "violates PodSecurity" in err.value.body
    assert "privileged" in err.value.body

    # A compliant pod is admitted and runs as the user it asks for.
    compliant = {
        "metadata": {"name": "compliant"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["sh", "-c", "id -u; id -g"],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }
    kube.create_pod(ns, compliant)
    kube.wait_phase(ns, "compliant", "Succeeded")
    assert kube.logs(ns, "compliant", "c") == "1000\n0\n"


TOKEN_PROBE = r"""
import json, os, ssl, urllib.request, urllib.error
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(sa + "/token").read()
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
base = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
ns = open(sa + "/namespace").read()
def call(path):
    req = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
def whoami():
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
    req = urllib.request.Request(base + "/apis/authentication.k8s.io/v1/selfsubjectreviews", data=body,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.load(resp)["status"]["userInfo"]["username"]
print(json.dumps({
    "list_pods": call("/api/v1/namespaces/%s/pods" % ns),
    "list_secrets": call("/api/v1/namespaces/%s/secrets" % ns),
    "list_kube_system_pods": call("/api/v1/namespaces/kube-system/pods"),
    "user": whoami(),
}))
"""


def test_a_service_account_token_is_mounted_only_where_asked_and_has_its_rbac_rights(
    kube: Kube, ns: str, python: str
) -> None:
    kube.core.create_namespaced_service_account(ns, {"metadata": {"name": "reader"}})
    kube.rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    kube.rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "reader-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    pod = {
        "metadata": {"name": "token"},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "reader",
            # The ServiceAccount admission plugin adds a token volume to every
            # container; turn that off and mount one into "with" only.
            "automountServiceAccountToken": False,
            "volumes": [
                {
                    "name": "api-token",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                            {
                                "downwardAPI": {
                                    "items": [
                                        {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
                                    ]
                                }
                            },
                        ]
                    },
                }
            ],
            "containers": [
                {
                    "name": "with",
                    "image": "python",
                    "command": [python, "-c", TOKEN_PROBE],
                    "volumeMounts": [{"name": "api-token", "mountPath": sa_dir, "readOnly": True}],
                },
                {
                    "name": "without",
                    "image": "busybox",
                    "command": ["sh", "-c", f"ls {sa_dir}/token 2>/dev/null && echo present || echo absent"],
                },
            ],
        },
    }
    kube.create_pod(ns, pod)
    kube.wait_phase(ns, "token", "Succeeded", "Failed")

    assert kube.logs(ns, "token", "without") == "absent\n"
    results = json.loads(kube.logs(ns, "token", "with"))
    assert results == {
        "list_pods": 200,
        "list_secrets": 403,
        "list_kube_system_pods": 403,
        "user": f"system:serviceaccount:{ns}:reader",
    }
