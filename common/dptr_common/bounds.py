"""Bounds on what a task can make dptr create, checked before anything is created.

A polled task's fields end up in a PipelineTask, in a Job and its pods' env and argv.
Past the limits below the API server refuses the object (after the task was polled and
acknowledged) or the kernel refuses to start the process: both would cost the attempt
in a way that says nothing.  So dptr checks first and ends the attempt FAILED with
``dptr.InvalidTask.TooLarge.<what>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from dptr_common.errors import TaskError

__all__ = [
    "MAX_EXEC_BYTES",
    "MAX_OBJECT_BYTES",
    "MAX_STRING_BYTES",
    "check_job",
    "check_object",
    "check_string",
]

#: The kernel's MAX_ARG_STRLEN: one argv or env string (``NAME=value``, with its NUL).
MAX_STRING_BYTES = 128 * 1024
#: One container's argv and env together.  execve's limit is a quarter of the stack
#: rlimit (2 MiB at the usual 8 MiB); the image's own env needs room too.
MAX_EXEC_BYTES = 1024 * 1024
#: A PipelineTask or Job as JSON.  etcd refuses requests over 1.5 MiB, and the Job's
#: template is copied into its pod: half a MiB leaves room for both.
MAX_OBJECT_BYTES = 512 * 1024

_FIELD_ENV = re.compile(r"^DPTR_FIELD_")


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_string(what: str, value: str, *, overhead: int = 1) -> None:
    """One argv/env string; ``what`` names the task field it comes from."""
    size = _size(value) + overhead
    if size > MAX_STRING_BYTES:
        raise TaskError(
            f"dptr.InvalidTask.TooLarge.{what}",
            f"{what} is {size} bytes; a process can be given at most {MAX_STRING_BYTES} bytes per "
            "argument or environment variable (the kernel's MAX_ARG_STRLEN)",
        )


def _env_field(name: str) -> str:
    if name == "DPTR_FIELDS_JSON" or _FIELD_ENV.match(name):
        return "myFields"
    if name == "DPTR_STAGING_PLAN":
        return "stagingPlan"
    return name


def check_job(job: Mapping[str, Any]) -> None:
    """Every container's env values and argv, and the whole Job; raises TaskError."""
    pod = job["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        total = 0
        for entry in container.get("env", []):
            if "value" in entry:
                check_string(_env_field(entry["name"]), entry["value"], overhead=len(entry["name"]) + 2)
                total += _size(entry["value"]) + len(entry["name"]) + 2
        for part in container.get("command", []) + container.get("args", []):
            total += _size(part) + 1
        if total > MAX_EXEC_BYTES:
            raise TaskError(
                "dptr.InvalidTask.TooLarge.environment",
                f"container {container.get('name')} would get {total} bytes of arguments and "
                f"environment; dptr allows {MAX_EXEC_BYTES} (the task's command, arguments and my* fields)",
            )
    check_object(job, "Job")


def check_object(obj: Mapping[str, Any], kind: str) -> None:
    size = len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_OBJECT_BYTES:
        raise TaskError(
            f"dptr.InvalidTask.TooLarge.{kind}",
            f"the task's {kind} would be {size} bytes; dptr keeps objects under {MAX_OBJECT_BYTES} "
            "bytes (the task's fields are too large)",
        )
