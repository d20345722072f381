"""The service's state machine: pipelines, instances, attempts and tasks.

One lock (a Condition, so long-polling PollForTask calls can wait on it)
guards everything. A ticker thread enforces the deadlines: the 2-minute ack,
``reportProgressTimeout`` and ``preconditionTimeout``. Durations from the
protocol and from definitions are multiplied by ``time_scale``; timestamps
shown to callers (``@scheduledStartTime`` ...) stay wall-clock.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dptr_datapipeline.definition import (
    ACTIVITY_TYPES,
    DEFAULT_OBJECT_ID,
    PRECONDITION_TYPES,
    Definition,
    Field,
    evaluate,
    parse_duration,
)
from dptr_datapipeline.errors import (
    InvalidRequestException,
    PipelineDeletedException,
    PipelineNotFoundException,
    TaskNotFoundException,
)
from dptr_datapipeline.ledger import AttemptRecord, Ledger, Reassignment, Violation

# Protocol constants, in unscaled seconds.
ACK_TIMEOUT = 120.0
LONG_POLL = 90.0
DEFAULT_PROGRESS_TIMEOUT = 15 * 60.0
DEFAULT_RETRY_DELAY = 10 * 60.0
DEFAULT_MAXIMUM_RETRIES = 2
MAX_IDS_PER_CALL = 25
LIST_PAGE = 100
PRECONDITION_RETRIES = frozenset({"runner", "service"})

TERMINAL = frozenset({"FINISHED", "FAILED", "CANCELED", "CASCADE_FAILED", "TIMEDOUT"})
_FAILED_LIKE = frozenset({"FAILED", "CASCADE_FAILED", "TIMEDOUT"})
_ID_ALPHABET = string.ascii_uppercase + string.digits


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(eq=False)
class Attempt:
    id: str
    number: int
    instance: Instance
    task_id: str
    ready_at: float
    status: str = "WAITING_FOR_RUNNER"
    polled_at: float | None = None
    acked_at: float | None = None
    last_progress_at: float | None = None
    hostname: str | None = None
    outcome: str | None = None
    reassigned: str | None = None
    error_id: str | None = None
    error_message: str | None = None
    error_stack_trace: str | None = None
    actual_start: float | None = None
    actual_end: float | None = None
    progress_fields: list[Field] = field(default_factory=list)


@dataclass(eq=False)
class Instance:
    id: str
    pipeline: Pipeline
    component_id: str
    kind: str  # "activity" or "precondition"
    scheduled: float
    worker_group: str
    started: float  # monotonic; preconditionTimeout counts from here
    status: str = "WAITING_ON_DEPENDENCIES"
    depends_on: list[str] = field(default_factory=list)
    preconditions: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    # Attempts that count against maximumRetries (FALSE checks do not).
    tries: int = 0
    actual_start: float | None = None
    actual_end: float | None = None
    cascade_on: str | None = None
    #: A precondition's runtime `node`: the data node it is attached to, if any.
    node: str | None = None

    @property
    def head(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


@dataclass(eq=False)
class Pipeline:
    id: str
    name: str
    unique_id: str
    description: str | None
    tags: list[dict[str, str]]
    created: float
    state: str = "PENDING"
    definition: Definition | None = None
    definition_errored: bool = False
    active_definition: Definition | None = None
    activation_values: list[dict[str, Any]] = field(default_factory=list)
    instances: dict[str, Instance] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    deleted: bool = False
    version: int = 0
    last_activation: float | None = None

    def attempt(self, attempt_id: str) -> Attempt | None:
        for inst in self.instances.values():
            for a in inst.attempts:
                if a.id == attempt_id:
                    return a
        return None


class Engine:
    def __init__(
        self,
        ledger: Ledger,
        time_scale: float = 1.0,
        default_maximum_retries: int = DEFAULT_MAXIMUM_RETRIES,
        state_file: str | os.PathLike[str] | None = None,
        *,
        precondition_retries: str = "runner",
        pipeline_log_uri_on_attempts: bool = True,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if precondition_retries not in PRECONDITION_RETRIES:
            raise ValueError(f"precondition_retries must be one of {sorted(PRECONDITION_RETRIES)}")
        #: "runner": the runner re-checks within one attempt and FALSE is final (the
        #: developer guide's reading); "service": FALSE is re-scheduled after retryDelay.
        self.precondition_retries = precondition_retries
        #: Whether Default's pipelineLogUri is inherited onto polled attempts (the developer
        #: guide does not say; False models a service that keeps it on Default only).
        self.pipeline_log_uri_on_attempts = pipeline_log_uri_on_attempts
        self.ledger = ledger
        self.time_scale = time_scale
        self.default_maximum_retries = default_maximum_retries
        self.state_file = Path(state_file) if state_file is not None else None
        # The ledger shares the lock, so a ledger read never sees half an update.
        self.cond = threading.Condition(ledger.lock)
        self.pipelines: dict[str, Pipeline] = {}
        self.by_unique_id: dict[tuple[str, str], str] = {}
        self.tasks: dict[str, Attempt] = {}
        self.queue: list[Attempt] = []
        self.running: dict[str, Attempt] = {}
        self.runner_terminate = False
        self.stopping = False
        self._last_run_second = 0
        self.clock: Callable[[], float] = time.monotonic
        if self.state_file is not None and self.state_file.exists():
            self._load()

    def scaled(self, seconds: float) -> float:
        return seconds * self.time_scale

    # ---------------------------------------------------------------- pipelines

    def create_pipeline(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            key = (req["name"], req["uniqueId"])
            existing = self.by_unique_id.get(key)
            # CreatePipeline is idempotent on (name, uniqueId): a retried call gets the same id.
            if existing is not None:
                return {"pipelineId": existing}
            pid = "df-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(19))
            self.pipelines[pid] = Pipeline(
                pid,
                req["name"],
                req["uniqueId"],
                req.get("description"),
                list(req.get("tags", [])),
                time.time(),
            )
            self.by_unique_id[key] = pid
            self._save()
            return {"pipelineId": pid}

    def _pipeline(self, pipeline_id: str) -> Pipeline:
        p = self.pipelines.get(pipeline_id)
        if p is None:
            raise PipelineNotFoundException(f"Pipeline with id '{pipeline_id}' does not exist")
        if p.deleted:
            raise PipelineDeletedException(f"Pipeline with id '{pipeline_id}' was deleted")
        return p

    def _check_definition(self, req: Mapping[str, Any]) -> tuple[Definition, dict[str, Any]]:
        definition = Definition.from_api(
            req["pipelineObjects"], req.get("parameterObjects"), req.get("parameterValues")
        )
        errors, warnings = definition.validate(req["pipelineObjects"])
        result: dict[str, Any] = {"errored": bool(errors)}
        if errors:
            result["validationErrors"] = errors
        if warnings:
            result["validationWarnings"] = warnings
        return definition, result

    def put_definition(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            definition, result = self._check_definition(req)
            # AWS stores an errored definition too, but refuses to activate it.
            p.definition, p.definition_errored = definition, result["errored"]
            self._save()
            return result

    def validate_definition(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            self._pipeline(req["pipelineId"])
            return self._check_definition(req)[1]

    def get_definition(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            version = req.get("version", "latest")
            if version not in ("latest", "active"):
                raise InvalidRequestException("version must be 'latest' or 'active'")
            definition = p.active_definition if version == "active" else p.definition
            if definition is None:
                raise InvalidRequestException(f"Pipeline '{p.id}' has no {version} definition")
            return definition.to_api()

    def activate(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            if p.definition is None:
                raise InvalidRequestException(f"Pipeline '{p.id}' has no definition to activate")
            if p.definition_errored:
                raise InvalidRequestException(f"Pipeline '{p.id}' definition has validation errors")
            if "parameterValues" in req:
                p.activation_values = list(req["parameterValues"])
            open_run = any(i.status not in TERMINAL for i in p.instances.values())
            p.state = "SCHEDULED"
            p.last_activation = time.time()
            if not open_run:
                self._start_run(p)
            self._save()
            self.cond.notify_all()
            return {}

    def deactivate(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            p.state = "INACTIVE"
            if req.get("cancelActive", True):
                for inst in list(p.instances.values()):
                    head = inst.head
                    if head is not None and head.status == "RUNNING":
                        self._cancel_instance(inst, "pipeline deactivated")
                self._advance(p)
            self._save()
            return {}

    def delete(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self.pipelines.get(req["pipelineId"])
            if p is None or p.deleted:
                raise PipelineNotFoundException(f"Pipeline with id '{req['pipelineId']}' does not exist")
            for inst in p.instances.values():
                for a in inst.attempts:
                    self._cancel_attempt(a, "pipeline deleted")
            p.deleted = True
            p.state = "DELETING"
            self.by_unique_id.pop((p.name, p.unique_id), None)
            self._save()
            return {}

    def describe_pipelines(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            ids = req["pipelineIds"]
            if len(ids) > MAX_IDS_PER_CALL:
                raise InvalidRequestException(f"At most {MAX_IDS_PER_CALL} pipelineIds per call")
            out = []
            for pid in ids:
                p = self._pipeline(pid)
                fields = [
                    Field("@pipelineState", p.state),
                    Field("@creationTime", _iso(p.created) or ""),
                    Field("@sphere", "PIPELINE"),
                    Field("@id", p.id),
                    Field("name", p.name),
                    Field("uniqueId", p.unique_id),
                    Field("@userId", "AIDADPTRLOCAL"),
                    Field("@accountId", "000000000000"),
                    Field("pipelineCreator", "AIDADPTRLOCAL"),
                    Field("@healthStatus", self._health(p)),
                    Field("@version", str(p.version)),
                ]
                if p.last_activation is not None:
                    fields.append(Field("@lastActivationTime", _iso(p.last_activation) or ""))
                desc: dict[str, Any] = {
                    "pipelineId": p.id,
                    "name": p.name,
                    "fields": [f.to_api() for f in fields],
                    "tags": p.tags,
                }
                if p.description is not None:
                    desc["description"] = p.description
                out.append(desc)
            return {"pipelineDescriptionList": out}

    def _health(self, p: Pipeline) -> str:
        bad = any(i.status in _FAILED_LIKE for i in p.instances.values())
        return "ERROR" if bad else "HEALTHY"

    def list_pipelines(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            live = [{"id": p.id, "name": p.name} for p in self.pipelines.values() if not p.deleted]
            start = _marker(req.get("marker"))
            page = live[start : start + LIST_PAGE]
            out: dict[str, Any] = {"pipelineIdList": page, "hasMoreResults": start + LIST_PAGE < len(live)}
            if out["hasMoreResults"]:
                out["marker"] = str(start + LIST_PAGE)
            return out

    def add_tags(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            merged = {t["key"]: t["value"] for t in p.tags}
            merged.update({t["key"]: t["value"] for t in req["tags"]})
            if len(merged) > 10:
                raise InvalidRequestException("A pipeline can have at most 10 tags")
            p.tags = [{"key": k, "value": v} for k, v in merged.items()]
            self._save()
            return {}

    def remove_tags(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            p.tags = [t for t in p.tags if t["key"] not in set(req["tagKeys"])]
            self._save()
            return {}

    # ------------------------------------------------------------------- runs

    def _run_time(self) -> float:
        # Instance ids embed the run's start second. Keeping that second unique
        # across the whole service keeps attempt ids unique too, so the ledger
        # can key attempts by attemptId even with many pipelines per second.
        second = max(int(time.time()), self._last_run_second + 1)
        self._last_run_second = second
        return float(second)

    def _start_run(self, p: Pipeline) -> None:
        defn = p.definition
        assert defn is not None
        p.active_definition = defn
        p.version += 1
        scheduled = self._run_time()
        stamp = _iso(scheduled)
        now = self.clock()
        p.instances = {}
        by_component: dict[str, Instance] = {}
        activities = [o for o in defn.objects if defn.type_of(o) in ACTIVITY_TYPES]
        lookup, params = self._lookup(p), self._params(p)

        def worker_group_of(comp: str) -> str | None:
            # A workerGroup may be a parameter (#{myWorkerGroup}), as any field may.
            raw = defn.first(comp, "workerGroup")
            return None if raw is None else evaluate(raw, lookup, comp, params)

        for comp in activities:
            wg = worker_group_of(comp)
            if wg is None:
                continue
            inst = Instance(f"@{comp}_{stamp}", p, comp, "activity", scheduled, wg, now)
            by_component[comp] = inst

        def guarded_by(activity: str) -> list[str]:
            # An activity waits for its own preconditions and for those of the data nodes
            # it reads (a data node's precondition, e.g. Exists, says its data is there).
            own = list(defn.all_values(activity, "precondition"))
            for node in defn.all_values(activity, "input"):
                if node in defn.objects:
                    own += [c for c in defn.all_values(node, "precondition") if c not in own]
            return own

        for comp in defn.objects:
            if defn.type_of(comp) not in PRECONDITION_TYPES:
                continue
            wg = worker_group_of(comp)
            if wg is None:
                # A precondition runs where the activity it guards runs.
                users = [a for a in activities if comp in guarded_by(a)]
                wg = next((w for a in users if (w := worker_group_of(a)) is not None), None)
            if wg is None:
                continue
            inst = Instance(f"@{comp}_{stamp}", p, comp, "precondition", scheduled, wg, now)
            # The runtime 'node': the first data node this precondition is attached to.
            inst.node = next(
                (
                    o
                    for o, obj in defn.objects.items()
                    if o != DEFAULT_OBJECT_ID
                    and (defn.type_of(o) or "").endswith("DataNode")
                    and any(f.is_ref and f.value == comp for f in obj.values("precondition"))
                ),
                None,
            )
            by_component[comp] = inst
        for comp, inst in by_component.items():
            if inst.kind != "activity":
                continue
            inst.depends_on = [
                by_component[d].id for d in defn.all_values(comp, "dependsOn") if d in by_component
            ]
            inst.preconditions = [by_component[c].id for c in guarded_by(comp) if c in by_component]
        p.instances = {inst.id: inst for inst in by_component.values()}
        self._advance(p)

    def _advance(self, p: Pipeline) -> None:
        """Move waiting instances on as their dependencies settle."""
        changed = True
        while changed:
            changed = False
            for inst in p.instances.values():
                if inst.status != "WAITING_ON_DEPENDENCIES":
                    continue
                deps = [p.instances[d] for d in inst.depends_on + inst.preconditions]
                precondition_timed_out = next(
                    (d for d in deps if d.kind == "precondition" and d.status == "TIMEDOUT"), None
                )
                failed = next((d for d in deps if d.status in _FAILED_LIKE), None)
                canceled = next((d for d in deps if d.status == "CANCELED"), None)
                if precondition_timed_out is not None or canceled is not None:
                    # A precondition that never held cancels what it guards.
                    inst.status = "CANCELED"
                    inst.cascade_on = (precondition_timed_out or canceled or inst).id
                    changed = True
                elif failed is not None:
                    inst.status, inst.cascade_on = "CASCADE_FAILED", failed.id
                    changed = True
                elif all(d.status == "FINISHED" for d in deps):
                    self._new_attempt(inst, 0.0)
                    changed = True
        if p.instances and all(i.status in TERMINAL for i in p.instances.values()) and p.state == "SCHEDULED":
            p.state = "FINISHED"

    def _new_attempt(self, inst: Instance, delay: float) -> Attempt:
        number = len(inst.attempts) + 1
        attempt_id = f"{inst.id}_Attempt={number}"
        a = Attempt(
            attempt_id, number, inst, self._task_id(inst.pipeline.id, attempt_id), self.clock() + delay
        )
        inst.attempts.append(a)
        inst.status = "WAITING_FOR_RUNNER"
        self.tasks[a.task_id] = a
        self.queue.append(a)
        self.cond.notify_all()
        return a

    @staticmethod
    def _task_id(pipeline_id: str, attempt_id: str) -> str:
        # Opaque and long, as AWS's are; runners must not parse or shorten it.
        payload = json.dumps({"p": pipeline_id, "a": attempt_id, "n": secrets.token_urlsafe(96)})
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    def _max_retries(self, inst: Instance) -> int:
        defn = inst.pipeline.active_definition
        raw = defn.first(inst.component_id, "maximumRetries") if defn else None
        try:
            return int(raw) if raw is not None else self.default_maximum_retries
        except ValueError:
            return self.default_maximum_retries

    def _duration_field(self, inst: Instance, key: str, default: float | None) -> float | None:
        defn = inst.pipeline.active_definition
        raw = defn.first(inst.component_id, key) if defn else None
        if raw is None:
            return default
        try:
            return parse_duration(raw)
        except ValueError:
            return default

    # ------------------------------------------------------------ task runner

    def poll(self, req: Mapping[str, Any]) -> dict[str, Any]:
        worker_group = req["workerGroup"]
        deadline = self.clock() + self.scaled(LONG_POLL)
        with self.cond:
            while not self.stopping:
                a = self._take(worker_group)
                if a is not None:
                    return {"taskObject": self._hand_out(a, req.get("hostname"))}
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                # Retry delays release attempts without a notify; wake often enough to see them.
                self.cond.wait(min(remaining, max(self.scaled(1.0), 0.01)))
        return {}

    def _take(self, worker_group: str) -> Attempt | None:
        now = self.clock()
        for index, a in enumerate(self.queue):
            p = a.instance.pipeline
            if (
                a.instance.worker_group == worker_group
                and a.ready_at <= now
                and p.state == "SCHEDULED"
                and a.instance.component_id not in p.paused
            ):
                del self.queue[index]
                return a
        return None

    def _hand_out(self, a: Attempt, hostname: str | None) -> dict[str, Any]:
        inst = a.instance
        now = self.clock()
        a.status, a.polled_at, a.hostname, a.actual_start = "RUNNING", now, hostname, time.time()
        inst.status = "RUNNING"
        inst.tries += 1
        if inst.actual_start is None:
            inst.actual_start = a.actual_start
        self.running[a.task_id] = a
        self.ledger.add_attempt(
            AttemptRecord(
                attempt_id=a.id,
                task_id=a.task_id,
                pipeline_id=inst.pipeline.id,
                object_id=inst.component_id,
                instance_id=inst.id,
                worker_group=inst.worker_group,
                polled_at=time.time(),
                hostname=hostname,
                # ready_at is on the monotonic clock: shown as wall-clock time.
                ready_at=time.time() - max(0.0, now - a.ready_at),
            )
        )
        objects = {a.id: self._attempt_object(a, evaluated=True)}
        defn = inst.pipeline.active_definition
        assert defn is not None
        # Data nodes an activity reads or writes travel with the task, so a runner can
        # stage them without another call; so do the database of a SqlActivity or a
        # SqlDataNode and a node's dataFormat, with their '*' fields (the runner connects
        # with them).  A guess at what the real service sends, documented in
        # docs/local-datapipeline.md.
        queue = [
            ref for key in ("input", "output", "database") for ref in defn.all_values(inst.component_id, key)
        ]
        while queue:
            ref = queue.pop(0)
            if ref in objects or ref not in defn.objects:
                continue
            objects[ref] = self._component_object(inst.pipeline, ref, evaluated=True)
            queue += [r for key in ("database", "dataFormat") for r in defn.all_values(ref, key)]
        # And the data node a precondition checks (its runtime 'node'); a guess at what
        # the real service sends, documented in docs/local-datapipeline.md.
        if inst.node is not None and inst.node in defn.objects:
            objects[inst.node] = self._component_object(inst.pipeline, inst.node, evaluated=True)
        return {"taskId": a.task_id, "pipelineId": inst.pipeline.id, "attemptId": a.id, "objects": objects}

    def _attempt_for_task(self, task_id: str) -> Attempt:
        a = self.tasks.get(task_id)
        if a is None or a.polled_at is None:
            raise TaskNotFoundException(f"Task '{task_id[:64]}...' does not exist")
        if a.instance.pipeline.deleted:
            raise PipelineDeletedException(f"Pipeline '{a.instance.pipeline.id}' was deleted")
        return a

    def report_progress(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            a = self._attempt_for_task(req["taskId"])
            record = self.ledger.attempt(a.id)
            if a.reassigned is not None or a.outcome == "CANCELED":
                if record is not None:
                    record.cancel_seen = True
                return {"canceled": True}
            if a.outcome is not None:
                # Progress after the final status is a harmless race (an operator's
                # heartbeat crossing the sidecar's report): answer, change nothing.
                return {"canceled": False}
            now = self.clock()
            if a.acked_at is None:
                a.acked_at = now
            a.last_progress_at = now
            a.progress_fields = [Field.from_api(f) for f in req.get("fields", [])]
            if record is not None:
                record.acked_at = record.acked_at or time.time()
                record.last_progress_at = time.time()
                record.progress_calls += 1
            return {"canceled": False}

    def set_task_status(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            a = self._attempt_for_task(req["taskId"])
            status = req["taskStatus"]
            error_id = req.get("errorId")
            if error_id is not None and error_id.startswith("Service_"):
                raise InvalidRequestException("errorId must not start with 'Service_', which is reserved")
            refusal = None
            if a.reassigned is not None:
                refusal = ("status_after_reassignment", f"attempt was reassigned ({a.reassigned})")
            elif a.outcome == "CANCELED":
                refusal = ("status_after_cancel", "attempt was canceled")
            elif a.outcome is not None:
                refusal = ("second_final_status", f"attempt already ended {a.outcome}")
            if refusal is not None:
                self.ledger.add_violation(
                    Violation(
                        time.time(),
                        refusal[0],
                        "SetTaskStatus",
                        a.task_id,
                        a.id,
                        f"{refusal[1]}; got {status}",
                    )
                )
                raise InvalidRequestException(
                    f"Task for attempt '{a.id}' cannot take status {status}: {refusal[1]}"
                )
            a.error_id, a.error_message, a.error_stack_trace = (
                error_id,
                req.get("errorMessage"),
                req.get("errorStackTrace"),
            )
            self._finish_attempt(a, status)
            self._advance(a.instance.pipeline)
            return {}

    def _record_outcome(self, a: Attempt, outcome: str, reason: str | None = None) -> None:
        a.outcome = outcome
        a.actual_end = time.time()
        self.running.pop(a.task_id, None)
        record = self.ledger.attempt(a.id)
        if record is not None:
            record.outcome = outcome
            record.outcomes.append(outcome)
            record.status = a.status
            record.error_id, record.error_message = a.error_id, a.error_message
            record.error_stack_trace = a.error_stack_trace
            record.canceled_reason = reason

    def _finish_attempt(self, a: Attempt, status: str) -> None:
        inst = a.instance
        a.status = "FINISHED" if status == "FINISHED" else "FAILED"
        self._record_outcome(a, status)
        if status == "FINISHED":
            inst.status, inst.actual_end = "FINISHED", time.time()
            return
        if status == "FALSE" and inst.kind == "precondition" and self.precondition_retries == "runner":
            # The runner checked until preconditionTimeout (the developer guide: "retry
            # logic for preconditions happens in Task Runner"): FALSE is the final answer.
            inst.status, inst.actual_end = "TIMEDOUT", time.time()
            return
        if status == "FALSE" and inst.kind == "precondition":
            # --precondition-retries service: a check that did not hold is retried until
            # preconditionTimeout, and does not use up maximumRetries.
            inst.tries -= 1
            delay = self._duration_field(inst, "retryDelay", DEFAULT_RETRY_DELAY) or 0.0
            self._new_attempt(inst, self.scaled(delay))
            return
        self._retry_or_end(inst, "FAILED")

    def _retry_or_end(self, inst: Instance, final_status: str, delay: float | None = None) -> Attempt | None:
        if inst.tries <= self._max_retries(inst):
            if delay is None:
                delay = self.scaled(self._duration_field(inst, "retryDelay", DEFAULT_RETRY_DELAY) or 0.0)
            return self._new_attempt(inst, delay)
        inst.status, inst.actual_end = final_status, time.time()
        return None

    def runner_heartbeat(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            self.ledger.runner_heartbeat(
                req["taskrunnerId"], req.get("workerGroup"), req.get("hostname"), time.time()
            )
            return {"terminate": self.runner_terminate}

    # ------------------------------------------------------------- cancelling

    def _cancel_attempt(self, a: Attempt, reason: str) -> None:
        if a.status == "WAITING_FOR_RUNNER":
            a.status = "CANCELED"
            if a in self.queue:
                self.queue.remove(a)
        elif a.status == "RUNNING" and a.outcome is None and a.reassigned is None:
            a.status = "CANCELED"
            # The runner learns of it from ReportTaskProgress and must stay
            # silent; the cancel is the attempt's one outcome.
            self._record_outcome(a, "CANCELED", reason)

    def _cancel_instance(self, inst: Instance, reason: str) -> None:
        for a in inst.attempts:
            self._cancel_attempt(a, reason)
        if inst.status not in TERMINAL:
            inst.status, inst.actual_end = "CANCELED", time.time()

    def tick(self) -> None:
        """Enforce deadlines; called by the service's ticker thread."""
        with self.cond:
            now = self.clock()
            changed: set[Pipeline] = set()
            for a in list(self.running.values()):
                inst = a.instance
                if a.acked_at is None:
                    if a.polled_at is not None and now - a.polled_at >= self.scaled(ACK_TIMEOUT):
                        self._reassign(a, "ack_timeout")
                        changed.add(inst.pipeline)
                else:
                    timeout = self._duration_field(inst, "reportProgressTimeout", DEFAULT_PROGRESS_TIMEOUT)
                    last = a.last_progress_at or a.acked_at
                    if timeout is not None and now - last >= self.scaled(timeout):
                        self._reassign(a, "progress_timeout")
                        changed.add(inst.pipeline)
            for p in self.pipelines.values():
                if p.deleted or p.state != "SCHEDULED":
                    continue
                for inst in p.instances.values():
                    if inst.kind != "precondition" or inst.status in TERMINAL:
                        continue
                    timeout = self._duration_field(inst, "preconditionTimeout", None)
                    if (
                        timeout is not None
                        and self.precondition_retries == "runner"
                        and any(a.status == "RUNNING" for a in inst.attempts)
                    ):
                        # The runner enforces the timeout of the check it runs; the service
                        # stops one still running at twice the timeout (a runner whose
                        # clock is wrong must not hold the pipeline forever).
                        timeout *= 2
                    if timeout is not None and now - inst.started >= self.scaled(timeout):
                        self._cancel_instance(inst, "preconditionTimeout")
                        inst.status = "TIMEDOUT"
                        changed.add(p)
            for p in changed:
                self._advance(p)
            if changed:
                self.cond.notify_all()

    def _reassign(self, a: Attempt, reason: str) -> None:
        inst = a.instance
        a.status, a.reassigned = "TIMEDOUT", reason
        self.running.pop(a.task_id, None)
        record = self.ledger.attempt(a.id)
        if record is not None:
            record.reassigned, record.status = reason, "TIMEDOUT"
        # A lost runner's work goes to the next poll at once, not after retryDelay.
        new = self._retry_or_end(inst, "TIMEDOUT", delay=0.0)
        self.ledger.add_reassignment(Reassignment(time.time(), a.id, reason, new.id if new else None))

    # --------------------------------------------------------------- SetStatus

    def set_status(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            ids: Sequence[str] = req["objectIds"]
            status = req["status"]
            defn = p.active_definition or p.definition
            instances = [p.instances[i] for i in ids if i in p.instances]
            components = [i for i in ids if defn is not None and i in defn.objects]
            unknown = [i for i in ids if i not in p.instances and i not in components]
            if unknown:
                raise InvalidRequestException(f"Objects not found in pipeline '{p.id}': {', '.join(unknown)}")
            if instances and components:
                raise InvalidRequestException("objectIds must be all components or all instances, not a mix")
            if components:
                if status == "PAUSE":
                    p.paused.update(components)
                elif status == "RESUME":
                    p.paused.difference_update(components)
                else:
                    raise InvalidRequestException("Components take status PAUSE or RESUME")
                self.cond.notify_all()
                return {}
            for inst in instances:
                if status in ("CANCEL", "TRY_CANCEL"):
                    self._cancel_instance(inst, "SetStatus CANCEL")
                elif status == "MARK_FINISHED":
                    self._cancel_instance(inst, "SetStatus MARK_FINISHED")
                    inst.status = "FINISHED"
                elif status == "RERUN":
                    self._rerun(p, inst)
                else:
                    raise InvalidRequestException(
                        "Instances take status CANCEL, TRY_CANCEL, RERUN or MARK_FINISHED"
                    )
            self._advance(p)
            if p.state == "FINISHED" and any(i.status not in TERMINAL for i in p.instances.values()):
                p.state = "SCHEDULED"
            return {}

    def _rerun(self, p: Pipeline, inst: Instance) -> None:
        if inst.status not in TERMINAL:
            return
        # Rerunning an instance also reruns what failed or was canceled because of it.
        inst.status, inst.tries, inst.cascade_on, inst.actual_end = "WAITING_ON_DEPENDENCIES", 0, None, None
        inst.started = self.clock()
        for other in p.instances.values():
            if inst.id in other.depends_on + other.preconditions and other.status in TERMINAL - {"FINISHED"}:
                self._rerun(p, other)

    # ----------------------------------------------------------------- objects

    def _params(self, p: Pipeline) -> dict[str, list[str]]:
        defn = p.active_definition or p.definition
        return defn.parameter_table(p.activation_values) if defn else {}

    def _lookup(self, p: Pipeline) -> Callable[[str], list[Field] | None]:
        def fields_of(object_id: str) -> list[Field] | None:
            defn = p.active_definition or p.definition
            if object_id in p.instances:
                return self._instance_fields(p.instances[object_id])
            a = p.attempt(object_id) if object_id.startswith("@") else None
            if a is not None:
                return self._attempt_fields(a)
            if defn is not None and object_id in defn.objects:
                return defn.resolved(object_id)
            return None

        return fields_of

    def _evaluate_fields(self, p: Pipeline, self_id: str, fields: list[Field]) -> list[Field]:
        lookup, params = self._lookup(p), self._params(p)
        return [f if f.is_ref else Field(f.key, evaluate(f.value, lookup, self_id, params)) for f in fields]

    def _user_fields(self, inst: Instance) -> list[Field]:
        defn = inst.pipeline.active_definition
        assert defn is not None
        fields = [f for f in defn.resolved(inst.component_id) if f.key != "parent"]
        if not self.pipeline_log_uri_on_attempts:
            # Model a service that keeps pipelineLogUri on Default only: a runner must
            # read it there (DescribeObjects) unless the object sets it itself.
            obj = defn.objects.get(inst.component_id)
            if obj is None or not obj.values("pipelineLogUri"):
                fields = [f for f in fields if f.key != "pipelineLogUri"]
        return fields

    def _instance_fields(self, inst: Instance) -> list[Field]:
        fields = self._user_fields(inst)
        fields += [
            Field("@componentParent", inst.component_id, True),
            Field("@sphere", "INSTANCE"),
            Field("@status", inst.status),
            Field("@scheduledStartTime", _iso(inst.scheduled) or ""),
            Field("@scheduledEndTime", _iso(inst.scheduled) or ""),
            Field("@pipelineId", inst.pipeline.id),
        ]
        if inst.head is not None:
            fields.append(Field("@headAttempt", inst.head.id, True))
        if inst.actual_start is not None:
            fields.append(Field("@actualStartTime", _iso(inst.actual_start) or ""))
        if inst.actual_end is not None:
            fields.append(Field("@actualEndTime", _iso(inst.actual_end) or ""))
        if inst.cascade_on is not None:
            fields.append(Field("@cascadeFailedOn", inst.cascade_on, True))
        if inst.status == "WAITING_ON_DEPENDENCIES":
            p = inst.pipeline
            for dep in inst.depends_on + inst.preconditions:
                if p.instances[dep].status != "FINISHED":
                    fields.append(Field("@waitingOn", dep, True))
        return fields

    def _attempt_fields(self, a: Attempt) -> list[Field]:
        inst = a.instance
        fields = self._user_fields(inst)
        fields += [
            Field("@componentParent", inst.component_id, True),
            Field("@instanceParent", inst.id, True),
            Field("@sphere", "ATTEMPT"),
            Field("@status", a.status),
            Field("@scheduledStartTime", _iso(inst.scheduled) or ""),
            Field("@scheduledEndTime", _iso(inst.scheduled) or ""),
            Field("@pipelineId", inst.pipeline.id),
            Field("@attemptNumber", str(a.number)),
        ]
        if inst.node is not None:
            fields.append(Field("node", inst.node, True))
        if a.actual_start is not None:
            fields.append(Field("@actualStartTime", _iso(a.actual_start) or ""))
        if a.hostname is not None:
            fields.append(Field("hostname", a.hostname))
        if a.actual_end is not None:
            fields.append(Field("@actualEndTime", _iso(a.actual_end) or ""))
        for key, value in (
            ("errorId", a.error_id),
            ("errorMessage", a.error_message),
            ("errorStackTrace", a.error_stack_trace),
        ):
            if value is not None:
                fields = [f for f in fields if f.key != key] + [Field(key, value)]
        return fields

    def _attempt_object(self, a: Attempt, evaluated: bool) -> dict[str, Any]:
        fields = self._attempt_fields(a)
        if evaluated:
            fields = self._evaluate_fields(a.instance.pipeline, a.id, fields)
        return {"id": a.id, "name": a.id, "fields": [f.to_api() for f in fields]}

    def _component_object(self, p: Pipeline, object_id: str, evaluated: bool) -> dict[str, Any]:
        defn = p.active_definition or p.definition
        assert defn is not None
        obj = defn.objects[object_id]
        fields = [*defn.resolved(object_id), Field("@sphere", "COMPONENT"), Field("@pipelineId", p.id)]
        if object_id in p.paused:
            fields.append(Field("@status", "PAUSED"))
        if evaluated:
            fields = self._evaluate_fields(p, object_id, fields)
        return {"id": obj.id, "name": obj.name, "fields": [f.to_api() for f in fields]}

    def _describe(self, p: Pipeline, object_id: str, evaluated: bool) -> dict[str, Any] | None:
        if object_id in p.instances:
            fields = self._instance_fields(p.instances[object_id])
            if evaluated:
                fields = self._evaluate_fields(p, object_id, fields)
            return {"id": object_id, "name": object_id, "fields": [f.to_api() for f in fields]}
        a = p.attempt(object_id) if object_id.startswith("@") else None
        if a is not None:
            return self._attempt_object(a, evaluated)
        defn = p.active_definition or p.definition
        if defn is not None and object_id in defn.objects:
            return self._component_object(p, object_id, evaluated)
        return None

    def describe_objects(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            if len(req["objectIds"]) > MAX_IDS_PER_CALL:
                raise InvalidRequestException(f"At most {MAX_IDS_PER_CALL} objectIds per call")
            evaluated = bool(req.get("evaluateExpressions", False))
            objects = [o for i in req["objectIds"] if (o := self._describe(p, i, evaluated)) is not None]
            return {"pipelineObjects": objects, "hasMoreResults": False}

    def evaluate_expression(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            if self._describe(p, req["objectId"], False) is None:
                raise TaskNotFoundException(f"Object '{req['objectId']}' does not exist")
            text = evaluate(req["expression"], self._lookup(p), req["objectId"], self._params(p))
            return {"evaluatedExpression": text}

    def query_objects(self, req: Mapping[str, Any]) -> dict[str, Any]:
        with self.cond:
            p = self._pipeline(req["pipelineId"])
            sphere = req["sphere"]
            if sphere == "COMPONENT":
                defn = p.active_definition or p.definition
                ids = list(defn.objects) if defn else []
            elif sphere == "INSTANCE":
                ids = list(p.instances)
            elif sphere == "ATTEMPT":
                ids = [a.id for inst in p.instances.values() for a in inst.attempts]
            else:
                raise InvalidRequestException("sphere must be COMPONENT, INSTANCE or ATTEMPT")
            selectors = req.get("query", {}).get("selectors", [])
            if selectors:
                ids = [i for i in ids if _matches(self._describe(p, i, False), selectors)]
            limit = req.get("limit") or 100
            if limit < 1:
                raise InvalidRequestException("limit must be positive")
            start = _marker(req.get("marker"))
            page = ids[start : start + limit]
            out: dict[str, Any] = {"ids": page, "hasMoreResults": start + limit < len(ids)}
            if out["hasMoreResults"]:
                out["marker"] = str(start + limit)
            return out

    # ------------------------------------------------------------- state file

    def _save(self) -> None:
        if self.state_file is None:
            return
        data = {
            "pipelines": [
                {
                    "id": p.id,
                    "name": p.name,
                    "uniqueId": p.unique_id,
                    "description": p.description,
                    "tags": p.tags,
                    "created": p.created,
                    "state": p.state,
                    "deleted": p.deleted,
                    "version": p.version,
                    "definition": p.definition.to_api() if p.definition else None,
                    "definitionErrored": p.definition_errored,
                    "activeDefinition": p.active_definition.to_api() if p.active_definition else None,
                    "activationValues": p.activation_values,
                }
                for p in self.pipelines.values()
            ]
        }
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        # Rename is atomic, so a crash mid-write never leaves a torn state file.
        tmp.replace(self.state_file)

    def _load(self) -> None:
        assert self.state_file is not None
        data = json.loads(self.state_file.read_text())
        for raw in data.get("pipelines", []):
            p = Pipeline(
                raw["id"], raw["name"], raw["uniqueId"], raw.get("description"), raw["tags"], raw["created"]
            )
            p.state, p.deleted, p.version = raw["state"], raw["deleted"], raw["version"]
            p.definition_errored = raw["definitionErrored"]
            p.activation_values = raw.get("activationValues", [])
            for attr, key in (("definition", "definition"), ("active_definition", "activeDefinition")):
                if raw.get(key):
                    d = raw[key]
                    setattr(
                        p,
                        attr,
                        Definition.from_api(
                            d["pipelineObjects"], d["parameterObjects"], d["parameterValues"]
                        ),
                    )
            # Runs in flight are not persisted: an active pipeline comes back
            # with no open instances, and ActivatePipeline starts a fresh run.
            if p.state == "SCHEDULED":
                p.state = "FINISHED"
            self.pipelines[p.id] = p
            if not p.deleted:
                self.by_unique_id[(p.name, p.unique_id)] = p.id


def _marker(marker: str | None) -> int:
    if not marker:
        return 0
    try:
        return max(0, int(marker))
    except ValueError:
        raise InvalidRequestException(f"Invalid marker '{marker}'") from None


def _matches(obj: Mapping[str, Any] | None, selectors: Sequence[Mapping[str, Any]]) -> bool:
    if obj is None:
        return False
    for selector in selectors:
        name = selector.get("fieldName")
        op = selector.get("operator", {})
        kind, values = op.get("type", "EQ"), op.get("values", [])
        got = [f.get("stringValue", f.get("refValue")) for f in obj["fields"] if f["key"] == name]
        if name == "id":
            got = [obj["id"]]
        if kind in ("EQ", "REF_EQ"):
            ok = any(g in values for g in got)
        elif kind == "LE":
            ok = bool(values) and any(g is not None and g <= values[0] for g in got)
        elif kind == "GE":
            ok = bool(values) and any(g is not None and g >= values[0] for g in got)
        elif kind == "BETWEEN":
            ok = len(values) >= 2 and any(g is not None and values[0] <= g <= values[1] for g in got)
        else:
            ok = False
        if not ok:
            return False
    return True
