"""Heartbeat pacing and retry back-off.

ReportTaskProgress has an account-wide quota of 10 calls/s (burst 100).  One heartbeat a
minute per task saturates it at ~600 running tasks, so the interval is stretched with the
number of running tasks.  It must also stay well inside each task's
``reportProgressTimeout`` (15 minutes by default), or the service hands the task to
someone else.  When both cannot hold, safety wins and the plan says the budget is not met
(the operator shows that as a Degraded condition).

Every retry loop uses the same capped exponential back-off with full jitter (AWS
Architecture Blog, "Exponential Backoff And Jitter"), so many sidecars throttled at once
spread out instead of retrying in lockstep.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_BASE_INTERVAL_SECONDS",
    "DEFAULT_BUDGET_PER_SECOND",
    "DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS",
    "SAFE_FRACTION",
    "Backoff",
    "HeartbeatPlan",
    "full_jitter_delay",
    "heartbeat_interval",
    "jittered",
]

DEFAULT_BUDGET_PER_SECOND = 8.0  # the 10/s quota less a margin for other callers and retries
DEFAULT_BASE_INTERVAL_SECONDS = 60  # the interval the API reference recommends
DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS = 15 * 60  # the service's default
SAFE_FRACTION = 1 / 3  # two heartbeats may fail and the task is still not reassigned


@dataclass(frozen=True)
class HeartbeatPlan:
    """The interval to use, and whether it keeps the fleet inside its call budget."""

    interval_seconds: int
    calls_per_second: float
    budget_met: bool
    message: str


def heartbeat_interval(
    running_tasks: int,
    budget_per_second: float = DEFAULT_BUDGET_PER_SECOND,
    base_interval_seconds: float = DEFAULT_BASE_INTERVAL_SECONDS,
    min_report_progress_timeout_seconds: float | None = None,
    *,
    safe_fraction: float = SAFE_FRACTION,
) -> HeartbeatPlan:
    """Plan the heartbeat interval for ``running_tasks`` tasks sharing ``budget_per_second``.

    * at least ``base_interval_seconds`` (no point heartbeating faster);
    * stretched so ``running_tasks / interval <= budget_per_second``;
    * never longer than ``safe_fraction`` of the smallest ``reportProgressTimeout``
      (the service default when None), not even to meet the budget.

    The interval is whole seconds: rounded up when stretching (so the rate stays within
    budget), down when capping (so it stays within the safety margin), and at least 1.
    """
    if budget_per_second <= 0:
        raise ValueError("budget_per_second must be positive")
    running = max(running_tasks, 0)
    timeout = min_report_progress_timeout_seconds or DEFAULT_REPORT_PROGRESS_TIMEOUT_SECONDS
    ceiling = max(math.floor(timeout * safe_fraction), 1)
    needed = math.ceil(running / budget_per_second) if running else 0
    interval = max(math.ceil(base_interval_seconds), needed, 1)
    capped = interval > ceiling
    interval = min(interval, ceiling)
    rate = running / interval
    met = rate <= budget_per_second + 1e-9
    if met and not capped:
        message = f"{running} running task(s) every {interval}s: {rate:.2f} calls/s of {budget_per_second:g}"
    elif met:
        message = (
            f"interval held at {interval}s, {safe_fraction:.2g} of the smallest reportProgressTimeout "
            f"({timeout:g}s): {rate:.2f} calls/s of {budget_per_second:g}"
        )
    else:
        message = (
            f"{running} running task(s) need {rate:.2f} heartbeats/s at {interval}s (at most "
            f"{safe_fraction:.2g} of reportProgressTimeout {timeout:g}s), over the budget of "
            f"{budget_per_second:g}/s; expect throttling"
        )
    return HeartbeatPlan(interval_seconds=interval, calls_per_second=rate, budget_met=met, message=message)


def full_jitter_delay(
    attempt: int,
    *,
    base: float = 0.5,
    cap: float = 30.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to sleep before retry ``attempt`` (0-based): uniform in [0, min(cap, base * 2**attempt)]."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # min() before the power would overflow for huge attempt counts.
    ceiling = cap if attempt >= 64 else min(cap, base * (2**attempt))
    return rand() * ceiling


def jittered(interval: float, *, fraction: float = 0.1, rand: Callable[[], float] = random.random) -> float:
    """``interval`` spread by +-``fraction`` so periodic callers do not synchronise."""
    return interval * (1 - fraction + 2 * fraction * rand())


class Backoff:
    """Stateful full-jitter back-off for one retry loop: ``next_delay()``, ``reset()`` on success."""

    def __init__(
        self, *, base: float = 0.5, cap: float = 30.0, rand: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self._rand = rand
        self.attempt = 0

    def next_delay(self) -> float:
        delay = full_jitter_delay(self.attempt, base=self.base, cap=self.cap, rand=self._rand)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
