"""Harness for the sidecar tests: a real test bed (with the kubelet stand-in running the
pod's containers as host processes), the local Data Pipeline service, and the sidecar's
own ServiceAccount + Role + RoleBinding made from charts/dptr/files/sidecar-role.yaml.

No operator: the test plays its part.  It polls a real task from the service, acks it,
creates the PipelineTask (``PipelineTaskSpec.from_task``) and the Job (``render_job``,
owned by the PipelineTask), and heartbeats the task until the sidecar records that it
has taken over, as the operator would.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dptr_common.kube import KubeClient, NotFound, job_path, pipelinetask_path, pod_path, taskrunner_path
from dptr_common.models import PipelineTaskSpec, TaskRunner
from dptr_common.naming import LABEL_PIPELINE_TASK, label_value, pipeline_task_name
from dptr_common.render import render_job
from dptr_common.task import Task, parse_task
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.installs import SIDECAR_ACCOUNT, sidecar_rbac
from dptr_testbed.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
TIME_SCALE = 0.01  # the datapipeline fixture's


def install_sidecar_rbac(kube: KubeClient, namespace: str, account: str = SIDECAR_ACCOUNT) -> None:
    """ServiceAccount ``account`` + Role + RoleBinding in ``namespace``, from the chart's file."""
    plural = {"ServiceAccount": "serviceaccounts", "Role": "roles", "RoleBinding": "rolebindings"}
    for obj in sidecar_rbac(namespace, account):
        group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
        kube.create(f"{group}/namespaces/{namespace}/{plural[obj['kind']]}", obj)


@dataclass
class RunningTask:
    """One polled attempt, its PipelineTask and its Job."""

    harness: SidecarHarness
    task: Task
    pipeline_id: str
    name: str  # PipelineTask and Job name
    _stop_beats: threading.Event = field(default_factory=threading.Event)
    _pod_uid: str = ""

    @property
    def attempt_id(self) -> str:
        return self.task.attempt_id

    @property
    def kube(self) -> KubeClient:
        return self.harness.kube

    def pipeline_task(self) -> dict[str, Any]:
        return self.kube.get(pipelinetask_path(self.harness.namespace, self.name))

    def status(self) -> dict[str, Any]:
        return self.pipeline_task().get("status") or {}

    def pods(self) -> list[dict[str, Any]]:
        selector = f"{LABEL_PIPELINE_TASK}={label_value(self.name)}"
        return self.kube.list(pod_path(self.harness.namespace), label_selector=selector)

    def pod(self, timeout: float = 30.0) -> dict[str, Any]:
        pods: list[dict[str, Any]] = wait_for(self.pods, timeout=timeout, what="the Job's pod")
        self._pod_uid = pods[0]["metadata"]["uid"]
        return pods[0]

    def pod_name(self) -> str:
        return str(self.pod()["metadata"]["name"])

    def container_state(self, container: str) -> dict[str, Any]:
        pods = self.pods()
        if not pods:
            return {}
        status = pods[0].get("status") or {}
        for entry in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
            if entry.get("name") == container:
                state: dict[str, Any] = entry.get("state") or {}
                return state
        return {}

    def job_exists(self) -> bool:
        try:
            self.kube.get(job_path(self.harness.namespace, self.name))
        except NotFound:
            return False
        return True

    def record(self) -> Any:
        return self.harness.datapipeline.ledger.attempt(self.attempt_id)

    def outcome(self) -> str | None:
        record = self.record()
        return None if record is None else record.outcome

    def wait_outcome(self, timeout: float = 60.0) -> Any:
        wait_for(
            lambda: self.outcome() is not None, timeout=timeout, what=f"an outcome for {self.attempt_id}"
        )
        return self.record()

    def wait_reported(self, timeout: float = 60.0) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            lambda: (s := self.status()).get("report", {}).get("reportedAt") and s,
            timeout=timeout,
            what="report.reportedAt on the PipelineTask",
        )
        return status

    def wait_sidecar_took_over(self, timeout: float = 60.0) -> dict[str, Any]:
        status: dict[str, Any] = wait_for(
            lambda: (s := self.status()).get("heartbeat", {}).get("owner") == "sidecar" and s,
            timeout=timeout,
            what="heartbeat.owner == sidecar",
        )
        return status

    def events(self) -> list[dict[str, Any]]:
        items = self.kube.list(
            f"/api/v1/namespaces/{self.harness.namespace}/events",
            field_selector=f"involvedObject.name={self.name}",
        )
        return items

    def sidecar_log(self) -> str:
        """The sidecar's log (all runs), from the stand-in's files on the host."""
        if not self._pod_uid:
            try:
                self.pod(timeout=1)
            except AssertionError:
                return "(no pod seen)"
        files = sorted(self.harness.testbed.state_dir.glob(f"nodes/*/pods/{self._pod_uid}/dptr-sidecar*.log"))
        return (
            "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}" for f in files) or "(no sidecar log)"
        )

    def stop_operator_heartbeats(self) -> None:
        self._stop_beats.set()


