"""One :class:`RunnerWorker` per TaskRunner: its Data Pipeline client, its pollers, its
ReportTaskRunnerHeartbeat loop and the health it shows in its status.

Polling rules (design.md, "PollForTask"):

* ``spec.pollers`` threads, each with at most one PollForTask in flight (botocore is
  synchronous; a long poll holds its thread for up to 90 s);
* a poller polls only after reserving a free slot: running tasks + polls in flight stay
  <= ``maxConcurrentTasks``, so the runner never receives a task it has no room for;
* throttling and 5xx back off with full jitter; an unreachable endpoint or refused
  credentials set ``Degraded`` (with a Warning Event) and polling goes on backing off,
  re-reading the credentials Secret, until it works again;
* ``paused``, ``terminate: true`` from ReportTaskRunnerHeartbeat, and deletion stop
  polling; running tasks are not touched by any of them.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dptr_common.awsauth import AssumedRole, external_id_for, session_name_for
from dptr_common.datapipeline import (
    CredentialsError,
    DataPipelineClient,
    DataPipelineError,
    EndpointUnreachable,
    InvalidRequest,
    StaticCredentials,
    Throttled,
    TransientError,
)
from dptr_common.kube import ApiError, ApiUnavailable, NotFound, namespaced_path, taskrunner_path
from dptr_common.logformat import log_context
from dptr_common.models import TaskRunner
from dptr_common.pacing import Backoff, HeartbeatPlan, heartbeat_interval, jittered
from dptr_operator.events import task_runner_ref
from dptr_operator.services import Services
from dptr_operator.tenancy import Refusal, task_account_refusal

__all__ = ["Dispatch", "RunnerWorker", "StatusRequest", "conditions_for", "runner_ready"]

log = logging.getLogger(__name__)

#: Hands a polled task on: (worker, PollForTask's taskObject, release its slot).
Dispatch = Callable[["RunnerWorker", Mapping[str, Any], Callable[[], None]], None]
#: Asks for the runner's status to be written.
StatusRequest = Callable[["RunnerWorker"], None]


@dataclass
class RunnerHealth:
    """What the worker knows about its own health; turned into conditions."""

    degraded_reason: str | None = None
    degraded_message: str = ""
    terminated: bool = False
    budget_message: str | None = None
    #: Why the administrator's tenancy settings keep this TaskRunner from polling.
    refusal: Refusal | None = None


def _condition(type_: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": "True" if status else "False", "reason": reason, "message": message}


def runner_ready(health: RunnerHealth, *, deleting: bool) -> bool:
    """The Ready condition's status (also dptr_taskrunner_ready)."""
    return health.refusal is None and not health.degraded_reason and not health.terminated and not deleting


def conditions_for(
    *, paused: bool, deleting: bool, health: RunnerHealth, active: int, maximum: int
) -> list[dict[str, Any]]:
    """The Ready, Polling and Degraded conditions for a runner's state (pure; no times)."""
    if health.refusal is not None:
        reason, message = health.refusal.reason, health.refusal.message
        return [
            _condition("Ready", False, reason, message),
            _condition("Polling", False, reason, message),
            _condition("Degraded", True, reason, message),
        ]
    if deleting:
        polling = _condition("Polling", False, "Deleting", "the TaskRunner is being deleted")
    elif health.terminated:
        polling = _condition(
            "Polling",
            False,
            "Terminated",
            "Data Pipeline asked this runner to terminate (ReportTaskRunnerHeartbeat)",
        )
    elif paused:
        polling = _condition("Polling", False, "Paused", f"paused; {active} running task(s) drain")
    elif active >= maximum:
        polling = _condition("Polling", False, "AtCapacity", f"{active}/{maximum} tasks running")
    elif health.degraded_reason:
        polling = _condition("Polling", False, health.degraded_reason, health.degraded_message)
    else:
        polling = _condition("Polling", True, "Polling", f"{active}/{maximum} tasks running")
    if health.degraded_reason:
        degraded = _condition("Degraded", True, health.degraded_reason, health.degraded_message)
    elif health.budget_message:
        degraded = _condition("Degraded", True, "HeartbeatBudgetExceeded", health.budget_message)
    else:
        degraded = _condition("Degraded", False, "Healthy", "")
    healthy = runner_ready(health, deleting=deleting)
    ready = _condition(
        "Ready",
        healthy,
        "Ready" if healthy else (health.degraded_reason or ("Deleting" if deleting else "Terminated")),
        "" if healthy else (health.degraded_message or polling["message"]),
    )
    return [ready, polling, degraded]


