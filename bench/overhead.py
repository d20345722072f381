"""What dptr costs per task on a real node, side by side with a plain Job.

One real node (``dptr-testbed up --real-node``: kubelet, containerd, CNI, kube-proxy;
started here, or attached with ``--testbed-dir``), the chart installed from the local
images (the operator as a pod, in-cluster config), the local Data Pipeline service on
the node's address at time scale 1 with Data Pipeline's own quotas. Then:

1. **one at a time**: N tasks running ``true`` and N running ``sleep 5`` through dptr,
   each paired with a plain Job (same image, command, pod and container security, no
   sidecar, no token) created directly by this script; the pairs alternate which goes
   first, and the next starts only when everything the last one caused is over;
2. **burst**: B dptr tasks (one pipeline of B activities) and B plain Jobs at once;
3. **limit**: B dptr tasks at once with the TaskRunner's maxConcurrentTasks at B/2.

Clocks: everything runs on this machine, so all times are wall-clock times here.

* ready: the attempt's ready time in the service's ledger; a plain Job's is just before
  its create request is sent;
* container started / exited: containerd's own ``/tasks/start`` event time and the
  ``exited_at`` of its ``/tasks/exit`` (``ctr events``; the API's timestamps have 1 s
  resolution);
* outcome: SetTaskStatus received by the service (ledger); for a plain Job, its
  Complete condition reaching this script's watch;
* sidecar start -> first heartbeat: the sidecar's ``/tasks/start`` -> the first
  ReportTaskProgress for the task the service received after it;
* API requests: ``apiserver_request_total`` read before and after each task of phase 1,
  less the idle rate measured beforehand (leases, node status, the operator's own idle
  work), averaged per task;
* sidecar memory and CPU: its container's cgroup read every 100 ms (the cgroup is gone
  once it exits, so the last reading is up to 100 ms early) and its own ``getrusage``,
  which it logs when it exits (peak RSS and CPU seconds for the whole process).

    .venv/bin/python bench/overhead.py [--tasks 50] [--burst 10] [--testbed-dir DIR]

Needs root and the real node's prerequisites (``dptr-testbed node-prereqs --install``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import job_label_for, load, machine, percentile, wait_for

from dptr_common import naming
from dptr_common.kube import ApiError, KubeClient
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, LocalDataPipeline
from dptr_testbed import binaries, images
from dptr_testbed.controlplane import RunningTestbed, Testbed

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "dptr"
WORKER_GROUP = "wg-overhead"
RELEASE = "dptr"
SIDECAR = "dptr-sidecar"
TASK = "task"
#: After a task's outcome, what it caused may still be landing (the operator's status
#: write and Events, the Job's TTL, kubelet's last pod status): wait this long before
#: reading the API server's counters.
SETTLE = 2.0
FINAL_PHASES = ("Succeeded", "Failed", "Canceled")


# ---------------------------------------------------------------- the bed


@dataclass(frozen=True)
class Node:
    bed: Any
    name: str
    address: str
    containerd_socket: Path

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        helm = binaries.Binaries(binaries.bin_dir()).helm
        env = dict(os.environ, KUBECONFIG=str(self.bed.kubeconfig))
        return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, check=False)


@contextlib.contextmanager
def real_node(testbed_dir: Path | None) -> Iterator[Node]:
    if testbed_dir is not None:
        info = json.loads((testbed_dir / "testbed.json").read_text())["realNode"]
        # Measure the working tree, not whatever the bed loaded when it started.
        for tag, archive in images.ensure_all().archives.items():
            if tag in (images.OPERATOR_IMAGE, images.SIDECAR_IMAGE):
                subprocess.run(
                    [
                        "ctr",
                        f"--address={info['containerdSocket']}",
                        "--namespace=k8s.io",
                        "images",
                        "import",
                        str(archive),
                    ],
                    check=True,
                    capture_output=True,
                )
        yield Node(
            RunningTestbed.attach(testbed_dir), info["name"], info["address"], Path(info["containerdSocket"])
        )
        return
    state = Path(tempfile.mkdtemp(prefix="dptr-rn-"))  # short: containerd's socket lives under it
    bed = Testbed(state, nodes=("node-1",), real_node=True)
    print(f"starting a real node in {state} ...", flush=True)
    started = time.monotonic()
    bed.start(timeout=600)
    assert bed.node_handle is not None
    print(f"  up in {time.monotonic() - started:.0f}s (images {bed.images_seconds:.0f}s)", flush=True)
    try:
        yield Node(bed, bed.node_handle.name, bed.node_handle.address, bed.node_handle.containerd_socket)
    finally:
        bed.stop()
        shutil.rmtree(state, ignore_errors=True)


def namespace(node: Node, prefix: str) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    node.bed.kubectl("create", "namespace", name)
    node.bed.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    return name


def install(
    node: Node, svc: LocalDataPipeline, release_ns: str, data_ns: str, max_tasks: int, work: Path
) -> None:
    node.bed.kubectl(
        "create", "secret", "generic", "-n", data_ns, "dp-credentials",
        f"--from-literal=AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY_ID}",
        "--from-literal=AWS_SECRET_ACCESS_KEY=overhead-bench",
    )  # fmt: skip

    def split(ref: str) -> tuple[str, str]:
        repository, _, tag = ref.rpartition(":")
        return repository, tag

    (op_repo, op_tag), (sc_repo, sc_tag) = split(images.OPERATOR_IMAGE), split(images.SIDECAR_IMAGE)
    values = {
        "operator": {
            "image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "Never"},
            "watch": {"namespaces": [data_ns]},
            "credentialsSecretNames": ["dp-credentials"],
        },
        "sidecar": {"image": {"repository": sc_repo, "tag": sc_tag}},
        "tenancy": {"defaultEndpointUrl": svc.endpoint_url},
        "taskRunners": [
            {
                "name": "overhead",
                "namespace": data_ns,
                "spec": {
                    "workerGroup": WORKER_GROUP,
                    "region": "us-east-1",
                    "credentials": {"mode": "Secret", "secretRef": {"name": "dp-credentials"}},
                    "maxConcurrentTasks": max_tasks,
                    "jobTemplate": {"image": images.SIDECAR_IMAGE, "imagePullPolicy": "Never"},
                },
            }
        ],
    }
    values_file = work / "values.json"
    values_file.write_text(json.dumps(values))
    proc = node.helm("install", RELEASE, str(CHART), "-n", release_ns, "-f", str(values_file))
    if proc.returncode != 0:
        raise RuntimeError(f"helm install failed:\n{proc.stdout}\n{proc.stderr}")
    out = node.bed.kubectl("rollout", "status", "-n", release_ns, f"deploy/{RELEASE}", "--timeout=300s")
    print(f"  operator: {out.strip()}", flush=True)
    wait_for(lambda: svc.ledger.runners, timeout=120, what="the operator's first runner heartbeat")


# ---------------------------------------------------------------- what happens, as it happens


class Watch:
    """A list + watch of ``path`` in a thread; ``handle(obj, arrived)`` for every object seen."""

    def __init__(self, kube: KubeClient, path: str, handle: Callable[[dict[str, Any], float], None]) -> None:
        self.kube, self.path, self.handle = kube, path, handle
        self._ready = threading.Event()
        threading.Thread(target=self._run, name=f"watch {path}", daemon=True).start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the watch on {path} did not start")

    def _run(self) -> None:
        rv = None
        while True:
            try:
                if rv is None:
                    listing = self.kube.get(self.path)
                    for obj in listing.get("items") or []:
                        self.handle(obj, time.time())
                    rv = listing["metadata"]["resourceVersion"]
                query = {
                    "watch": "1",
                    "resourceVersion": rv,
                    "timeoutSeconds": "3600",
                    "allowWatchBookmarks": "true",
                }
                conn, response = self.kube.stream(self.path, query, timeout=3700)
                self._ready.set()
                try:
                    while line := response.readline():
                        arrived = time.time()
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            rv = None  # expired: list again
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event.get("type") != "BOOKMARK":
                            self.handle(obj, arrived)
                finally:
                    conn.close()
            except (ApiError, OSError, ValueError) as exc:
                print(f"  (watch {self.path}: {exc!r}; again)", file=sys.stderr, flush=True)
                time.sleep(0.5)


@dataclass
class Container:
    pid: int
    started: float
    exited: float | None = None
    #: cgroup readings (v1 or v2): the largest RSS and usage seen, the last CPU time.
    rss_max: int = 0
    usage_max: int = 0
    cpu_seconds: float = 0.0
    cgroups: dict[str, Path] = field(default_factory=dict)


_EVENT = re.compile(r"^(\S+ \S+) ([+-]\d{4}) \S+ (\S+) (/\S+) (\{.*\})\s*$")


def _parse_time(text: str) -> float:
    """containerd's times: ``2026-12-01 15:40:00.123456789`` (+ offset) or RFC 3339."""
    text = text.strip().replace("T", " ").rstrip("Z")
    date, _, frac = text.partition(".")
    digits = re.match(r"\d*", frac)
    fraction = float("0." + digits.group(0)) if digits and digits.group(0) else 0.0
    base = dt.datetime.strptime(date, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    return base.timestamp() + fraction


class Containerd:
    """``ctr events`` and the cgroups of every container started meanwhile."""

    def __init__(self, socket: Path) -> None:
        self.containers: dict[str, Container] = {}
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["ctr", f"--address={socket}", "events"], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        threading.Thread(target=self._read, name="ctr events", daemon=True).start()
        threading.Thread(target=self._sample, name="cgroups", daemon=True).start()

    def close(self) -> None:
        self.proc.terminate()

    def get(self, container_id: str) -> Container | None:
        with self._lock:
            return self.containers.get(container_id)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _EVENT.match(line)
            if not m or m.group(3) != "k8s.io":
                continue
            stamp, offset, topic, payload = m.group(1), m.group(2), m.group(4), json.loads(m.group(5))
            if offset != "+0000":
                raise RuntimeError(f"ctr events prints local time ({offset}); run with TZ=UTC")
            if topic == "/tasks/start":
                cid, pid = payload["container_id"], int(payload["pid"])
                container = Container(pid=pid, started=_parse_time(stamp), cgroups=_cgroups(pid))
                with self._lock:
                    self.containers[cid] = container
            elif topic == "/tasks/exit" and payload.get("id") == payload.get("container_id"):
                with self._lock:
                    found = self.containers.get(payload["container_id"])
                if found is not None:
                    exited = payload.get("exited_at")
                    if isinstance(exited, dict):  # a protobuf Timestamp, as Go's json prints it
                        found.exited = int(exited.get("seconds", 0)) + int(exited.get("nanos", 0)) / 1e9
                    elif isinstance(exited, str):
                        found.exited = _parse_time(exited)
                    else:
                        found.exited = _parse_time(stamp)

    def _sample(self) -> None:
        while True:
            with self._lock:
                live = [c for c in self.containers.values() if c.cgroups]
            for c in live:
                try:
                    _read_cgroup(c)
                except (FileNotFoundError, ProcessLookupError, OSError):
                    c.cgroups = {}  # gone with its container
            time.sleep(0.1)


def _cgroups(pid: int) -> dict[str, Path]:
    found: dict[str, Path] = {}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for ctl in controllers.split(","):
            if ctl in ("memory", "cpuacct"):
                # v1: mounted at /sys/fs/cgroup/<its controllers>, e.g. cpuacct or cpu,cpuacct.
                found[ctl] = Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
        if controllers == "" and "memory" not in found:
            root = (
                Path("/sys/fs/cgroup/unified")
                if Path("/sys/fs/cgroup/unified").is_dir()
                else Path("/sys/fs/cgroup")
            )
            if (root / path.lstrip("/") / "memory.peak").exists():
                found["v2"] = root / path.lstrip("/")
    return found


def _read_cgroup(c: Container) -> None:
    if "memory" in c.cgroups:
        mem = c.cgroups["memory"]
        stat = dict(line.split() for line in (mem / "memory.stat").read_text().splitlines())
        c.rss_max = max(c.rss_max, int(stat.get("total_rss", stat.get("rss", 0))))
        c.usage_max = max(c.usage_max, int((mem / "memory.max_usage_in_bytes").read_text()))
        if "cpuacct" in c.cgroups:
            c.cpu_seconds = int((c.cgroups["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
    elif "v2" in c.cgroups:
        root = c.cgroups["v2"]
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines())
        c.rss_max = max(c.rss_max, int(stat.get("anon", 0)))
        c.usage_max = max(c.usage_max, int((root / "memory.peak").read_text()))
        cpu = dict(line.split() for line in (root / "cpu.stat").read_text().splitlines())
        c.cpu_seconds = int(cpu["usage_usec"]) / 1e6


class Cluster:
    """What the watches saw: pods, PipelineTasks, plain Jobs' completions."""

    def __init__(self, kube: KubeClient, data_ns: str, plain_ns: str) -> None:
        self.kube = kube
        self.pods: dict[str, dict[str, Any]] = {}  # by pod name (the namespaces' names differ)
        self.tasks: dict[str, dict[str, Any]] = {}  # PipelineTasks by name
        self.complete: dict[str, float] = {}  # plain Job name -> Complete seen
        #: Every version of every PipelineTask the watch delivered: who wrote what, when.
        self.task_versions: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        Watch(kube, f"/api/v1/namespaces/{data_ns}/pods", self._pod)
        Watch(kube, f"/api/v1/namespaces/{plain_ns}/pods", self._pod)
        Watch(kube, f"/apis/dptr.dev/v1alpha1/namespaces/{data_ns}/pipelinetasks", self._task)
        Watch(kube, f"/apis/batch/v1/namespaces/{plain_ns}/jobs", self._job)

    def _pod(self, obj: dict[str, Any], _arrived: float) -> None:
        with self._lock:
            self.pods[obj["metadata"]["name"]] = obj

    def _task(self, obj: dict[str, Any], arrived: float) -> None:
        with self._lock:
            name = obj["metadata"]["name"]
            self.tasks[name] = obj
            self.task_versions.setdefault(name, []).append((arrived, obj))

    def _job(self, obj: dict[str, Any], arrived: float) -> None:
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions):
            with self._lock:
                self.complete.setdefault(obj["metadata"]["name"], arrived)

    def pod_with(self, label: str, value: str) -> dict[str, Any] | None:
        with self._lock:
            for pod in self.pods.values():
                if (pod["metadata"].get("labels") or {}).get(label) == value:
                    return pod
        return None


def container_id(pod: dict[str, Any], name: str) -> str | None:
    status = pod.get("status") or {}
    for cs in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        if cs.get("name") == name and cs.get("containerID"):
            return str(cs["containerID"]).removeprefix("containerd://")
    return None


def pod_done(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


# ---------------------------------------------------------------- API requests


def request_counts(kube: KubeClient) -> Counter[str]:
    """``apiserver_request_total`` summed over codes: ``VERB resource[/subresource]``, for
    requests scoped to a namespace or an object (a WATCH counts when it ends)."""
    text = kube.request("GET", "/metrics", accept="text/plain", raw=True).decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        resource = labels.get("resource", "")
        if not resource or labels.get("scope") == "cluster":
            # /metrics, /healthz, discovery; and cluster-wide requests (controllers'
            # informers re-listing and re-watching, nodes, leases): none is a task's.
            continue
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        counts[f"{labels.get('verb', '?')} {resource}"] += int(float(value))
    return counts


@dataclass
class Background:
    rates: dict[str, float]

    @classmethod
    def measure(cls, kube: KubeClient, seconds: float) -> Background:
        before, t0 = request_counts(kube), time.monotonic()
        time.sleep(seconds)
        after, t1 = request_counts(kube), time.monotonic()
        return cls({k: (after[k] - before[k]) / (t1 - t0) for k in after if after[k] != before[k]})

    def less(self, delta: Counter[str], seconds: float) -> dict[str, float]:
        keys = set(delta) | set(self.rates)
        return {k: delta.get(k, 0) - self.rates.get(k, 0.0) * seconds for k in keys}


# ---------------------------------------------------------------- one task, either side


@dataclass
class Sample:
    side: str  # "dptr" or "plain"
    ready: float
    started: float | None = None
    exited: float | None = None
    outcome: float | None = None
    sidecar_started: float | None = None
    first_beat: float | None = None
    progress_calls: int | None = None
    sidecar: Container | None = None
    sidecar_log: str = ""
    requests: dict[str, float] | None = None
    key: str = ""

    @property
    def start_latency(self) -> float | None:
        return None if self.started is None else self.started - self.ready

    @property
    def outcome_latency(self) -> float | None:
        return None if self.exited is None or self.outcome is None else self.outcome - self.exited

    @property
    def whole(self) -> float | None:
        return None if self.outcome is None else self.outcome - self.ready


class Bench:
    def __init__(self, node: Node, svc: LocalDataPipeline, data_ns: str, plain_ns: str) -> None:
        self.node, self.svc, self.data_ns, self.plain_ns = node, svc, data_ns, plain_ns
        self.kube = KubeClient.from_kubeconfig(node.bed.kubeconfig)
        self.metrics_kube = KubeClient.from_kubeconfig(node.bed.kubeconfig)
        self.cluster = Cluster(KubeClient.from_kubeconfig(node.bed.kubeconfig), data_ns, plain_ns)
        self.ctr = Containerd(node.containerd_socket)
        self.plain_pod_spec: dict[str, Any] | None = None
        self.background: Background | None = None

    # -- submitting

    def submit_dptr(self, commands: Sequence[str]) -> list[str]:
        """Activate one pipeline with an activity per command; the activities' ids."""
        objects = {
            f"A{i}": {"type": "ShellCommandActivity", "command": cmd, "maximumRetries": "0"}
            for i, cmd in enumerate(commands)
        }
        pipeline_id = self.svc.run_pipeline(objects, worker_group=WORKER_GROUP)
        return [f"{pipeline_id}/A{i}" for i in range(len(commands))]

    def submit_plain(self, command: str) -> tuple[str, float]:
        assert self.plain_pod_spec is not None
        spec = json.loads(json.dumps(self.plain_pod_spec))
        spec["containers"][0]["command"] = self._command_for(command)
        name = f"plain-{os.urandom(4).hex()}"
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.plain_ns},
            "spec": {
                "backoffLimit": 0,
                "template": {"metadata": {"labels": {"bench": "plain"}}, "spec": spec},
            },
        }
        ready = time.time()
        self.kube.create(f"/apis/batch/v1/namespaces/{self.plain_ns}/jobs", job)
        return name, ready

    def _command_for(self, command: str) -> list[str]:
        # The task container's own command line, with the task's command in it.
        assert self.plain_pod_spec is not None
        template: list[str] = self.plain_pod_spec["containers"][0]["command"]
        return [command if part == "__COMMAND__" else part for part in template]

    def learn_plain_spec(self, pod: dict[str, Any], command: str) -> None:
        """A plain Job's pod: the dptr task container as rendered (image, command, security),
        without the sidecar, the token, the task's environment or dptr's labels."""
        spec = pod["spec"]
        (task,) = [c for c in spec["containers"] if c["name"] == TASK]
        argv = [("__COMMAND__" if part == command else part) for part in task["command"]]
        if "__COMMAND__" not in argv:
            raise RuntimeError(f"the task container's command does not hold {command!r}: {task['command']}")
        container = {k: task[k] for k in ("name", "image", "securityContext", "imagePullPolicy") if k in task}
        container["command"] = argv
        self.plain_pod_spec = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": spec.get("terminationGracePeriodSeconds", 30),
            "securityContext": spec.get("securityContext") or {},
            "containers": [container],
        }

    # -- reading what happened

    def attempt(self, key: str) -> Any:
        """The ledger's attempt of the activity ``pipeline/objectId`` (one attempt each here)."""
        pipeline_id, object_id = key.split("/")
        return next(
            (
                a
                for a in self.svc.ledger.attempts.values()
                if a.pipeline_id == pipeline_id and a.object_id == object_id
            ),
            None,
        )

    def dptr_sample(self, key: str) -> Sample | None:
        """The sample of the activity ``pipeline/objectId`` once everything of it is over."""
        pipeline_id, _ = key.split("/")
        record = self.attempt(key)
        if record is None or not record.outcome:
            return None
        task_name = naming.pipeline_task_name(pipeline_id, record.attempt_id)
        pt = self.cluster.tasks.get(task_name)
        status = (pt or {}).get("status") or {}
        if status.get("phase") not in FINAL_PHASES or not (status.get("report") or {}).get("reportedBy"):
            return None
        pod = self.cluster.pod_with(naming.LABEL_PIPELINE_TASK, job_label_for(pipeline_id, record.attempt_id))
        if pod is None or not pod_done(pod):
            return None
        task_c = self._container(pod, TASK)
        side_c = self._container(pod, SIDECAR)
        if task_c is None or task_c.exited is None or side_c is None or side_c.exited is None:
            return None
        reports = [c.at for c in self.svc.ledger.calls_to("SetTaskStatus") if c.task_id == record.task_id]
        beats = sorted(
            c.at
            for c in self.svc.ledger.calls_to("ReportTaskProgress")
            if c.task_id == record.task_id and c.at >= side_c.started
        )
        assert record.ready_at is not None
        return Sample(
            "dptr",
            record.ready_at,
            started=task_c.started,
            exited=task_c.exited,
            outcome=min(reports) if reports else None,
            sidecar_started=side_c.started,
            first_beat=beats[0] if beats else None,
            progress_calls=record.progress_calls,
            sidecar=side_c,
        )

    def plain_sample(self, name: str, ready: float) -> Sample | None:
        completed = self.cluster.complete.get(name)
        pod = self.cluster.pod_with("job-name", name)
        if completed is None or pod is None or not pod_done(pod):
            return None
        c = self._container(pod, TASK)
        if c is None or c.exited is None:
            return None
        return Sample("plain", ready, started=c.started, exited=c.exited, outcome=completed)

    def _container(self, pod: dict[str, Any], name: str) -> Container | None:
        cid = container_id(pod, name)
        return self.ctr.get(cid) if cid else None

    def sidecar_log(self, sample: Sample, key: str) -> str:
        pipeline_id, _ = key.split("/")
        record = self.attempt(key)
        assert record is not None
        pod = self.cluster.pod_with(naming.LABEL_PIPELINE_TASK, job_label_for(pipeline_id, record.attempt_id))
        assert pod is not None
        return self.kube.read_log(self.data_ns, pod["metadata"]["name"], SIDECAR).decode(errors="replace")

    def report_writes(self, key: str) -> None:
        """The writes to one task's PipelineTask, as its watch saw them: when (after the
        task was ready), by whom (the newest managedFields entry) and what changed."""
        pipeline_id, _ = key.split("/")
        record = self.attempt(key)
        assert record is not None
        assert record.ready_at is not None
        name = naming.pipeline_task_name(pipeline_id, record.attempt_id)
        versions = self.cluster.task_versions.get(name, [])
        print(f"    writes to one PipelineTask ({len(versions)} versions seen by a watch):")
        previous: dict[str, Any] = {}
        for arrived, obj in versions:
            fields = obj["metadata"].get("managedFields") or []
            newest: dict[str, Any] = max(fields, key=lambda f: f.get("time") or "", default={})
            changed = _changed(previous, obj)
            print(
                f"      +{arrived - record.ready_at:6.2f}s  {newest.get('manager', '?')} "
                f"{newest.get('operation', '?')} {newest.get('subresource', '')}: {', '.join(changed) or '-'}"
            )
            previous = obj

    def report_events(self, tasks: int, since: float) -> None:
        """Events written since ``since``, per task, by who wrote them and why."""
        for side, ns in (("dptr", self.data_ns), ("plain", self.plain_ns)):
            counts: Counter[str] = Counter()
            for event in self.kube.list(f"/api/v1/namespaces/{ns}/events"):
                stamp = event.get("lastTimestamp") or event.get("eventTime") or ""
                if stamp and _parse_time(stamp[:19]) < since - 1:
                    continue
                source = (
                    event.get("reportingComponent") or (event.get("source") or {}).get("component") or "?"
                )
                kind = (event.get("involvedObject") or {}).get("kind", "?")
                counts[f"{source}: {kind} {event.get('reason')}"] += int(event.get("count") or 1)
            total = sum(counts.values()) / tasks
            print(f"    Events per {side} task, by writer and reason ({total:.1f} in all):")
            for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"      {n / tasks:6.2f}  {key}")

    # -- running

    def one(self, side: str, command: str, count_requests: bool) -> Sample:
        before = request_counts(self.metrics_kube) if count_requests else None
        t0 = time.monotonic()
        if side == "dptr":
            (key,) = self.submit_dptr([command])
            sample = wait_for(
                lambda: self.dptr_sample(key), timeout=300, interval=0.05, what=f"dptr task {command!r}"
            )
        else:
            name, ready = self.submit_plain(command)
            sample = wait_for(
                lambda: self.plain_sample(name, ready),
                timeout=300,
                interval=0.05,
                what=f"plain Job {command!r}",
            )
        time.sleep(SETTLE)
        if before is not None and self.background is not None:
            after = request_counts(self.metrics_kube)
            sample.requests = self.background.less(after - before, time.monotonic() - t0)
        if side == "dptr":
            sample.sidecar_log = self.sidecar_log(sample, key)
            sample.key = key
        return sample

    def burst(self, command: str, count: int, plain: bool) -> list[Sample]:
        keys = self.submit_dptr([command] * count)
        plain_jobs = [self.submit_plain(command) for _ in range(count)] if plain else []
        samples: dict[str, Sample] = {}

        def all_done() -> bool:
            for key in keys:
                if key not in samples and (s := self.dptr_sample(key)) is not None:
                    samples[key] = s
            for name, ready in plain_jobs:
                if name not in samples and (s := self.plain_sample(name, ready)) is not None:
                    samples[name] = s
            return len(samples) == len(keys) + len(plain_jobs)

        wait_for(all_done, timeout=600, interval=0.2, what=f"a burst of {count}")
        time.sleep(SETTLE)
        return list(samples.values())


