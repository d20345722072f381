"""Scale: the operator's memory and CPU with 1,000 and 5,000 active PipelineTasks, and its
heartbeat pacing judged from the Data Pipeline service's ledger.

One namespace, one TaskRunner (maxConcurrentTasks 5,000, 16 pollers, heartbeat budget
8/s, the default reportProgressTimeout of 15 min), one ``dptr-operator`` process.  Pods
never run (no nodes), so the operator heartbeats every task itself.  Stages: queue 1,000
tasks (one pipeline), wait until all are dispatched and acknowledged, measure over a
window; then queue 4,000 more and measure again.

Time scaling (``--time-scale S``, default 0.2): the service and the operator multiply
every protocol duration by S (reportProgressTimeout 900 s -> 900*S s, heartbeat interval
-> interval*S) and the service divides its quota refill rates by S (ReportTaskProgress
10/s -> 10/S per real second), as does the operator's heartbeat budget.  So a rate
measured here, multiplied by S, is the protocol (production) rate, and a gap divided by
S is the protocol gap.  Memory does not scale; CPU per real second is roughly 1/S times
what the same work costs in production (an upper bound).

Quotas: ReportTaskProgress 10/s, SetTaskStatus 10/s, ReportTaskRunnerHeartbeat 1/s
(scaled) are enforced; PollForTask's 2/s is not, so setting up 5,000 tasks takes minutes
rather than 40 (it is a dispatch quota, not what is measured here).

    .venv/bin/python bench/scale.py [--time-scale 0.2] [--sizes 1000,5000]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import (
    HEARTBEAT_BENCH_QUOTAS,
    Cluster,
    add_common_args,
    add_heartbeat_workers_arg,
    control_plane,
    cpu_seconds,
    heartbeat_workers_flags,
    kubectl_quiet,
    load,
    machine,
    new_namespace,
    percentile,
    proc_memory_mb,
    start_operator,
    wait_for,
)

from dptr_common.pacing import heartbeat_interval
from dptr_datapipeline import LocalDataPipeline

MEMORY_BAR_MB = 300.0
RTP_QUOTA = HEARTBEAT_BENCH_QUOTAS["ReportTaskProgress"]  # calls/s (protocol)
PROGRESS_TIMEOUT = 900.0  # the service's default reportProgressTimeout, protocol seconds


def queue_tasks(svc: LocalDataPipeline, worker_group: str, first: int, count: int) -> None:
    objects = {
        f"A{i}": {"type": "ShellCommandActivity", "command": f"echo {i}"} for i in range(first, first + count)
    }
    svc.run_pipeline(objects, worker_group=worker_group, name=f"scale-{first}")


def acked(svc: LocalDataPipeline) -> int:
    return sum(1 for r in svc.ledger.attempts.values() if r.acked_at is not None)


def measure(svc: LocalDataPipeline, pid: int, size: int, scale: float, window: float) -> dict[str, Any]:
    """Sample the operator over ``window`` real seconds and judge the ledger's heartbeats."""
    cpu0, t0 = cpu_seconds(pid), time.time()
    rss_samples = []
    loads = []
    while time.time() - t0 < window:
        time.sleep(min(5.0, window / 10))
        rss_samples.append(proc_memory_mb(pid)[0])
        loads.append(load())
    cpu1, t1 = cpu_seconds(pid), time.time()
    rss, hwm = proc_memory_mb(pid)
    calls = [c for c in svc.ledger.calls if c.operation == "ReportTaskProgress"]
    in_window = [c for c in calls if t0 <= c.at < t1]
    ok = [c for c in in_window if c.status == 200]
    throttled = [c for c in in_window if c.error == "ThrottlingException"]
    per_second: collections.Counter[int] = collections.Counter(int(c.at - t0) for c in in_window)
    busiest = max(per_second.values()) if per_second else 0
    # Per task: the largest gap between successful ReportTaskProgress calls, counted from
    # its ack, up to the window's end.
    times: dict[str, list[float]] = collections.defaultdict(list)
    for c in calls:
        if c.status == 200 and c.task_id and c.at < t1:
            times[c.task_id].append(c.at)
    gaps = []
    for record in svc.ledger.attempts.values():
        beats = sorted(times.get(record.task_id, []))
        if not beats:
            continue
        stamps = [*beats, t1]
        relevant = [b - a for a, b in itertools.pairwise(stamps) if b > t0]
        if relevant:
            gaps.append(max(relevant))
    timeout = PROGRESS_TIMEOUT * scale
    plan = heartbeat_interval(size, 8.0, 60, PROGRESS_TIMEOUT)
    return {
        "size": size,
        "rss": rss,
        "hwm": hwm,
        "rss_max": max(rss_samples) if rss_samples else rss,
        "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "window": t1 - t0,
        "rtp_rate": len(ok) / (t1 - t0),
        "rtp_all_rate": len(in_window) / (t1 - t0),
        "throttled": len(throttled),
        "busiest_second": busiest,
        "max_gap": max(gaps) if gaps else float("nan"),
        "p99_gap": percentile(gaps, 99),
        "tasks_with_beats": len(gaps),
        "timeout": timeout,
        "reassignments": len(svc.ledger.reassignments),
        "plan": plan,
        "load": loads[-1] if loads else load(),
    }


