"""The heartbeat scheduler under a backlog: FIFO per runner, O(1) work per token."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from dptr_operator.heartbeats import HeartbeatScheduler
from dptr_operator.index import TaskEntry, TaskIndex, TaskKey


class _RecordingScheduler(HeartbeatScheduler):
    def __init__(self, op: Any) -> None:
        super().__init__(op)
        self.beats: list[TaskKey] = []
        self.checks = 0
        self._lock = threading.Lock()

    def _check(self, key: TaskKey, now: float, *, waited: bool = False) -> bool:
        self.checks += 1
        return super()._check(key, now, waited=waited)

    def _beat(self, key: TaskKey) -> None:
        with self._lock:
            self.beats.append(key)


def _operator(budget: float) -> Any:
    worker = SimpleNamespace(spec=SimpleNamespace(heartbeat=SimpleNamespace(budget_per_second=budget)))
    return SimpleNamespace(
        index=TaskIndex(),
        leading=True,
        config=SimpleNamespace(time_scale=1.0, heartbeat_workers=2),
        interval_for=lambda entry: 60.0,
        worker_for=lambda entry: worker,
        metrics=SimpleNamespace(heartbeat_lag=SimpleNamespace(observe=lambda value: None)),
    )


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
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while len(scheduler.beats) < len(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.stop()
    assert scheduler.beats == keys  # every task once, in the order it became due
    # Each task is checked when due and about once more from its runner's queue;
    # it is not re-scheduled on every token while it waits.
    assert scheduler.checks <= 3 * len(keys)