# ---------------------------------------------------------------- reporting


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Which spec/status members differ (one level into status's objects)."""
    out = []
    if not old:
        return ["created"]
    if old.get("spec") != new.get("spec"):
        out.append("spec")
    if (old.get("metadata") or {}).get("finalizers") != (new.get("metadata") or {}).get("finalizers"):
        out.append("finalizers")
    before, after = old.get("status") or {}, new.get("status") or {}
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if isinstance(after.get(key), dict) and isinstance(before.get(key), dict):
            inner = sorted(
                k for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k)
            )
            out.append(f"{key}.{{{','.join(inner)}}}")
        elif key in ("phase", "podName"):
            out.append(f"{key}={after.get(key)}")
        else:
            out.append(key)
    return out


def stats(values: Sequence[float | None]) -> tuple[float, float, float]:
    got = [v for v in values if v is not None]
    return percentile(got, 50), percentile(got, 90), (max(got) if got else math.nan)


def fmt(values: Sequence[float | None]) -> str:
    p50, p90, top = stats(values)
    return f"p50 {p50:.2f}s p90 {p90:.2f}s max {top:.2f}s"


def compare(title: str, dptr: Sequence[float | None], plain: Sequence[float | None]) -> float:
    """Print one measure for both sides; return dptr's p50 minus plain's."""
    d50, p50 = stats(dptr)[0], stats(plain)[0]
    ratio = d50 / p50 if p50 else math.nan
    print(
        f"    {title}: dptr {fmt(dptr)} | plain {fmt(plain)} | dptr/plain p50 {ratio:.2f} ({d50 - p50:+.2f}s)"
    )
    return d50 - p50


