"""Chaos: exactly-once under operator kills, sidecar kills, an API server restart and a
faulty, throttling Data Pipeline (issue 8).

A few hundred time-scaled tasks with a mix of outcomes run through the real operator and
the real sidecar (pods run as host processes through the kubelet stand-in) on a test bed
of this test's own: it restarts the API server, which the shared bed must not see.

Meanwhile the harness, on a seeded schedule tied to progress (so a slow machine gets the
same faults at the same points of the run, only later):

* SIGKILLs the operator and restarts it (same identity: it retakes its own Lease at once);
* SIGKILLs sidecars of running pods (the stand-in restarts native sidecars);
* restarts the API server once;
* has the local service fail 10% of the task-runner calls (InternalServiceError) and
  throttle all of them in bursts;
* cancels some long tasks mid-run with SetStatus CANCEL, as a user would.

Then faults are removed, the work settles, and the ledger must show exactly one outcome
(or an honoured cancel) per polled attempt, no protocol violation, no reassignment, every
PipelineTask in a final phase, the outcome each activity was built to have, and no Job
beyond the TaskRunner's history limits.

Time scale 0.1: the 2-minute ack window is 12 s, the default 15-minute
reportProgressTimeout 90 s, the long poll 9 s, heartbeats every 6 s. On 2 saturated
cores a Python process can stall for a second or two and an operator restart (kopf start,
listing every PipelineTask) takes several seconds; at 0.01 (1.2 s to ack) the test would
mostly measure CPU starvation, not dptr. At 0.1 a missed deadline is a real bug.

Environment knobs: DPTR_CHAOS_SEED (default 8), DPTR_CHAOS_TASKS (default 150).
"""

from __future__ import annotations

import collections
import importlib.util
import json
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

import pytest

from dptr_common.kube import KubeClient, job_path, pipelinetask_path
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_testbed import controlplane
from dptr_testbed.installs import install_crds, install_sidecar_admission_policy, sidecar_rbac

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
N_TASKS = int(os.environ.get("DPTR_CHAOS_TASKS", "150"))
TIME_SCALE = 0.1
NAMESPACE = "chaos"
WORKER_GROUP = "wg-chaos"
#: Each running pod is two host processes, one of them a Python sidecar: 8 at once keeps
#: 2 cores busy without starving the control plane.
MAX_CONCURRENT = 8
HISTORY = {"succeeded": 10, "failed": 10}
TASK_RUNNER_OPS = ("PollForTask", "ReportTaskProgress", "SetTaskStatus", "ReportTaskRunnerHeartbeat")
ERROR_RATE = 0.1
FINAL_PHASES = {"Succeeded", "Failed", "Canceled", "Lost"}
#: Bounds (real seconds).
WORK_TIMEOUT = 540.0
SETTLE_TIMEOUT = 150.0


@dataclass(frozen=True)
class Activity:
    """One piece of work and the outcome it was built to have."""

    name: str
    kind: str  # ok | fail | false | cancel | long
    fields: dict[str, Any]
    expected: str  # FINISHED | FAILED | FALSE | CANCELED
    error_id: str | None = None


def build_activities(rng: random.Random, n: int) -> list[Activity]:
    kinds = ["ok"] * 40 + ["fail"] * 25 + ["false"] * 12 + ["cancel"] * 10 + ["long"] * 13
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
            # A precondition that does not hold: FALSE, re-checked only after 2 h (scaled:
            # 12 min), i.e. not within this test.
            fields = {
                "type": "ShellCommandPrecondition",
                "command": f"sleep {pause}; test -e /nonexistent/{name}",
                "retryDelay": "120 minutes",
                "preconditionTimeout": "240 minutes",
            }
            out.append(Activity(name, kind, fields, "FALSE"))
        elif kind == "cancel":
            # Runs until SetStatus CANCEL; the cancel is its one outcome.
            out.append(Activity(name, kind, _shell(f"echo {name} waiting; sleep 300"), "CANCELED"))
        else:
            code = rng.choice([0, 0, 0, 7])
            cmd = f"echo {name} long; sleep {round(rng.uniform(4, 10), 1)}; exit {code}"
            expected = "FINISHED" if code == 0 else "FAILED"
            out.append(Activity(name, kind, _shell(cmd), expected, f"dptr.ExitCode.{code}" if code else None))
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


