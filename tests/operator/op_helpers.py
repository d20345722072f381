"""Helpers for the operator's cluster tests: the operator as a real subprocess.

``operator`` starts ``dptr-operator --kubeconfig ... --namespace NS --time-scale 0.01``
against the shared test bed; ``runner`` creates the credentials Secret, the sidecar's
ServiceAccount and a TaskRunner pointing at the test's LocalDataPipeline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from dptr_common.kube import KubeClient, job_path, pipelinetask_path, taskrunner_path
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed

TIME_SCALE = 0.01
#: The operator's tenancy in most tests: one tenant, who may point the runner at the local
#: service and moto (tests/security passes its own, to check the fences).
OPEN_TENANCY = (
    "--allow-any-worker-group",
    *("--allow-override", "endpointUrl"),
    *("--allow-override", "s3EndpointUrl"),
    *("--allow-override", "sidecarImage"),
    *("--allow-override", "passDataPipelineCredentials"),
    *("--allow-override", "proxy"),
)


class OperatorProcess:
    """One ``dptr-operator`` subprocess; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(
        self,
        testbed: RunningTestbed,
        namespace: str,
        log_dir: Path,
        extra: list[str],
        *,
        tenancy: tuple[str, ...] = OPEN_TENANCY,
        env: dict[str, str] | None = None,
    ) -> None:
        self.testbed = testbed
        self.namespace = namespace
        self.log_dir = log_dir
        self.extra = extra
        self.tenancy = tenancy
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def start(self, *more: str) -> OperatorProcess:
        self.starts += 1
        argv = [
            sys.executable,
            "-m",
            "dptr_operator.cli",
            "--kubeconfig",
            str(self.testbed.kubeconfig),
            "--namespace",
            self.namespace,
            "--time-scale",
            str(TIME_SCALE),
            "--http-port",
            "0",
            "--identity",
            "op-test",
            "--lease-namespace",
            self.namespace,
            "--log-level",
            "DEBUG" if os.environ.get("DPTR_TEST_DEBUG") else "INFO",
            *self.tenancy,
            *self.extra,
            *more,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env} if self.env else None,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        """The samples of its /metrics (``name{labels}`` -> value); {} before it serves.
        Its HTTP port (``--http-port 0``: any free one) is read from its log."""
        match = re.search(r"http port (\d+)", self.log_path.read_text(errors="replace"))
        if match is None:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        samples = {}
        for raw in text.splitlines():
            if raw and not raw.startswith("#"):
                key, _, value = raw.rpartition(" ")
                samples[key] = float(value)
        return samples

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def logs(self) -> str:
        return "\n".join(
            (self.log_dir / f"operator-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
            if (self.log_dir / f"operator-{i}.log").exists()
        )


class Cluster:
    """Helpers over the API for one test namespace."""

    def __init__(self, testbed: RunningTestbed, namespace: str) -> None:
        self.testbed = testbed
        self.namespace = namespace
        self.kube = KubeClient.from_kubeconfig(testbed.kubeconfig)

    def apply(self, obj: dict[str, Any]) -> str:
        return self.testbed.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(obj))

    def tasks(self) -> list[dict[str, Any]]:
        return self.kube.list(pipelinetask_path(self.namespace))

    def jobs(self) -> list[dict[str, Any]]:
        return self.kube.list(job_path(self.namespace))

    def pods(self) -> list[dict[str, Any]]:
        return self.kube.list(f"/api/v1/namespaces/{self.namespace}/pods")

    def runner(self, name: str = "runner") -> dict[str, Any]:
        return self.kube.get(taskrunner_path(self.namespace, name))

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        conditions = (self.runner(name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == type_), None)

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        items = self.kube.list(f"/api/v1/namespaces/{self.namespace}/events")
        return [e for e in items if reason is None or e.get("reason") == reason]

    def patch_pod_status(self, name: str, status: dict[str, Any]) -> None:
        self.kube.patch(f"/api/v1/namespaces/{self.namespace}/pods/{name}/status", {"status": status})

    def create_runner(
        self,
        datapipeline: LocalDataPipeline,
        worker_group: str,
        name: str = "runner",
        secret_key_id: str = DEFAULT_ACCESS_KEY_ID,
        secret_access_key: str = DEFAULT_SECRET_ACCESS_KEY,
        endpoint: bool = True,
        **spec: Any,
    ) -> dict[str, Any]:
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "dp-credentials"},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": secret_key_id,
                    "AWS_SECRET_ACCESS_KEY": secret_access_key,
                },
            }
        )
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "dptr-sidecar"}})
        body = {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": name},
            "spec": {
                "workerGroup": worker_group,
                "region": "us-east-1",
                # endpoint=False: the operator's --default-endpoint-url serves instead.
                **({"endpointUrl": datapipeline.endpoint_url} if endpoint else {}),
                "credentials": {"mode": "Secret", "secretRef": {"name": "dp-credentials"}},
                # The shared bed's nodes run pods; most operator tests want them to
                # stay Pending (their statuses are patched by hand), so by default
                # the pods ask for a node that does not exist. Tests that want pods
                # to run pass their own jobTemplate.
                "jobTemplate": {
                    "image": "debian:bookworm",
                    "nodeSelector": {"dptr.dev/test": "no-such-node"},
                },
                **spec,
            },
        }
        self.apply(body)
        return self.runner(name)


#: Pods stay Pending in these tests unless they ask to run: keep graces long by default.
QUIET_GRACES = ("--unschedulable-grace-seconds", "100000", "--image-pull-grace-seconds", "100000")


def namespace_state(testbed: RunningTestbed, namespace: str) -> str:
    """What a failed test's reader needs beside the operator's log: the Jobs and pods
    (with the scheduler's conditions) and the namespace's Events, oldest first."""
    parts = []
    for args in (
        ("get", "jobs,pods,pipelinetasks", "-o", "wide"),
        (
            "get",
            "pods",
            "-o",
            "custom-columns=POD:.metadata.name,PHASE:.status.phase,CONDITIONS:.status.conditions[*].reason",
        ),
        ("get", "events", "--sort-by=.metadata.creationTimestamp"),
    ):
        parts.append(testbed.kubectl(*args, "-n", namespace, check=False))
    return "\n".join(parts)
