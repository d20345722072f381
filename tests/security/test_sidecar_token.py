"""Attack: a stolen sidecar token acts on a neighbour's task.

The sidecar's Role (charts/dptr/files/sidecar-role.yaml) has to grant Job deletion and
PipelineTask status writes namespace-wide: RBAC cannot name "its own" object.  The
chart's ValidatingAdmissionPolicy (templates/sidecar-admission-policy.yaml, installed on
the shared bed by the ``crds`` fixture) narrows them to the Job and PipelineTask of the
pod the token is bound to.  Here real tokens come from the TokenRequest API, bound to
real pods, and are used against the real API server.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest
from op_helpers import Cluster

from dptr_common import naming
from dptr_common.kube import event_path, job_path, pipelinetask_path
from dptr_testbed.installs import SIDECAR_ACCOUNT, sidecar_admission_policy

pytestmark = pytest.mark.cluster


def _task_and_job(cluster: Cluster, attempt: str) -> str:
    """A PipelineTask and its (suspended: no pods) Job, named as the operator names them."""
    name = naming.pipeline_task_name("df-TOKEN", attempt)
    cluster.kube.create(
        pipelinetask_path(cluster.namespace),
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "PipelineTask",
            "metadata": {"name": name},
            "spec": {
                "taskRunner": "r",
                "taskId": "t-" + attempt,
                "pipelineId": "df-TOKEN",
                "attemptId": attempt,
            },
        },
    )
    cluster.kube.create(
        job_path(cluster.namespace),
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "suspend": True,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "task", "image": "debian:bookworm", "command": ["true"]}],
                    }
                },
            },
        },
    )
    return name


def _pod(cluster: Cluster, name: str) -> None:
    """A pod named as the Job controller would name one of ``<job>``'s (never scheduled)."""
    cluster.kube.create(
        f"/api/v1/namespaces/{cluster.namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": SIDECAR_ACCOUNT,
                "automountServiceAccountToken": False,
                "nodeSelector": {"dptr.dev/test": "no-such-node"},
                "containers": [{"name": "task", "image": "debian:bookworm", "command": ["true"]}],
            },
        },
    )


class TokenClient:
    """Raw HTTPS calls to the API server with one bearer token."""

    def __init__(self, cluster: Cluster, token: str) -> None:
        self.server = cluster.kube.config.server
        self.token = token
        self.context = (
            ssl.create_default_context(cafile=cluster.kube.config.ca_file)
            if cluster.kube.config.ca_file
            else ssl.create_default_context()
        )
        if cluster.kube.config.ca_data:
            self.context = ssl.create_default_context(cadata=cluster.kube.config.ca_data)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, content: str = "application/json"
    ) -> tuple[int, str]:
        request = urllib.request.Request(
            self.server + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content},
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=20) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def _status_patch(client: TokenClient, namespace: str, name: str) -> tuple[int, str]:
    return client.call(
        "PATCH",
        pipelinetask_path(namespace, name, "status"),
        {"status": {"heartbeat": {"owner": "sidecar", "by": "attacker"}}},
        content="application/merge-patch+json",
    )


def _event(client: TokenClient, namespace: str, about: str) -> tuple[int, str]:
    return client.call(
        "POST",
        event_path(namespace),
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "forged-"},
            "involvedObject": {
                "apiVersion": "dptr.dev/v1alpha1",
                "kind": "PipelineTask",
                "name": about,
                "namespace": namespace,
            },
            "reason": "Reported",
            "message": "forged",
            "type": "Normal",
        },
    )


def test_a_pod_bound_sidecar_token_reaches_only_its_own_task(secure_cluster: Cluster) -> None:
    cluster = secure_cluster
    ns = cluster.namespace
    own = _task_and_job(cluster, "@Own_2026-01-01T00:00:00_Attempt=1")
    neighbour = _task_and_job(cluster, "@Neighbour_2026-01-01T00:00:00_Attempt=1")
    pod = f"{own}-ab1cd"
    _pod(cluster, pod)
    bound = cluster.testbed.kubectl(
        "create", "token", SIDECAR_ACCOUNT, "-n", ns, "--bound-object-kind", "Pod", "--bound-object-name", pod
    ).strip()
    client = TokenClient(cluster, bound)

    # Its own task: every write the sidecar makes is admitted.
    assert _status_patch(client, ns, own)[0] == 200
    assert _event(client, ns, own)[0] == 201
    # The neighbour's: refused, saying why.
    code, body = _status_patch(client, ns, neighbour)
    assert code == 403 and "may act only on its own task" in body, body
    code, body = _event(client, ns, neighbour)
    assert code == 403 and "may act only on its own task" in body, body
    code, body = client.call("DELETE", job_path(ns, neighbour))
    assert code == 403 and "may act only on its own task" in body, body
    assert client.call("DELETE", job_path(ns, own))[0] == 200

    # A token of the same account that is bound to no pod may write nothing.
    unbound = TokenClient(
        cluster, cluster.testbed.kubectl("create", "token", SIDECAR_ACCOUNT, "-n", ns).strip()
    )
    code, body = _status_patch(unbound, ns, neighbour)
    assert code == 403 and "token bound to its pod" in body, body
    code, body = unbound.call("DELETE", job_path(ns, neighbour))
    assert code == 403 and "token bound to its pod" in body, body

    # What admission cannot fence (docs/security.md): reads.
    assert client.call("GET", pipelinetask_path(ns, neighbour))[0] == 200


def test_a_pod_of_a_longer_named_job_is_not_the_shorter_ones(secure_cluster: Cluster) -> None:
    cluster = secure_cluster
    ns = cluster.namespace
    short = _task_and_job(cluster, "@A_2026-01-01T00:00:00_Attempt=1")
    # A pod named <short>-xyz12-more... is not <short>-<5 characters>: refused.
    pod = f"{short}-xyz12-more"[:63].rstrip("-")
    _pod(cluster, pod)
    token = cluster.testbed.kubectl(
        "create", "token", SIDECAR_ACCOUNT, "-n", ns, "--bound-object-kind", "Pod", "--bound-object-name", pod
    ).strip()
    code, body = TokenClient(cluster, token).call("DELETE", job_path(ns, short))
    assert code == 403, body


def test_the_chart_policy_is_what_the_bed_runs() -> None:
    rendered = sidecar_admission_policy()
    assert "kind: ValidatingAdmissionPolicy\n" in rendered
    assert "kind: ValidatingAdmissionPolicyBinding\n" in rendered
    assert "validationActions: [Deny]" in rendered
