from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dptr_samples import (
    ATTEMPT_ID,
    COMPONENT_ID,
    INSTANCE_ID,
    PIPELINE_ID,
    TASK_ID,
    poll_for_task_response,
    set_attempt_fields,
    task_object,
)

from dptr_common.task import Task, TaskError, TaskField, parse_bool, parse_period, parse_task


def test_parses_a_realistic_poll_for_task_response() -> None:
    task = parse_task(poll_for_task_response()["taskObject"])

    assert task.task_id == TASK_ID
    assert task.pipeline_id == PIPELINE_ID
    assert task.attempt_id == ATTEMPT_ID
    assert task.object_type == "ShellCommandActivity"
    assert task.command == 'echo "$1" "$2" "$3" > /dev/null; exit 0'
    assert task.script_uri is None
    # Repeated field, order kept, values untouched (no shell splitting).
    assert task.script_arguments == ("--date", "2024-05-01 00:00", "it's; $(rm -rf /) `x`")
    assert task.stage is False
    assert task.stdout == "s3://logs-bucket/etl/stdout"
    assert task.stderr == "s3://logs-bucket/etl/stderr"
    assert task.attempt_timeout_seconds == 2 * 3600
    assert task.report_progress_timeout_seconds == 15 * 60
    assert task.maximum_retries == 3
    assert task.my_image == "registry.example.com/etl/job:1.4"
    assert task.inputs == ("InputDataNode",)
    assert task.outputs == ("OutputDataNode",)
    assert task.component_id == COMPONENT_ID
    assert task.instance_id == INSTANCE_ID
    # The referenced objects are kept, the attempt is not among them.
    assert set(task.objects) == {"InputDataNode", "OutputDataNode"}
    assert task.objects["InputDataNode"].first("directoryPath") == "s3://in-bucket/2024-05-01"


def test_field_kinds() -> None:
    task = parse_task(task_object())
    assert task.custom_fields == {
        "myImage": ["registry.example.com/etl/job:1.4"],
        "myTable": ["events"],
        "myPartition": ["2024-05-01", "2024-05-02"],
    }
    system = task.system_fields
    assert system["@status"] == ["RUNNING"]
    assert system["@componentParent"] == [COMPONENT_ID]  # refs shown by id
    assert "type" not in system and "myTable" not in system
    refs = [f for f in task.fields if f.is_ref]
    assert [f.key for f in refs] == ["@componentParent", "@instanceParent", "@headAttempt", "input", "output"]
    assert task.attempt.refs("input") == ["InputDataNode"]
    assert task.attempt.values("input") == []


def test_fields_map_round_trip_keeps_order() -> None:
    task = parse_task(task_object())
    strings, refs = task.fields_map()
    assert strings["scriptArgument"] == list(task.script_arguments)
    assert refs["input"] == ["InputDataNode"]
    assert "input" not in strings
    rebuilt = Task.from_fields(
        task_id=task.task_id,
        pipeline_id=task.pipeline_id,
        attempt_id=task.attempt_id,
        fields=[TaskField(key=k, string_value=v) for k, vs in strings.items() for v in vs]
        + [TaskField(key=k, ref_value=v) for k, vs in refs.items() for v in vs],
    )
    assert rebuilt.script_arguments == task.script_arguments
    assert rebuilt.component_id == task.component_id
    assert rebuilt.attempt_timeout_seconds == task.attempt_timeout_seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15 Minutes", 900),
        ("2 hours", 7200),
        ("30 seconds", 30),
        ("1 minute", 60),
        ("1 Hour", 3600),
        ("3 days", 3 * 86400),
        ("1 week", 7 * 86400),
        ("1 month", 30 * 86400),
        ("1 year", 365 * 86400),
        ("  45   MINUTES ", 45 * 60),
        ("10minutes", 600),
    ],
)
def test_parse_period(text: str, seconds: int) -> None:
    assert parse_period(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "15",
        "minutes",
        "0 minutes",
        "-1 hours",
        "1.5 hours",
        "5 fortnights",
        "PT15M",
        # Unbounded: would overflow activeDeadlineSeconds (int64) and make the Job invalid.
        "300000000000 years",
        "367 days",
        "9" * 5000 + " seconds",
    ],
)
def test_parse_period_rejects(text: str) -> None:
    with pytest.raises(TaskError) as info:
        parse_period(text, field="attemptTimeout")
    assert info.value.error_id == "dptr.InvalidTask.BadPeriod.attemptTimeout"
    assert repr(text[:64]) in info.value.message


def test_the_longest_period_is_a_leap_year() -> None:
    assert parse_period("366 days") == 366 * 86400
    assert parse_period("52 weeks") == 52 * 7 * 86400


