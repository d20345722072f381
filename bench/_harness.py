"""Shared pieces of the operator benchmarks (dispatch.py, scale.py, recovery.py).

* a control plane without nodes (``Testbed(nodes=(), kubelet=False)``), or an already
  running one (``--testbed-dir`` of a ``dptr-testbed up --no-kubelet``), with the CRDs;
* the operator as a real ``dptr-operator`` subprocess and the TaskRunner/Secret set-up,
  both reused from the operator tests (tests/operator/op_helpers.py);
* a Job watch that records when each Job arrived (the Job's creationTimestamp has only
  1 s resolution);
* /proc readings of the operator process, percentiles, and the machine's description.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "operator"))  # op_helpers: what the operator tests use

import op_helpers  # noqa: E402
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess  # noqa: E402

from dptr_common import naming  # noqa: E402
from dptr_common.kube import KubeConfig  # noqa: E402
from dptr_datapipeline import DEFAULT_QUOTAS  # noqa: E402
from dptr_testbed.controlplane import RunningTestbed, Testbed  # noqa: E402
from dptr_testbed.installs import install_crds  # noqa: E402
from dptr_testbed.waiting import wait_for  # noqa: E402

__all__ = [
    "QUIET_GRACES",
    "Cluster",
    "JobWatch",
    "OperatorProcess",
    "add_common_args",
    "api_baseline",
    "control_plane",
    "cpu_seconds",
    "job_label_for",
    "load",
    "machine",
    "new_namespace",
    "percentile",
    "proc_memory_mb",
    "start_operator",
    "wait_for",
]


# ---------------------------------------------------------------- the machine


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f}"


def machine() -> str:
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}; nproc {os.cpu_count()}; "
        f"memory {mem_kb / 1024 / 1024:.1f} GiB; Python {platform.python_version()}; {load()}"
    )


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------- /proc


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = float(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    parts = stat[stat.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the cluster


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--testbed-dir",
        type=Path,
        help="attach to a running `dptr-testbed up --no-kubelet --state-dir DIR` instead of starting one",
    )
    parser.add_argument("--keep", action="store_true", help="keep the namespaces (and logs) afterwards")


def add_heartbeat_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat-workers",
        type=int,
        help="the operator's --heartbeat-workers (default: its own, 16); each holds one "
        "ReportTaskProgress call at a time, so at time scale S the same call latency needs "
        "1/S times the workers",
    )


def heartbeat_workers_flags(args: argparse.Namespace) -> list[str]:
    """The operator flags for ``add_heartbeat_workers_arg``'s option, if given."""
    return ["--heartbeat-workers", str(args.heartbeat_workers)] if args.heartbeat_workers else []


#: The service's quotas for the heartbeat benchmarks: Data Pipeline's own, except
#: PollForTask's 2/s, which would make setting up thousands of tasks take most of an hour
#: (it limits dispatch, which is not what these measure).
HEARTBEAT_BENCH_QUOTAS = {op: rate for op, rate in DEFAULT_QUOTAS.items() if op != "PollForTask"}


#: The benchmarks' pods never get a node, and with thousands of Jobs the Job controller
#: (20 requests/s) takes minutes to create their pods: at time scale 0.2 the default
#: 5-minute pod-create grace (60 s real) failed hundreds of attempts as
#: ``dptr.PodRejected.NoPod``, which is right for a cluster but not what these measure.
BENCH_GRACES = ("--pod-create-grace-seconds", "100000")


@contextlib.contextmanager
def control_plane(testbed_dir: Path | None) -> Iterator[Any]:
    """A control plane without nodes (pods stay Pending), with dptr's CRDs installed."""
    if testbed_dir is not None:
        bed: Any = RunningTestbed.attach(testbed_dir)
        owned = None
    else:
        state = Path(tempfile.mkdtemp(prefix="dptr-bench-bed-"))
        owned = bed = Testbed(state, nodes=(), kubelet=False)
        print(f"starting a control plane in {state} ...", flush=True)
        owned.start()
    try:
        install_crds(bed)
        yield bed
    finally:
        if owned is not None:
            owned.stop()
            shutil.rmtree(owned.state_dir, ignore_errors=True)


def new_namespace(bed: Any, prefix: str) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    bed.kubectl("create", "namespace", name)
    return name


