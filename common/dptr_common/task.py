"""A polled task, parsed once at the boundary.

``PollForTask`` returns a ``taskObject``::

    {"taskId": "...", "pipelineId": "df-...", "attemptId": "@Act_2024-...Attempt=1",
     "objects": {"<id>": {"id": ..., "name": ..., "fields": [{"key": ..., "stringValue" | "refValue": ...}]}}}

The attempt object is ``objects[attemptId]``; the service copies the activity's own fields
(``type``, ``command``, ``scriptArgument``, ...) onto it.  ``fields`` is an ordered
multimap: ``scriptArgument`` repeats and its order is the argv order, so it is kept as a
list of :class:`TaskField`, never a dict.  Keys starting with ``@`` are the service's own;
keys starting with ``my`` are the user's.

Everything is validated here so that a malformed task fails with a :class:`TaskError`
(and a descriptive errorId) before anything is created for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from dptr_common.errors import TaskError

__all__ = [
    "MAX_PERIOD_SECONDS",
    "PipelineObject",
    "Task",
    "TaskError",
    "TaskField",
    "parse_bool",
    "parse_object",
    "parse_period",
    "parse_task",
]

SHELL_COMMAND_ACTIVITY = "ShellCommandActivity"
SHELL_COMMAND_PRECONDITION = "ShellCommandPrecondition"
EXISTS_PRECONDITION = "Exists"

_PERIOD = re.compile(r"^\s*(\d+)\s*([A-Za-z]+)\s*$")
# Data Pipeline periods are "N <unit>", units in any case, singular or plural.  A month
# and a year have no fixed length; for a timeout the conventional 30/365 days is fine.
_UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}


#: The longest period dptr accepts (366 days): anything longer is a mistake, and an
#: unbounded one would overflow activeDeadlineSeconds (int64) and be refused by the API
#: server after the task was polled.
MAX_PERIOD_SECONDS = 366 * 86400


def parse_period(value: str, *, field: str = "period") -> int:
    """``"15 Minutes"`` -> ``900``, at most :data:`MAX_PERIOD_SECONDS`.  Raises
    ``TaskError(dptr.InvalidTask.BadPeriod.<field>)``."""
    match = _PERIOD.match(value) if len(value) <= 64 else None
    if match:
        unit = match.group(2).lower()
        unit = unit[:-1] if unit.endswith("s") else unit
        if unit in _UNIT_SECONDS and len(match.group(1)) <= 12:
            seconds = int(match.group(1)) * _UNIT_SECONDS[unit]
            if seconds > MAX_PERIOD_SECONDS:
                raise TaskError(
                    f"dptr.InvalidTask.BadPeriod.{field}",
                    f"field {field!r} is {value!r}, longer than dptr's maximum of 366 days",
                )
            if seconds > 0:
                return seconds
    raise TaskError(
        f"dptr.InvalidTask.BadPeriod.{field}",
        f"field {field!r} is {value[:64]!r}; expected a positive period such as '15 minutes' or '2 hours'",
    )


def is_s3_path(path: str | None) -> bool:
    """An ``s3://`` (or Hadoop's ``s3n://``/``s3a://``) path; anything else in ``stdout`` or
    ``stderr`` is a local path, which the developer guide allows for workerGroup tasks."""
    return path is not None and re.match(r"^s3[an]?://", path.strip(), re.IGNORECASE) is not None


def parse_bool(value: str, *, field: str) -> bool:
    """Data Pipeline booleans are the strings ``true``/``false`` (any case)."""
    lowered = value.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    raise TaskError(
        f"dptr.InvalidTask.BadBoolean.{field}", f"field {field!r} is {value!r}; expected true or false"
    )


def _parse_int(value: str, *, field: str, minimum: int = 0) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TaskError(
            f"dptr.InvalidTask.BadInteger.{field}",
            f"field {field!r} is {value!r}; expected an integer >= {minimum}",
        )
    return number


class TaskField(BaseModel):
    """One entry of an object's ``fields``: a string value or a reference, never both."""

    model_config = ConfigDict(frozen=True)

    key: str
    string_value: str | None = None
    ref_value: str | None = None

    @property
    def is_ref(self) -> bool:
        return self.ref_value is not None

    @property
    def is_system(self) -> bool:
        """``@``-fields belong to the service (``@status``, ``@componentParent``, ...)."""
        return self.key.startswith("@")

    @property
    def is_custom(self) -> bool:
        """User-defined fields start with ``my``."""
        return self.key.startswith("my")


