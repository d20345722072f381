"""The ledger: what happened, for tests and chaos harnesses to judge a runner by.

It records every call, every polled attempt with the outcome the runner gave
it, every reassignment and every protocol violation. The service mutates it
under the engine's lock; readers get copies, so a test may inspect it while
pollers are still running.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

# Final outcomes an attempt can have. CANCELED is the service's own outcome
# (SetStatus CANCEL, deactivation, deletion): the runner must then stay silent.
OUTCOMES = ("FINISHED", "FAILED", "FALSE", "CANCELED")

_CAMEL = {
    "attemptId": "attempt_id",
    "taskId": "task_id",
    "pipelineId": "pipeline_id",
    "objectId": "object_id",
    "instanceId": "instance_id",
    "workerGroup": "worker_group",
    "errorId": "error_id",
    "errorMessage": "error_message",
    "errorStackTrace": "error_stack_trace",
}


@dataclass
class CallRecord:
    at: float
    operation: str
    access_key: str | None
    status: int
    error: str | None
    duration: float
    task_id: str | None = None
    pipeline_id: str | None = None
    request: dict[str, Any] | None = None
    #: The caller's identity: ``arn:aws:iam::<account>:user/...`` for a static key, the
    #: ``arn:aws:sts::<account>:assumed-role/<role>/<session>`` of an STS session.
    principal: str | None = None


@dataclass
class AttemptRecord:
    """One polled attempt. Readable as attributes or, in the ledger's JSON
    spelling, as items: ``record.error_id == record["errorId"]``."""

    attempt_id: str
    task_id: str
    pipeline_id: str
    object_id: str
    instance_id: str
    worker_group: str
    polled_at: float
    hostname: str | None = None
    # Wall-clock time the attempt became ready to be polled (for dispatch latency).
    ready_at: float | None = None
    acked_at: float | None = None
    last_progress_at: float | None = None
    progress_calls: int = 0
    status: str = "RUNNING"
    outcome: str | None = None
    # Every accepted outcome; more than one would be a service bug, so
    # assert_clean checks the count rather than trusting ``outcome``.
    outcomes: list[str] = field(default_factory=list)
    error_id: str | None = None
    error_message: str | None = None
    error_stack_trace: str | None = None
    reassigned: str | None = None
    canceled_reason: str | None = None
    cancel_seen: bool = False

    def __getitem__(self, key: str) -> Any:
        return getattr(self, _CAMEL.get(key, key))


@dataclass
class Reassignment:
    at: float
    attempt_id: str
    reason: str
    new_attempt_id: str | None


@dataclass
class Violation:
    at: float
    kind: str
    operation: str
    task_id: str | None
    attempt_id: str | None
    detail: str


@dataclass
class RunnerRecord:
    taskrunner_id: str
    worker_group: str | None
    hostname: str | None
    first_seen: float
    last_seen: float
    heartbeats: int = 0


class Ledger:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._calls: list[CallRecord] = []
        self._attempts: dict[str, AttemptRecord] = {}
        self._reassignments: list[Reassignment] = []
        self._violations: list[Violation] = []
        self._runners: dict[str, RunnerRecord] = {}

    # -- writers (used by the service) ------------------------------------

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def add_call(self, record: CallRecord) -> None:
        with self._lock:
            self._calls.append(record)

    def add_attempt(self, record: AttemptRecord) -> None:
        with self._lock:
            self._attempts[record.attempt_id] = record

    def attempt(self, attempt_id: str) -> AttemptRecord | None:
        with self._lock:
            return self._attempts.get(attempt_id)

    def add_reassignment(self, record: Reassignment) -> None:
        with self._lock:
            self._reassignments.append(record)

    def add_violation(self, record: Violation) -> None:
        with self._lock:
            self._violations.append(record)

    def runner_heartbeat(
        self, taskrunner_id: str, worker_group: str | None, hostname: str | None, at: float
    ) -> None:
        with self._lock:
            runner = self._runners.get(taskrunner_id)
            if runner is None:
                runner = self._runners[taskrunner_id] = RunnerRecord(
                    taskrunner_id, worker_group, hostname, at, at
                )
            runner.worker_group, runner.hostname, runner.last_seen = worker_group, hostname, at
            runner.heartbeats += 1

    # -- readers ------------------------------------------------------------

    @property
    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    @property
    def attempts(self) -> dict[str, AttemptRecord]:
        with self._lock:
            return dict(self._attempts)

    @property
    def reassignments(self) -> list[Reassignment]:
        with self._lock:
            return list(self._reassignments)

    @property
    def violations(self) -> list[Violation]:
        with self._lock:
            return list(self._violations)

    @property
    def runners(self) -> dict[str, RunnerRecord]:
        with self._lock:
            return dict(self._runners)

    def outcomes(self) -> dict[str, str | None]:
        """attemptId -> its outcome (None while open, or if it was lost)."""
        with self._lock:
            return {k: v.outcome for k, v in self._attempts.items()}

    def calls_to(self, operation: str) -> list[CallRecord]:
        return [c for c in self.calls if c.operation == operation]

    def problems(self, allow_open: bool = False) -> list[str]:
        """Why the ledger is not clean; empty when every polled attempt got
        exactly one outcome and no protocol violation happened."""
        with self._lock:
            problems = [
                f"violation {v.kind} in {v.operation} for {v.attempt_id}: {v.detail}"
                for v in self._violations
            ]
            for record in self._attempts.values():
                if record.reassigned is not None:
                    problems.append(
                        f"attempt {record.attempt_id} was reassigned ({record.reassigned}) with no outcome"
                    )
                elif len(record.outcomes) != 1 and not (allow_open and not record.outcomes):
                    problems.append(
                        f"attempt {record.attempt_id} has {len(record.outcomes)} outcomes "
                        f"{record.outcomes} (status {record.status})"
                    )
            return problems

    def to_json(self, include_calls: bool = True) -> dict[str, Any]:
        with self._lock:
            attempts = {}
            for key, record in self._attempts.items():
                body = asdict(record)
                attempts[key] = {_SNAKE_TO_CAMEL.get(k, k): v for k, v in body.items()}
            return {
                "calls": [asdict(c) for c in self._calls] if include_calls else [],
                "attempts": attempts,
                "outcomes": {k: v.outcome for k, v in self._attempts.items()},
                "reassignments": [asdict(r) for r in self._reassignments],
                "violations": [asdict(v) for v in self._violations],
                "runners": {k: asdict(v) for k, v in self._runners.items()},
            }


_SNAKE_TO_CAMEL = {v: k for k, v in _CAMEL.items()}