_USAGE = re.compile(r"peak RSS ([\d.]+) MiB, CPU ([\d.]+)s user \+ ([\d.]+)s system")


def report_phase(title: str, samples: list[Sample]) -> dict[str, float]:
    dptr = [s for s in samples if s.side == "dptr"]
    plain = [s for s in samples if s.side == "plain"]
    print(f"  {title} ({len(dptr)} dptr, {len(plain)} plain) [{load()}]", flush=True)
    figures: dict[str, float] = {}
    if plain:
        figures["start_gap"] = compare(
            "ready|create -> task container started",
            [s.start_latency for s in dptr],
            [s.start_latency for s in plain],
        )
        compare(
            "task container exit -> outcome (SetTaskStatus | Job Complete)",
            [s.outcome_latency for s in dptr],
            [s.outcome_latency for s in plain],
        )
        compare("whole: ready|create -> outcome", [s.whole for s in dptr], [s.whole for s in plain])
    else:
        print(f"    ready -> task container started: dptr {fmt([s.start_latency for s in dptr])}")
        print(f"    task container exit -> SetTaskStatus: dptr {fmt([s.outcome_latency for s in dptr])}")
        print(f"    whole: ready -> outcome: dptr {fmt([s.whole for s in dptr])}")
    figures["outcome_p50"] = stats([s.outcome_latency for s in dptr])[0]
    first = [
        None if s.first_beat is None or s.sidecar_started is None else s.first_beat - s.sidecar_started
        for s in dptr
    ]
    figures["first_beat_p50"] = stats(first)[0]
    print(f"    sidecar start -> first heartbeat: {fmt(first)}")
    print(f"    ReportTaskProgress per task: {fmt_counts([s.progress_calls for s in dptr])}")
    usages = [m for s in dptr if (m := _USAGE.search(s.sidecar_log))]
    if usages:
        rss = [float(m.group(1)) for m in usages]
        cpu = [float(m.group(2)) + float(m.group(3)) for m in usages]
        figures["rss_max_mib"] = max(rss)
        print(
            f"    sidecar peak RSS (its getrusage): p50 {percentile(rss, 50):.1f} MiB, max {max(rss):.1f} MiB "
            f"({max(rss) * 1.048576:.1f} MB); CPU p50 {percentile(cpu, 50):.2f}s, max {max(cpu):.2f}s ({len(usages)} sidecars)"
        )
    cg = [s.sidecar for s in dptr if s.sidecar is not None and s.sidecar.rss_max]
    if cg:
        print(
            "    sidecar cgroup, sampled every 100 ms: RSS max p50 "
            f"{percentile([c.rss_max / 2**20 for c in cg], 50):.1f} MiB, max {max(c.rss_max for c in cg) / 2**20:.1f} MiB; "
            f"usage incl. page cache max {max(c.usage_max for c in cg) / 2**20:.1f} MiB; "
            f"CPU p50 {percentile([c.cpu_seconds for c in cg], 50):.2f}s ({len(cg)} sidecars)"
        )
    return figures


