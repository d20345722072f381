"""Idle memory and CPU of a real ``dptr-sidecar`` process.

Starts a test bed (control plane only: no kubelet is needed to measure one process), the
local Data Pipeline service, a polled and acknowledged task with its PipelineTask and
Job, and then the real ``dptr-sidecar`` as a host process with exactly the environment
the rendered pod gives it, authenticated as the ``dptr-sidecar`` ServiceAccount (a
token from the TokenRequest API, so the RBAC in charts/dptr/files/sidecar-role.yaml is
what it runs with).  The pod's status says the task container is running, so the
sidecar sits idle: heartbeating, watching its pod.  After the warm-up it samples
VmRSS/VmHWM from /proc/<pid>/status and CPU time from /proc/<pid>/stat, then ends the
task (exit 0) and checks it was reported.

    .venv/bin/python bench/sidecar_memory.py [--seconds 20] [--time-scale 0.01]

At time scale 0.01 a heartbeat goes out every 0.6 s (the 60 s default, scaled), 100
times more often than in production, so the CPU figure is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.sidecar.conftest: the harness the tests use

LIMIT_MB = 60.0


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def kb(value: str) -> float:
    return float(value.split(maxsplit=1)[0])


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    parts = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks  # utime + stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="idle time to measure over")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--time-scale", type=float, default=0.01)
    args = parser.parse_args()

    from dptr_common.kube import pod_path
    from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
    from dptr_testbed.controlplane import Testbed
    from dptr_testbed.installs import install_crds
    from tests.sidecar import conftest as harness_mod

    harness_mod.TIME_SCALE = args.time_scale
    with tempfile.TemporaryDirectory(prefix="dptr-bench-") as tmp:
        bed = Testbed(Path(tmp) / "bed", nodes=(), kubelet=False)
        bed.start()
        svc = LocalDataPipeline(time_scale=args.time_scale).start()
        proc: subprocess.Popen[bytes] | None = None
        try:
            install_crds(bed)
            bed.kubectl("create", "namespace", "bench")
            h = harness_mod.SidecarHarness(bed, "bench", svc)  # type: ignore[arg-type]
            task = h.start("sleep 3600")
            pod = task.pod()
            name = pod["metadata"]["name"]

            def set_task_state(state: dict[str, Any]) -> None:
                # A merge patch, not a PUT: the pod's controllers write it too, and a
                # PUT with a stale resourceVersion is refused with 409.
                status = {
                    "phase": "Running",
                    "containerStatuses": [
                        {
                            "name": "task",
                            "ready": True,
                            "restartCount": 0,
                            "image": "x",
                            "imageID": "",
                            "state": state,
                        }
                    ],
                }
                h.kube.patch(pod_path("bench", name, "status"), {"status": status})

            set_task_state({"running": {"startedAt": "2025-01-01T00:00:00Z"}})
            token = bed.kubectl("create", "token", "dptr-sidecar", "-n", "bench").strip()
            kubeconfig = json.loads(bed.kubeconfig.read_text())
            kubeconfig["users"] = [{"name": "dptr-sidecar", "user": {"token": token}}]
            kubeconfig["contexts"][0]["context"]["user"] = "dptr-sidecar"
            sa_kubeconfig = Path(tmp) / "sidecar.kubeconfig"
            sa_kubeconfig.write_text(json.dumps(kubeconfig))

            container = next(c for c in pod["spec"]["initContainers"] if c["name"] == "dptr-sidecar")
            env = {"PATH": os.environ["PATH"], "HOME": tmp, "KUBECONFIG": str(sa_kubeconfig)}
            env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
            env.update(
                POD_NAME=name,
                POD_NAMESPACE="bench",
                POD_UID=pod["metadata"]["uid"],
                AWS_ACCESS_KEY_ID=DEFAULT_ACCESS_KEY_ID,
                AWS_SECRET_ACCESS_KEY=DEFAULT_SECRET_ACCESS_KEY,
                DPTR_LOG_LEVEL="WARNING",
            )
            sidecar = str(Path(sys.executable).parent / "dptr-sidecar")
            proc = subprocess.Popen([sidecar], env=env)
            task.wait_sidecar_took_over(30)
            time.sleep(args.warmup)
            beats_before = task.record().progress_calls
            cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
            rss: list[float] = []
            while time.monotonic() - started < args.seconds:
                rss.append(kb(proc_status(proc.pid)["VmRSS"]) / 1024)
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
            status = proc_status(proc.pid)
            beats = task.record().progress_calls - beats_before

            set_task_state(
                {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": "2025-01-01T00:00:00Z",
                        "finishedAt": "2025-01-01T00:00:01Z",
                    }
                }
            )
            code = proc.wait(60)
            outcome = task.wait_outcome(30).outcome
            svc.assert_clean()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
            svc.stop()
            bed.stop()

    hwm = kb(status["VmHWM"]) / 1024
    print(f"dptr-sidecar idle for {elapsed:.0f}s at time scale {args.time_scale:g} ({beats} heartbeats):")
    print(
        f"  VmRSS {rss[-1]:.1f} MB (min {min(rss):.1f}, max {max(rss):.1f}), VmHWM {hwm:.1f} MB, limit {LIMIT_MB:.0f} MB"
    )
    print(f"  CPU {cpu:.2f}s over {elapsed:.0f}s = {100 * cpu / elapsed:.2f}% of one core")
    print(f"  then: task exit 0 -> {outcome}, sidecar exit code {code}")
    ok = hwm <= LIMIT_MB and max(rss) <= LIMIT_MB and outcome == "FINISHED" and code == 0
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
