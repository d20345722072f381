"""Chaos, second edition: exactly one outcome for 500+ attempts while everything that can
go wrong does.

Time-scaled tasks with a mix of outcomes run through the real operator and the real
sidecar (pods run as host processes through the kubelet stand-in) on a test bed of this
test's own (it restarts the API server, which the shared bed must not see), with staged
inputs and outputs and stdout/stderr on moto's S3 server.  Meanwhile the harness, on a
seeded schedule tied to progress (a slow machine gets the same faults at the same points
of the run, only later):

* SIGKILLs the operator and restarts it (same identity: it retakes its own Lease at once);
* SIGKILLs sidecars of running pods (the stand-in restarts native sidecars), and some
  sidecars in the middle of their upload, after the task exited (not restarted then);
* restarts the API server once;
* has the local service fail 10% of the task-runner calls and DescribeObjects
  (InternalServiceError) and throttle all of them in bursts;
* puts a ResourceQuota on the namespace that refuses every Job for a while;
* deletes the PipelineTasks of some running tasks, and the Jobs of others, as a user would;
* cancels some long tasks mid-run with SetStatus CANCEL, as a user would.

Then faults are removed, the work settles, and against the service's ledger: 0 attempts
without an outcome, 0 with two, 0 protocol violations, every FINISHED attempt's outputs
in S3 with the right bytes, every deletion and refusal reported with its errorId, every
PipelineTask final.  The one excuse: an attempt polled within 3 s before an operator kill
(or 2 s before the API server stops) that no PipelineTask recorded, which Data Pipeline
reassigns after its ack window; an excuse never covers a protocol violation or a second
outcome.

Time scale 0.1: the 2-minute ack window is 12 s, the default 15-minute
reportProgressTimeout 90 s, heartbeats every 6 s.  On 2 saturated cores a Python process
can stall for a second or two and an operator restart takes several seconds; at 0.01
the test would mostly measure CPU starvation, not dptr.

Environment knobs: DPTR_CHAOS_SEED (default 8), DPTR_CHAOS_TASKS (default 520).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from dptr_common.kube import ApiError, KubeClient, job_path, pipelinetask_path
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_testbed import controlplane
from dptr_testbed.installs import install_crds, install_sidecar_admission_policy, sidecar_rbac
from dptr_testbed.waiting import wait_for

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "operator"))
from op_helpers import OperatorProcess  # noqa: E402


def _load_sidecar_pids() -> Any:
    """``sidecar_pids`` from the sidecar tests' harness (a conftest, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("_sidecar_harness", TESTS / "sidecar" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.sidecar_pids


sidecar_pids = _load_sidecar_pids()

pytestmark = pytest.mark.cluster

SEED = int(os.environ.get("DPTR_CHAOS_SEED", "8"))
N_TASKS = int(os.environ.get("DPTR_CHAOS_TASKS", "520"))
TIME_SCALE = 0.1
NAMESPACE = "chaos"
WORKER_GROUP = "wg-chaos"
#: Each running pod is two or three host processes, one of them a Python sidecar: 10 at
#: once keeps 2 cores busy without starving the control plane.
MAX_CONCURRENT = 10
HISTORY = {"succeeded": 10, "failed": 10}
TASK_RUNNER_OPS = ("PollForTask", "ReportTaskProgress", "SetTaskStatus", "ReportTaskRunnerHeartbeat")
#: Faults go to DescribeObjects too: the "already final?" check and stage-in's lookups.
FAULTED_OPS = (*TASK_RUNNER_OPS, "DescribeObjects")
ERROR_RATE = 0.1
FINAL_PHASES = {"Succeeded", "Failed", "Canceled", "Lost"}
BUCKET = "chaos"
#: Bytes of the bigger staged output of each staged task (one S3 part: a few MB upload
#: long enough for a sidecar kill to land in the middle of some).
BIG_OUTPUT = 6 * 1024 * 1024
#: Sidecars killed after their task exited, while they upload (not restarted then).
MID_UPLOAD_KILLS = 8
#: Bounds (real seconds).
WORK_TIMEOUT = 1500.0
SETTLE_TIMEOUT = 200.0
#: Longer than the test can last, scaled. It was 2 hours (720 s scaled): a CI run whose work
#: took 730 s then got each failure's retry 720 s after it, new work arriving until the
#: work timed out at 1500 s.
RETRY_DELAY = f"{math.ceil((WORK_TIMEOUT + SETTLE_TIMEOUT) / TIME_SCALE / 3600) + 1} hours"
QUOTA_SECONDS = 6.0
#: Excuse windows for a reassigned attempt without a PipelineTask (see the docstring).
KILL_WINDOW, API_WINDOW = 3.0, 2.0

