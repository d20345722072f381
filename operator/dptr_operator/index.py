"""The in-memory index of PipelineTasks: what the hot paths read instead of the API.

It is rebuilt from the PipelineTasks at start (a list) and kept current by the watch
(kopf ``on.event``) and by the operator's own writes.  One small slotted record per
task, so 5,000 active tasks cost well under a megabyte; no per-object daemon, no
cached copy of whole objects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dptr_common.ledger import parse_time
from dptr_common.models import TERMINAL_PHASES

__all__ = ["ATTEMPT_FINALIZER", "TaskEntry", "TaskIndex", "TaskKey"]

#: On every PipelineTask while its attempt has no outcome: deleting one then reports it
#: (dptr.PipelineTaskDeleted) before it goes.
ATTEMPT_FINALIZER = "dptr.dev/attempt"

TaskKey = tuple[str, str]  # (namespace, name)


@dataclass(slots=True)
class TaskEntry:
    """What the operator needs to know about one PipelineTask."""

    namespace: str
    name: str
    runner: str
    task_id: str
    pipeline_id: str
    attempt_id: str
    object_type: str | None
    uid: str | None
    phase: str = "Pending"
    job_name: str | None = None
    pod_name: str | None = None
    acknowledged: bool = False
    heartbeat_owner: str = "operator"
    heartbeat_last_at: datetime | None = None
    #: When this process saw ``heartbeat_last_at`` change (its monotonic clock): staleness
    #: is judged on it, never on the writer's timestamp (clocks of nodes differ).
    heartbeat_seen: float | None = None
    report_claimed_by: str | None = None
    reported: bool = False
    #: What was reported to Data Pipeline (FINISHED, FAILED, FALSE), once it was.
    reported_status: str | None = None
    canceled: bool = False
    report_progress_timeout: int | None = None
    finished_at: datetime | None = None
    created_at: datetime | None = None
    #: A user (or the garbage collector) deleted the PipelineTask; the finalizer holds it.
    deleting: bool = False
    #: The operator's attempt finalizer is still on the object.
    finalized: bool = False
    #: ``stage: true`` with outputs: a FINISHED needs the sidecar's confirmed upload.
    staged_outputs: bool = False
    #: Operator-side, not persisted: since when a pod problem (image pull, unschedulable,
    #: pod ended without a report) has been seen, and what it is.
    problem: str | None = None
    problem_message: str | None = None
    problem_since: float | None = None
    problem_outcome: Any = None
    #: A fallback report or a cancel is being worked on (not persisted).
    busy: bool = False
    #: Since when (monotonic) this process knows the task's Job, and whether it has seen a
    #: pod of it: a Job with no pod past a grace was refused its pods (not persisted).
    job_since: float | None = None
    pod_seen: bool = False
    #: Since when (monotonic) the task is known to have no Job that this process is
    #: creating: an outage during its dispatch, a restart, a PipelineTask whose create
    #: failed but landed.  The sweep creates the Job a grace later (not persisted).
    job_pending_since: float | None = None
    job_checked: float | None = None
    #: The operator finished what follows an outcome (finalizer, TTL; not persisted).
    settled: bool = False
    #: A deletion of a canceled task's leftover Job was requested (not persisted).
    stopping: bool = False
    #: The task's end was counted in the metrics and its runner's counts (not persisted).
    counted: bool = False

    def log_fields(self) -> dict[str, str | None]:
        """What JSON log lines about this task carry (dptr_common.logformat.log_context),
        the same fields dispatch sets."""
        return {
            "taskrunner": f"{self.namespace}/{self.runner}",
            "pipeline": self.pipeline_id or None,
            "attempt": self.attempt_id or None,
            "task": self.name or None,
        }

    @property
    def key(self) -> TaskKey:
        return (self.namespace, self.name)

    @property
    def runner_key(self) -> TaskKey:
        return (self.namespace, self.runner)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES or self.reported or self.canceled

    @classmethod
    def from_k8s(cls, obj: Mapping[str, Any]) -> TaskEntry:
        """From a PipelineTask as the API returns it (raw dict: cheaper than the model)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        heartbeat = status.get("heartbeat") or {}
        report = status.get("report") or {}
        canceled = status.get("canceled") or {}
        fields, refs = spec.get("fields") or {}, spec.get("refs") or {}
        stage = str((fields.get("stage") or [""])[0]).strip().lower() == "true"
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            runner=str(spec.get("taskRunner") or ""),
            task_id=str(spec.get("taskId") or ""),
            pipeline_id=str(spec.get("pipelineId") or ""),
            attempt_id=str(spec.get("attemptId") or ""),
            object_type=spec.get("objectType"),
            uid=meta.get("uid"),
            phase=str(status.get("phase") or "Pending"),
            job_name=status.get("jobName"),
            pod_name=status.get("podName"),
            acknowledged=bool(status.get("acknowledgedAt")),
            heartbeat_owner=str(heartbeat.get("owner") or "operator"),
            heartbeat_last_at=parse_time(heartbeat.get("lastAt")),
            heartbeat_seen=time.monotonic() if heartbeat.get("lastAt") else None,
            report_claimed_by=report.get("claimedBy"),
            reported=bool(report.get("reportedAt")),
            reported_status=report.get("status") if report.get("reportedAt") else None,
            canceled=bool(canceled.get("at")) or status.get("phase") == "Canceled",
            report_progress_timeout=spec.get("reportProgressTimeoutSeconds"),
            finished_at=parse_time(report.get("reportedAt") or canceled.get("at")),
            created_at=parse_time(meta.get("creationTimestamp")),
            deleting=bool(meta.get("deletionTimestamp")),
            finalized=ATTEMPT_FINALIZER in (meta.get("finalizers") or []),
            staged_outputs=stage and bool(refs.get("output")),
        )

    def absorb(self, newer: TaskEntry) -> None:
        """Take the persisted fields of a newer read of the same object; keep ours."""
        # Our own heartbeat time may be ahead of the watch (written after the event's
        # read): comparable only with our own earlier one.  Another writer's is simply
        # new when it differs, whatever its clock says.
        ours = self.heartbeat_owner == "operator" and newer.heartbeat_owner == "operator"
        last, new = self.heartbeat_last_at, newer.heartbeat_last_at
        if new is not None and new != last and (not ours or last is None or new > last):
            self.heartbeat_last_at = new
            self.heartbeat_seen = newer.heartbeat_seen
        for name in (
            "phase",
            "job_name",
            "pod_name",
            "acknowledged",
            "heartbeat_owner",
            "report_claimed_by",
            "reported",
            "reported_status",
            "canceled",
            "finished_at",
            "uid",
            "deleting",
            "finalized",
        ):
            setattr(self, name, getattr(newer, name))


