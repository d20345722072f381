"""End to end on the real node: the chart, the operator pod, task pods with the real sidecar.

``helm install`` puts the operator on the node as a real pod from the locally built
image (in-cluster config through the ``kubernetes`` Service, the chart's
least-privilege RBAC, leader election on). The chart also creates the TaskRunner
(``taskRunners:``), pointing at a local Data Pipeline service that listens on the
node's address, with static keys from a Secret. A pipeline with a succeeding, a
failing and a cancelled activity then runs as real Jobs whose pods hold the real
sidecar image (projected token) beside the task container, and the service's
ledger must show exactly one right outcome for each, reported by the sidecar.

A fourth activity is an attack on a real kubelet's ``$(VAR)`` expansion (the same
attack as tests/security/test_kubelet_expansion.py on the stand-in): its command,
arguments, ``my*`` field and S3 log paths name ``$(AWS_SECRET_ACCESS_KEY)`` and hold
``$$``; what the process printed must come back byte for byte from moto's S3 (on the
node's address), and the Secret's canary key must appear nowhere.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, LocalDataPipeline
from dptr_testbed import images
from dptr_testbed.waiting import wait_for

from .conftest import PROBE_IMAGE, RealBed

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(2400)]

CHART = Path(__file__).resolve().parents[2] / "charts" / "dptr"
# Image-based pods take seconds to start: keep protocol time only modestly compressed
# (a 60 s heartbeat interval becomes 6 s, the 2-minute ack window 12 s).
TIME_SCALE = 0.1
WORKER_GROUP = "wg-real-node"
RELEASE = "dptr"
BUCKET = "real-node"
#: The TaskRunner's secret key (the local service checks only the key id): it must leak nowhere.
CANARY = "CANARY-" + uuid.uuid4().hex
#: The expansion attack: kubelet must leave every byte of these alone.
REFS = "$(AWS_SECRET_ACCESS_KEY)|$(DPTR_PIPELINE_ID)|$(DPTR_TASK_ID)|$(POD_NAME)|$$|$"
HOSTILE_ARGS = ["$(AWS_SECRET_ACCESS_KEY)", "$(DPTR_PIPELINE_ID)", "$$"]
HOSTILE = {
    "type": "ShellCommandActivity",
    "command": (
        f"printf 'cmd:%s\\n' '{REFS}'; printf 'arg:%s\\n' \"$@\"; "
        'printf \'field:%s\\n\' "$DPTR_FIELD_myValue"; echo "pid:$$"'
    ),
    "scriptArgument": HOSTILE_ARGS,
    "myValue": REFS,
    "stdout": f"s3://{BUCKET}/out/$(AWS_SECRET_ACCESS_KEY)/stdout",
    "stderr": f"s3://{BUCKET}/out/$(POD_NAME)/stderr",
    "maximumRetries": "0",
}


def split_image(ref: str) -> tuple[str, str]:
    repository, _, tag = ref.rpartition(":")
    return repository, tag


class Installed:
    """The release and the task namespace, with readers for what the test checks."""

    def __init__(self, bed: RealBed, release_ns: str, data_ns: str) -> None:
        self.bed, self.release_ns, self.data_ns = bed, release_ns, data_ns

    def get(self, *args: str) -> Any:
        return json.loads(self.bed.kubectl("get", *args, "-o", "json"))

    def tasks(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("pipelinetasks", "-n", self.data_ns)["items"]
        return items

    def task_for(self, object_id: str) -> dict[str, Any] | None:
        for task in self.tasks():
            if (task["spec"].get("activity") or {}).get("componentId") == object_id:
                return task
        return None

    def operator_pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.get(
            "pods", "-n", self.release_ns, "-l", "app.kubernetes.io/component=operator"
        )["items"]
        return pods

    def diagnostics(self) -> str:
        parts = []
        for args in (
            ("get", "all,pipelinetasks,taskrunners", "-n", self.data_ns, "-o", "wide"),
            ("get", "pods", "-n", self.release_ns, "-o", "wide"),
            ("get", "events", "-n", self.data_ns, "--sort-by=.lastTimestamp"),
            ("get", "events", "-n", self.release_ns, "--sort-by=.lastTimestamp"),
            ("get", "taskrunners", "-n", self.data_ns, "-o", "yaml"),
            ("logs", "-n", self.release_ns, "deploy/" + RELEASE, "--tail=150"),
        ):
            parts.append(f"$ kubectl {' '.join(args)}\n{self.bed.kubectl(*args, check=False)}")
        return "\n".join(parts)


@pytest.fixture
def datapipeline(real_bed: RealBed) -> Iterator[LocalDataPipeline]:
    # On the pod network's gateway: pods reach it there, the test reaches it too.
    with LocalDataPipeline(time_scale=TIME_SCALE, host=real_bed.node_address) as svc:
        yield svc


@pytest.fixture
def moto_s3(real_bed: RealBed) -> Iterator[tuple[str, Any]]:
    """moto's S3 on the node's address (pods reach it there), and a boto3 client for it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=real_bed.node_address, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDREALNODE",
        aws_secret_access_key="real-node",
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint, client
    finally:
        server.stop()


