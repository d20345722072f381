"""``pipelineLogUri`` for attempts that do not carry it.

``pipelineLogUri`` is a field of the pipeline's ``Default`` object.  Whether the service
copies it onto every polled attempt (as it does inherited fields) is not documented; if
it does not, the logs must still go there.  So before a Job is rendered for an attempt
without one, the operator reads ``Default`` with DescribeObjects (expressions evaluated),
once per pipeline per :data:`CACHE_SECONDS`, and adds the field to the task.  A lookup
that fails is visible: a Warning Event ``PipelineLogUriUnknown`` on the PipelineTask and
``dptr_pipeline_log_uri_lookups_total{result="error"}``; the task still runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from dptr_common.datapipeline import DataPipelineError
from dptr_common.task import PipelineObject, Task, TaskField

__all__ = ["CACHE_SECONDS", "LogUriLookup", "PipelineLogUris", "with_pipeline_log_uri"]

#: How long a pipeline's answer (a URI or "none") is reused, in protocol seconds.
CACHE_SECONDS = 600.0
#: How long a failed lookup is remembered (protocol seconds).
ERROR_CACHE_SECONDS = 60.0
DEFAULT_OBJECT_ID = "Default"


@dataclass(frozen=True)
class LogUriLookup:
    uri: str | None
    #: Why there is no answer (the lookup failed); None when the pipeline simply has none.
    problem: str | None = None
    #: The answer came from the cache (no call was made).
    cached: bool = False


class PipelineLogUris:
    """A small cache of ``Default.pipelineLogUri`` (thread-safe), per TaskRunner and
    pipeline: one TaskRunner's answers (its endpoint, its credentials) never serve
    another's.  A failed lookup is remembered for ``error_seconds`` so that a throttled
    or refused DescribeObjects is not asked again for every attempt."""

    def __init__(
        self,
        ttl_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        error_seconds: float = ERROR_CACHE_SECONDS,
    ) -> None:
        self.ttl = ttl_seconds
        self.error_ttl = error_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._known: dict[tuple[Hashable, str], tuple[float, str | None, str | None]] = {}

    def lookup(self, client: Any, pipeline_id: str, scope: Hashable = None) -> LogUriLookup:
        now = self._clock()
        key = (scope, pipeline_id)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                at, uri, problem = known
                if now - at < (self.error_ttl if problem else self.ttl):
                    return LogUriLookup(uri, problem, cached=True)
        found = _describe(client, pipeline_id)
        with self._lock:
            if len(self._known) > 4096:  # bounded: old pipelines drop out
                self._known.clear()
            self._known[key] = (now, found.uri, found.problem)
        return found


def _describe(client: Any, pipeline_id: str) -> LogUriLookup:
    try:
        objects = client.describe_objects(pipeline_id, [DEFAULT_OBJECT_ID], evaluate_expressions=True)
    except DataPipelineError as exc:
        return LogUriLookup(None, f"DescribeObjects of the pipeline's Default object failed: {exc}")
    except Exception as exc:  # never let a log lookup cost the task
        return LogUriLookup(
            None, f"DescribeObjects of the pipeline's Default object failed: {type(exc).__name__}: {exc}"
        )
    for obj in objects:
        if str(obj.get("id")) == DEFAULT_OBJECT_ID:
            values = [f.get("stringValue") for f in obj.get("fields", []) if f.get("key") == "pipelineLogUri"]
            return LogUriLookup(next((v for v in values if v), None))
    return LogUriLookup(None)


def with_pipeline_log_uri(task: Task, uri: str) -> Task:
    """``task`` with ``pipelineLogUri`` added to its attempt's fields."""
    attempt = task.attempt
    fields = (*attempt.fields, TaskField(key="pipelineLogUri", string_value=uri))
    updated = PipelineObject(id=attempt.id, name=attempt.name, fields=fields)
    return task.model_copy(update={"attempt": updated})