def _install(bed: controlplane.Testbed, kube: KubeClient, datapipeline: LocalDataPipeline) -> None:
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
    ) -> None:
        self.bed = bed
        self.dp = datapipeline
        self.operator = operator
        self.by_name = {a.name: a for a in activities}
        self.rng = rng
        self.kube = KubeClient.from_kubeconfig(bed.kubeconfig, timeout=10)
        self.client = datapipeline.client()
        self.log = ChaosLog()
        self.canceled: set[str] = set()  # attempt ids the harness canceled
        self.operator_exits: list[tuple[int | None, str]] = []
        self.api_outages: list[float] = []  # when each API server stop began

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

    # ---- faults --------------------------------------------------------------
    def errors_on(self) -> None:
        for op in TASK_RUNNER_OPS:
            self.dp.set_fault(op, error_rate=ERROR_RATE)

    def throttle_burst(self, seconds: float) -> None:
        self.log.note("throttle-burst", f"every task-runner call throttled for {seconds:.1f}s")
        for op in TASK_RUNNER_OPS:
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

    def kill_a_sidecar(self) -> None:
        try:
            pods = [p for p in self.pods() if (p.get("status") or {}).get("phase") == "Running"]
        except Exception:
            return
        self.rng.shuffle(pods)
        for pod in pods:
            name = pod["metadata"]["name"]
            pids = sidecar_pids(name)
            if not pids:
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            self.log.note("sidecar-kill", f"SIGKILL {pids} of pod {name}")
            return

    def cancel_running(self) -> None:
        """SetStatus CANCEL on every 'cancel' activity whose pod runs (a user's cancel)."""
        attempts = self.dp.ledger.attempts
        for task in self.tasks():
            attempt_id = task["spec"]["attemptId"]
            record = attempts.get(attempt_id)
            if record is None or attempt_id in self.canceled or record.outcome:
                continue
            if self.by_name[record.object_id].kind != "cancel":
                continue
            if (task.get("status") or {}).get("phase") != "Running":
                continue
            self.client.set_status(
                pipelineId=record.pipeline_id, objectIds=[record.instance_id], status="CANCEL"
            )
            self.canceled.add(attempt_id)
            self.log.note("user-cancel", f"SetStatus CANCEL {record.object_id} ({attempt_id})")


def chaos_schedule(rng: random.Random) -> list[tuple[float, str, float]]:
    """(progress fraction, action, parameter), sorted: when a share of the work has ended,
    do the action. Progress-based, so a slow machine gets the same chaos, later."""
    plan: list[tuple[float, str, float]] = []
    for at in (0.08, 0.27, 0.48, 0.68):
        plan.append((at + rng.uniform(0, 0.05), "kill-operator", round(rng.uniform(0.5, 4.0), 1)))
    plan.append((0.38 + rng.uniform(0, 0.05), "restart-apiserver", 0.0))
    for at in (0.15, 0.55, 0.78):
        plan.append((at + rng.uniform(0, 0.04), "throttle", round(rng.uniform(2.0, 4.0), 1)))
    return sorted(plan)


# ---------------------------------------------------------------------------- the test