@pytest.fixture
def installed(
    real_bed: RealBed, datapipeline: LocalDataPipeline, moto_s3: tuple[str, Any], tmp_path: Path
) -> Iterator[Installed]:
    release_ns = real_bed.namespace("rn-dptr")
    data_ns = real_bed.namespace("rn-data")
    inst = Installed(real_bed, release_ns, data_ns)
    real_bed.kubectl(
        "create",
        "secret",
        "generic",
        "-n",
        data_ns,
        "dp-credentials",
        f"--from-literal=AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY_ID}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={CANARY}",
    )
    operator_repo, operator_tag = split_image(images.OPERATOR_IMAGE)
    sidecar_repo, sidecar_tag = split_image(images.SIDECAR_IMAGE)
    probe_repo, _ = split_image(PROBE_IMAGE)
    values = {
        "operator": {
            # Already in the node's containerd: never pull (no registry is reachable).
            "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
            "watch": {"namespaces": [data_ns]},
            "credentialsSecretNames": ["dp-credentials"],
            "logLevel": "DEBUG",
            "extraEnv": [{"name": "DPTR_TIME_SCALE", "value": str(TIME_SCALE)}],
            # 30 s for the sidecar to report a pod's end before the operator's fallback
            # would (scaled); the sidecar needs about a second, and the test checks who did.
            "extraArgs": ["--sidecar-report-grace-seconds=300"],
        },
        "sidecar": {"image": {"repository": sidecar_repo, "tag": sidecar_tag}},
        # The administrator points every runner at the local service and moto (as at
        # VPC endpoints); the TaskRunner below is declared here, so its worker group is
        # granted to its namespace.
        "tenancy": {"defaultEndpointUrl": datapipeline.endpoint_url, "defaultS3EndpointUrl": moto_s3[0]},
        "taskRunners": [
            {
                "name": "real-node",
                "namespace": data_ns,
                "spec": {
                    "workerGroup": WORKER_GROUP,
                    "region": "us-east-1",
                    "credentials": {"mode": "Secret", "secretRef": {"name": "dp-credentials"}},
                    "maxConcurrentTasks": 5,
                    # The sidecar image has /bin/sh; a task may pick the probe image.
                    "jobTemplate": {"image": images.SIDECAR_IMAGE, "imagePullPolicy": "Never"},
                    "imagePolicy": {"allowedImages": [f"{probe_repo}:*"]},
                },
            }
        ],
    }
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps(values))
    started = time.monotonic()
    proc = real_bed.helm("install", RELEASE, str(CHART), "-n", release_ns, "-f", str(values_file))
    assert proc.returncode == 0, f"helm install failed:\n{proc.stdout}\n{proc.stderr}"
    try:
        yield inst
    except BaseException:
        raise
    finally:
        sys.stdout.write(f"\n----- installed {time.monotonic() - started:.1f}s ago -----\n")
        sys.stdout.write(inst.diagnostics()[-30000:] + "\n")
        # The TaskRunner first, while the operator can still remove its finalizer.
        real_bed.kubectl("delete", "taskrunners", "--all", "-n", data_ns, "--timeout=60s", check=False)
        real_bed.helm("uninstall", RELEASE, "-n", release_ns, "--wait", "--timeout", "90s")
        for ns in (data_ns, release_ns):
            real_bed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_pipeline_outcomes_through_the_chart_on_the_real_node(
    real_bed: RealBed, installed: Installed, datapipeline: LocalDataPipeline, moto_s3: tuple[str, Any]
) -> None:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    # The operator: a real container from the local image, Ready once it leads.
    rollout = real_bed.kubectl(
        "rollout", "status", "-n", installed.release_ns, f"deploy/{RELEASE}", "--timeout=180s", check=False
    )
    assert "successfully rolled out" in rollout, f"the operator did not become Ready: {rollout}"
    timings["operator ready"] = time.monotonic() - t0
    (op_pod,) = installed.operator_pods()
    (op_status,) = op_pod["status"]["containerStatuses"]
    assert op_status["image"].endswith(images.OPERATOR_IMAGE.split("/", 1)[1]), op_status
    assert op_status["containerID"].startswith("containerd://"), op_status
    assert op_pod["spec"]["nodeName"] == real_bed.node_name
    # In-cluster config only: nothing but the projected token points it at the API server.
    assert not any("kubeconfig" in arg for arg in op_pod["spec"]["containers"][0]["args"])
    lease = installed.get("lease", "-n", installed.release_ns, "dptr-operator")
    assert lease["spec"]["holderIdentity"] == op_pod["metadata"]["name"], lease["spec"]

    pipeline_id = datapipeline.run_pipeline(
        {
            "Succeeds": {"type": "ShellCommandActivity", "command": "echo hello from a real container"},
            "Fails": {
                "type": "ShellCommandActivity",
                "command": "echo about to fail >&2; exit 3",
                "myImage": PROBE_IMAGE,
                "maximumRetries": "0",
            },
            "Canceled": {"type": "ShellCommandActivity", "command": "sleep 600", "maximumRetries": "0"},
            "Hostile": HOSTILE,
        },
        worker_group=WORKER_GROUP,
    )

    # Cancel the long task once its pod runs and the sidecar has taken over heartbeats,
    # so the sidecar is the one that hears `canceled: true`.
    def sidecar_owns_canceled() -> dict[str, Any] | None:
        task = installed.task_for("Canceled")
        status = (task or {}).get("status") or {}
        if status.get("phase") == "Running" and (status.get("heartbeat") or {}).get("owner") == "sidecar":
            return task
        return None

    try:
        wait_for(
            sidecar_owns_canceled,
            timeout=240,
            what="the Canceled task's pod running with the sidecar heartbeating",
            interval=0.5,
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{installed.diagnostics()}") from None
    timings["cancel target running"] = time.monotonic() - t0
    (canceled_attempt,) = [a for a in datapipeline.ledger.attempts.values() if a.object_id == "Canceled"]
    dp = datapipeline.client()
    dp.set_status(pipelineId=pipeline_id, objectIds=[canceled_attempt.instance_id], status="CANCEL")

    def all_outcomes() -> dict[str, Any] | None:
        attempts = {a.object_id: a for a in datapipeline.ledger.attempts.values()}
        if set(attempts) >= {"Succeeds", "Fails", "Canceled", "Hostile"} and all(
            a.outcome for a in attempts.values()
        ):
            tasks = {o: installed.task_for(o) for o in attempts}
            # The PipelineTask ledger records the report / the cancel too.
            if all(
                t and t["status"].get("phase") in ("Succeeded", "Failed", "Canceled") for t in tasks.values()
            ):
                return attempts
        return None

    try:
        attempts = wait_for(all_outcomes, timeout=180, what="an outcome for every activity", interval=0.5)
    except AssertionError as err:
        ledger = json.dumps(datapipeline.ledger.to_json(include_calls=False), default=str)[:6000]
        raise AssertionError(f"{err}\nledger: {ledger}\n{installed.diagnostics()}") from None
    timings["all outcomes"] = time.monotonic() - t0
    sys.stdout.write(f"\ntimings (s from operator install): {json.dumps(timings)}\n")

    assert attempts["Succeeds"].outcome == "FINISHED", attempts["Succeeds"]
    assert (attempts["Fails"].outcome, attempts["Fails"].error_id) == ("FAILED", "dptr.ExitCode.3")
    assert "about to fail" in (attempts["Fails"].error_stack_trace or "")
    assert attempts["Canceled"].outcome == "CANCELED", attempts["Canceled"]
    set_status_tasks = [c.task_id for c in datapipeline.ledger.calls_to("SetTaskStatus")]
    assert canceled_attempt.task_id not in set_status_tasks, "SetTaskStatus was called for a canceled task"
    # Exactly one SetTaskStatus each for the others.
    assert sorted(map(str, set_status_tasks)) == sorted(
        [attempts["Succeeds"].task_id, attempts["Fails"].task_id, attempts["Hostile"].task_id]
    )
    check_expansion_attack(installed, datapipeline, moto_s3[1], attempts["Hostile"])

    # Each outcome came from the sidecar in the task's own pod, a real container on the node.
    for object_id, phase in (("Succeeds", "Succeeded"), ("Fails", "Failed")):
        task = installed.task_for(object_id)
        assert task is not None
        status = task["status"]
        assert status["phase"] == phase, status
        assert status["report"]["reportedBy"].startswith("sidecar/"), status["report"]
        assert status["report"]["reportedBy"] == f"sidecar/{status['podName']}", status
        # Having reported, the sidecar exits by itself once kubelet asks it to: the pod
        # ends within seconds, not when the 30 s grace period runs out (exit 137).
        pod = wait_for(
            lambda name=status["podName"]: (
                p
                if (p := installed.get("pod", "-n", installed.data_ns, name))["status"].get("phase")
                in ("Succeeded", "Failed")
                else None
            ),
            timeout=20,
            interval=0.5,
            what=f"{object_id}'s pod finished",
        )
        assert pod["spec"]["nodeName"] == real_bed.node_name
        assert pod["status"]["podIP"].startswith("10.244."), pod["status"]
        (sidecar,) = pod["status"]["initContainerStatuses"]
        (task_container,) = pod["status"]["containerStatuses"]
        assert sidecar["containerID"].startswith("containerd://")
        assert sidecar["state"]["terminated"]["exitCode"] == 0, sidecar
        assert sidecar["image"].endswith(images.SIDECAR_IMAGE.split("/", 1)[1]), sidecar
        want_image = PROBE_IMAGE if object_id == "Fails" else images.SIDECAR_IMAGE
        assert task_container["image"].endswith(want_image.split("/", 1)[1]), task_container
        assert task_container["state"]["terminated"]["exitCode"] == (3 if object_id == "Fails" else 0)
        # Only the sidecar holds an API token.
        volumes = {m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts") or []}
        assert not any("token" in v for v in volumes), pod["spec"]["containers"]
    canceled = installed.task_for("Canceled")
    assert canceled is not None
    assert canceled["status"]["phase"] == "Canceled", canceled["status"]
    assert canceled["status"]["canceled"]["by"].startswith("sidecar/"), canceled["status"]
    assert not (canceled["status"].get("report") or {}).get("reportedAt"), canceled["status"]
    # The sidecar deleted the canceled task's Job.
    wait_for(
        lambda: (
            not installed.bed.kubectl(
                "get",
                "job",
                "-n",
                installed.data_ns,
                canceled["status"]["jobName"],
                "--ignore-not-found",
                check=False,
            ).strip()
        ),
        timeout=60,
        what="the canceled task's Job deleted",
        interval=0.5,
    )
    # The chart's least-privilege RBAC is all the operator needed: nothing was refused.
    op_logs = real_bed.kubectl("logs", "-n", installed.release_ns, op_pod["metadata"]["name"], check=False)
    refused = [line for line in op_logs.splitlines() if "forbidden" in line.lower()]
    assert not refused, "the operator was refused by the API server:\n" + "\n".join(refused[:10])
    datapipeline.assert_clean()


def check_expansion_attack(
    installed: Installed, datapipeline: LocalDataPipeline, s3: Any, record: Any
) -> None:
    """A real kubelet handed every process its strings exactly, and the key leaked nowhere."""
    assert (record.outcome, record.error_id) == ("FINISHED", None), record.error_message
    stdout = s3.get_object(Bucket=BUCKET, Key="out/$(AWS_SECRET_ACCESS_KEY)/stdout")["Body"].read()
    pid_line = stdout.decode().splitlines()[-1]
    assert pid_line.startswith("pid:") and pid_line[4:].isdigit(), stdout
    lines = [f"cmd:{REFS}", *(f"arg:{a}" for a in HOSTILE_ARGS), f"field:{REFS}", pid_line]
    assert stdout == ("\n".join(lines) + "\n").encode()
    keys = [i["Key"] for i in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert "out/$(POD_NAME)/stderr" in keys, keys
    leaks = [k for k in keys if CANARY in k]
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        if CANARY.encode() in (gzip.decompress(body) if key.endswith(".gz") else body):
            leaks.append(f"object {key}")
    for kind in ("pipelinetasks", "jobs", "pods", "events"):
        if CANARY in json.dumps(installed.get(kind, "-n", installed.data_ns)):
            leaks.append(kind)
    if CANARY in json.dumps(datapipeline.ledger.to_json(include_calls=True), default=str):
        leaks.append("the Data Pipeline ledger")
    assert leaks == [], f"the Secret's key leaked to: {leaks}"