def start_operator(
    bed: Any, namespace: str, log_dir: Path, time_scale: float, *extra: str
) -> OperatorProcess:
    """``dptr-operator`` for one namespace (the test helper's ``--time-scale 0.01`` is
    overridden: argparse keeps the last value).

    With ``DPTR_BENCH_PROFILE=DIR`` set, the operator runs under bench/_sampler.py and
    writes its profile to DIR/profile-<namespace>-<n>.txt when stopped (SIGTERM)."""
    op = OperatorProcess(bed, namespace, log_dir, [*QUIET_GRACES, *BENCH_GRACES, *extra])
    profile_dir = os.environ.get("DPTR_BENCH_PROFILE")
    if not profile_dir:
        return op.start("--time-scale", repr(time_scale))
    out = Path(profile_dir) / f"profile-{namespace}-{op.starts + 1}.txt"
    popen = op_helpers.subprocess.Popen

    def sampled(argv: list[str], **kwargs: Any) -> Any:
        i = argv.index("-m")
        argv = [*argv[:i], str(REPO / "bench" / "_sampler.py"), str(out), *argv[i + 2 :]]
        return popen(argv, **kwargs)

    op_helpers.subprocess.Popen = sampled  # type: ignore[assignment]
    try:
        return op.start("--time-scale", repr(time_scale))
    finally:
        op_helpers.subprocess.Popen = popen  # type: ignore[assignment]


def job_label_for(pipeline_id: str, attempt_id: str) -> str:
    """The ``dptr.dev/pipeline-task`` label of the Job of an attempt."""
    return naming.label_value(naming.pipeline_task_name(pipeline_id, attempt_id))


class JobWatch:
    """Watches a namespace's Jobs; ``arrivals`` maps the Job's pipeline-task label to the
    wall-clock time its ADDED event reached this process."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.config = KubeConfig.from_kubeconfig(kubeconfig)
        self.namespace = namespace
        self.arrivals: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)

    def start(self) -> JobWatch:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Job watch did not start")
        return self

    def stop(self) -> None:
        self._stop.set()

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def _connect(self) -> http.client.HTTPSConnection:
        host, _, port = self.config.server.removeprefix("https://").partition(":")
        return http.client.HTTPSConnection(
            host, int(port or 443), timeout=600, context=self.config.ssl_context()
        )

    def _run(self) -> None:
        conn = self._connect()
        headers = {"Accept": "application/json"}
        token = self.config.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        path = f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
        conn.request("GET", path + "?limit=1", headers=headers)
        listing = json.loads(conn.getresponse().read())
        rv = listing["metadata"]["resourceVersion"]
        conn.request("GET", f"{path}?watch=1&resourceVersion={rv}&timeoutSeconds=3600", headers=headers)
        response = conn.getresponse()
        self._ready.set()
        while not self._stop.is_set():
            line = response.readline()
            if not line:
                return
            arrived = time.time()
            event = json.loads(line)
            if event.get("type") != "ADDED":
                continue
            labels = event["object"]["metadata"].get("labels") or {}
            key = labels.get(naming.LABEL_PIPELINE_TASK)
            if key:
                with self._lock:
                    self.arrivals.setdefault(key, arrived)


def call_breakdown(samples: dict[str, float]) -> str:
    """Mean duration of each call the operator timed, and of a whole dispatch."""
    parts = []
    for op in ("CreatePipelineTask", "ReportTaskProgress", "CreateJob"):
        total = samples.get(f'dptr_api_call_duration_seconds_sum{{operation="{op}"}}')
        count = samples.get(f'dptr_api_call_duration_seconds_count{{operation="{op}"}}')
        if total is not None and count:
            parts.append(f"{op} {1000 * total / count:.0f} ms ({count:.0f})")
    total, count = (
        samples.get("dptr_dispatch_duration_seconds_sum"),
        samples.get("dptr_dispatch_duration_seconds_count"),
    )
    if total is not None and count:
        parts.append(
            f"whole dispatch (poll answer -> Job, status write excluded) {1000 * total / count:.0f} ms"
        )
    return "mean call durations seen by the operator: " + ", ".join(parts)


def api_baseline(bed: Any, namespace: str, count: int = 30) -> str:
    """Mean and worst latency of creating a small ConfigMap: how busy the API server is."""
    from dptr_common.kube import KubeClient

    kube = KubeClient.from_kubeconfig(bed.kubeconfig)
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    took = []
    for i in range(count):
        start = time.monotonic()
        kube.create(path, {"metadata": {"name": f"baseline-{os.urandom(3).hex()}-{i}"}, "data": {"k": "v"}})
        took.append(1000 * (time.monotonic() - start))
    kube.close()
    return (
        f"API server baseline: ConfigMap create mean {sum(took) / len(took):.0f} ms, max {max(took):.0f} ms"
    )


def kubectl_quiet(bed: Any, *args: str) -> None:
    with contextlib.suppress(subprocess.CalledProcessError, RuntimeError):
        bed.kubectl(*args, check=False)