def test_parse_bool() -> None:
    assert parse_bool("TRUE", field="stage") is True
    assert parse_bool("false", field="stage") is False
    with pytest.raises(TaskError) as info:
        parse_bool("yes", field="stage")
    assert info.value.error_id == "dptr.InvalidTask.BadBoolean.stage"


def test_script_uri_task() -> None:
    obj = set_attempt_fields(
        task_object(),
        [
            {"key": "type", "stringValue": "ShellCommandPrecondition"},
            {"key": "scriptUri", "stringValue": "s3://bucket/check.sh"},
            {"key": "scriptArgument", "stringValue": "a b"},
            {"key": "scriptArgument", "stringValue": ""},
        ],
    )
    task = parse_task(obj)
    assert task.object_type == "ShellCommandPrecondition"
    assert task.script_uri == "s3://bucket/check.sh"
    assert task.script_arguments == ("a b", "")
    assert task.command is None
    assert task.attempt_timeout_seconds is None
    assert task.component_id is None


def _error_for(obj: object) -> TaskError:
    with pytest.raises(TaskError) as info:
        parse_task(obj)
    return info.value


@pytest.mark.parametrize(
    ("mutate", "error_id"),
    [
        (lambda o: o.pop("taskId"), "dptr.InvalidTask.MissingTaskId"),
        (lambda o: o.update(taskId=""), "dptr.InvalidTask.MissingTaskId"),
        (lambda o: o.update(taskId="x" * 2049), "dptr.InvalidTask.BadTaskId"),
        (lambda o: o.pop("pipelineId"), "dptr.InvalidTask.MissingPipelineId"),
        (lambda o: o.pop("attemptId"), "dptr.InvalidTask.MissingAttemptId"),
        (lambda o: o.update(attemptId="@Other_Attempt=1"), "dptr.InvalidTask.MissingAttemptObject"),
        (lambda o: o.pop("objects"), "dptr.InvalidTask.MissingObjects"),
        (lambda o: o.update(objects=[]), "dptr.InvalidTask.MissingObjects"),
        (lambda o: o["objects"].update({ATTEMPT_ID: "nope"}), "dptr.InvalidTask.MalformedObject"),
        (lambda o: o["objects"][ATTEMPT_ID].update(fields={"a": 1}), "dptr.InvalidTask.MalformedObject"),
    ],
)
def test_malformed_task_objects(mutate: Callable[[dict[str, Any]], object], error_id: str) -> None:
    obj = task_object()
    mutate(obj)
    assert _error_for(obj).error_id == error_id


@pytest.mark.parametrize(
    ("fields", "error_id"),
    [
        ([{"key": "command", "stringValue": "true"}], "dptr.InvalidTask.MissingType"),
        ([{"stringValue": "x"}], "dptr.InvalidTask.MalformedField"),
        (["not a field"], "dptr.InvalidTask.MalformedField"),
        ([{"key": "type", "stringValue": "A", "refValue": "B"}], "dptr.InvalidTask.MalformedField"),
        ([{"key": "type"}], "dptr.InvalidTask.MalformedField"),
        ([{"key": "type", "stringValue": 5}], "dptr.InvalidTask.MalformedField"),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "attemptTimeout", "stringValue": "soon"},
            ],
            "dptr.InvalidTask.BadPeriod.attemptTimeout",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "reportProgressTimeout", "stringValue": "0 minutes"},
            ],
            "dptr.InvalidTask.BadPeriod.reportProgressTimeout",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "maximumRetries", "stringValue": "-2"},
            ],
            "dptr.InvalidTask.BadInteger.maximumRetries",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "stage", "stringValue": "maybe"},
            ],
            "dptr.InvalidTask.BadBoolean.stage",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "command", "stringValue": "a"},
                {"key": "command", "stringValue": "b"},
            ],
            "dptr.InvalidTask.RepeatedField.command",
        ),
        (
            [{"key": "type", "stringValue": "ShellCommandActivity"}, {"key": "command", "refValue": "Other"}],
            "dptr.InvalidTask.BadField.command",
        ),
        (
            [
                {"key": "type", "stringValue": "ShellCommandActivity"},
                {"key": "scriptArgument", "refValue": "Other"},
            ],
            "dptr.InvalidTask.BadField.scriptArgument",
        ),
    ],
)
def test_malformed_fields(fields: list[object], error_id: str) -> None:
    obj = task_object()
    obj["objects"][ATTEMPT_ID]["fields"] = fields
    error = _error_for(obj)
    assert error.error_id == error_id
    assert error.message


def test_not_an_object() -> None:
    assert _error_for(None).error_id == "dptr.InvalidTask.NotAnObject"
    assert _error_for("task").error_id == "dptr.InvalidTask.NotAnObject"
