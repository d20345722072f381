"""Pipeline definitions: objects, field inheritance, validation, expressions.

A definition is what PutPipelineDefinition carries: pipeline objects whose
``fields`` are an ordered multimap of ``{key, stringValue | refValue}``, plus
parameter objects and parameter values. Everything here is pure; the service
engine calls it under its own lock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The activity and precondition types this service queues as tasks. Other
# types (data nodes, resources, schedules, ...) are accepted and kept as
# plain objects that tasks may reference.
ACTIVITY_TYPES = frozenset({"ShellCommandActivity", "SqlActivity", "CopyActivity"})
# Exists is user-managed: its check runs on the runner, against the runtime ``node``.
PRECONDITION_TYPES = frozenset({"ShellCommandPrecondition", "Exists"})
# The types that run a user's command or script.
RUNNABLE_TYPES = frozenset({"ShellCommandActivity", "ShellCommandPrecondition"})

DEFAULT_OBJECT_ID = "Default"

_EXPRESSION = re.compile(r"#\{([^{}]*)\}")
_SIMPLE_PATH = re.compile(r"^\s*(@?[A-Za-z_][\w]*(?:\.@?[A-Za-z_][\w]*)*)\s*$")
# This period parser deliberately duplicates dptr_common.task.parse_period and must
# stay independent of it (this package imports nothing of the product's). This service
# is the test oracle standing in for AWS: it reads reportProgressTimeout (and
# retryDelay, preconditionTimeout) itself to decide when an attempt has timed out or
# may be retried, and the tests check dptr (which parses reportProgressTimeout too)
# against what it decided.
# Were both to share one parser, a bug in it (a wrong unit, a misread plural) would
# move the deadline on both sides alike and no test could see it. The two also differ
# on purpose: dptr refuses zero and periods over 366 days (its own limits, see
# MAX_PERIOD_SECONDS), whereas this parser models only what the service accepts.
_DURATION = re.compile(
    r"^\s*(\d+)\s*(second|minute|hour|day|week|month|year)s?\s*$",
    re.IGNORECASE,
)
_UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}


def parse_duration(text: str) -> float:
    """Seconds in a Data Pipeline period such as ``15 minutes`` or ``2 Hours``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a Data Pipeline period: {text!r}")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]


@dataclass(frozen=True)
class Field:
    key: str
    value: str
    is_ref: bool = False

    def to_api(self) -> dict[str, str]:
        return {"key": self.key, "refValue" if self.is_ref else "stringValue": self.value}

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> Field:
        if raw.get("refValue") is not None:
            return cls(raw["key"], raw["refValue"], True)
        return cls(raw["key"], raw.get("stringValue") or "", False)


@dataclass
class DefObject:
    id: str
    name: str
    fields: list[Field] = field(default_factory=list)

    def values(self, key: str) -> list[Field]:
        return [f for f in self.fields if f.key == key]

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "fields": [f.to_api() for f in self.fields]}