class SidecarHarness:
    """Creates what the operator would for one TaskRunner in ``namespace``."""

    def __init__(self, testbed: RunningTestbed, namespace: str, datapipeline: LocalDataPipeline) -> None:
        self.testbed = testbed
        self.namespace = namespace
        self.datapipeline = datapipeline
        self.kube = KubeClient.from_kubeconfig(testbed.kubeconfig, timeout=20)
        self.kube.config.namespace = namespace
        self.dp = datapipeline.client(retries={"total_max_attempts": 1})
        self.worker_group = "wg-" + uuid.uuid4().hex[:8]
        self.runner_name = "runner"
        self.tasks: list[RunningTask] = []
        install_sidecar_rbac(self.kube, namespace)
        self.kube.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "dp-keys"},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
                    "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_ACCESS_KEY,
                },
            },
        )
        runner = {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": self.runner_name, "namespace": namespace},
            "spec": {
                "workerGroup": self.worker_group,
                "region": "us-east-1",
                "endpointUrl": datapipeline.endpoint_url,
                "credentials": {"mode": "Secret", "secretRef": {"name": "dp-keys"}},
                "jobTemplate": {"image": "localhost/dptr-task:test"},
            },
        }
        created = wait_for(lambda: self._create_runner(runner), timeout=30, what="TaskRunner created")
        self.runner = TaskRunner.from_k8s(created)

    def _create_runner(self, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.kube.create(taskrunner_path(self.namespace), body)
        except NotFound:  # the CRD was just established
            return None

    def publish_interval(self, seconds: int) -> None:
        """What the operator does: the paced interval in the TaskRunner's status."""
        self.kube.patch(
            taskrunner_path(self.namespace, self.runner_name, "status"),
            {"status": {"heartbeatIntervalSeconds": seconds}},
        )

    def poll(self, objects: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        pipeline_id = self.datapipeline.run_pipeline(objects, worker_group=self.worker_group)
        # No pause between tries: each is a long poll.
        task_object: dict[str, Any] = wait_for(
            lambda: self.dp.poll_for_task(workerGroup=self.worker_group, hostname="dptr-test").get(
                "taskObject"
            ),
            timeout=30,
            interval=0,
            what="a task polled",
        )
        return pipeline_id, task_object

    def start(self, command: str, *, object_type: str = "ShellCommandActivity", **fields: Any) -> RunningTask:
        """Poll a task running ``command``, ack it, create its PipelineTask and Job."""
        pipeline_id, task_object = self.poll({"Act": {"type": object_type, "command": command, **fields}})
        # The ack, within the (scaled) 2 minutes.
        self.dp.report_task_progress(taskId=task_object["taskId"])
        task = parse_task(task_object)
        name = pipeline_task_name(task.pipeline_id, task.attempt_id)
        spec = PipelineTaskSpec.from_task(task, task_runner=self.runner_name, polled_by="dptr-test")
        pt = self.kube.create(
            pipelinetask_path(self.namespace),
            {
                "apiVersion": "dptr.dev/v1alpha1",
                "kind": "PipelineTask",
                "metadata": {"name": name, "ownerReferences": [self.runner.owner_reference()]},
                "spec": spec.to_k8s(),
            },
        )
        self.kube.patch(
            pipelinetask_path(self.namespace, name, "status"),
            {
                "status": {
                    "phase": "Pending",
                    "jobName": name,
                    "heartbeat": {"owner": "operator", "by": "test"},
                }
            },
        )
        running = RunningTask(self, task, pipeline_id, name)
        self._operator_heartbeats(running)
        job = render_job(
            task,
            self.runner,
            sidecar_image="localhost/dptr-sidecar:test",
            namespace=self.namespace,
            owner=pt,
            service_account_name=SIDECAR_ACCOUNT,
            sidecar_env={"DPTR_TIME_SCALE": str(TIME_SCALE), "DPTR_LOG_LEVEL": "DEBUG"},
        )
        self.kube.create(job_path(self.namespace), job)
        self.tasks.append(running)
        return running

    def _operator_heartbeats(self, running: RunningTask) -> None:
        """Heartbeat like the operator until the sidecar takes over (or the test says stop)."""
        interval = 60 * TIME_SCALE / 2

        def loop() -> None:
            while not running._stop_beats.wait(interval):
                try:
                    status = running.status()
                    if (status.get("heartbeat") or {}).get("owner") == "sidecar" or status.get("phase") in (
                        "Canceled",
                        "Succeeded",
                        "Failed",
                    ):
                        return
                    self.dp.report_task_progress(taskId=running.task.task_id)
                except Exception:
                    pass

        threading.Thread(target=loop, daemon=True, name=f"op-beats-{running.name}").start()

    def cancel(self, running: RunningTask) -> None:
        """SetStatus CANCEL on the attempt's instance, as a user would."""
        instance = running.task.instance_id
        assert instance, "the attempt has no @instanceParent"
        self.dp.set_status(pipelineId=running.pipeline_id, objectIds=[instance], status="CANCEL")

    def close(self) -> None:
        for running in self.tasks:
            running.stop_operator_heartbeats()


@pytest.fixture
def harness(
    crds: RunningTestbed, namespace: str, datapipeline: LocalDataPipeline
) -> Iterator[SidecarHarness]:
    h = SidecarHarness(crds, namespace, datapipeline)
    try:
        yield h
    finally:
        h.close()


def dump(running: RunningTask) -> str:
    """Everything useful when a scenario fails."""
    try:
        status = running.status()
    except Exception as exc:
        status = {"error": str(exc)}
    record = running.record()
    return (
        f"PipelineTask status: {json.dumps(status, indent=1)}\n"
        f"ledger: {record}\n"
        f"sidecar log:\n{running.sidecar_log()[-6000:]}"
    )


def sidecar_pids(pod_name: str) -> list[int]:
    """Host pids of the ``dptr-sidecar`` (run) process of ``pod_name`` (the kubelet stand-in
    runs containers as host processes, with the pod's env)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if not any(part.endswith(b"dptr-sidecar") for part in cmdline) or b"fetch-script" in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"POD_NAME={pod_name}".encode() in environ:
            pids.append(int(entry.name))
    return pids