class RunnerWorker:
    """Polls one TaskRunner's worker group and owns its Data Pipeline client.

    ``dispatch`` is handed each polled task (it calls ``release`` when its slot may go);
    ``request_status`` asks for the runner's status to be written at the next sweep."""

    def __init__(
        self,
        services: Services,
        runner: TaskRunner,
        *,
        dispatch: Dispatch,
        request_status: StatusRequest,
    ) -> None:
        self.services = services
        self._dispatch = dispatch
        self._request_status = request_status
        self.namespace = str(runner.metadata.namespace)
        self.name = runner.metadata.name
        self.key = (self.namespace, self.name)
        self.health = RunnerHealth()
        self.runner = self._admit(runner)
        self.taskrunner_id = (
            self.runner.spec.taskrunner_id or runner.status.taskrunner_id or f"dptr-{uuid.uuid4()}"
        )
        self.counts = runner.status.counts.model_copy()
        self.deleting = False
        self.plan: HeartbeatPlan = heartbeat_interval(0)
        self.last_poll_time: datetime | None = None
        self._lock = threading.Lock()
        self._inflight = 0
        self._stop = threading.Event()
        self._wake = threading.Condition(self._lock)
        self._client: DataPipelineClient | None = None
        self._client_key: tuple[Any, ...] | None = None
        self._client_built = 0.0
        self._refresh = False
        self._threads: dict[int, threading.Thread] = {}
        self._status_written: dict[str, Any] = {}
        self._status_written_at = 0.0
        self._transitions: dict[str, tuple[str, str]] = {}
        self._hb_thread: threading.Thread | None = None
        #: Set after the first ReportTaskRunnerHeartbeat (whatever its result): a runner
        #: told to terminate must not have polled in the meantime.
        self._registered = threading.Event()
        #: No polling before this (monotonic): the namespace refused a Job for its quota.
        self._held_until = 0.0

    # ------------------------------------------------------------------ lifecycle

    @property
    def spec(self) -> Any:
        return self.runner.spec

    def start(self) -> None:
        self._ensure_pollers()
        if self._hb_thread is None:
            self._hb_thread = threading.Thread(
                target=self._runner_heartbeat_loop, name=f"runner-hb-{self.name}", daemon=True
            )
            self._hb_thread.start()

    def update(self, runner: TaskRunner) -> None:
        """A new version of the TaskRunner (spec or status) was seen."""
        admitted = self._admit(runner)
        with self._lock:
            self.runner = admitted
            if admitted.spec.taskrunner_id:
                # Unsetting it later keeps the id in use: it stays stable either way.
                self.taskrunner_id = admitted.spec.taskrunner_id
            self._wake.notify_all()
        self._ensure_pollers()

    def _admit(self, runner: TaskRunner) -> TaskRunner:
        """Check the TaskRunner against the administrator's tenancy settings (recording why
        it may not poll, with an Event when that changes) and fill in the administrator's
        default endpoints: the runner as the worker uses it."""
        config = self.services.config
        refusal = config.tenancy.check(runner) or task_account_refusal(runner, config.sidecar_service_account)
        previous, self.health.refusal = self.health.refusal, refusal
        if refusal != previous:
            ref = task_runner_ref(self.namespace, self.name, runner.metadata.uid)
            if refusal is not None:
                log.warning("%s/%s: %s", self.namespace, self.name, refusal.message)
                self.services.events.emit(ref, refusal.reason, refusal.message, "Warning")
            elif previous is not None:
                self.services.events.emit(
                    ref, "Permitted", f"the TaskRunner may poll again (was {previous.reason})"
                )
            self._request_status(self)
        defaults: dict[str, Any] = {}
        if runner.spec.endpoint_url is None and config.default_endpoint_url:
            defaults["endpoint_url"] = config.default_endpoint_url
        if runner.spec.s3_endpoint_url is None and config.default_s3_endpoint_url:
            defaults["s3_endpoint_url"] = config.default_s3_endpoint_url
        if not defaults:
            return runner
        return runner.model_copy(update={"spec": runner.spec.model_copy(update=defaults)})

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._wake.notify_all()

    def begin_deletion(self) -> None:
        with self._lock:
            self.deleting = True
            self._wake.notify_all()

    def _ensure_pollers(self) -> None:
        wanted = self.spec.pollers
        for index in range(wanted):
            thread = self._threads.get(index)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=self._poll_loop, args=(index,), name=f"poll-{self.name}-{index}", daemon=True
                )
                self._threads[index] = thread
                thread.start()

    # ------------------------------------------------------------------ client

    def client(self) -> DataPipelineClient:
        """The runner's Data Pipeline client, rebuilt when the endpoint or credentials change.

        The credentials Secret is read when the client is first built, after a call was
        refused for its credentials (:meth:`refresh_credentials`), and every 5 minutes."""
        spec = self.spec
        spec_key = (spec.region, spec.endpoint_url, spec.credentials.model_dump_json())
        with self._lock:
            fresh = (
                self._client is not None
                and self._client_key is not None
                and self._client_key[0] == spec_key
                and not self._refresh
                and time.monotonic() - self._client_built < 300
            )
            if fresh and self._client is not None:
                return self._client
        creds = self._credentials()
        with self._lock:
            key = (spec_key, creds)
            if self._client is None or key != self._client_key:
                if self._client is not None:
                    old = self._client
                    timer = threading.Timer(120, old.close)  # let calls in flight finish
                    timer.daemon = True
                    timer.start()
                self._client = DataPipelineClient(
                    spec.region,
                    spec.endpoint_url,
                    creds,
                    role=self._role(),
                    max_pool_connections=32,
                    on_error=self.services.metrics.attempt_failed,
                )
                self._client_key = key
            self._client_built = time.monotonic()
            self._refresh = False
            return self._client

    def _role(self) -> AssumedRole | None:
        arn = self.spec.credentials.role_arn
        if arn is None:
            return None
        return AssumedRole(
            arn, session_name_for(self.namespace, self.name, "operator"), external_id_for(self.namespace)
        )

    def refresh_credentials(self) -> None:
        with self._lock:
            self._refresh = True

    def _credentials(self) -> StaticCredentials | None:
        creds = self.spec.credentials
        if creds.mode != "Secret" or creds.secret_ref is None:
            return None
        ref = creds.secret_ref
        try:
            secret = self.services.kube.get(namespaced_path("api/v1", "secrets", self.namespace, ref.name))
        except NotFound as exc:
            raise CredentialsError(f"Secret {self.namespace}/{ref.name} does not exist") from exc
        except ApiError as exc:
            raise CredentialsError(f"cannot read Secret {self.namespace}/{ref.name}: {exc}") from exc
        data = secret.get("data") or {}

        def value(key: str) -> str:
            raw = data.get(key)
            if not raw:
                raise CredentialsError(f"Secret {self.namespace}/{ref.name} has no key {key!r}")
            return base64.b64decode(raw).decode()

        return StaticCredentials(value(ref.access_key_id_key), value(ref.secret_access_key_key))

    # ------------------------------------------------------------------ capacity

    def may_poll(self) -> bool:
        return self._registered.is_set() and not (
            self._stop.is_set()
            or self.deleting
            or self.spec.paused
            or self.health.terminated
            or self.health.refusal is not None
            or time.monotonic() < self._held_until
            or not self.services.leading.is_set()
        )

    def hold_polling(self, seconds: float, why: str) -> None:
        """Poll nothing for ``seconds``: new tasks could not run either (a quota is full)."""
        until = time.monotonic() + seconds
        if until <= self._held_until:
            return
        self._held_until = until
        log.warning("%s/%s: polling held for %.1fs: %s", self.namespace, self.name, seconds, why)
        self.services.events.emit(
            task_runner_ref(self.namespace, self.name, self.runner.metadata.uid),
            "PollingHeld",
            f"polling paused for {seconds:.0f}s: {why}",
            "Warning",
        )

    def active(self) -> int:
        return self.services.index.active_count(self.key)

    def _reserve(self) -> bool:
        """Take a slot for one poll (True), or wait a little for one (False)."""
        with self._lock:
            if self.may_poll() and self.active() + self._inflight < self.spec.max_concurrent_tasks:
                self._inflight += 1
                return True
            self._wake.wait(timeout=0.25)
            return False

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._wake.notify_all()

    def capacity_changed(self) -> None:
        with self._lock:
            self._wake.notify_all()

    # ------------------------------------------------------------------ polling

    def _poll_loop(self, index: int) -> None:
        # Every line this poller logs (and the dispatches it runs) names its TaskRunner.
        with log_context(taskrunner=f"{self.namespace}/{self.name}"):
            self._poll_forever(index)

    def _poll_forever(self, index: int) -> None:
        backoff = Backoff(
            base=self.services.config.scaled(2.0) + 0.05, cap=max(self.services.config.scaled(60.0), 1.0)
        )
        while not self._stop.is_set():
            if index >= self.spec.pollers:
                return
            if not self._api_reachable() or not self._reserve():
                continue
            dispatched = False
            try:
                task = self._poll_once()
                backoff.reset()
                self._set_degraded(None)
                if task is not None:
                    dispatched = True
                    self._dispatch(self, task, self.release)
            except (Throttled, TransientError) as exc:
                delay = backoff.next_delay()
                log.info(
                    "%s/%s: PollForTask %s; retrying in %.2fs", self.namespace, self.name, exc.reason, delay
                )
                self._stop.wait(delay)
            except (EndpointUnreachable, CredentialsError, InvalidRequest) as exc:
                if isinstance(exc, CredentialsError):
                    self.refresh_credentials()
                self._set_degraded(exc.reason, str(exc))
                self._stop.wait(max(backoff.next_delay(), self.services.config.scaled(5.0)))
            except DataPipelineError as exc:
                self._set_degraded(exc.reason, str(exc))
                self._stop.wait(max(backoff.next_delay(), self.services.config.scaled(5.0)))
            except Exception:
                log.exception("%s/%s: poller %d failed", self.namespace, self.name, index)
                self._stop.wait(1.0)
            finally:
                if not dispatched:
                    self.release()

    def _api_reachable(self) -> bool:
        """Poll only what can be recorded: while the API server does not answer, a polled
        task cannot become a PipelineTask, and Data Pipeline would give it to someone else
        once its ack window passed.  After a failed call, one GET must answer first."""
        kube = self.services.kube
        if kube.unreachable_since is None:
            return True
        try:
            kube.get(taskrunner_path(self.namespace, self.name), timeout=5)
        except ApiUnavailable:
            self._stop.wait(max(self.services.config.scaled(2.0), 0.5))
            return False
        except ApiError:
            pass  # it answered
        return True

    def _poll_once(self) -> dict[str, Any] | None:
        client = self.client()
        start = time.monotonic()
        result = "error"
        try:
            task = client.poll_for_task(self.spec.worker_group, self.services.config.identity)
            result = "task" if task else "empty"
            return task
        finally:
            self.services.metrics.poll_duration.labels(self.namespace, self.name, result).observe(
                time.monotonic() - start
            )
            if result != "error":
                self.last_poll_time = datetime.now(UTC)

    # ------------------------------------------------------------------ health

    def _set_degraded(self, reason: str | None, message: str = "") -> None:
        previous = self.health.degraded_reason
        if reason == previous and (reason is None or message == self.health.degraded_message):
            return
        self.health.degraded_reason = reason
        self.health.degraded_message = message
        ref = task_runner_ref(self.namespace, self.name, self.runner.metadata.uid)
        if reason is not None and reason != previous:
            self.services.events.emit(ref, "Degraded", f"{reason}: {message}", "Warning")
        elif reason is None and previous is not None:
            self.services.events.emit(ref, "Recovered", f"polling works again (was {previous})")
        self._request_status(self)

    def _runner_heartbeat_loop(self) -> None:
        period = self.services.config.scaled(self.services.config.runner_heartbeat_seconds)
        while not self._stop.is_set():
            wait = period
            if self.services.leading.is_set() and not self.deleting and self.health.refusal is None:
                try:
                    terminate = self.client().report_task_runner_heartbeat(
                        self.taskrunner_id, self.spec.worker_group, self.services.config.identity
                    )
                    self._set_terminated(terminate)
                except DataPipelineError as exc:
                    log.warning("%s/%s: ReportTaskRunnerHeartbeat: %s", self.namespace, self.name, exc)
                    wait = min(period, max(self.services.config.scaled(30.0), 1.0))
                except Exception:
                    log.exception("%s/%s: ReportTaskRunnerHeartbeat failed", self.namespace, self.name)
                    wait = min(period, 5.0)
                finally:
                    self._registered.set()
                    with self._lock:
                        self._wake.notify_all()
            else:
                wait = min(period, 1.0)
            self._stop.wait(jittered(wait, fraction=0.05))

    def _set_terminated(self, terminate: bool) -> None:
        if terminate == self.health.terminated:
            return
        self.health.terminated = terminate
        ref = task_runner_ref(self.namespace, self.name, self.runner.metadata.uid)
        if terminate:
            self.services.events.emit(
                ref, "Terminated", "Data Pipeline asked this runner to terminate; polling stopped", "Warning"
            )
        else:
            self.services.events.emit(ref, "Resumed", "Data Pipeline no longer asks this runner to terminate")
        with self._lock:
            self._wake.notify_all()
        self._request_status(self)

    # ------------------------------------------------------------------ status

    def desired_status(self) -> dict[str, Any]:
        active = self.active()
        maximum = self.spec.max_concurrent_tasks
        conditions = conditions_for(
            paused=self.spec.paused,
            deleting=self.deleting,
            health=self.health,
            active=active,
            maximum=maximum,
        )
        return {
            "conditions": conditions,
            "active": active,
            "activeSummary": f"{active}/{maximum}",
            "taskrunnerId": self.taskrunner_id,
            "heartbeatIntervalSeconds": self.plan.interval_seconds,
            "counts": self.counts.to_k8s(),
            "observedGeneration": self.runner.metadata.generation,
        }

    def publish_status(self, *, force: bool = False) -> None:
        """Write the status if it changed (lastPollTime alone: at most every 10 s)."""
        desired = self.desired_status()
        now = time.monotonic()
        changed = desired != self._status_written
        if not changed and not force and (self.last_poll_time is None or now - self._status_written_at < 10):
            return
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for cond in desired["conditions"]:
            previous = self._transitions.get(cond["type"])
            if previous is None or previous[0] != cond["status"]:
                existing = self.runner.status.condition(cond["type"])
                if existing and existing.status == cond["status"] and existing.last_transition_time:
                    when = existing.last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
                else:
                    when = stamp
                self._transitions[cond["type"]] = (cond["status"], when)
            cond["lastTransitionTime"] = self._transitions[cond["type"]][1]
        body = {**desired}
        if self.last_poll_time is not None:
            body["lastPollTime"] = self.last_poll_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.services.kube.patch(taskrunner_path(self.namespace, self.name, "status"), {"status": body})
        except NotFound:
            return
        except ApiError as exc:
            log.warning("%s/%s: status write failed: %s", self.namespace, self.name, exc)
            return
        for cond in desired["conditions"]:
            cond.pop("lastTransitionTime", None)
        self._status_written = desired
        self._status_written_at = now
