"""Recovery: SIGKILL the operator with 1,000 active tasks, restart it, and time until every
task has been heartbeated again; the service's ledger must show no reassignment.

One namespace, one TaskRunner (16 pollers, heartbeat budget 8/s, the default
reportProgressTimeout of 15 min), the local Data Pipeline service with the
ReportTaskProgress quota (10/s, scaled) on.  Pods never run, so the operator heartbeats
every task.  Once every task has had at least one heartbeat after its ack (the paced
schedule is in its steady state), the operator is SIGKILLed and started again at once
with the same identity (it retakes its own Lease).

Printed, per the ledger (wall clock):
* restart -> first heartbeat, and the operator's own "rebuilt the index" time (real
  seconds: process start, Lease, listing the PipelineTasks; these do not scale);
* kill -> every task heartbeated again, at the time scale and in protocol seconds
  (dominated by the paced schedule: each task is due one interval after its last beat);
* each task's lateness against its schedule (first beat after the restart minus last
  beat before the kill plus one interval), its largest gap vs reportProgressTimeout,
  and the reassignments.

    .venv/bin/python bench/recovery.py [--tasks 1000] [--time-scale 0.2]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    HEARTBEAT_BENCH_QUOTAS,
    Cluster,
    add_common_args,
    add_heartbeat_workers_arg,
    control_plane,
    heartbeat_workers_flags,
    kubectl_quiet,
    load,
    machine,
    new_namespace,
    percentile,
    start_operator,
    wait_for,
)

from dptr_datapipeline import QUOTA_BURST, LocalDataPipeline

BAR_SECONDS = 30.0
PROGRESS_TIMEOUT = 900.0


def beats_by_task(svc: LocalDataPipeline) -> dict[str, list[float]]:
    beats: dict[str, list[float]] = collections.defaultdict(list)
    for c in svc.ledger.calls:
        if c.operation == "ReportTaskProgress" and c.status == 200 and c.task_id:
            beats[c.task_id].append(c.at)
    return beats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=0.2)
    add_heartbeat_workers_arg(parser)
    args = parser.parse_args()
    more = heartbeat_workers_flags(args)
    s, n = args.time_scale, args.tasks
    log_dir = Path(tempfile.mkdtemp(prefix="dptr-bench-recovery-"))
    print(f"machine: {machine()}", flush=True)
    print(f"operator logs: {log_dir}", flush=True)
    with control_plane(args.testbed_dir) as bed:
        namespace = new_namespace(bed, "bench-recovery")
        svc = LocalDataPipeline(time_scale=s, quotas=HEARTBEAT_BENCH_QUOTAS, record_requests=False).start()
        worker_group = f"wg-{namespace}"
        cluster = Cluster(bed, namespace)
        cluster.create_runner(svc, worker_group, maxConcurrentTasks=n, pollers=16)
        op = start_operator(bed, namespace, log_dir, s, "--identity", "bench-recovery", *more)
        try:
            wait_for(lambda: svc.ledger.runners, timeout=60, what="the operator's first runner heartbeat")
            svc.run_pipeline(
                {f"A{i}": {"type": "ShellCommandActivity", "command": f"echo {i}"} for i in range(n)},
                worker_group=worker_group,
            )
            wait_for(
                lambda: sum(r.acked_at is not None for r in svc.ledger.attempts.values()) >= n,
                timeout=1200,
                interval=1.0,
                what=f"{n} acked",
            )
            task_ids = {r.task_id for r in svc.ledger.attempts.values()}
            print(f"{n} tasks dispatched and acknowledged [{load()}]", flush=True)

            def steady() -> bool:
                beats = beats_by_task(svc)
                return all(len(beats.get(t, ())) >= 2 for t in task_ids)

            wait_for(steady, timeout=3600 * s, interval=1.0, what="every task heartbeated after its ack")
            interval_protocol = float(cluster.runner()["status"]["heartbeatIntervalSeconds"])
            interval = interval_protocol * s
            time.sleep(min(interval / 2, 10))

            killed_at = time.time()
            op.kill()
            restarted_at = time.time()
            op.start("--time-scale", repr(s))

            def all_beaten() -> bool:
                beats = beats_by_task(svc)
                return all(any(b > killed_at for b in beats.get(t, ())) for t in task_ids)

            wait_for(
                all_beaten, timeout=3 * interval + 120, interval=0.5, what="every task heartbeated again"
            )
            beats = beats_by_task(svc)
            first_after, lateness, gaps = [], [], []
            for t in task_ids:
                before = max(b for b in beats[t] if b <= killed_at)
                after = min(b for b in beats[t] if b > killed_at)
                first_after.append(after)
                lateness.append(after - (before + interval))
                gaps.append(after - before)
            everyone = max(first_after) - killed_at
            first = min(first_after) - restarted_at
            rebuilds = re.findall(
                r"rebuilt the index from (\d+) PipelineTask\(s\) \((\d+) active\) in ([\d.]+)s", op.logs()
            )
            rebuild = f"{rebuilds[-1][2]}s for {rebuilds[-1][0]} PipelineTasks" if rebuilds else "not logged"
            reassigned = len(svc.ledger.reassignments)
            timeout = PROGRESS_TIMEOUT * s
            print(
                f"{n} active tasks, time scale {s:g}, paced interval {interval_protocol:.0f}s protocol "
                f"({interval:.1f}s real) [{load()}]\n"
                f"  restart -> first heartbeat: {first:.1f}s real (index rebuild: {rebuild})\n"
                f"  kill -> every task heartbeated again: {everyone:.1f}s real at scale {s:g} "
                f"= {everyone / s:.0f}s protocol (one paced interval is {interval_protocol:.0f}s)\n"
                f"  lateness vs each task's schedule (last beat before the kill + interval): "
                f"p50 {percentile(lateness, 50):.1f}s, p99 {percentile(lateness, 99):.1f}s, "
                f"max {max(lateness):.1f}s real\n"
                f"  largest gap between two heartbeats across the kill: {max(gaps):.1f}s real = "
                f"{max(gaps) / s:.0f}s protocol vs reportProgressTimeout {PROGRESS_TIMEOUT:.0f}s "
                f"({timeout:.0f}s real)\n"
                f"  reassignments in the ledger: {reassigned}",
                flush=True,
            )
            ok_gap = max(gaps) < timeout and reassigned == 0
            # Within the quota one round of n heartbeats takes at least (n - burst) / rate,
            # kill or no kill; so the literal bar is printed, and beside it what a kill can
            # change: how late each task's next heartbeat comes against its schedule.
            floor = max(n - QUOTA_BURST, 0) / HEARTBEAT_BENCH_QUOTAS["ReportTaskProgress"]
            late_ok = max(lateness) / s < BAR_SECONDS
            print(
                f"  bars: every task heartbeated again within {BAR_SECONDS:g}s: "
                f"{'met' if everyone / s < BAR_SECONDS else 'NOT met'} (protocol time; within the "
                f"quota one round of {n} heartbeats takes at least {floor:.0f}s, kill or no kill); "
                f"no task's heartbeat later than {BAR_SECONDS:g}s behind its schedule: "
                f"{'met' if late_ok else 'NOT met'} (max {max(lateness) / s:.0f}s protocol); "
                f"no reassignment: {'met' if ok_gap else 'NOT met'}",
                flush=True,
            )
            return 0 if ok_gap and late_ok else 1
        finally:
            svc.stop()
            op.stop()
            if not args.keep:
                kubectl_quiet(bed, "delete", "namespace", namespace, "--wait=false")


if __name__ == "__main__":
    sys.exit(main())