def fmt_counts(values: Sequence[int | None]) -> str:
    got = [v for v in values if v is not None]
    return f"mean {sum(got) / len(got):.2f}, max {max(got)}" if got else "n/a"


def report_requests(side: str, samples: list[Sample]) -> None:
    per = [s.requests for s in samples if s.requests is not None]
    if not per:
        return
    keys = sorted({k for r in per for k in r})
    mean = {k: sum(r.get(k, 0.0) for r in per) / len(per) for k in keys}
    shown = {k: v for k, v in mean.items() if abs(v) >= 0.25}
    total = sum(shown.values())
    events = sum(v for k, v in shown.items() if k.split()[1] == "events")
    print(
        f"    API requests per {side} task ({len(per)} tasks, idle rate subtracted): {total:.1f} in all, {events:.1f} Event writes"
    )
    for k, v in sorted(shown.items(), key=lambda kv: -kv[1]):
        print(f"      {v:6.1f}  {k}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tasks",
        type=int,
        default=50,
        help="N: tasks of each kind run one at a time (and as many plain Jobs)",
    )
    parser.add_argument(
        "--sleep", type=float, default=5.0, help="seconds the second kind sleeps (0: skip it)"
    )
    parser.add_argument(
        "--burst", type=int, default=10, help="B: tasks at once in the burst and limit phases (0: skip)"
    )
    parser.add_argument(
        "--no-quotas", action="store_true", help="turn off the local service's Data Pipeline quotas"
    )
    parser.add_argument(
        "--testbed-dir", type=Path, help="attach to a running `dptr-testbed up --real-node --state-dir DIR`"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/overhead.py needs root (the real node changes the host)", file=sys.stderr)
        return 2
    os.environ["TZ"] = "UTC"  # ctr events prints local time
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"machine: {machine()}; commit {commit}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dptr-bench-overhead-"))
    with real_node(args.testbed_dir) as node:
        svc = LocalDataPipeline(time_scale=1.0, host=node.address, quotas=not args.no_quotas).start()
        release_ns, data_ns, plain_ns = (
            namespace(node, "ovh-dptr"),
            namespace(node, "ovh-data"),
            namespace(node, "ovh-plain"),
        )
        max_tasks = max(2 * args.burst, 2)
        install(node, svc, release_ns, data_ns, max_tasks, work)
        bench = Bench(node, svc, data_ns, plain_ns)
        try:
            return run(bench, args, node, data_ns)
        finally:
            bench.ctr.close()
            node.helm("uninstall", RELEASE, "-n", release_ns, "--wait", "--timeout", "120s")
            svc.stop()


