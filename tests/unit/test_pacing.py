from __future__ import annotations

import random

import pytest

from dptr_common.pacing import Backoff, full_jitter_delay, heartbeat_interval, jittered


def test_ten_tasks_use_the_base_interval() -> None:
    plan = heartbeat_interval(10, budget_per_second=8, base_interval_seconds=60)
    assert plan.interval_seconds == 60
    assert plan.budget_met
    assert plan.calls_per_second == pytest.approx(10 / 60)


def test_six_hundred_tasks_stretch_the_interval() -> None:
    plan = heartbeat_interval(600, budget_per_second=8, base_interval_seconds=60)
    assert plan.interval_seconds == 75  # 600 / 8
    assert plan.budget_met
    assert plan.calls_per_second <= 8


def test_five_thousand_tasks_cannot_meet_the_budget_safely() -> None:
    plan = heartbeat_interval(5000, budget_per_second=8, base_interval_seconds=60)
    # 5000/8 = 625 s would exceed a third of the default 15-minute timeout: safety wins.
    assert plan.interval_seconds == 300
    assert not plan.budget_met
    assert plan.calls_per_second == pytest.approx(5000 / 300)
    assert "over the budget" in plan.message


def test_short_report_progress_timeout_caps_the_interval() -> None:
    plan = heartbeat_interval(10, 8, 60, min_report_progress_timeout_seconds=120)
    assert plan.interval_seconds == 40
    assert plan.budget_met
    plan = heartbeat_interval(600, 8, 60, min_report_progress_timeout_seconds=180)
    assert plan.interval_seconds == 60
    assert not plan.budget_met  # 10/s > 8/s


def test_interval_properties_over_a_range() -> None:
    for running in range(0, 20000, 97):
        for timeout in (60, 300, 900, 3600):
            plan = heartbeat_interval(running, 8, 60, timeout)
            assert 1 <= plan.interval_seconds <= timeout / 3
            if plan.budget_met:
                assert running / plan.interval_seconds <= 8
            else:
                assert plan.interval_seconds == timeout // 3


def test_rounding_stays_within_budget() -> None:
    plan = heartbeat_interval(601, budget_per_second=8, base_interval_seconds=60)
    assert plan.interval_seconds == 76
    assert 601 / plan.interval_seconds <= 8


def test_invalid_budget() -> None:
    with pytest.raises(ValueError, match="positive"):
        heartbeat_interval(1, budget_per_second=0)


def test_full_jitter_bounds() -> None:
    assert full_jitter_delay(0, base=1, cap=30, rand=lambda: 1.0) == 1
    assert full_jitter_delay(3, base=1, cap=30, rand=lambda: 1.0) == 8
    assert full_jitter_delay(10, base=1, cap=30, rand=lambda: 1.0) == 30
    assert full_jitter_delay(10_000, base=1, cap=30, rand=lambda: 0.5) == 15
    assert full_jitter_delay(5, rand=lambda: 0.0) == 0
    with pytest.raises(ValueError, match="attempt"):
        full_jitter_delay(-1)


def test_backoff_grows_caps_and_resets() -> None:
    rng = random.Random(7)
    backoff = Backoff(base=0.5, cap=20, rand=rng.random)
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0 <= d <= 20 for d in delays)
    assert all(d <= 0.5 * 2**i for i, d in enumerate(delays))
    assert max(delays[10:]) > 5  # grows (with overwhelming probability for this seed)
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 0.5


def test_jittered_spreads_within_fraction() -> None:
    assert jittered(60, fraction=0.1, rand=lambda: 0.0) == pytest.approx(54)
    assert jittered(60, fraction=0.1, rand=lambda: 1.0) == pytest.approx(66)
    values = {round(jittered(60), 6) for _ in range(20)}
    assert len(values) > 1