class PipelineObject(BaseModel):
    """An object of the ``objects`` map (the attempt, or a referenced data node, ...)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    fields: tuple[TaskField, ...] = ()

    def values(self, key: str) -> list[str]:
        """All string values of ``key``, in order."""
        return [f.string_value for f in self.fields if f.key == key and f.string_value is not None]

    def refs(self, key: str) -> list[str]:
        """All reference values of ``key``, in order."""
        return [f.ref_value for f in self.fields if f.key == key and f.ref_value is not None]

    def first(self, key: str) -> str | None:
        values = self.values(key)
        return values[0] if values else None


def _parse_field(raw: Any, object_id: str, index: int) -> TaskField:
    where = f"field #{index} of object {object_id!r}"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("key"), str) or not raw["key"]:
        raise TaskError("dptr.InvalidTask.MalformedField", f"{where} has no key")
    string_value, ref_value = raw.get("stringValue"), raw.get("refValue")
    if (string_value is None) == (ref_value is None):
        raise TaskError(
            "dptr.InvalidTask.MalformedField",
            f"{where} ({raw['key']!r}) must have exactly one of stringValue and refValue",
        )
    value = string_value if string_value is not None else ref_value
    if not isinstance(value, str):
        raise TaskError("dptr.InvalidTask.MalformedField", f"{where} ({raw['key']!r}) has a non-string value")
    return TaskField(key=raw["key"], string_value=string_value, ref_value=ref_value)


def parse_object(object_id: str, raw: Any) -> PipelineObject:
    """One object of a PollForTask ``objects`` map or of DescribeObjects' answer."""
    if not isinstance(raw, Mapping):
        raise TaskError("dptr.InvalidTask.MalformedObject", f"object {object_id!r} is not an object")
    raw_fields = raw.get("fields", [])
    if not isinstance(raw_fields, list):
        raise TaskError("dptr.InvalidTask.MalformedObject", f"object {object_id!r} has no field list")
    return PipelineObject(
        id=str(raw.get("id") or object_id),
        name=str(raw.get("name") or object_id),
        fields=tuple(_parse_field(f, object_id, i) for i, f in enumerate(raw_fields)),
    )