KIND_WEIGHTS = {
    "ok": 26,
    "fail": 14,
    "false": 8,
    "cancel": 7,
    "long": 10,
    "staged": 16,
    "logs": 9,
    "deletept": 5,
    "deletejob": 5,
}


@dataclass(frozen=True)
class Activity:
    """One piece of work and the outcome it was built to have."""

    name: str
    kind: str
    fields: dict[str, Any]
    expected: str  # FINISHED | FAILED | FALSE | CANCELED
    error_id: str | None = None
    extra_objects: dict[str, Any] = field(default_factory=dict)

    def input_key(self) -> str:
        return f"in/{self.name}/in.txt"

    def input_bytes(self) -> bytes:
        return f"input of {self.name}\n".encode() * 64

    def expected_objects(self) -> dict[str, bytes]:
        """What S3 must hold after this activity ended FINISHED."""
        if self.kind == "staged":
            line = f"{self.name}\n".encode()
            big = (line * (BIG_OUTPUT // len(line) + 1))[:BIG_OUTPUT]
            return {f"out/{self.name}/upper.txt": self.input_bytes().upper(), f"out/{self.name}/big.bin": big}
        if self.kind == "logs":
            return {
                f"logs/{self.name}/stdout": f"out of {self.name}\n".encode(),
                f"logs/{self.name}/stderr": f"err of {self.name}\n".encode(),
            }
        return {}


def build_activities(rng: random.Random, n: int) -> list[Activity]:
    kinds = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        pause = round(rng.uniform(0.1, 2.0), 1)
        name = f"A{i:03d}{kind.capitalize()}"
        if kind == "ok":
            out.append(Activity(name, kind, _shell(f"echo {name}; sleep {pause}"), "FINISHED"))
        elif kind == "fail":
            code = rng.randint(1, 5)
            cmd = f"echo {name} failing >&2; sleep {pause}; exit {code}"
            out.append(Activity(name, kind, _shell(cmd), "FAILED", f"dptr.ExitCode.{code}"))
        elif kind == "false":
            # A precondition that does not hold: without a preconditionTimeout the runner
            # checks once, so its one attempt is FALSE.
            fields = {
                "type": "ShellCommandPrecondition",
                "command": f"sleep {pause}; test -e /nonexistent/{name}",
            }
            out.append(Activity(name, kind, fields, "FALSE"))
        elif kind == "cancel":
            # Runs until SetStatus CANCEL; the cancel is its one outcome.
            out.append(Activity(name, kind, _shell(f"echo {name} waiting; sleep 300"), "CANCELED"))
        elif kind == "long":
            code = rng.choice([0, 0, 0, 7])
            cmd = f"echo {name} long; sleep {round(rng.uniform(4, 10), 1)}; exit {code}"
            expected = "FINISHED" if code == 0 else "FAILED"
            out.append(Activity(name, kind, _shell(cmd), expected, f"dptr.ExitCode.{code}" if code else None))
        elif kind == "staged":
            command = (
                f'tr a-z A-Z < "$INPUT1_STAGING_DIR/in.txt" > "$OUTPUT1_STAGING_DIR/upper.txt"; '
                f'yes {name} | head -c {BIG_OUTPUT} > "$OUTPUT1_STAGING_DIR/big.bin"; sleep {pause}'
            )
            fields = {
                **_shell(command),
                "stage": "true",
                "input": {"ref": f"{name}In"},
                "output": {"ref": f"{name}Out"},
            }
            nodes = {
                f"{name}In": {"type": "S3DataNode", "filePath": f"s3://{BUCKET}/in/{name}/in.txt"},
                f"{name}Out": {"type": "S3DataNode", "directoryPath": f"s3://{BUCKET}/out/{name}"},
            }
            out.append(Activity(name, kind, fields, "FINISHED", extra_objects=nodes))
        elif kind == "logs":
            command = f"echo out of {name}; echo err of {name} >&2; sleep {pause}"
            fields = {
                **_shell(command),
                "stdout": f"s3://{BUCKET}/logs/{name}/stdout",
                "stderr": f"s3://{BUCKET}/logs/{name}/stderr",
            }
            out.append(Activity(name, kind, fields, "FINISHED"))
        else:  # deletept, deletejob: a user deletes it while it runs
            error = "dptr.PipelineTaskDeleted" if kind == "deletept" else "dptr.JobDeleted"
            command = f"echo {name} until deleted; trap 'exit 143' TERM; sleep 300 & wait"
            # No retry: the harness deletes each attempt once, while the chaos runs; a retry
            # polled as it ends would sleep out its 300 s with nobody to delete it.
            out.append(Activity(name, kind, {**_shell(command), "maximumRetries": "0"}, "FAILED", error))
    return out


def _shell(command: str) -> dict[str, Any]:
    return {"type": "ShellCommandActivity", "command": command}


# ---------------------------------------------------------------------------- the bed


@dataclass
class ChaosLog:
    started: float = field(default_factory=time.time)
    events: list[tuple[float, str]] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    operator_kills: list[float] = field(default_factory=list)

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.events.append((time.time(), f"{kind}: {detail}"))
        print(f"[chaos +{time.time() - self.started:6.1f}s] {kind}: {detail}", flush=True)


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[controlplane.Testbed]:
    testbed = controlplane.Testbed(tmp_path / "bed", nodes=("node-1", "node-2"))
    testbed.start(timeout=240)
    try:
        yield testbed
    finally:
        testbed.stop()


def _install(bed: controlplane.Testbed, datapipeline: LocalDataPipeline, s3_endpoint: str) -> None:
    install_crds(bed)
    install_sidecar_admission_policy(bed)
    bed.kubectl("create", "namespace", NAMESPACE)
    objects: list[dict[str, Any]] = [
        *sidecar_rbac(NAMESPACE),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "dp-credentials"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_ACCESS_KEY,
            },
        },
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": "chaos"},
            "spec": {
                "workerGroup": WORKER_GROUP,
                "region": "us-east-1",
                "endpointUrl": datapipeline.endpoint_url,
                "s3EndpointUrl": s3_endpoint,
                "credentials": {"mode": "Secret", "secretRef": {"name": "dp-credentials"}},
                "maxConcurrentTasks": MAX_CONCURRENT,
                "pollers": 2,
                "historyLimits": HISTORY,
                # The stand-in ignores images.
                "jobTemplate": {"image": "debian:bookworm-slim"},
            },
        },
    ]
    bed.kubectl(
        "apply",
        "-n",
        NAMESPACE,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )


# ---------------------------------------------------------------------------- chaos


class Harness:
    """Reads the cluster and the ledger, and injects the faults."""

    def __init__(
        self,
        bed: controlplane.Testbed,
        datapipeline: LocalDataPipeline,
        operator: OperatorProcess,
        activities: list[Activity],
        rng: random.Random,
        s3: Any,
    ) -> None:
        self.bed = bed
        self.dp = datapipeline
        self.operator = operator
        self.by_name = {a.name: a for a in activities}
        self.rng = rng
        self.s3 = s3
        self.kube = KubeClient.from_kubeconfig(bed.kubeconfig, timeout=10)
        self.client = datapipeline.client()
        self.log = ChaosLog()
        self.canceled: set[str] = set()  # attempt ids the harness canceled
        self.deleted: dict[str, str] = {}  # attempt id -> what the harness deleted (PipelineTask, Job)
        self.mid_upload: set[str] = set()  # attempt ids whose sidecar died uploading
        self.sidecar_killed: set[str] = set()  # attempt ids whose sidecar died, any time
        self.operator_exits: list[tuple[int | None, str]] = []
        self.api_outages: list[float] = []  # when each API server stop began
        self.quota_windows: list[tuple[float, float]] = []

    # ---- reading -------------------------------------------------------------
    def tasks(self) -> list[dict[str, Any]]:
        return self.kube.list(pipelinetask_path(NAMESPACE))

    def jobs(self) -> list[dict[str, Any]]:
        return self.kube.list(job_path(NAMESPACE))

    def pods(self) -> list[dict[str, Any]]:
        return self.kube.list(f"/api/v1/namespaces/{NAMESPACE}/pods")

    def finished_fraction(self) -> float:
        done = {r.object_id for r in self.dp.ledger.attempts.values() if r.outcome}
        return len(done) / len(self.by_name)

    def work_done(self) -> bool:
        """Every activity has an attempt with an outcome and no attempt is open."""
        attempts = self.dp.ledger.attempts.values()
        ended = {r.object_id for r in attempts if r.outcome}
        open_ = [r for r in attempts if r.outcome is None and r.reassigned is None]
        return ended >= set(self.by_name) and not open_

    def _kind_of(self, task: dict[str, Any]) -> tuple[str, Any] | None:
        record = self.dp.ledger.attempts.get(task["spec"]["attemptId"])
        if record is None:
            return None
        return self.by_name[record.object_id].kind, record

    # ---- faults --------------------------------------------------------------
    def errors_on(self) -> None:
        for op in FAULTED_OPS:
            self.dp.set_fault(op, error_rate=ERROR_RATE)

    def throttle_burst(self, seconds: float) -> None:
        self.log.note(
            "throttle-burst", f"every task-runner call and DescribeObjects throttled for {seconds:.1f}s"
        )
        for op in FAULTED_OPS:
            self.dp.set_fault(op, throttle=True)
        time.sleep(seconds)
        self.errors_on()

    def kill_operator(self, down: float) -> None:
        pid = self.operator.proc.pid if self.operator.proc else None
        self.log.operator_kills.append(time.time())
        self.operator.kill()
        self.log.note("operator-kill", f"SIGKILL pid {pid}, down {down:.1f}s")
        time.sleep(down)
        self.operator.start()

    def restart_exited_operator(self) -> None:
        """Play kubelet (restartPolicy Always) for an operator that exited on its own: by
        design it exits when it cannot renew its Lease (the API server is down)."""
        if self.operator.alive():
            return
        assert self.operator.proc is not None
        code = self.operator.proc.returncode
        last = self.operator.log_path.read_text(errors="replace").strip().splitlines()[-1:]
        self.log.note("operator-exit", f"exit code {code}: {last[0][-160:] if last else ''}; restarting")
        self.operator_exits.append((code, last[0] if last else ""))
        time.sleep(1.0)
        self.operator.start()

    def restart_apiserver(self) -> None:
        self.log.note("apiserver-restart", "stopping kube-apiserver")
        self.api_outages.append(time.time())
        self.bed.restart_apiserver(timeout=120)
        self.log.note("apiserver-ready", "kube-apiserver ready again")

    def refuse_jobs(self, seconds: float) -> None:
        """A ResourceQuota that refuses every new Job, for a while."""
        quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
                 "spec": {"hard": {"count/jobs.batch": "0"}}}  # fmt: skip
        started = time.time()
        try:
            self.bed.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(quota))
        except Exception as exc:
            self.log.note("quota-skipped", f"could not create the quota: {exc}")
            return
        self.log.note("quota-on", f"count/jobs.batch: 0 for {seconds:.0f}s")
        time.sleep(seconds)
        for _ in range(60):  # the API server may be restarting: keep trying
            try:
                self.bed.kubectl("delete", "resourcequota", "no-jobs", "-n", NAMESPACE, "--ignore-not-found")
                break
            except Exception:
                time.sleep(1)
        self.quota_windows.append((started, time.time()))
        self.log.note("quota-off", "Jobs may be created again")

    def kill_a_sidecar(self) -> None:
        try:
            pods = [p for p in self.pods() if (p.get("status") or {}).get("phase") == "Running"]
        except Exception:
            return
        self.rng.shuffle(pods)
        for pod in pods:
            name = pod["metadata"]["name"]
            attempt = str((pod["metadata"].get("annotations") or {}).get("dptr.dev/attempt-id"))
            record = self.dp.ledger.attempts.get(attempt)
            # Staged tasks lose their sidecars only after their task exited (below): a kill
            # that lands as the task exits is not restarted, and could not be told apart.
            if record is None or self.by_name[record.object_id].kind == "staged":
                continue
            pids = sidecar_pids(name)
            if not pids:
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            self.sidecar_killed.add(attempt)
            self.log.note("sidecar-kill", f"SIGKILL {pids} of pod {name}")
            return

    def kill_an_uploading_sidecar(self) -> None:
        """SIGKILL the sidecar of a staged task whose task container has exited: it is
        uploading the outputs (or reporting), and is not restarted then."""
        if len(self.mid_upload) >= MID_UPLOAD_KILLS:
            return
        for pod in self.pods():
            if not _task_exited(pod):
                continue
            attempt = (pod["metadata"].get("annotations") or {}).get("dptr.dev/attempt-id")
            record = self.dp.ledger.attempts.get(attempt or "")
            if record is None or record.outcome or self.by_name[record.object_id].kind != "staged":
                continue
            pids = sidecar_pids(pod["metadata"]["name"])
            if not pids or attempt in self.mid_upload:
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            self.mid_upload.add(str(attempt))
            self.log.note(
                "sidecar-kill-uploading", f"SIGKILL {pids} of {record.object_id} after its task exited"
            )
            return

    def cancel_running(self) -> None:
        """SetStatus CANCEL on every 'cancel' activity whose pod runs (a user's cancel)."""
        for task in self.tasks():
            found = self._kind_of(task)
            if found is None:
                continue
            kind, record = found
            if kind != "cancel" or record.attempt_id in self.canceled or record.outcome:
                continue
            if (task.get("status") or {}).get("phase") != "Running":
                continue
            self.client.set_status(
                pipelineId=record.pipeline_id, objectIds=[record.instance_id], status="CANCEL"
            )
            self.canceled.add(record.attempt_id)
            self.log.note("user-cancel", f"SetStatus CANCEL {record.object_id} ({record.attempt_id})")

    def delete_running(self) -> None:
        """What a user does by hand: delete a running task's PipelineTask, or its Job."""
        for task in self.tasks():
            found = self._kind_of(task)
            if found is None:
                continue
            kind, record = found
            status = task.get("status") or {}
            if kind not in ("deletept", "deletejob") or record.attempt_id in self.deleted or record.outcome:
                continue
            if status.get("phase") != "Running" or (status.get("heartbeat") or {}).get("owner") != "sidecar":
                continue
            name = task["metadata"]["name"]
            try:
                if kind == "deletept":
                    self.kube.delete(pipelinetask_path(NAMESPACE, name), propagation_policy="Background")
                    self.deleted[record.attempt_id] = "PipelineTask"
                else:
                    self.kube.delete(
                        job_path(NAMESPACE, status.get("jobName") or name), propagation_policy="Background"
                    )
                    self.deleted[record.attempt_id] = "Job"
            except ApiError as exc:
                print(f"[chaos] deleting for {record.object_id} failed: {exc}", flush=True)
                continue
            self.log.note("user-delete", f"{self.deleted[record.attempt_id]} of {record.object_id} ({name})")


