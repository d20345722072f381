"""Pure parts of dptr_common.ledger: claim decisions, staleness, time format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dptr_common.ledger import (
    FINAL_PHASE,
    decide_claim,
    format_time,
    heartbeat_is_stale,
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
    ("status", "action"),
    [
        ({}, "claim"),
        ({"phase": "Running", "report": {}}, "claim"),
        ({"report": {"claimedBy": ME, "claimedAt": at(1000)}}, "own"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(5)}}, "refuse"),
        ({"report": {"claimedBy": OTHER, "claimedAt": at(60)}}, "take_over"),
        ({"report": {"claimedBy": OTHER}}, "take_over"),  # no claimedAt: age unknown, so stale
        ({"report": {"claimedBy": OTHER, "claimedAt": at(600), "reportedAt": at(590)}}, "refuse"),
        ({"report": {"claimedBy": ME, "claimedAt": at(5), "reportedAt": at(1)}}, "refuse"),
        ({"phase": "Canceled"}, "refuse"),
        ({"canceled": {"at": at(3), "by": "sidecar/x", "reason": "canceled"}}, "refuse"),
        ({"phase": "Lost"}, "claim"),
    ],
)
def test_decide_claim(status: dict, action: str) -> None:
    decision = decide_claim(status, ME, NOW, stale_after=30)
    assert decision.action == action, decision.why
    assert decision.why


def test_heartbeat_is_stale() -> None:
    assert heartbeat_is_stale({}, NOW, 60)
    assert heartbeat_is_stale(None, NOW, 60)
    assert not heartbeat_is_stale({"heartbeat": {"lastAt": at(59)}}, NOW, 60)
    assert heartbeat_is_stale({"heartbeat": {"lastAt": at(61)}}, NOW, 60)
    assert not heartbeat_is_stale({"heartbeat": {"lastAt": at(1)}}, NOW.replace(tzinfo=None), 60)


def test_heartbeat_is_stale_on_the_model() -> None:
    models = pytest.importorskip("dptr_common.models")
    status = models.PipelineTaskStatus.model_validate({"heartbeat": {"lastAt": at(10), "owner": "sidecar"}})
    assert not heartbeat_is_stale(status, NOW, 60)
    assert heartbeat_is_stale(status, NOW, 5)
    assert heartbeat_is_stale(models.PipelineTaskStatus(), NOW, 5)


def test_final_phase() -> None:
    assert FINAL_PHASE == {"FINISHED": "Succeeded", "FAILED": "Failed", "FALSE": "Failed"}
