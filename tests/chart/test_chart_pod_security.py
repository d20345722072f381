"""Task pods rendered by dptr_common.render.render_job are admitted in a namespace that
enforces the restricted Pod Security Standard (and the operator's pod is too)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from dptr_common.models import TaskRunner
from dptr_common.render import render_job
from dptr_common.task import parse_task
from dptr_testbed import binaries
from dptr_testbed.controlplane import RunningTestbed

from .conftest import REPO, Helm

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
}


def _samples() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dptr_samples", REPO / "tests" / "unit" / "dptr_samples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _apply_dry_run(bed: RunningTestbed, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """kubectl apply --dry-run=server, with stderr (Pod Security warnings) kept."""
    kubectl = binaries.Binaries(binaries.bin_dir()).kubectl
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={bed.kubeconfig}", "apply", "--dry-run=server", "-f", "-"],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
    )


def _jobs(namespace: str) -> dict[str, dict[str, Any]]:
    s = _samples()
    command_task = parse_task(s.task_object())
    script_task = parse_task(
        s.set_attempt_fields(
            s.task_object(),
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "scriptUri", "stringValue": "s3://scripts-bucket/etl/run.sh"},
                {"key": "scriptArgument", "stringValue": "--full"},
            ],
        )
    )
    pod_identity = TaskRunner.from_k8s(
        s.task_runner_object(imagePolicy={"allowedImages": ["registry.example.com/etl/*"]})
    )
    secret = TaskRunner.from_k8s(
        s.task_runner_object(
            credentials={"mode": "Secret", "secretRef": {"name": "dp-creds"}},
            passDataPipelineCredentials=True,
            imagePolicy={"allowedImages": ["registry.example.com/etl/*"]},
            jobTemplate={
                "image": "registry.example.com/etl/base:1.0",
                "resources": {"limits": {"memory": "1Gi"}},
            },
        )
    )
    selector = {"matchLabels": {"dptr.dev/task-runner": "etl"}}
    scheduled = TaskRunner.from_k8s(
        s.task_runner_object(
            jobTemplate={
                "image": "registry.example.com/etl/base:1.0",
                "affinity": {
                    "podAntiAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 10,
                                "podAffinityTerm": {
                                    "topologyKey": "kubernetes.io/hostname",
                                    "labelSelector": selector,
                                },
                            }
                        ]
                    }
                },
                "topologySpreadConstraints": [
                    {
                        "maxSkew": 1,
                        "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": selector,
                    }
                ],
                "imagePullSecrets": [{"name": "regcred"}],
            }
        )
    )
    common = {
        "sidecar_image": "ghcr.io/dptr-dev/dptr-sidecar:0.1.0",
        "namespace": namespace,
        "owner": s.pipeline_task_owner(),
        "service_account_name": "dptr-sidecar",
    }
    return {
        "command, PodIdentity": render_job(command_task, pod_identity, **common),
        "scriptUri, Secret": render_job(script_task, secret, **common),
        "scheduling, sidecar resources": render_job(
            script_task,
            scheduled,
            sidecar_resources={"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
            **common,
        ),
    }


def _pod_of(job: dict[str, Any]) -> dict[str, Any]:
    template = copy.deepcopy(job["spec"]["template"])
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template["metadata"],
            "name": job["metadata"]["name"],
            "namespace": job["metadata"]["namespace"],
        },
        "spec": template["spec"],
    }


@pytest.fixture
def restricted_namespace(testbed: RunningTestbed, make_namespace: Callable[..., str]) -> str:
    ns = make_namespace("t-chart-pss", labels=RESTRICTED)
    # The ServiceAccount admission plugin wants the pods' account to exist.
    testbed.kubectl("create", "serviceaccount", "dptr-sidecar", "-n", ns)
    return ns


def test_enforcement_is_on(testbed: RunningTestbed, restricted_namespace: str) -> None:
    """The control: a pod that breaks the restricted standard is refused there."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-privileged", "namespace": restricted_namespace},
        "spec": {
            "serviceAccountName": "dptr-sidecar",
            "containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}],
        },
    }
    proc = _apply_dry_run(testbed, pod)
    assert proc.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "variant", ["command, PodIdentity", "scriptUri, Secret", "scheduling, sidecar resources"]
)
def test_task_pods_are_admitted(testbed: RunningTestbed, restricted_namespace: str, variant: str) -> None:
    job = _jobs(restricted_namespace)[variant]
    # The Job: accepted, and no Pod Security warning about its pod template.
    proc = _apply_dry_run(testbed, job)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    # Its pod, as the Job controller would create it: admitted under enforcement.
    proc = _apply_dry_run(testbed, _pod_of(job))
    assert proc.returncode == 0, proc.stderr
    assert "created (server dry run)" in proc.stdout
    assert "PodSecurity" not in proc.stderr, proc.stderr


def test_operator_pod_is_admitted(testbed: RunningTestbed, restricted_namespace: str, helm: Helm) -> None:
    docs = helm.render(release="pss", namespace=restricted_namespace)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    testbed.kubectl("create", "serviceaccount", "pss-dptr", "-n", restricted_namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "operator",
            "namespace": restricted_namespace,
            **deployment["spec"]["template"]["metadata"],
        },
        "spec": deployment["spec"]["template"]["spec"],
    }
    proc = _apply_dry_run(testbed, pod)
    assert proc.returncode == 0, proc.stderr
    assert "PodSecurity" not in proc.stderr, proc.stderr
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
