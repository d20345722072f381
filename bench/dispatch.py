"""Dispatch: tasks ready in Data Pipeline -> Jobs created by the operator.

For each scenario a fresh namespace, local Data Pipeline service (quotas off, time
scale 1) and ``dptr-operator`` process:

* burst N (100, 1,000): one on-demand pipeline with N ShellCommandActivity objects is
  activated, so N tasks become ready at once; throughput = N / (last Job seen - first
  task ready), and the ready -> Job latency percentiles;
* steady R/s (20): one single-activity pipeline activated every 1/R s for D seconds;
  ready -> Job latency percentiles.

"Ready" is the attempt's ready time from the service's ledger (``AttemptRecord.ready_at``).
"Job exists" is when the Job's ADDED event reached this process's watch on Jobs (the
Job's creationTimestamp has only 1 s resolution), so latencies include the watch's
delivery delay: an upper bound.  Pods never run (no nodes).

    .venv/bin/python bench/dispatch.py [--pollers 16] [--bursts 100,1000] [--rate 20 --seconds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import (
    Cluster,
    JobWatch,
    add_common_args,
    api_baseline,
    call_breakdown,
    control_plane,
    cpu_seconds,
    job_label_for,
    kubectl_quiet,
    load,
    machine,
    new_namespace,
    percentile,
    start_operator,
    wait_for,
)

from dptr_datapipeline import LocalDataPipeline

THROUGHPUT_BAR = 50.0  # tasks/s
P99_BAR_MS = 250.0  # at 20 tasks/s offered


def activity(index: int) -> dict[str, Any]:
    return {"type": "ShellCommandActivity", "command": f"echo {index}"}


class Scenario:
    def __init__(self, bed: Any, log_dir: Path, pollers: int, max_tasks: int, label: str) -> None:
        self.bed = bed
        self.namespace = new_namespace(bed, f"bench-dispatch-{label}")
        self.svc = LocalDataPipeline(time_scale=1.0, quotas=False, record_requests=False).start()
        self.worker_group = f"wg-{self.namespace}"
        cluster = Cluster(bed, self.namespace)
        cluster.create_runner(self.svc, self.worker_group, maxConcurrentTasks=max_tasks, pollers=pollers)
        self.operator = start_operator(bed, self.namespace, log_dir, 1.0, "--identity", f"bench-{label}")
        # Polling starts after the first ReportTaskRunnerHeartbeat; give the pollers a
        # moment to have their long polls in flight.
        wait_for(lambda: self.svc.ledger.runners, timeout=60, what="the operator's first runner heartbeat")
        time.sleep(2.0)
        print(f"  {api_baseline(bed, self.namespace)} [{load()}]", flush=True)
        self.watch = JobWatch(bed.kubeconfig, self.namespace).start()

    def wait_jobs(self, count: int, timeout: float) -> None:
        wait_for(lambda: self.watch.count() >= count, timeout=timeout, interval=0.05, what=f"{count} Jobs")

    def latencies(self) -> tuple[list[float], list[float], list[float]]:
        """(ready times, Job arrival times, latencies in ms) of every polled attempt."""
        ready, seen, lat = [], [], []
        for record in self.svc.ledger.attempts.values():
            arrived = self.watch.arrivals.get(job_label_for(record.pipeline_id, record.attempt_id))
            if arrived is None or record.ready_at is None:
                continue
            ready.append(record.ready_at)
            seen.append(arrived)
            lat.append((arrived - record.ready_at) * 1000)
        return ready, seen, lat

    def operator_cpu(self) -> float:
        assert self.operator.proc is not None
        return cpu_seconds(self.operator.proc.pid)

    def details(self, cpu_before: float, seconds: float) -> str:
        cpu = self.operator_cpu() - cpu_before
        return (
            f"  operator CPU {cpu:.1f}s over {seconds:.1f}s ({100 * cpu / seconds:.0f}% of a core); "
            + call_breakdown(self.operator.metrics())
        )

    def close(self, keep: bool) -> None:
        self.watch.stop()
        self.svc.stop()  # first: long polls in flight end before the operator closes them
        self.operator.stop()
        if not keep:
            kubectl_quiet(self.bed, "delete", "namespace", self.namespace, "--wait=false")


def line(label: str, lat: list[float], extra: str = "") -> str:
    return (
        f"{label}: {extra}latency ready->Job p50 {percentile(lat, 50):.0f} ms, p90 {percentile(lat, 90):.0f} ms, "
        f"p99 {percentile(lat, 99):.0f} ms, max {max(lat):.0f} ms ({len(lat)} tasks) [{load()}]"
    )


def run_burst(bed: Any, log_dir: Path, pollers: int, n: int, keep: bool) -> tuple[float, float]:
    sc = Scenario(bed, log_dir, pollers, max(n, 10), f"b{n}-p{pollers}")
    try:
        cpu0, t0 = sc.operator_cpu(), time.monotonic()
        sc.svc.run_pipeline({f"A{i}": activity(i) for i in range(n)}, worker_group=sc.worker_group)
        sc.wait_jobs(n, timeout=max(120.0, n / 5))
        details = sc.details(cpu0, time.monotonic() - t0)
        ready, seen, lat = sc.latencies()
        span = max(seen) - min(ready)
        rate = len(lat) / span
        print(
            line(
                f"burst N={n}, pollers={pollers}",
                lat,
                f"{len(lat)} Jobs in {span:.2f}s = {rate:.1f} tasks/s; ",
            ),
            flush=True,
        )
        print(details, flush=True)
        return rate, percentile(lat, 99)
    finally:
        sc.close(keep)


def run_steady(bed: Any, log_dir: Path, pollers: int, rate: float, seconds: float, keep: bool) -> float:
    total = int(rate * seconds)
    sc = Scenario(bed, log_dir, pollers, max(total + 10, 10), f"s{int(rate)}-p{pollers}")
    try:
        cpu0, start = sc.operator_cpu(), time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sc.svc.run_pipeline({"A": activity(i)}, worker_group=sc.worker_group, name=f"steady-{i}")
        offered = total / (time.monotonic() - start)
        sc.wait_jobs(total, timeout=120)
        details = sc.details(cpu0, time.monotonic() - start)
        _, _, lat = sc.latencies()
        print(
            line(
                f"steady {rate:g}/s offered for {seconds:g}s, pollers={pollers}",
                lat,
                f"{offered:.1f}/s achieved; ",
            ),
            flush=True,
        )
        print(details, flush=True)
        return percentile(lat, 99)
    finally:
        sc.close(keep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--pollers", default="16", help="comma-separated TaskRunner spec.pollers values")
    parser.add_argument("--bursts", default="100,1000", help="comma-separated N (0 or empty: none)")
    parser.add_argument("--rate", type=float, default=20.0, help="steady offered rate, tasks/s (0: none)")
    parser.add_argument("--seconds", type=float, default=30.0, help="steady run length")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="dptr-bench-dispatch-"))
    print(f"machine: {machine()}", flush=True)
    print(f"operator logs: {log_dir}", flush=True)
    ok = True
    with control_plane(args.testbed_dir) as bed:
        for pollers in [int(p) for p in args.pollers.split(",") if p]:
            for n in [int(x) for x in args.bursts.split(",") if x.strip() and int(x)]:
                rate, _ = run_burst(bed, log_dir, pollers, n, args.keep)
                verdict = "met" if rate >= THROUGHPUT_BAR else "NOT met"
                print(f"  bar >= {THROUGHPUT_BAR:g} tasks/s: {verdict}", flush=True)
                ok &= rate >= THROUGHPUT_BAR
            if args.rate:
                p99 = run_steady(bed, log_dir, pollers, args.rate, args.seconds, args.keep)
                verdict = "met" if p99 <= P99_BAR_MS else "NOT met"
                print(f"  bar p99 <= {P99_BAR_MS:g} ms at {args.rate:g}/s: {verdict}", flush=True)
                ok &= p99 <= P99_BAR_MS
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