@dataclass
class Definition:
    objects: dict[str, DefObject] = field(default_factory=dict)
    parameter_objects: list[dict[str, Any]] = field(default_factory=list)
    parameter_values: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_api(
        cls,
        pipeline_objects: Sequence[Mapping[str, Any]],
        parameter_objects: Sequence[Mapping[str, Any]] | None = None,
        parameter_values: Sequence[Mapping[str, Any]] | None = None,
    ) -> Definition:
        objects: dict[str, DefObject] = {}
        for raw in pipeline_objects:
            obj = DefObject(
                raw["id"], raw.get("name") or raw["id"], [Field.from_api(f) for f in raw["fields"]]
            )
            # A duplicate id is reported by validate(); keep the first.
            objects.setdefault(obj.id, obj)
        return cls(
            objects,
            [dict(p) for p in parameter_objects or []],
            [dict(v) for v in parameter_values or []],
        )

    def duplicate_ids(self, pipeline_objects: Sequence[Mapping[str, Any]]) -> list[str]:
        seen: set[str] = set()
        dupes: list[str] = []
        for raw in pipeline_objects:
            if raw["id"] in seen:
                dupes.append(raw["id"])
            seen.add(raw["id"])
        return dupes

    def to_api(self) -> dict[str, Any]:
        return {
            "pipelineObjects": [o.to_api() for o in self.objects.values()],
            "parameterObjects": self.parameter_objects,
            "parameterValues": self.parameter_values,
        }

    # -- inheritance -------------------------------------------------------

    def resolved(self, object_id: str) -> list[Field]:
        """Fields of an object with those inherited from ``parent`` chains and Default.

        A key set on the object replaces every inherited value of that key, so a
        repeated field such as scriptArgument is never merged across levels.
        """
        return self._resolve(object_id, frozenset())

    def _resolve(self, object_id: str, seen: frozenset[str]) -> list[Field]:
        obj = self.objects.get(object_id)
        if obj is None or object_id in seen:
            return []
        seen = seen | {object_id}
        result = list(obj.fields)
        own = {f.key for f in obj.fields}
        ancestors = [f.value for f in obj.values("parent") if f.is_ref]
        if object_id != DEFAULT_OBJECT_ID:
            ancestors.append(DEFAULT_OBJECT_ID)
        for ancestor in ancestors:
            inherited = [f for f in self._resolve(ancestor, seen) if f.key not in own and f.key != "parent"]
            result.extend(inherited)
            own |= {f.key for f in inherited}
        return result

    def first(self, object_id: str, key: str) -> str | None:
        for f in self.resolved(object_id):
            if f.key == key:
                return f.value
        return None

    def all_values(self, object_id: str, key: str) -> list[str]:
        return [f.value for f in self.resolved(object_id) if f.key == key]

    def type_of(self, object_id: str) -> str | None:
        return self.first(object_id, "type")

    # -- parameters --------------------------------------------------------

    def parameter_table(self, overrides: Sequence[Mapping[str, Any]] = ()) -> dict[str, list[str]]:
        """Parameter id -> values: activation values, else put values, else default."""
        table: dict[str, list[str]] = {}
        for param in self.parameter_objects:
            for attr in param.get("attributes", []):
                if attr["key"] == "default":
                    table.setdefault(param["id"], []).append(attr["stringValue"])
        for source in (self.parameter_values, overrides):
            given: dict[str, list[str]] = {}
            for value in source:
                given.setdefault(value["id"], []).append(value["stringValue"])
            table.update(given)
        return table

    # -- validation --------------------------------------------------------

    def validate(
        self, raw_objects: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(validationErrors, validationWarnings) in the API's shape."""
        errors: dict[str, list[str]] = {}
        warnings: dict[str, list[str]] = {}

        def err(object_id: str, message: str) -> None:
            errors.setdefault(object_id, []).append(message)

        for dupe in self.duplicate_ids(raw_objects):
            err(dupe, f"ERROR: duplicate object id '{dupe}'")
        declared = {p["id"] for p in self.parameter_objects}
        for param_id in declared:
            # '*my...' is an encrypted parameter (the guide's *myPassword).
            if not param_id.removeprefix("*").startswith("my"):
                err(param_id, f"ERROR: parameter id '{param_id}' must start with 'my' (or '*my')")
        for value in self.parameter_values:
            if value["id"] not in declared:
                err(value["id"], f"ERROR: value given for undeclared parameter '{value['id']}'")
        params = self.parameter_table()
        for obj in self.objects.values():
            for f in obj.fields:
                if f.is_ref and f.value not in self.objects:
                    err(obj.id, f"ERROR: '{f.key}' references an object that does not exist: '{f.value}'")
                if not f.is_ref:
                    for ref in _EXPRESSION.findall(f.value):
                        name = ref.strip()
                        if name.startswith("my") and name in declared and name not in params:
                            err(obj.id, f"ERROR: parameter '{name}' has no value and no default")
            if self._parent_cycle(obj.id):
                err(obj.id, "ERROR: 'parent' references form a cycle")
                continue
            kind = self.type_of(obj.id)
            if obj.id != DEFAULT_OBJECT_ID and kind is None:
                warnings.setdefault(obj.id, []).append("WARNING: object has no 'type'")
            if kind in RUNNABLE_TYPES:
                has_command = self.first(obj.id, "command") is not None
                has_script = self.first(obj.id, "scriptUri") is not None
                if not has_command and not has_script:
                    err(obj.id, f"ERROR: {kind} requires one of 'command' or 'scriptUri'")
                elif has_command and has_script:
                    err(obj.id, f"ERROR: {kind} accepts only one of 'command' or 'scriptUri'")
            if kind == "SqlActivity":
                if self.first(obj.id, "database") is None:
                    err(obj.id, "ERROR: SqlActivity requires 'database'")
                if (self.first(obj.id, "script") is None) == (self.first(obj.id, "scriptUri") is None):
                    err(obj.id, "ERROR: SqlActivity requires exactly one of 'script' or 'scriptUri'")
            if kind == "CopyActivity":
                for key in ("input", "output"):
                    if self.first(obj.id, key) is None:
                        err(obj.id, f"ERROR: CopyActivity requires '{key}'")
            if kind in ACTIVITY_TYPES and self.first(obj.id, "workerGroup") is None:
                if self.first(obj.id, "runsOn") is None:
                    err(obj.id, "ERROR: one of 'runsOn' or 'workerGroup' must be specified")
                else:
                    warnings.setdefault(obj.id, []).append(
                        "WARNING: runsOn resources are not launched by the local service; "
                        "only activities with a workerGroup are queued"
                    )
        return (
            [{"id": k, "errors": v} for k, v in errors.items()],
            [{"id": k, "warnings": v} for k, v in warnings.items()],
        )

    def _parent_cycle(self, object_id: str) -> bool:
        stack: list[tuple[str, frozenset[str]]] = [(object_id, frozenset())]
        while stack:
            current, path = stack.pop()
            if current in path:
                return True
            obj = self.objects.get(current)
            if obj is None:
                continue
            for f in obj.values("parent"):
                if f.is_ref:
                    stack.append((f.value, path | {current}))
        return False


# -- expressions -----------------------------------------------------------

Lookup = Callable[[str], "list[Field] | None"]


def evaluate(text: str, fields_of: Lookup, self_id: str, params: Mapping[str, list[str]]) -> str:
    """Substitute simple ``#{...}`` references in ``text``.

    Supported: ``#{myParameter}`` (``#{*myParameter}`` for an encrypted one), ``#{field}`` and ``#{@systemField}`` of the
    object itself, and dotted paths through references (``#{input.directoryPath}``).
    Anything else (functions such as ``format(...)``) is left as written, so a
    runner sees exactly what the service could not evaluate.
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name.startswith("*"):
            # An encrypted parameter (an id starting with '*', the guide's #{*myPassword}):
            # only a parameter can be named so.
            values = params.get(name)
            return values[0] if values else match.group(0)
        simple = _SIMPLE_PATH.match(match.group(1))
        if not simple:
            return match.group(0)
        parts = simple.group(1).split(".")
        if len(parts) == 1 and parts[0] in params and params[parts[0]]:
            return params[parts[0]][0]
        current = self_id
        for index, part in enumerate(parts):
            fields = fields_of(current)
            if fields is None:
                return match.group(0)
            found = next((f for f in fields if f.key == part), None)
            if found is None:
                return match.group(0)
            if index == len(parts) - 1:
                if found.is_ref:
                    return found.value
                # One level of nesting: a field may itself hold a parameter.
                return _EXPRESSION.sub(
                    lambda m: _param_only(m, params),
                    found.value,
                )
            if not found.is_ref:
                return match.group(0)
            current = found.value
        return match.group(0)

    return _EXPRESSION.sub(substitute, text)


def _param_only(match: re.Match[str], params: Mapping[str, list[str]]) -> str:
    name = match.group(1).strip()
    values = params.get(name)
    return values[0] if values else match.group(0)


# -- the definition-file format (what `aws datapipeline` reads) --------------


def definition_file_to_api(definition: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """Translate the JSON definition-file format into API members.

    Accepts ``{"objects": [...], "parameters": [...], "values": {...}}`` as the
    AWS CLI does (a ``{"ref": id}`` value is a refValue, a list repeats the key),
    a bare list of such objects, or a compact ``{id: {field: value}}`` mapping.
    """
    if isinstance(definition, Mapping) and "objects" in definition:
        raw_objects: Iterable[Mapping[str, Any]] = definition["objects"]
        parameters = definition.get("parameters", [])
        values = definition.get("values", {})
    elif isinstance(definition, Mapping):
        raw_objects = [{"id": key, **body} for key, body in definition.items()]
        parameters, values = [], {}
    else:
        raw_objects = definition
        parameters, values = [], {}

    def to_fields(body: Mapping[str, Any], skip: Iterable[str]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for key, value in body.items():
            if key in skip:
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Mapping) and list(item) == ["ref"]:
                    out.append({"key": key, "refValue": str(item["ref"])})
                else:
                    out.append({"key": key, "stringValue": str(item)})
        return out

    objects = [
        {"id": obj["id"], "name": obj.get("name", obj["id"]), "fields": to_fields(obj, ("id", "name"))}
        for obj in raw_objects
    ]
    parameter_objects = [
        {
            "id": p["id"],
            "attributes": [{"key": f["key"], "stringValue": f["stringValue"]} for f in to_fields(p, ("id",))],
        }
        for p in parameters
    ]
    parameter_values = [
        {"id": key, "stringValue": str(v)}
        for key, value in values.items()
        for v in (value if isinstance(value, list) else [value])
    ]
    return {
        "pipelineObjects": objects,
        "parameterObjects": parameter_objects,
        "parameterValues": parameter_values,
    }
