"""The operator's metrics: names, labels, the per-TaskRunner rows read at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dptr_common.version import VERSION
from dptr_operator.metrics import PHASES, Metrics, RunnerSample
from dptr_operator.reporter import outcome_status


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _row(name: str = "etl", **changes: object) -> RunnerSample:
    values: dict[str, object] = {
        "namespace": "team-a",
        "name": name,
        "ready": True,
        "paused": False,
        "capacity": 4,
        "active": 1,
        "heartbeat_interval": 60.0,
        "phases": {"Running": 1, "Succeeded": 2},
        "oldest_heartbeat_age": 30.0,
        "heartbeat_age_ratio": 0.25,
        "last_successful_poll": 1_800_000_000.0,
    }
    values.update(changes)
    return RunnerSample(**values)  # type: ignore[arg-type]


TR = (("taskrunner", "etl"), ("taskrunner_namespace", "team-a"))


def test_every_name_has_the_one_prefix() -> None:
    metrics = Metrics()
    metrics.runner_state(lambda: [_row()])
    names = {name for name, _ in _samples(metrics)}
    assert names and all(n.startswith("dptr_") for n in names), sorted(names)


def test_runner_rows_become_labelled_gauges_and_vanish_with_the_runner() -> None:
    rows = [_row(), _row("nightly", ready=False, paused=True, last_successful_poll=None)]
    metrics = Metrics()
    metrics.runner_state(lambda: rows)
    got = _samples(metrics)
    assert got[("dptr_taskrunner_ready", TR)] == 1
    assert got[("dptr_taskrunner_capacity", TR)] == 4
    assert got[("dptr_heartbeat_age_ratio", TR)] == 0.25
    assert got[("dptr_oldest_heartbeat_age_seconds", TR)] == 30
    assert got[("dptr_last_successful_poll_timestamp_seconds", TR)] == 1_800_000_000
    for phase in PHASES:  # zeros too: a panel or an alert never sees "no data"
        expected = {"Running": 1, "Succeeded": 2}.get(phase, 0)
        assert got[("dptr_tasks", (("phase", phase), *TR))] == expected
    nightly = (("taskrunner", "nightly"), ("taskrunner_namespace", "team-a"))
    assert got[("dptr_taskrunner_ready", nightly)] == 0
    assert got[("dptr_taskrunner_paused", nightly)] == 1
    assert ("dptr_last_successful_poll_timestamp_seconds", nightly) not in got  # never polled yet

    rows.pop()  # the TaskRunner is deleted
    assert ("dptr_taskrunner_ready", nightly) not in _samples(metrics)


def test_a_failing_state_source_still_answers_the_scrape() -> None:
    def broken() -> list[RunnerSample]:
        raise RuntimeError("boom")

    metrics = Metrics()
    metrics.runner_state(broken)
    got = _samples(metrics)
    assert ("dptr_leader", ()) in got
    assert not [k for k in got if k[0] == "dptr_taskrunner_ready"]


def test_build_info_and_the_first_failures_series_exist_from_the_start() -> None:
    got = _samples(Metrics())
    info = [labels for name, labels in got if name == "dptr_build_info"]
    assert len(info) == 1 and ("version", VERSION) in info[0]
    assert got[("dptr_lease_transitions", ())] == 0
    # A first SetTaskStatus failure must show as an increase, never as a series born at 1.
    for reason in ("TransientError", "InvalidCredentials", "Throttled"):
        assert got[("dptr_api_call_errors_total", (("operation", "SetTaskStatus"), ("reason", reason)))] == 0


def test_only_throttling_tries_are_counted_as_throttled() -> None:
    metrics = Metrics()
    metrics.attempt_failed("PollForTask", "Throttled")
    metrics.attempt_failed("PollForTask", "TransientError")
    got = _samples(metrics)
    assert got[("dptr_api_throttled_total", (("operation", "PollForTask"),))] == 1
    assert len([k for k in got if k[0] == "dptr_api_throttled_total"]) == 1


def test_outcomes_are_what_data_pipeline_was_told() -> None:
    # A precondition that did not hold (FALSE) ends Failed but is not a failure.
    assert outcome_status("Failed", "FALSE") == "FALSE"
    assert outcome_status("Failed", "FAILED") == "FAILED"
    assert outcome_status("Succeeded", "FINISHED") == "FINISHED"
    assert outcome_status("Canceled", None) == "canceled"
    # A claim made but its status not yet read back: the phase says which.
    assert outcome_status("Succeeded", None) == "FINISHED"
    assert outcome_status("Failed", None) == "FAILED"


def test_a_taskrunners_counters_start_at_zero() -> None:
    metrics = Metrics()
    metrics.runner_added("team-a", "etl")
    got = _samples(metrics)
    assert got[("dptr_tasks_polled_total", TR)] == 0
    assert got[("dptr_operator_outcomes_total", TR)] == 0
    for status in ("FINISHED", "FAILED", "FALSE", "canceled"):
        assert got[("dptr_task_outcomes_total", (("status", status), *TR))] == 0
