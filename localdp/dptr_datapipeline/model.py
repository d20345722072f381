"""Request validation against botocore's own datapipeline service model.

botocore validates on the client side only what is cheap (required members,
types, minimum lengths); maximum lengths, patterns and enums are left to the
service. A runner that sends a 2,000-character ``errorStackTrace`` therefore
passes botocore and is refused by AWS, and must be refused here too.

Messages follow the wording AWS services built on Coral use, e.g.
``1 validation error detected: Value '...' at 'errorStackTrace' failed to
satisfy constraint: Member must have length less than or equal to 1024``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, cast

from botocore.loaders import Loader

from dptr_datapipeline.errors import InvalidRequestException

SERVICE_NAME = "datapipeline"
API_VERSION = "2012-10-29"

# The model's patterns are written for Java, where strings are UTF-16: astral
# characters appear as surrogate-pair ranges such as ``\uD800\uDC00-\uDBFF\uDFFF``.
# Python's re works on code points, so each pair is folded into one ``\U`` escape.
_SURROGATE_PAIR = re.compile(r"\\u(D[89AB][0-9A-F]{2})\\u(D[C-F][0-9A-F]{2})", re.IGNORECASE)
_ECHO_LIMIT = 120


def _fold_surrogates(match: re.Match[str]) -> str:
    high, low = int(match.group(1), 16), int(match.group(2), 16)
    return f"\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08X}"


def java_pattern_to_python(pattern: str) -> re.Pattern[str]:
    return re.compile(_SURROGATE_PAIR.sub(_fold_surrogates, pattern), re.DOTALL)


@functools.cache
def service_model() -> dict[str, Any]:
    """The raw service-2 model, loaded once per process."""
    return cast(dict[str, Any], Loader().load_service_model(SERVICE_NAME, "service-2", API_VERSION))


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return java_pattern_to_python(pattern)


def operation_names() -> list[str]:
    return sorted(service_model()["operations"])


def _echo(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value)
    if len(text) > _ECHO_LIMIT:
        text = text[:_ECHO_LIMIT] + "..."
    return f"'{text}'"


class _Validator:
    def __init__(self) -> None:
        self.shapes: Mapping[str, Any] = service_model()["shapes"]
        self.errors: list[str] = []

    def fail(self, value: Any, path: str, constraint: str) -> None:
        self.errors.append(f"Value {_echo(value)} at '{path}' failed to satisfy constraint: {constraint}")

    def check(self, shape_name: str, value: Any, path: str) -> None:
        shape = self.shapes[shape_name]
        kind = shape["type"]
        if kind == "structure":
            self._structure(shape, value, path)
        elif kind == "list":
            self._list(shape, value, path)
        elif kind == "map":
            self._map(shape, value, path)
        elif kind == "string":
            self._string(shape, value, path)
        elif kind == "boolean":
            if not isinstance(value, bool):
                self.fail(value, path, "Member must be a boolean")
        elif kind in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(value, path, "Member must be an integer")
        elif kind == "timestamp" and (isinstance(value, bool) or not isinstance(value, int | float | str)):
            # JSON 1.1 sends epoch seconds; ISO strings are tolerated.
            self.fail(value, path, "Member must be a timestamp")

    def _structure(self, shape: Mapping[str, Any], value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, path or "input", "Member must be a structure")
            return
        for name in shape.get("required", []):
            if value.get(name) is None:
                self.fail(None, f"{path}.{name}" if path else name, "Member must not be null")
        for name, member in shape.get("members", {}).items():
            # Unknown members are ignored, as AWS JSON services do.
            if value.get(name) is not None:
                self.check(member["shape"], value[name], f"{path}.{name}" if path else name)

    def _length(self, shape: Mapping[str, Any], value: Any, size: int, path: str) -> None:
        if "min" in shape and size < shape["min"]:
            self.fail(value, path, f"Member must have length greater than or equal to {shape['min']}")
        if "max" in shape and size > shape["max"]:
            self.fail(value, path, f"Member must have length less than or equal to {shape['max']}")

    def _list(self, shape: Mapping[str, Any], value: Any, path: str) -> None:
        if not isinstance(value, list):
            self.fail(value, path, "Member must be a list")
            return
        self._length(shape, value, len(value), path)
        for index, item in enumerate(value, start=1):
            self.check(shape["member"]["shape"], item, f"{path}.{index}.member")

    def _map(self, shape: Mapping[str, Any], value: Any, path: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, path, "Member must be a map")
            return
        for key, item in value.items():
            self.check(shape["key"]["shape"], key, f"{path}.{key}.key")
            self.check(shape["value"]["shape"], item, f"{path}.{key}.value")

    def _string(self, shape: Mapping[str, Any], value: Any, path: str) -> None:
        if not isinstance(value, str):
            self.fail(value, path, "Member must be a string")
            return
        self._length(shape, value, len(value), path)
        if "enum" in shape and value not in shape["enum"]:
            self.fail(value, path, f"Member must satisfy enum value set: [{', '.join(shape['enum'])}]")
        pattern = shape.get("pattern")
        if pattern is not None and not _compiled(pattern).fullmatch(value):
            self.fail(value, path, f"Member must satisfy regular expression pattern: {pattern}")


def validate_request(operation: str, params: Any) -> None:
    """Raise InvalidRequestException naming every member that breaks the model."""
    op = service_model()["operations"][operation]
    validator = _Validator()
    if "input" in op:
        validator.check(op["input"]["shape"], params, "")
    errors = validator.errors
    if errors:
        count = len(errors)
        noun = "error" if count == 1 else "errors"
        raise InvalidRequestException(f"{count} validation {noun} detected: {'; '.join(errors)}")
