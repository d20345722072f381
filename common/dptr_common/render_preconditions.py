"""Preconditions retry inside their attempt (pure: task in, pod parts out).

The developer guide's page on Task Runner threads and preconditions
(https://docs.aws.amazon.com/datapipeline/latest/DeveloperGuide/dp-taskrunner-threading.html)
says that retry logic for preconditions happens in Task Runner, which honours the
precondition's ``retryDelay`` and ``preconditionTimeout``.  So one attempt checks again
and again: every ``retryDelay`` until the check holds (FINISHED) or ``preconditionTimeout``
has passed since the attempt began (the last answer, FALSE, is reported).  The sidecar
heartbeats the whole time, and a cancel deletes the Job, which ends the loop.

``ShellCommandPrecondition``
    The user's check runs under :data:`CHECK_LOOP`, a POSIX ``sh`` loop in the task
    container (``sh``, ``sleep`` and ``date +%s``; without a usable ``date`` it counts
    the time it slept).  Exit 0 ends it (holds); an exit of 129-192 (a signal) ends it
    too, so a killed check stays FAILED; any other exit is checked again until the
    deadline, then returned (FALSE).
``Exists``
    dptr's own check (``dptr-sidecar check-exists``, :mod:`dptr_sidecar.preconditions`)
    in the task container, with the sidecar's image and S3 identity: an S3DataNode's
    ``filePath`` object, or at least one object under its ``directoryPath``.  No user
    code runs in that pod.

Defaults (dptr's choice; the developer guide gives none): ``retryDelay`` 10 minutes,
the service's default retry delay; without ``preconditionTimeout`` the check runs once,
since nothing would bound the wait.  "The attempt began" is the attempt's
``@actualStartTime`` as the service sent it; without one, the loop's own start.
``attemptTimeout`` still bounds the whole attempt (the Job's deadline).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dptr_common.errors import TaskError
from dptr_common.podspec import TASK_CONTAINER, command, identity_env
from dptr_common.podspec import env as _env
from dptr_common.staging_plan import DataNodeLocation, as_pipeline_object, data_node_location
from dptr_common.task import EXISTS_PRECONDITION, Task

__all__ = [
    "CHECK_LOOP",
    "DEFAULT_RETRY_DELAY_SECONDS",
    "CheckTiming",
    "check_timing",
    "exists_container",
    "exists_location",
    "wrap_check",
]

#: retryDelay when a precondition sets none: the service's default retry delay.
DEFAULT_RETRY_DELAY_SECONDS = 600
_LOOP_NAME = "dptr-check"

#: Runs the check "$@" until it holds or the deadline passes.  POSIX sh; `date +%s` where
#: the image has it.  Signals are forwarded to the running check and end the loop.
CHECK_LOOP = r"""delay="${DPTR_CHECK_RETRY_DELAY:-600}"
left="${DPTR_CHECK_BUDGET:-0}"
deadline="${DPTR_CHECK_DEADLINE:-}"
now=$(date +%s 2>/dev/null)
case "$now" in
  ''|*[!0-9]*) now= deadline= ;;
  # Never later than the budget from now: a start time from a skewed clock cannot
  # stretch the wait past preconditionTimeout.
  *) if [ -z "$deadline" ] || [ "$deadline" -gt $((now + left)) ]; then deadline=$((now + left)); fi ;;
esac
child=
trap '[ -z "$child" ] || kill -TERM "$child" 2>/dev/null; exit 143' TERM INT HUP
while :; do
  "$@" &
  child=$!
  wait "$child"
  rc=$?
  child=
  # Holds, or killed by a signal (129-192, as dptr_common.errors reads them): no retry.
  if [ "$rc" -eq 0 ] || { [ "$rc" -gt 128 ] && [ "$rc" -le 192 ]; }; then exit "$rc"; fi
  if [ -n "$deadline" ]; then
    now=$(date +%s 2>/dev/null)
    case "$now" in ''|*[!0-9]*) now=$deadline ;; esac
    left=$((deadline - now))
  fi
  if [ "$left" -le 0 ]; then exit "$rc"; fi
  pause=$delay
  if [ "$left" -lt "$pause" ]; then pause=$left; fi
  sleep "$pause" &
  child=$!
  wait "$child"
  child=
  [ -n "$deadline" ] || left=$((left - pause))
