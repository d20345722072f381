"""History limits: keep the newest finished PipelineTasks (and, through owner references,
their Jobs) per TaskRunner, delete the rest.

``historyLimits.succeeded`` counts Succeeded tasks; ``historyLimits.failed`` counts
Failed, Canceled and Lost ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from dptr_common.models import HistoryLimits
from dptr_operator.index import TaskEntry, TaskKey

__all__ = ["expired"]

_EPOCH = datetime.min.replace(tzinfo=UTC)


def expired(entries: Iterable[TaskEntry], limits: HistoryLimits) -> list[TaskKey]:
    """Keys of the finished tasks beyond the limits, oldest first (pure)."""
    succeeded: list[TaskEntry] = []
    failed: list[TaskEntry] = []
    for entry in entries:
        if not entry.terminal:
            continue
        (succeeded if entry.phase == "Succeeded" else failed).append(entry)
    doomed: list[TaskEntry] = []
    for group, keep in ((succeeded, limits.succeeded), (failed, limits.failed)):
        group.sort(key=lambda e: (e.finished_at or e.created_at or _EPOCH, e.name), reverse=True)
        doomed.extend(group[keep:])
    doomed.sort(key=lambda e: (e.finished_at or e.created_at or _EPOCH, e.name))
    return [e.key for e in doomed]