def report(m: dict[str, Any], scale: float) -> bool:
    s = scale
    under_quota = m["rtp_all_rate"] * s < RTP_QUOTA
    in_time = m["max_gap"] < m["timeout"] and m["reassignments"] == 0
    memory_ok = m["rss"] <= MEMORY_BAR_MB and m["hwm"] <= MEMORY_BAR_MB
    plan = m["plan"]
    print(
        f"{m['size']} active tasks, time scale {s:g}, window {m['window']:.0f}s real "
        f"({m['window'] / s:.0f}s protocol) [{m['load']}]\n"
        f"  operator memory: VmRSS {m['rss']:.1f} MB (max sampled {m['rss_max']:.1f}), VmHWM {m['hwm']:.1f} MB\n"
        f"  operator CPU: {m['cpu_pct']:.1f}% of one core at scale {s:g} "
        f"(heartbeat work runs 1/{s:g} = {1 / s:.0f}x faster than in production)\n"
        f"  pacing plan: {plan.message}\n"
        f"  ReportTaskProgress: {m['rtp_rate']:.1f}/s accepted, {m['rtp_all_rate']:.1f}/s incl. "
        f"{m['throttled']} throttled, busiest real second {m['busiest_second']} calls "
        f"-> protocol {m['rtp_all_rate'] * s:.2f}/s on average, {m['busiest_second'] * s:.1f}/s in the busiest "
        f"{1 / s:g} s (quota {RTP_QUOTA:g}/s)\n"
        f"  per-task gap between heartbeats: max {m['max_gap']:.1f}s, p99 {m['p99_gap']:.1f}s real "
        f"-> protocol max {m['max_gap'] / s:.0f}s, p99 {m['p99_gap'] / s:.0f}s vs reportProgressTimeout "
        f"{PROGRESS_TIMEOUT:.0f}s ({m['tasks_with_beats']} tasks); reassignments in the ledger: "
        f"{m['reassignments']}",
        flush=True,
    )
    print(
        f"  bars: memory <= {MEMORY_BAR_MB:g} MB {'met' if memory_ok else 'NOT met'}; "
        f"ReportTaskProgress < {RTP_QUOTA:g}/s {'met' if under_quota else 'NOT met'}; "
        f"every task within its timeout {'met' if in_time else 'NOT met'}",
        flush=True,
    )
    return memory_ok and under_quota and in_time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--time-scale", type=float, default=0.2)
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument(
        "--window",
        type=float,
        default=1200.0,
        help="measurement window per size in protocol seconds (default 1200: longer than the 900 s timeout)",
    )
    add_heartbeat_workers_arg(parser)
    args = parser.parse_args()
    more = heartbeat_workers_flags(args)
    scale = args.time_scale
    sizes = [int(x) for x in args.sizes.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="dptr-bench-scale-"))
    print(f"machine: {machine()}", flush=True)
    print(f"operator logs: {log_dir}", flush=True)
    ok = True
    with control_plane(args.testbed_dir) as bed:
        namespace = new_namespace(bed, "bench-scale")
        svc = LocalDataPipeline(
            time_scale=scale, quotas=HEARTBEAT_BENCH_QUOTAS, record_requests=False
        ).start()
        worker_group = f"wg-{namespace}"
        Cluster(bed, namespace).create_runner(svc, worker_group, maxConcurrentTasks=max(sizes), pollers=16)
        op = start_operator(bed, namespace, log_dir, scale, "--identity", "bench-scale", *more)
        assert op.proc is not None
        try:
            wait_for(lambda: svc.ledger.runners, timeout=60, what="the operator's first runner heartbeat")
            queued = 0
            for size in sizes:
                started = time.monotonic()
                queue_tasks(svc, worker_group, queued, size - queued)
                queued = size
                wait_for(
                    lambda size=size: acked(svc) >= size, timeout=1800, interval=1.0, what=f"{size} acked"
                )
                print(
                    f"{size} tasks dispatched and acknowledged after {time.monotonic() - started:.0f}s "
                    f"[{load()}]",
                    flush=True,
                )
                ok &= report(measure(svc, op.proc.pid, size, scale, args.window * scale), scale)
        finally:
            op.stop()
            svc.stop()
            if not args.keep:
                kubectl_quiet(bed, "delete", "namespace", namespace, "--wait=false")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
