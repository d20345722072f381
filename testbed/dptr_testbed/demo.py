"""``dptr-testbed demo``: dptr end to end on one machine, no cluster, no AWS account.

It starts the test bed (a real control plane and a kubelet stand-in), the local
Data Pipeline service, the operator and a TaskRunner, then activates an
on-demand pipeline with four pieces of work: one that succeeds, one that
fails, a precondition that does not hold (so the activity it guards is never
run), and a long one that is cancelled while it runs. It prints progress, then
a table of each attempt's outcome as Data Pipeline recorded it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import installs

NAMESPACE = "dptr-demo"
WORKER_GROUP = "dptr-demo"

#: Ten times faster than real time: the 2-minute ack window is 12 s and the
#: default 15-minute reportProgressTimeout is 90 s, so the demo is quick but
#: nothing races.
TIME_SCALE = 0.1

PIPELINE: dict[str, dict[str, Any]] = {
    "Default": {
        "scheduleType": "ondemand",
        "workerGroup": WORKER_GROUP,
        "failureAndRerunMode": "CASCADE",
        "maximumRetries": "0",
    },
    "SayHello": {
        "type": "ShellCommandActivity",
        "command": 'echo "hello from $DPTR_ATTEMPT_ID"; sleep 2',
    },
    "BrokenStep": {
        "type": "ShellCommandActivity",
        "command": "echo 'cannot open /data/input.csv' >&2; exit 3",
    },
    "InputArrived": {
        "type": "ShellCommandPrecondition",
        "command": "test -e /nonexistent/marker",
        "preconditionTimeout": "2 minutes",
        "retryDelay": "1 minutes",
    },
    "GuardedStep": {
        "type": "ShellCommandActivity",
        "command": "echo should never run",
        "precondition": {"ref": "InputArrived"},
    },
    "LongStep": {
        "type": "ShellCommandActivity",
        "command": "echo working; sleep 600",
    },
}


def _say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class _Stack:
    """What the demo started, stopped in reverse on exit or Ctrl-C."""

    state: Path
    bed: Any = None
    service: Any = None
    operator: subprocess.Popen[bytes] | None = None

    def close(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
        if self.service is not None:
            self.service.stop()
        if self.bed is not None:
            self.bed.stop()


@contextlib.contextmanager
def _interrupts_as_exceptions() -> Iterator[None]:
    # SIGTERM behaves like Ctrl-C so `finally` cleans up either way.
    def _raise(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _apply(bed: Any, obj: dict[str, Any]) -> None:
    bed.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(obj))


def _install(bed: Any) -> None:
    from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY

    installs.install_crds(bed)
    installs.install_sidecar_admission_policy(bed)
    bed.kubectl("create", "namespace", NAMESPACE)
    bed.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    # The sidecar's RBAC, from the chart's single source of its rules.
    for obj in installs.sidecar_rbac(NAMESPACE):
        _apply(bed, obj)
    _apply(
        bed,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "datapipeline-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_ACCESS_KEY,
            },
        },
    )
    _apply(
        bed,
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": "demo"},
            "spec": {
                "workerGroup": WORKER_GROUP,
                "region": "us-east-1",
                # No endpointUrl: the administrator points every runner at the local service
                # (the operator's --default-endpoint-url), as with a VPC endpoint.
                "credentials": {"mode": "Secret", "secretRef": {"name": "datapipeline-credentials"}},
                "maxConcurrentTasks": 4,
                # The stand-in ignores images; a real cluster pulls this one.
                "jobTemplate": {"image": "debian:bookworm-slim"},
            },
        },
    )


def _start_operator(bed: Any, state: Path, service: Any) -> subprocess.Popen[bytes]:
    log = (state / "operator.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dptr_operator.cli",
            f"--kubeconfig={bed.kubeconfig}",
            f"--namespace={NAMESPACE}",
            f"--time-scale={TIME_SCALE}",
            f"--lease-namespace={NAMESPACE}",
            "--http-port=0",
            "--identity=dptr-demo-operator",
            # Tenancy as an administrator sets it: this namespace serves this worker group.
            f"--worker-group-grant={NAMESPACE}={WORKER_GROUP}",
            f"--default-endpoint-url={service.endpoint_url}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _pipeline_tasks(bed: Any) -> list[dict[str, Any]]:
    out = bed.kubectl("get", "pipelinetasks", "-n", NAMESPACE, "-o", "json", check=False)
    try:
        items: list[dict[str, Any]] = json.loads(out)["items"]
    except (ValueError, KeyError):
        return []
    return items


def _component(attempt_id: str, service: Any) -> str:
    """The activity an attempt belongs to, as the service recorded it."""
    return str(service.ledger.attempts[attempt_id].object_id)


def _cancel_long_step(service: Any, pipeline_id: str, bed: Any) -> bool:
    """Cancel LongStep once its pod runs: Data Pipeline answers the next heartbeat with canceled."""
    for task in _pipeline_tasks(bed):
        if task["spec"].get("activity", {}).get("componentId") != "LongStep":
            continue
        if (task.get("status") or {}).get("phase") != "Running":
            return False
        instance = task["spec"]["activity"].get("instanceId")
        service.client().set_status(pipelineId=pipeline_id, objectIds=[instance], status="CANCEL")
        _say("  -> LongStep is running: cancelling it through Data Pipeline (SetStatus CANCEL)")
        return True
    return False


def _instance_statuses(service: Any, pipeline_id: str) -> dict[str, str]:
    """Each activity's instance @status, as DescribeObjects answers it."""
    client = service.client()
    ids = client.query_objects(pipelineId=pipeline_id, sphere="INSTANCE")["ids"]
    statuses: dict[str, str] = {}
    for obj in client.describe_objects(pipelineId=pipeline_id, objectIds=ids)["pipelineObjects"]:
        fields = {f["key"]: f.get("stringValue") or f.get("refValue") for f in obj["fields"]}
        statuses[str(fields.get("@componentParent") or obj["name"])] = str(fields.get("@status") or "")
    return statuses