class TaskIndex:
    """Thread-safe map of (namespace, name) -> :class:`TaskEntry` with per-runner active sets."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[TaskKey, TaskEntry] = {}
        self._active: dict[TaskKey, set[TaskKey]] = {}

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def upsert(self, entry: TaskEntry) -> tuple[TaskEntry, str | None]:
        """Insert or refresh; returns (the indexed entry, the phase it had before or None)."""
        with self._lock:
            current = self._entries.get(entry.key)
            before = None
            if current is None or (entry.uid and current.uid and entry.uid != current.uid):
                current = entry
                self._entries[entry.key] = entry
            else:
                before = current.phase
                current.absorb(entry)
            self._track(current)
            return current, before

    def _track(self, entry: TaskEntry) -> None:
        active = self._active.setdefault(entry.runner_key, set())
        if entry.terminal:
            active.discard(entry.key)
        else:
            active.add(entry.key)

    def update(self, key: TaskKey, **changes: Any) -> TaskEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            for name, value in changes.items():
                setattr(entry, name, value)
            self._track(entry)
            return entry

    def remove(self, key: TaskKey) -> TaskEntry | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._active.get(entry.runner_key, set()).discard(key)
            return entry

    def get(self, key: TaskKey) -> TaskEntry | None:
        with self._lock:
            return self._entries.get(key)

    def active_count(self, runner_key: TaskKey) -> int:
        with self._lock:
            return len(self._active.get(runner_key, ()))

    def active_keys(self, runner_key: TaskKey | None = None) -> list[TaskKey]:
        with self._lock:
            if runner_key is not None:
                return list(self._active.get(runner_key, ()))
            return [k for keys in self._active.values() for k in keys]

    def for_runner(self, runner_key: TaskKey) -> list[TaskEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.runner_key == runner_key]

    def __iter__(self) -> Iterator[TaskEntry]:
        with self._lock:
            return iter(list(self._entries.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
