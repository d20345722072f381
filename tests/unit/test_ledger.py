"""Pure parts of dptr_common.ledger: claim decisions, staleness, time format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dptr_common.ledger import (
    FINAL_PHASE,
    StalenessObserver,
    claim_fingerprint,
    decide_claim,
    format_time,
    operator_holder,
    parse_time,
    sidecar_holder,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
ME = sidecar_holder("pod-1")
OTHER = operator_holder("op-0")


def at(seconds_ago: float) -> str:
    return format_time(NOW - timedelta(seconds=seconds_ago))


def test_identities() -> None:
    assert ME == "sidecar/pod-1"
    assert OTHER == "operator/op-0"


def test_time_round_trip() -> None:
    text = format_time(NOW)
    assert text == "2025-01-02T03:04:05.678901Z"
    assert parse_time(text) == NOW
    assert parse_time("2025-01-02T03:04:05Z") == NOW.replace(microsecond=0)
    assert parse_time(None) is None
    assert parse_time("garbage") is None
    naive = datetime(2025, 1, 1)
    assert parse_time(naive) == naive.replace(tzinfo=UTC)
    assert format_time(naive) == "2025-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("status", "unchanged_for", "action"),
    [
        ({}, 0, "claim"),
        ({"phase": "Running", "report": {}}, 0, "claim"),
        ({"report": {"claimedBy": ME, "claimedAt": at(1000)}}, 1000, "own"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(5)}}, 5, "refuse"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(60)}}, 60, "take_over"),
        # The writer's claimedAt decides nothing: only what this observer saw.
        ({"report": {"claimedBy": OTHER, "claimedAt": at(86400)}}, 0, "refuse"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(-86400)}}, 31, "take_over"),
        ({"report": {"claimedBy": OTHER}}, 0, "refuse"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(600), "reportedAt": at(590)}}, 600, "refuse"),
        ({"report": {"claimedBy": ME, "claimedAt": at(5), "reportedAt": at(1)}}, 5, "refuse"),
        ({"phase": "Canceled"}, 0, "refuse"),
        ({"canceled": {"at": at(3), "by": "sidecar/x", "reason": "canceled"}}, 0, "refuse"),
        ({"phase": "Lost"}, 0, "claim"),
    ],
)
def test_decide_claim(status: dict, unchanged_for: float, action: str) -> None:
    decision = decide_claim(status, ME, unchanged_for=unchanged_for, stale_after=30)
    assert decision.action == action, decision.why
    assert decision.why


def test_staleness_observer_counts_on_its_own_clock() -> None:
    now = [100.0]
    observer = StalenessObserver(clock=lambda: now[0], limit=2)
    claim = {"report": {"claimedBy": OTHER, "claimedAt": at(0), "status": "FINISHED"}}
    assert observer.unchanged_for("a", claim_fingerprint(claim)) == 0
    now[0] += 7
    assert observer.unchanged_for("a", claim_fingerprint(claim)) == 7
    refreshed = {"report": {**claim["report"], "claimedAt": at(-1)}}
    assert observer.unchanged_for("a", claim_fingerprint(refreshed)) == 0  # a refresh restarts it
    now[0] += 1
    assert observer.unchanged_for("a", claim_fingerprint(refreshed)) == 1
    observer.unchanged_for("b", 1)
    observer.unchanged_for("c", 1)  # beyond the limit: "a" is forgotten
    assert observer.unchanged_for("a", claim_fingerprint(refreshed)) == 0


def test_final_phase() -> None:
    assert FINAL_PHASE == {"FINISHED": "Succeeded", "FAILED": "Failed", "FALSE": "Failed"}