def run(bench: Bench, args: argparse.Namespace, node: Node, data_ns: str) -> int:
    # Warm-up (not counted): the first pods pay for image unpacking and the first
    # connections; the first dptr pod also shows what a plain Job's pod must hold.
    first = bench.one("dptr", "true", count_requests=False)
    key_pod = next(p for p in bench.cluster.pods.values() if p["metadata"]["namespace"] == data_ns)
    bench.learn_plain_spec(key_pod, "true")
    bench.one("plain", "true", count_requests=False)
    print(f"warm-up done: first dptr task took {first.whole:.2f}s ready -> outcome [{load()}]", flush=True)
    bench.background = Background.measure(bench.metrics_kube, 30.0)
    print(
        "  idle API requests/s (subtracted): "
        + ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(bench.background.rates.items(), key=lambda kv: -kv[1])
            if v >= 0.02
        ),
        flush=True,
    )
    ok = True
    kinds = ["true"] + ([f"sleep {args.sleep:g}"] if args.sleep else [])
    since = time.time()
    for command in kinds:
        samples: list[Sample] = []
        for i in range(args.tasks):
            for side in ("dptr", "plain") if i % 2 == 0 else ("plain", "dptr"):
                samples.append(bench.one(side, command, count_requests=True))
        figures = report_phase(f"`{command}`, one at a time, N={args.tasks}", samples)
        report_requests("dptr", [s for s in samples if s.side == "dptr"])
        report_requests("plain", [s for s in samples if s.side == "plain"])
        bench.report_events(args.tasks, since)
        bench.report_writes(next(s.key for s in reversed(samples) if s.side == "dptr"))
        since = time.time()
        ok &= goals(figures)
    if args.burst:
        samples = bench.burst("true", args.burst, plain=True)
        report_phase(
            f"`true`, {args.burst} dptr tasks and {args.burst} plain Jobs at once (maxConcurrentTasks {max(2 * args.burst, 2)})",
            samples,
        )
        limit = max(args.burst // 2, 1)
        node.bed.kubectl(
            "patch",
            "taskrunner",
            "-n",
            data_ns,
            "overhead",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"maxConcurrentTasks": limit}}),
        )
        time.sleep(5)  # the operator's pollers pick the new limit up from the watch
        samples = bench.burst("true", args.burst, plain=False)
        report_phase(f"`true`, {args.burst} dptr tasks at once, maxConcurrentTasks {limit}", samples)
    bench.svc.assert_clean()
    print(f"done [{load()}]; ledger clean", flush=True)
    return 0 if ok else 1


def goals(figures: dict[str, float]) -> bool:
    checks = [
        ("ready -> started p50 within 1 s of a plain Job's", figures.get("start_gap", math.nan) <= 1.0),
        ("exit -> outcome p50 under 1 s", figures.get("outcome_p50", math.nan) < 1.0),
        ("sidecar start -> first heartbeat p50 under 1 s", figures.get("first_beat_p50", math.nan) < 1.0),
        ("sidecar peak RSS <= 45 MB", figures.get("rss_max_mib", math.nan) * 1.048576 <= 45.0),
    ]
    for what, met in checks:
        print(f"    goal {what}: {'met' if met else 'NOT met'}")
    return all(met for _, met in checks)


if __name__ == "__main__":
    sys.exit(main())