done
"""


@dataclass(frozen=True)
class CheckTiming:
    """When a precondition's attempt checks, in real seconds (after the time scale)."""

    retry_delay: int
    #: How long after the attempt began checks may start; 0 = one check.
    budget: int
    #: ``@actualStartTime`` + budget as epoch seconds, when the service sent a start time.
    deadline: int | None

    def env(self) -> list[dict[str, Any]]:
        entries = [
            _env("DPTR_CHECK_RETRY_DELAY", str(self.retry_delay)),
            _env("DPTR_CHECK_BUDGET", str(self.budget)),
        ]
        if self.deadline is not None:
            entries.append(_env("DPTR_CHECK_DEADLINE", str(self.deadline)))
        return entries


def _epoch(timestamp: str | None) -> int | None:
    if not timestamp:
        return None
    try:
        parsed = datetime.strptime(timestamp.strip()[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None  # the loop then counts from its own start
    return int(parsed.replace(tzinfo=UTC).timestamp())


def check_timing(task: Task, time_scale: float = 1.0) -> CheckTiming:
    """The precondition's ``retryDelay`` / ``preconditionTimeout``, scaled (tests run at 0.01)."""
    delay = task.retry_delay_seconds or DEFAULT_RETRY_DELAY_SECONDS
    timeout = task.precondition_timeout_seconds or 0
    budget = math.ceil(timeout * time_scale)
    start = _epoch(task.actual_start_time)
    return CheckTiming(
        retry_delay=max(1, round(delay * time_scale)),
        budget=budget,
        deadline=start + budget if start is not None and budget else None,
    )


def wrap_check(argv: list[str]) -> list[str]:
    """The task's check command line, run under :data:`CHECK_LOOP`."""
    return ["/bin/sh", "-c", CHECK_LOOP, _LOOP_NAME, *argv]


def exists_location(node_id: str, node: Any) -> DataNodeLocation:
    """Where an Exists precondition looks (``node`` a parsed or raw API object); raises
    TaskError for a data node dptr cannot check."""
    try:
        location = data_node_location(node)
    except TaskError as exc:
        raise TaskError(
            exc.error_id.replace("dptr.StagingFailed.", "dptr.InvalidTask.Exists."), exc.message
        ) from None
    if location is None:
        node_type = as_pipeline_object(node).first("type") or "untyped"
        later = " (SQL data nodes are not supported yet)" if node_type == "SqlDataNode" else ""
        raise TaskError(
            f"dptr.PreconditionNotSupported.Exists.{node_type}"[:200],
            f"dptr checks Exists for S3DataNode only; {node_id!r} is a {node_type}{later}",
        )
    return location


def exists_container(
    task: Task,
    sidecar: dict[str, Any],
    *,
    region: str,
    endpoint_url: str | None,
    s3_endpoint_url: str | None,
    timing: CheckTiming,
) -> dict[str, Any]:
    """The task container of an ``Exists`` precondition: dptr's check of its data node.

    A node the task did not carry (the service left it out, or the task was rebuilt from
    its PipelineTask, which keeps no ``objects``) is looked up by the check itself, with
    DescribeObjects.  Raises TaskError for a precondition dptr cannot check: no ``node``,
    or a carried data node of a type other than S3DataNode.
    """
    if task.object_type != EXISTS_PRECONDITION:
        raise ValueError(f"not an Exists precondition: {task.object_type}")
    if task.node is None:
        raise TaskError(
            "dptr.InvalidTask.Exists.NoNode",
            "the Exists precondition has no 'node': it must be the precondition of a data node",
        )
    node = task.objects.get(task.node)
    where: list[dict[str, Any]]
    if node is not None:
        location = exists_location(task.node, node)
        where = [_env("DPTR_EXISTS_URI", location.uri), _env("DPTR_EXISTS_KIND", location.kind)]
    else:
        where = [_env("DPTR_PIPELINE_ID", task.pipeline_id)]
        if endpoint_url:
            where.append(_env("DPTR_ENDPOINT_URL", endpoint_url))
    # The sidecar's AWS identity (its keys, and the TaskRunner's role on top): this
    # container runs dptr's code only, like dptr-stage-in.
    credentials = identity_env(sidecar)
    env = [
        _env("DPTR_EXISTS_NODE", task.node),
        *where,
        _env("DPTR_REGION", region),
        _env("AWS_REGION", region),
        *timing.env(),
    ]
    if s3_endpoint_url:
        env.append(_env("AWS_ENDPOINT_URL_S3", s3_endpoint_url))
    return {
        "name": TASK_CONTAINER,
        "image": sidecar["image"],
        "command": command(["dptr-sidecar", "check-exists"]),
        "env": [*env, *credentials],
        # The sidecar's (the operator's --sidecar-resources): the same program.
        "resources": copy.deepcopy(sidecar.get("resources", {})),
        "securityContext": copy.deepcopy(sidecar.get("securityContext", {})),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