def _task_exited(pod: dict[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    task = next((c for c in statuses if c.get("name") == "task"), {})
    return "terminated" in (task.get("state") or {})


def chaos_schedule(rng: random.Random) -> list[tuple[float, str, float]]:
    """(progress fraction, action, parameter), sorted: when a share of the work has ended,
    do the action. Progress-based, so a slow machine gets the same chaos, later."""
    plan: list[tuple[float, str, float]] = []
    for at in (0.06, 0.22, 0.40, 0.58, 0.76):
        plan.append((at + rng.uniform(0, 0.04), "kill-operator", round(rng.uniform(0.5, 4.0), 1)))
    plan.append((0.32 + rng.uniform(0, 0.04), "restart-apiserver", 0.0))
    plan.append((0.50 + rng.uniform(0, 0.04), "refuse-jobs", QUOTA_SECONDS))
    for at in (0.12, 0.45, 0.68, 0.84):
        plan.append((at + rng.uniform(0, 0.03), "throttle", round(rng.uniform(2.0, 4.0), 1)))
    return sorted(plan)


# ---------------------------------------------------------------------------- the test


@pytest.mark.timeout(2700)
def test_exactly_once_under_chaos(bed: controlplane.Testbed, tmp_path: Path, s3_endpoint: str) -> None:
    rng = random.Random(SEED)
    activities = build_activities(rng, N_TASKS)
    datapipeline = LocalDataPipeline(time_scale=TIME_SCALE)
    datapipeline.start()
    operator = OperatorProcess(bed, NAMESPACE, tmp_path, ["--time-scale", str(TIME_SCALE)])  # type: ignore[arg-type]
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDCHAOS",
        aws_secret_access_key="x",
    )
    harness: Harness | None = None
    started = time.monotonic()
    try:
        s3.create_bucket(Bucket=BUCKET)
        for activity in activities:
            if activity.kind == "staged":
                s3.put_object(Bucket=BUCKET, Key=activity.input_key(), Body=activity.input_bytes())
        _install(bed, datapipeline, s3_endpoint)
        operator.start()
        harness = Harness(bed, datapipeline, operator, activities, rng, s3)
        harness.errors_on()
        harness.log.note("faults", f"{ERROR_RATE:.0%} InternalServiceError on {', '.join(FAULTED_OPS)}")
        # Pipelines of 20 activities; failures are not retried within the test (retryDelay
        # outlasts it) but a lost attempt would be offered again at once.
        for chunk in range(0, len(activities), 20):
            objects: dict[str, Any] = {"Default": {"maximumRetries": "1", "retryDelay": RETRY_DELAY}}
            for activity in activities[chunk : chunk + 20]:
                objects[activity.name] = activity.fields
                objects.update(activity.extra_objects)
            datapipeline.run_pipeline(objects, worker_group=WORKER_GROUP, name=f"chaos-{chunk // 20}")
        run_chaos(harness, chaos_schedule(rng))
        settle(harness)
        work_seconds = time.monotonic() - started
        check(harness, work_seconds)
    finally:
        operator.stop()
        datapipeline.stop()
        (tmp_path / "ledger.json").write_text(
            json.dumps(datapipeline.ledger.to_json(include_calls=False), default=str, indent=1)
        )
        print(f"\nledger: {tmp_path / 'ledger.json'}; operator logs: {tmp_path}/operator-*.log")


def run_chaos(h: Harness, plan: list[tuple[float, str, float]]) -> None:
    deadline = time.monotonic() + WORK_TIMEOUT
    next_sidecar_kill = time.monotonic() + h.rng.uniform(5, 10)
    last_progress = ""
    while not h.work_done():
        if time.monotonic() > deadline:
            why = f"the work did not end within {WORK_TIMEOUT:.0f}s ({h.finished_fraction():.0%} of activities ended)"
            raise AssertionError(f"{why}\n{dump(h)}\n{why}")  # last as well, as check() does
        fraction = h.finished_fraction()
        while plan and plan[0][0] <= fraction:
            _, action, param = plan.pop(0)
            if action == "kill-operator":
                h.kill_operator(param)
            elif action == "restart-apiserver":
                threading.Thread(target=h.restart_apiserver, daemon=True).start()
            elif action == "refuse-jobs":
                threading.Thread(target=h.refuse_jobs, args=(param,), daemon=True).start()
            elif action == "throttle":
                threading.Thread(target=h.throttle_burst, args=(param,), daemon=True).start()
        try:
            h.cancel_running()
            h.delete_running()
            if fraction < 0.9:
                h.kill_an_uploading_sidecar()
            if fraction < 0.85 and time.monotonic() >= next_sidecar_kill:
                h.kill_a_sidecar()
                next_sidecar_kill = time.monotonic() + h.rng.uniform(4, 9)
        except Exception as exc:  # the API server may be restarting: try again next round
            print(f"[chaos] harness call failed: {exc}", flush=True)
        h.restart_exited_operator()
        progress = f"{fraction:.0%} of activities ended, {len(h.dp.ledger.attempts)} attempts polled"
        if progress != last_progress:
            print(f"[chaos +{time.time() - h.log.started:6.1f}s] {progress}", flush=True)
            last_progress = progress
        time.sleep(0.5)
    for _, action, _param in plan:
        h.log.note("skipped", f"{action}: the work ended first")


def settle(h: Harness) -> None:
    """Faults off; wait (bounded) for every PipelineTask to be final and history trimmed."""
    h.dp.clear_faults()
    h.log.note("faults", "cleared; settling")

    def settled() -> bool:
        try:
            tasks, jobs = h.tasks(), h.jobs()
        except Exception:  # the API server may be restarting: not yet
            return False
        return not _unsettled(tasks, jobs)

    # Bounded, not asserted: check() reports what did not settle.
    with contextlib.suppress(AssertionError):
        wait_for(
            settled,
            timeout=SETTLE_TIMEOUT,
            interval=1,
            tolerate=(),
            what="every PipelineTask final and history trimmed",
        )


def _unsettled(tasks: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[str]:
    problems = []
    names = {t["metadata"]["name"] for t in tasks}
    for t in tasks:
        phase = (t.get("status") or {}).get("phase")
        if phase not in FINAL_PHASES:
            problems.append(f"PipelineTask {t['metadata']['name']} stuck in phase {phase!r}")
        if "dptr.dev/attempt" in (t["metadata"].get("finalizers") or []):
            problems.append(f"PipelineTask {t['metadata']['name']} still holds its attempt finalizer")
    phases = collections.Counter((t.get("status") or {}).get("phase") for t in tasks)
    failed_like = phases["Failed"] + phases["Canceled"] + phases["Lost"]
    if phases["Succeeded"] > HISTORY["succeeded"] or failed_like > HISTORY["failed"]:
        problems.append(f"history limits {HISTORY} exceeded: {dict(phases)}")
    for job in jobs:
        owners = {o.get("name") for o in job["metadata"].get("ownerReferences") or []}
        if not owners & names:
            problems.append(f"Job {job['metadata']['name']} left behind (owners {owners} are gone)")
    if len(jobs) > HISTORY["succeeded"] + HISTORY["failed"]:
        problems.append(f"{len(jobs)} Jobs exceed the history limits {HISTORY}")
    return problems


def _s3_object(h: Harness, key: str) -> bytes | None:
    try:
        body: bytes = h.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return body
    except h.s3.exceptions.NoSuchKey:
        return None


def _in_window(moment: float, windows: list[tuple[float, float]], slack: float = 2.0) -> bool:
    return any(start - slack <= moment <= end + slack for start, end in windows)


def check(h: Harness, seconds: float) -> None:
    ledger = h.dp.ledger
    attempts = ledger.attempts
    tasks, jobs = h.tasks(), h.jobs()
    excused = excused_reassignments(h, {t["spec"]["attemptId"] for t in tasks})
    # Protocol violations (a second SetTaskStatus, a report after a cancel...) and second
    # outcomes are never excused; only an unrecorded, reassigned attempt is.
    problems: list[str] = [f"violation: {v}" for v in ledger.violations]
    problems += [
        f"attempt {r.attempt_id} ({r.object_id}) has {len(r.outcomes)} outcomes {r.outcomes}"
        for r in attempts.values()
        if len(r.outcomes) > 1
    ]
    problems += [
        f"attempt {r.attempt_id} ({r.object_id}) has no outcome (status {r.status}, reassigned {r.reassigned})"
        for r in attempts.values()
        if not r.outcomes and r.attempt_id not in excused
    ]
    problems += [
        f"operator exited on its own, not for a lost Lease: {code} {line}"
        for code, line in h.operator_exits
        if "lost the leader Lease" not in line
    ]
    problems += _unsettled(tasks, jobs)
    offending: set[str] = set()
    tally: collections.Counter[str] = collections.Counter()
    for record in attempts.values():
        if record.attempt_id in excused or not record.outcome:
            continue
        activity = h.by_name[record.object_id]
        got = (record.outcome, record.error_id)
        # What the chaos may legitimately have made of this attempt.
        if record.error_id == "dptr.JobRejected.Quota" and _in_window(record.polled_at, h.quota_windows):
            tally["refused by the quota"] += 1
            continue
        if record.attempt_id in h.mid_upload and got in (
            ("FAILED", "dptr.StagingFailed.Interrupted"),
            ("FAILED", "dptr.StagingFailed.Incomplete"),
        ):
            tally["uploads cut short"] += 1
            continue
        if activity.kind in ("deletept", "deletejob") and record.attempt_id not in h.deleted:
            # It ended before the harness got to delete it (an operator kill, a refusal).
            problems.append(f"{record.object_id}: ended {got} before the harness deleted it")
            offending.add(record.attempt_id)
            continue
        if record.outcome != activity.expected or (
            activity.error_id is not None and record.error_id != activity.error_id
        ):
            problems.append(
                f"{record.object_id} ({record.attempt_id}): outcome {record.outcome} {record.error_id}, "
                f"built to be {activity.expected} {activity.error_id or ''}"
            )
            offending.add(record.attempt_id)
            continue
        if activity.kind in ("deletept", "deletejob"):
            tally[f"deleted {h.deleted[record.attempt_id]} reported"] += 1
        if activity.kind == "logs" and record.attempt_id in h.sidecar_killed:
            # Log uploads never change an outcome (docs/task-runner-parity.md): a sidecar
            # killed as the task exits leaves a FINISHED attempt without (all of) its logs.
            tally["log uploads cut short"] += 1
            continue
        # No FINISHED without its outputs: every byte where the activity said.
        if record.outcome == "FINISHED":
            for key, want in activity.expected_objects().items():
                have = _s3_object(h, key)
                if have != want:
                    shown = "missing" if have is None else f"{len(have)} bytes, not the {len(want)} expected"
                    problems.append(f"{record.object_id} FINISHED but s3://{BUCKET}/{key} is {shown}")
                    offending.add(record.attempt_id)
                else:
                    tally["S3 objects verified"] += 1
    seen = {r.object_id for r in attempts.values()}
    problems += [f"{name} was never polled" for name in sorted(set(h.by_name) - seen)]
    if not tally["refused by the quota"]:
        problems.append("the quota refused no Job: the refusal path was not exercised")
    deleted_kinds = {h.by_name[r.object_id].kind for r in attempts.values() if r.attempt_id in h.deleted}
    if deleted_kinds != {"deletept", "deletejob"}:
        problems.append(f"deletions exercised: {deleted_kinds}, not both kinds")
    # A PipelineTask agrees with the ledger.
    expect_phase = {"FINISHED": "Succeeded", "FAILED": "Failed", "FALSE": "Failed", "CANCELED": "Canceled"}
    for t in tasks:
        record = attempts.get(t["spec"]["attemptId"])
        phase = (t.get("status") or {}).get("phase")
        if record is None or expect_phase.get(record.outcome or "") != phase:
            problems.append(f"PipelineTask {t['metadata']['name']} phase {phase} vs ledger {record}")
            offending.add(t["spec"]["attemptId"])

    print(summary(h, tasks, seconds, excused, tally), flush=True)
    if problems:
        listed = "\n  ".join(problems)
        # The problems go last as well: a CI log that keeps only the head and tail of a long
        # failure still shows what broke, not just the chaos schedule.
        raise AssertionError(
            f"exactly-once does not hold under chaos:\n  {listed}\n"
            + dump(h, offending | {v.attempt_id for v in ledger.violations if v.attempt_id})
            + f"\nexactly-once does not hold under chaos ({len(problems)} problems):\n  {listed}"
        )


def excused_reassignments(h: Harness, recorded: set[str]) -> dict[str, str]:
    """The reassignments the protocol makes unavoidable, and only those.

    Data Pipeline hands a task out in PollForTask's answer; nothing can be recorded before
    that.  If the operator dies (SIGKILL) with an answer in hand, or the API server stops
    answering just as a poll is answered, the attempt has no PipelineTask, nobody can ack
    it, and the service reassigns it after the ack window (as AWS would): the work runs
    again as a new attempt, which must get its one outcome like any other.  Excused: an
    ``ack_timeout`` reassignment of an attempt that never got a PipelineTask, polled from
    KILL_WINDOW s before an operator kill to 10 s after (a long poll outlives its dead
    caller) or within API_WINDOW s before to 4 s after the API server began to stop, at
    most one per poller (2) per fault.  Anything else is a bug.
    """
    attempts = h.dp.ledger.attempts
    budget: collections.Counter[str] = collections.Counter()
    excused: dict[str, str] = {}
    for r in h.dp.ledger.reassignments:
        record = attempts.get(r.attempt_id)
        if r.reason != "ack_timeout" or record is None or r.attempt_id in recorded or record.outcomes:
            continue
        polled = record.polled_at
        why = next(
            (
                f"operator kill at {k:.1f}"
                for k in h.log.operator_kills
                if k - KILL_WINDOW <= polled <= k + 10.0
            ),
            None,
        )
        if why is None:
            why = next(
                (f"API server stop at {t:.1f}" for t in h.api_outages if t - API_WINDOW <= polled <= t + 4.0),
                None,
            )
        if why is None or budget[why] >= 2:
            continue
        budget[why] += 1
        excused[r.attempt_id] = f"polled at {polled:.1f}, {why}; re-offered as {r.new_attempt_id}"
    return excused


def summary(
    h: Harness,
    tasks: list[dict[str, Any]],
    seconds: float,
    excused: dict[str, str],
    tally: collections.Counter[str],
) -> str:
    ledger = h.dp.ledger
    attempts = ledger.attempts.values()
    outcomes = collections.Counter(r.outcome or ("reassigned" if r.reassigned else "open") for r in attempts)
    injected = collections.Counter(
        c.operation for c in ledger.calls if c.error in ("InternalServiceError", "ThrottlingException")
    )
    unanswered = sum(1 for r in attempts if not r.outcomes and r.attempt_id not in excused)
    doubled = sum(1 for r in attempts if len(r.outcomes) > 1)
    counts = h.log.counts
    line = (
        f"chaos: seed {SEED}, {len(h.by_name)} activities, {len(ledger.attempts)} attempts in {seconds:.0f}s "
        f"(time scale {TIME_SCALE}): without an outcome {unanswered}, with two {doubled}, "
        f"violations {len(ledger.violations)}; outcomes {dict(sorted(outcomes.items()))}; "
        f"S3 objects verified {tally['S3 objects verified']}; "
        f"deleted PipelineTasks reported {tally['deleted PipelineTask reported']}, "
        f"deleted Jobs reported {tally['deleted Job reported']}; "
        f"Jobs refused by the quota {tally['refused by the quota']}; "
        f"uploads cut short {tally['uploads cut short']} of {len(h.mid_upload)} sidecars killed uploading; "
        f"operator kills {counts['operator-kill']}, sidecar kills {counts['sidecar-kill']}, "
        f"API server restarts {counts['apiserver-restart']}, user cancels {len(h.canceled)}, "
        f"faults served {sum(injected.values())} (DescribeObjects {injected['DescribeObjects']} of "
        f"{len(ledger.calls_to('DescribeObjects'))} calls); "
        f"excused reassignments {len(excused)}"
    )
    details = "; ".join(f"{k} {v}" for k, v in excused.items())
    return "\n" + line + (f"\nexcused: {details}" if details else "")


def dump(h: Harness, attempt_ids: set[str] | None = None, limit: int = 12) -> str:
    """The offending PipelineTasks and ledger records (or every open one)."""
    attempts = h.dp.ledger.attempts
    if attempt_ids is None:
        attempt_ids = {k for k, r in attempts.items() if r.outcome is None}
    try:
        tasks = {t["spec"]["attemptId"]: t for t in h.tasks()}
    except Exception as exc:
        tasks = {}
        print(f"cannot list PipelineTasks: {exc}")
    out = []
    for attempt_id in sorted(attempt_ids)[:limit]:
        task = tasks.get(attempt_id)
        out.append(
            f"--- {attempt_id}\nledger: {attempts.get(attempt_id)}\n"
            f"PipelineTask: {json.dumps({'name': task['metadata']['name'], 'status': task.get('status')}, indent=1) if task else '(none)'}"
        )
    if len(attempt_ids) > limit:
        out.append(f"... and {len(attempt_ids) - limit} more")
    out.append(f"reassignments: {h.dp.ledger.reassignments}")
    out.append(f"violations: {h.dp.ledger.violations}")
    out.append("chaos events:\n  " + "\n  ".join(f"{t - h.log.started:6.1f}s {e}" for t, e in h.log.events))
    return "\n".join(out)