@pytest.mark.timeout(1200)
def test_exactly_once_under_chaos(bed: controlplane.Testbed, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    activities = build_activities(rng, N_TASKS)
    datapipeline = LocalDataPipeline(time_scale=TIME_SCALE)
    datapipeline.start()
    operator = OperatorProcess(bed, NAMESPACE, tmp_path, ["--time-scale", str(TIME_SCALE)])  # type: ignore[arg-type]
    harness: Harness | None = None
    started = time.monotonic()
    try:
        kube = KubeClient.from_kubeconfig(bed.kubeconfig, timeout=10)
        _install(bed, kube, datapipeline)
        operator.start()
        harness = Harness(bed, datapipeline, operator, activities, rng)
        harness.errors_on()
        harness.log.note("faults", f"{ERROR_RATE:.0%} InternalServiceError on {', '.join(TASK_RUNNER_OPS)}")
        # Pipelines of 20 activities; failures are not retried within the test (retryDelay 2 h, scaled
        # 12 min) but a lost attempt would be offered again at once.
        for chunk in range(0, len(activities), 20):
            objects: dict[str, Any] = {
                "Default": {"maximumRetries": "1", "retryDelay": "120 minutes"},
                **{a.name: a.fields for a in activities[chunk : chunk + 20]},
            }
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
            raise AssertionError(f"the work did not end within {WORK_TIMEOUT:.0f}s\n" + dump(h))
        fraction = h.finished_fraction()
        while plan and plan[0][0] <= fraction:
            _, action, param = plan.pop(0)
            if action == "kill-operator":
                h.kill_operator(param)
            elif action == "restart-apiserver":
                threading.Thread(target=h.restart_apiserver, daemon=True).start()
            elif action == "throttle":
                threading.Thread(target=h.throttle_burst, args=(param,), daemon=True).start()
        try:
            h.cancel_running()
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
        time.sleep(1.0)
    for _, action, _param in plan:
        h.log.note("skipped", f"{action}: the work ended first")


def settle(h: Harness) -> None:
    """Faults off; wait (bounded) for every PipelineTask to be final and history trimmed."""
    h.dp.clear_faults()
    h.log.note("faults", "cleared; settling")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            tasks, jobs = h.tasks(), h.jobs()
        except Exception:
            time.sleep(1)
            continue
        if not _unsettled(tasks, jobs):
            return
        time.sleep(1)
    # check() reports what did not settle.


def _unsettled(tasks: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[str]:
    problems = []
    names = {t["metadata"]["name"] for t in tasks}
    for t in tasks:
        phase = (t.get("status") or {}).get("phase")
        if phase not in FINAL_PHASES:
            problems.append(f"PipelineTask {t['metadata']['name']} stuck in phase {phase!r}")
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


def check(h: Harness, seconds: float) -> None:
    ledger = h.dp.ledger
    attempts = ledger.attempts
    tasks, jobs = h.tasks(), h.jobs()
    excused = excused_reassignments(h, {t["spec"]["attemptId"] for t in tasks})
    problems: list[str] = [p for p in ledger.problems() if not any(a in p for a in excused)]
    problems += [f"reassignment: {r}" for r in ledger.reassignments if r.attempt_id not in excused]
    problems += [
        f"operator exited on its own, not for a lost Lease: {code} {line}"
        for code, line in h.operator_exits
        if "lost the leader Lease" not in line
    ]
    problems += _unsettled(tasks, jobs)
    # Each activity ended the way it was built to end.
    offending: set[str] = set()
    for record in attempts.values():
        if record.attempt_id in excused:
            continue
        activity = h.by_name[record.object_id]
        if record.outcome != activity.expected or (
            activity.error_id is not None and record.error_id != activity.error_id
        ):
            problems.append(
                f"{record.object_id} ({record.attempt_id}): outcome {record.outcome} {record.error_id}, "
                f"built to be {activity.expected} {activity.error_id or ''}"
            )
            offending.add(record.attempt_id)
    seen = {r.object_id for r in attempts.values()}
    problems += [f"{name} was never polled" for name in sorted(set(h.by_name) - seen)]
    # A PipelineTask agrees with the ledger.
    expect_phase = {"FINISHED": "Succeeded", "FAILED": "Failed", "FALSE": "Failed", "CANCELED": "Canceled"}
    for t in tasks:
        record = attempts.get(t["spec"]["attemptId"])
        phase = (t.get("status") or {}).get("phase")
        if record is None or expect_phase.get(record.outcome or "") != phase:
            problems.append(f"PipelineTask {t['metadata']['name']} phase {phase} vs ledger {record}")
            offending.add(t["spec"]["attemptId"])
    for t in tasks:
        if (t.get("status") or {}).get("phase") not in FINAL_PHASES:
            offending.add(t["spec"]["attemptId"])

    print(summary(h, tasks, jobs, seconds, excused), flush=True)
    if problems:
        raise AssertionError(
            "exactly-once does not hold under chaos:\n  "
            + "\n  ".join(problems)
            + "\n"
            + dump(h, offending | {v.attempt_id for v in ledger.violations if v.attempt_id})
        )


def excused_reassignments(h: Harness, recorded: set[str]) -> dict[str, str]:
    """The reassignments the protocol makes unavoidable, and only those.

    Data Pipeline hands a task out in PollForTask's answer; nothing can be recorded before
    that.  If the operator dies (SIGKILL) with an answer in hand, or the API server stops
    answering just as a poll is answered, the attempt has no PipelineTask, nobody can ack
    it, and the service reassigns it after the ack window (as AWS would): the work runs
    again as a new attempt, which must get its one outcome like any other.  Excused: an
    ``ack_timeout`` reassignment of an attempt that never got a PipelineTask, polled from
    3 s before an operator kill to 10 s after (a long poll outlives its dead caller) or within 2 s before to 4 s after the API server began
    to stop, at most one per poller (2) per fault.  Anything else is a bug (e.g. polling
    on while the API server is known to be down).
    """
    attempts = h.dp.ledger.attempts
    budget: collections.Counter[str] = collections.Counter()
    excused: dict[str, str] = {}
    for r in h.dp.ledger.reassignments:
        record = attempts.get(r.attempt_id)
        if r.reason != "ack_timeout" or record is None or r.attempt_id in recorded:
            continue
        polled = record.polled_at
        why = next(
            (f"operator kill at {k:.1f}" for k in h.log.operator_kills if k - 3.0 <= polled <= k + 10.0), None
        )
        if why is None:
            why = next(
                (f"API server stop at {t:.1f}" for t in h.api_outages if t - 2.0 <= polled <= t + 4.0), None
            )
        if why is None or budget[why] >= 2:
            continue
        budget[why] += 1
        excused[r.attempt_id] = f"polled at {polled:.1f}, {why}; re-offered as {r.new_attempt_id}"
    return excused


def summary(
    h: Harness,
    tasks: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    seconds: float,
    excused: dict[str, str],
) -> str:
    ledger = h.dp.ledger
    attempts = ledger.attempts.values()
    outcomes = collections.Counter(r.outcome or ("reassigned" if r.reassigned else "open") for r in attempts)
    kinds = collections.Counter(a.kind for a in h.by_name.values())
    injected = collections.Counter(
        f"{c.operation}:{c.error}"
        for c in ledger.calls
        if c.error in ("InternalServiceError", "ThrottlingException")
    )
    calls = collections.Counter(c.operation for c in ledger.calls if c.operation in TASK_RUNNER_OPS)
    reporters = collections.Counter(
        ((t.get("status") or {}).get("report") or {}).get("reportedBy", "-").split("/")[0] for t in tasks
    )
    lines = [
        "",
        f"===== chaos summary (seed {SEED}, {N_TASKS} activities, time scale {TIME_SCALE}, "
        f"{seconds:.0f}s) =====",
        f"activities by kind: {dict(sorted(kinds.items()))}",
        f"attempts polled: {len(ledger.attempts)}; outcomes: {dict(sorted(outcomes.items()))}",
        f"violations: {len(ledger.violations)}; reassignments: {len(ledger.reassignments)} "
        f"(excused as unavoidable: {len(excused)}{': ' if excused else ''}"
        f"{'; '.join(f'{k} {v}' for k, v in excused.items())}); user cancels: {len(h.canceled)}",
        f"kills and restarts: {dict(sorted(h.log.counts.items()))}",
        f"task-runner calls: {dict(sorted(calls.items()))}",
        f"faults served: {dict(sorted(injected.items()))}",
        f"left at the end: {len(tasks)} PipelineTasks "
        f"{dict(collections.Counter((t.get('status') or {}).get('phase') for t in tasks))}, {len(jobs)} Jobs; "
        f"kept tasks reported by: {dict(reporters)}",
    ]
    return "\n".join(lines)


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