class Task(BaseModel):
    """A polled task attempt with its fields parsed and validated.

    Build it with :func:`parse_task` (from PollForTask) or :meth:`Task.from_fields`
    (from a PipelineTask's spec, after a restart).  ``task_id`` is a credential-like
    token: it must never reach the task's container.
    """

    model_config = ConfigDict(frozen=True)

    task_id: str
    pipeline_id: str
    attempt_id: str
    attempt: PipelineObject
    #: The other objects PollForTask returned (data nodes the attempt refers to, ...).
    objects: dict[str, PipelineObject] = {}

    # Parsed from the attempt's fields (see from_fields for their sources).
    object_type: str
    command: str | None = None
    script_uri: str | None = None
    script_arguments: tuple[str, ...] = ()
    stage: bool | None = None
    stdout: str | None = None
    stderr: str | None = None
    attempt_timeout_seconds: int | None = None
    report_progress_timeout_seconds: int | None = None
    maximum_retries: int | None = None
    #: Preconditions: the pause between checks, and how long after the attempt began
    #: the runner keeps checking (dptr_common.render_preconditions).
    retry_delay_seconds: int | None = None
    precondition_timeout_seconds: int | None = None
    #: ``@actualStartTime`` of the attempt (``YYYY-MM-DDTHH:MM:SS``, UTC), as the service sent it.
    actual_start_time: str | None = None
    #: An ``Exists`` precondition's data node (the runtime ``node`` reference).
    node: str | None = None
    my_image: str | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    component_id: str | None = None
    instance_id: str | None = None

    @property
    def fields(self) -> tuple[TaskField, ...]:
        return self.attempt.fields

    @property
    def custom_fields(self) -> dict[str, list[str]]:
        """``my*`` fields with their string values, in first-seen key order."""
        out: dict[str, list[str]] = {}
        for f in self.attempt.fields:
            if f.is_custom and f.string_value is not None:
                out.setdefault(f.key, []).append(f.string_value)
        return out

    @property
    def system_fields(self) -> dict[str, list[str]]:
        """``@`` fields, values or refs as strings."""
        out: dict[str, list[str]] = {}
        for f in self.attempt.fields:
            if f.is_system:
                out.setdefault(f.key, []).append(
                    f.string_value if f.string_value is not None else str(f.ref_value)
                )
        return out

    def fields_map(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """(string fields, ref fields) as key -> ordered values, the PipelineTask spec's form."""
        strings: dict[str, list[str]] = {}
        refs: dict[str, list[str]] = {}
        for f in self.attempt.fields:
            if f.ref_value is not None:
                refs.setdefault(f.key, []).append(f.ref_value)
            elif f.string_value is not None:
                strings.setdefault(f.key, []).append(f.string_value)
        return strings, refs

    @classmethod
    def from_fields(
        cls,
        *,
        task_id: str,
        pipeline_id: str,
        attempt_id: str,
        fields: Iterable[TaskField],
        name: str | None = None,
        objects: Mapping[str, PipelineObject] | None = None,
    ) -> Task:
        """Validate ids and parse the attempt's fields into a Task.

        Raises :class:`TaskError` with ids under ``dptr.InvalidTask.*``.
        """
        for label, value, limit in (
            ("TaskId", task_id, 2048),
            ("PipelineId", pipeline_id, 1024),
            ("AttemptId", attempt_id, 1024),
        ):
            if not isinstance(value, str) or not value:
                raise TaskError(
                    f"dptr.InvalidTask.Missing{label}", f"the task has no {label[0].lower() + label[1:]}"
                )
            if len(value) > limit:
                raise TaskError(
                    f"dptr.InvalidTask.Bad{label}", f"the {label} is longer than {limit} characters"
                )
        attempt = PipelineObject(id=attempt_id, name=name or attempt_id, fields=tuple(fields))

        def single(key: str) -> str | None:
            values = attempt.values(key)
            if len(values) > 1:
                raise TaskError(
                    f"dptr.InvalidTask.RepeatedField.{key}", f"field {key!r} is given {len(values)} times"
                )
            if attempt.refs(key):
                raise TaskError(
                    f"dptr.InvalidTask.BadField.{key}", f"field {key!r} must be a string, not a reference"
                )
            return values[0] if values else None

        def single_ref(key: str) -> str | None:
            refs = attempt.refs(key)
            return refs[0] if refs else None

        object_type = single("type")
        if not object_type:
            raise TaskError("dptr.InvalidTask.MissingType", "the attempt object has no 'type' field")
        stage = single("stage")
        attempt_timeout = single("attemptTimeout")
        rpt = single("reportProgressTimeout")
        retries = single("maximumRetries")
        # Only a precondition's runner uses these (the service retries activities), so only
        # a precondition fails for a malformed one.
        checks = object_type in (SHELL_COMMAND_PRECONDITION, EXISTS_PRECONDITION)
        retry_delay = single("retryDelay") if checks else None
        precondition_timeout = single("preconditionTimeout") if checks else None
        if attempt.refs("scriptArgument"):
            raise TaskError(
                "dptr.InvalidTask.BadField.scriptArgument", "scriptArgument values must be strings"
            )
        return cls(
            task_id=task_id,
            pipeline_id=pipeline_id,
            attempt_id=attempt_id,
            attempt=attempt,
            objects=dict(objects or {}),
            object_type=object_type,
            command=single("command"),
            script_uri=single("scriptUri"),
            script_arguments=tuple(attempt.values("scriptArgument")),
            stage=parse_bool(stage, field="stage") if stage is not None else None,
            stdout=single("stdout"),
            stderr=single("stderr"),
            attempt_timeout_seconds=parse_period(attempt_timeout, field="attemptTimeout")
            if attempt_timeout
            else None,
            report_progress_timeout_seconds=parse_period(rpt, field="reportProgressTimeout") if rpt else None,
            maximum_retries=_parse_int(retries, field="maximumRetries") if retries is not None else None,
            retry_delay_seconds=parse_period(retry_delay, field="retryDelay") if retry_delay else None,
            precondition_timeout_seconds=parse_period(precondition_timeout, field="preconditionTimeout")
            if precondition_timeout
            else None,
            actual_start_time=attempt.first("@actualStartTime"),
            node=single_ref("node"),
            my_image=single("myImage"),
            inputs=tuple(attempt.refs("input")),
            outputs=tuple(attempt.refs("output")),
            component_id=single_ref("@componentParent"),
            instance_id=single_ref("@instanceParent"),
        )


def parse_task(task_object: Any) -> Task:
    """Parse PollForTask's ``taskObject`` (the botocore response's dict) into a :class:`Task`.

    Raises :class:`TaskError` for anything malformed; a task without a taskId cannot
    even be reported, which the caller sees as ``dptr.InvalidTask.MissingTaskId``.
    """
    if not isinstance(task_object, Mapping):
        raise TaskError("dptr.InvalidTask.NotAnObject", "the taskObject is not an object")
    attempt_id = task_object.get("attemptId")
    raw_objects = task_object.get("objects")
    if not isinstance(raw_objects, Mapping):
        raise TaskError("dptr.InvalidTask.MissingObjects", "the taskObject has no objects map")
    if not isinstance(attempt_id, str) or not attempt_id:
        raise TaskError("dptr.InvalidTask.MissingAttemptId", "the taskObject has no attemptId")
    if attempt_id not in raw_objects:
        raise TaskError(
            "dptr.InvalidTask.MissingAttemptObject",
            f"objects has no entry for the attempt {attempt_id!r}",
        )
    objects = {str(k): parse_object(str(k), v) for k, v in raw_objects.items()}
    attempt = objects.pop(attempt_id)
    return Task.from_fields(
        task_id=task_object.get("taskId") or "",  # validated there
        pipeline_id=task_object.get("pipelineId") or "",
        attempt_id=attempt_id,
        fields=attempt.fields,
        name=attempt.name,
        objects=objects,
    )
