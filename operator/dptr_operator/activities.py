"""The plan and the per-attempt Secret of a SqlActivity, made before its Job.

The plan needs the activity's database and data nodes.  PollForTask carries them; a task
rebuilt from its PipelineTask (after a restart, or a Job created late) does not, because
the PipelineTask keeps no objects (they hold ``*password``): those are looked up with
DescribeObjects, with the runner's Data Pipeline identity, as dptr-stage-in does for
data nodes.
"""

from __future__ import annotations

import time
from typing import Any

from dptr_common.activity_plan import ACTIVITY_TYPES, ActivityPlan, as_objects, build_plan, missing_objects
from dptr_common.datapipeline import DataPipelineError, Throttled, TransientError, call_with_retry
from dptr_common.errors import TaskError, error_id
from dptr_common.task import PipelineObject, Task

__all__ = ["plan_for"]

#: References are followed this deep (activity -> node -> database -> ...).
_MAX_ROUNDS = 4


def plan_for(task: Task, client: Any, *, budget: float) -> ActivityPlan | None:
    """The task's plan (None for a type that has none); raises TaskError."""
    if task.object_type not in ACTIVITY_TYPES:
        return None
    extra: dict[str, PipelineObject] = {}
    for _ in range(_MAX_ROUNDS):
        missing = missing_objects(task, extra)
        if not missing:
            break

        def describe(ids: list[str] = missing) -> Any:
            return client.describe_objects(task.pipeline_id, ids, evaluate_expressions=True)

        try:
            described = call_with_retry(
                describe,
                deadline=time.monotonic() + budget,
                retry_on=(Throttled, TransientError),
                base=max(budget / 60, 0.01),
                cap=max(budget / 6, 0.05),
            )
        except DataPipelineError as exc:
            raise TaskError(
                error_id("InvalidTask", "DescribeObjects", exc.reason),
                f"could not look up {', '.join(missing)} of the {task.object_type}: {exc}",
            ) from exc
        found = as_objects(list(described))
        if not found:
            break  # build_plan names what is missing
        extra.update(found)
    return build_plan(task, extra)
