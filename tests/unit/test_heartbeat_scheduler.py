"""The heartbeat scheduler under a backlog: earliest deadline first per runner, little
work per token."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from dptr_operator.config import OperatorConfig
from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import TaskEntry, TaskIndex, TaskKey
from dptr_operator.metrics import Metrics
from dptr_operator.services import Services
from dptr_operator.workpool import WorkPool


class _RecordingScheduler(HeartbeatScheduler):
    def __init__(self, parts: SimpleNamespace) -> None:
        super().__init__(parts.services, parts.runners, parts.reporter)
        self.beats: list[TaskKey] = []
        self.checks = 0
        self.waited: set[TaskKey] = set()

    def _check(self, key: TaskKey, now: float, *, waited: bool = False) -> bool:
        self.checks += 1
        queued = len(self._waiting_keys)
        served = super()._check(key, now, waited=waited)
        if served and len(self._waiting_keys) == queued:
            # Handed to the pool (every task here is valid and the operator leads).
            # Recorded here, on the scheduler thread, in the order of the decisions:
            # the pool's threads may run them in a slightly different order.
            self.beats.append(key)
        return served

    def _wait_for_token(self, entry: TaskEntry, wait: float, *, head: bool) -> None:
        self.waited.add(entry.key)
        super()._wait_for_token(entry, wait, head=head)

    def _beat(self, key: TaskKey) -> None:
        pass  # no Data Pipeline here: the decision is what is under test


def _operator(budget: float) -> Any:
    """The scheduler's real collaborators where they need no cluster (config, index,
    metrics, leadership); the runners stand-in answers the two questions the scheduler
    asks of them, and the decisions under test never reach the API, Data Pipeline, or the
    reporter."""
    worker = SimpleNamespace(spec=SimpleNamespace(heartbeat=SimpleNamespace(budget_per_second=budget)))
    services = Services(
        config=OperatorConfig(namespaces=["ns"], time_scale=1.0, heartbeat_workers=2),
        kube=None,  # type: ignore[arg-type]
        index=TaskIndex(),
        metrics=Metrics(),
        events=None,  # type: ignore[arg-type]
        status_writer=None,  # type: ignore[arg-type]
        work=WorkPool(1),
    )
    services.leading.set()
    runners = SimpleNamespace(interval_for=lambda entry: 60.0, worker_for=lambda entry: worker)
    return SimpleNamespace(services=services, runners=runners, reporter=None, index=services.index)


def run(scheduler: _RecordingScheduler, beats: int) -> None:
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while len(scheduler.beats) < beats and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()


def test_backlog_is_served_oldest_first_once_each_with_little_work() -> None:
    op = _operator(budget=50.0)  # burst 50, then one token every 20 ms
    scheduler = _RecordingScheduler(op)
    keys = []
    for i in range(150):
        entry = TaskEntry(
            "ns", f"t{i:03d}", "runner", f"task-{i}", "df-1", f"@a{i}", None, None, acknowledged=True
        )
        op.index.upsert(entry)
        keys.append(entry.key)
        scheduler.schedule(entry.key, 0.001 * i)  # due in this order
    run(scheduler, len(keys))
    assert scheduler.beats == keys  # every task once, in the order it became due
    # Each task is checked when due and about once more from its runner's queue;
    # it is not re-scheduled on every token while it waits.
    assert scheduler.checks <= 3 * len(keys)


def test_waiting_tasks_are_served_closest_to_their_timeout_first() -> None:
    # All due at once, in the order of i; but the larger i, the older its last heartbeat:
    # past the burst of tokens, the waiting ones must go by deadline, not by due order.
    op = _operator(budget=50.0)
    scheduler = _RecordingScheduler(op)
    now = datetime.now(UTC)
    rank = {}
    for i in range(150):
        entry = TaskEntry(
            "ns",
            f"t{i:03d}",
            "runner",
            f"task-{i}",
            "df-1",
            f"@a{i}",
            None,
            None,
            acknowledged=True,
            heartbeat_last_at=now - timedelta(seconds=i),
            report_progress_timeout=900 if i % 2 else 1800,
        )
        op.index.upsert(entry)
        rank[entry.key] = (
            entry.heartbeat_last_at + timedelta(seconds=entry.report_progress_timeout)
        ).timestamp()
        scheduler.schedule(entry.key, 0)
    run(scheduler, 150)
    assert sorted(scheduler.beats) == sorted(rank)  # each once
    # About 50 are served at once (the burst of tokens); the others wait, and every one
    # is in line before the first token frees (the wake-up is due after all of them).
    waited = [k for k in scheduler.beats if k in scheduler.waited]
    assert len(waited) >= 20
    assert [rank[k] for k in waited] == sorted(rank[k] for k in waited)
    assert waited[0] == ("ns", "t149")  # by due order it would have been served last
