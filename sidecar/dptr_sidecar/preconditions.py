"""``dptr-sidecar check-exists``: the ``Exists`` precondition, checked inside its attempt.

The task container of an Exists attempt runs this (dptr_common.render_preconditions):
it checks the data node every ``DPTR_CHECK_RETRY_DELAY`` seconds until it exists or the
deadline (``DPTR_CHECK_DEADLINE``, epoch seconds; else ``DPTR_CHECK_BUDGET`` seconds from
now) has passed.  Exit codes, read by ``dptr_common.errors.outcome_for_termination``:

* 0: the data node exists (FINISHED);
* 1: it still does not, at the deadline (FALSE), termination message
  ``dptr.Exists.NotFound``;
* 2: it could not be checked (FAILED), e.g. ``dptr.Exists.AccessDenied``.

An S3DataNode ``filePath`` exists when its object does (HeadObject); a ``directoryPath``
when at least one object is under it (ListObjectsV2).  A missing bucket is "does not
exist yet", like a missing key; any other S3 error ends the check.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType

from dptr_common.errors import TaskError

from .s3 import S3Client, S3Error, S3Uri, parse_s3_uri
from .staging import write_termination_message

__all__ = ["check_exists_main", "exists_once"]

_ABSENT_CODES = frozenset({"NoSuchKey", "NoSuchBucket"})


def exists_once(s3: S3Client, uri: str, kind: str) -> bool:
    """Whether the data node exists now; raises S3Error for an answer that is not yes or no."""
    try:
        target = parse_s3_uri(uri)
        if kind == "file":
            return s3.exists(target)
        if target.key and not target.key.endswith("/"):
            # A directory: s3://b/day=1 must not be satisfied by s3://b/day=10/x.
            target = S3Uri(target.bucket, target.key + "/")
        return next(iter(s3.list(target)), None) is not None
    except S3Error as exc:
        if exc.code in _ABSENT_CODES:
            return False
        raise


def _resolve_node(env: Mapping[str, str], node: str) -> tuple[str, str]:
    """The node's location from DescribeObjects, when the task did not carry the node."""
    pipeline_id = env.get("DPTR_PIPELINE_ID") or ""
    if not pipeline_id or not env.get("DPTR_EXISTS_NODE"):
        raise TaskError("dptr.Exists.NotConfigured", "neither DPTR_EXISTS_URI nor DPTR_EXISTS_NODE is set")
    from dptr_common.datapipeline import DataPipelineError, call_with_retry
    from dptr_common.render_preconditions import exists_location

    from .config import time_scale_from_env
    from .staging import RESOLVE_RETRY_BUDGET, _dp_client_from_env

    budget = RESOLVE_RETRY_BUDGET * time_scale_from_env(env)
    client = _dp_client_from_env(env)
    try:
        described = call_with_retry(
            lambda: client.describe_objects(pipeline_id, [node], evaluate_expressions=True),
            deadline=time.monotonic() + budget,
            base=max(budget / 60, 0.01),
            cap=max(budget / 6, 0.05),
        )
    except DataPipelineError as exc:
        raise TaskError(
            f"dptr.Exists.DescribeObjects.{exc.reason}", f"could not look up data node {node!r}: {exc}"
        ) from exc
    finally:
        client.close()
    obj = next((o for o in described if str(o.get("id")) == node), None)
    if obj is None:
        raise TaskError(
            "dptr.Exists.DataNodeNotFound", f"data node {node!r} is not in pipeline {pipeline_id}"
        )
    location = exists_location(node, obj)
    _log(f"{node} looked up with DescribeObjects: {location.uri}")
    return location.uri, location.kind


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name) or default)
    except ValueError:
        return default


def _log(message: str) -> None:
    print(f"dptr check-exists: {message}", file=sys.stderr, flush=True)


def check_exists_main(
    argv: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    s3_factory: Callable[[Mapping[str, str]], S3Client] | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    env = os.environ if env is None else env

    def on_term(signum: int, _frame: FrameType | None) -> None:
        # The Job was deleted (a cancel): stop at once, as a signal death would.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    uri, kind = (env.get("DPTR_EXISTS_URI") or "").strip(), (env.get("DPTR_EXISTS_KIND") or "file").strip()
    node = env.get("DPTR_EXISTS_NODE") or "the data node"
    delay = max(_int(env, "DPTR_CHECK_RETRY_DELAY", 600), 1)
    started = clock()
    # Never later than the budget from now (a skewed start time cannot stretch the wait).
    latest = int(started) + _int(env, "DPTR_CHECK_BUDGET", 0)
    deadline = min(_int(env, "DPTR_CHECK_DEADLINE", 0) or latest, latest)
    checks = 0
    try:
        if not uri:
            uri, kind = _resolve_node(env, node)
        with (s3_factory or (lambda e: S3Client(env=e)))(env) as s3:
            while True:
                checks += 1
                if exists_once(s3, uri, kind):
                    _log(f"{node} exists: {uri} (check {checks})")
                    return 0
                left = deadline - clock()
                _log(f"{node} does not exist yet: {uri} (check {checks})")
                if left <= 0:
                    break
                sleep(min(delay, left))
    except S3Error as exc:
        write_termination_message(TaskError(f"dptr.Exists.{exc.code}", f"checking {uri}: {exc.message}"), env)
        return 2
    except TaskError as error:
        write_termination_message(error, env)
        return 2
    except Exception as exc:  # credentials, a bug: one clear line and an errorId, never a hang
        write_termination_message(
            TaskError(f"dptr.Exists.{type(exc).__name__}", f"checking {uri}: {type(exc).__name__}: {exc}"),
            env,
        )
        return 2
    waited = int(clock() - started)
    write_termination_message(
        TaskError(
            "dptr.Exists.NotFound",
            f"{node} ({uri}) did not exist after {checks} check(s) over {waited} s"
            " (preconditionTimeout passed)",
        ),
        env,
    )
    return 1