def _print_table(service: Any, bed: Any, pipeline_id: str) -> None:
    reported_by: dict[str, str] = {}
    for task in _pipeline_tasks(bed):
        status = task.get("status") or {}
        who = (status.get("report") or {}).get("reportedBy") or (status.get("canceled") or {}).get("by") or ""
        reported_by[task["spec"]["attemptId"]] = who.split("/")[0]
    rows = [("ACTIVITY", "ATTEMPT", "OUTCOME", "ERROR ID", "HANDLED BY")]
    for attempt_id, outcome in sorted(service.ledger.outcomes().items()):
        record = service.ledger.attempts[attempt_id]
        rows.append(
            (
                _component(attempt_id, service),
                attempt_id,
                str(outcome or "-"),
                str(record.error_id or ""),
                reported_by.get(attempt_id, ""),
            )
        )
    _say("")
    _say("Attempts, as Data Pipeline recorded them:")
    _table(rows)
    _say("")
    _say("Instances (DescribeObjects @status):")
    _table([("ACTIVITY", "STATUS"), *sorted(_instance_statuses(service, pipeline_id).items())])
    problems = service.ledger.problems()
    _say("")
    _say(
        "ledger: "
        + ("every attempt has exactly one outcome, no protocol violation" if not problems else str(problems))
    )


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _say("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def run(keep: bool = False, timeout: float = 300.0) -> int:
    from dptr_datapipeline import LocalDataPipeline

    from .controlplane import Testbed

    state = Path(tempfile.mkdtemp(prefix="dptr-demo-"))
    stack = _Stack(state)
    try:
        with _interrupts_as_exceptions():
            _say(f"[1/5] starting the test bed (control plane + kubelet stand-in) in {state}")
            stack.bed = Testbed(state / "bed", nodes=("node-1",))
            stack.bed.start()
            _say(f"[2/5] starting the local Data Pipeline service (time scale {TIME_SCALE})")
            stack.service = LocalDataPipeline(time_scale=TIME_SCALE)
            stack.service.start()
            _say(f"      {stack.service.endpoint_url}")
            _say("[3/5] installing the CRDs, the sidecar's RBAC and a TaskRunner")
            _install(stack.bed)
            _say("[4/5] starting the operator")
            stack.operator = _start_operator(stack.bed, state, stack.service)
            _say(
                "[5/5] activating an on-demand pipeline: SayHello, BrokenStep, InputArrived -> GuardedStep, LongStep"
            )
            pipeline_id = stack.service.run_pipeline(
                objects=PIPELINE, worker_group=WORKER_GROUP, name="dptr-demo"
            )
            _say(f"      pipeline {pipeline_id}")
            _say("")
            _say(f"  look around meanwhile: export KUBECONFIG={stack.bed.kubeconfig}")
            _say(f"    kubectl get taskrunners,pipelinetasks,jobs,pods -n {NAMESPACE}")
            _say(f"    kubectl get events -n {NAMESPACE} --sort-by=.lastTimestamp")
            _say("")
            canceled = False
            deadline = time.monotonic() + timeout
            last = ""
            while time.monotonic() < deadline:
                if stack.operator.poll() is not None:
                    _say(f"the operator exited; its log: {state / 'operator.log'}")
                    return 1
                if not canceled:
                    canceled = _cancel_long_step(stack.service, pipeline_id, stack.bed)
                outcomes = stack.service.ledger.outcomes()
                phases = [(t.get("status") or {}).get("phase") for t in _pipeline_tasks(stack.bed)]
                line = (
                    f"  polled {len(outcomes)}  running {phases.count('Running')}"
                    f"  pending {phases.count('Pending')}  finished {sum(1 for o in outcomes.values() if o)}"
                )
                if line != last:
                    _say(line)
                    last = line
                # Done when Data Pipeline has settled every activity: InputArrived
                # stays FALSE until its preconditionTimeout cancels GuardedStep.
                instances = _instance_statuses(stack.service, pipeline_id)
                settled = {"FINISHED", "FAILED", "CANCELED", "TIMEDOUT"}
                if canceled and instances and all(st in settled for st in instances.values()):
                    break
                time.sleep(1)
            else:
                _say("the demo did not finish in time; showing what happened so far")
            _print_table(stack.service, stack.bed, pipeline_id)
            if keep:
                _say("")
                _say(f"still up (Ctrl-C to stop): export KUBECONFIG={stack.bed.kubeconfig}")
                while True:
                    time.sleep(3600)
            return 0
    except KeyboardInterrupt:
        _say("\ninterrupted; cleaning up")
        return 130
    finally:
        stack.close()
        if not os.environ.get("DPTR_DEMO_KEEP_STATE"):
            shutil.rmtree(state, ignore_errors=True)
