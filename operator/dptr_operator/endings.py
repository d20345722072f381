"""What follows an attempt's end, and a TaskRunner's: the finalizers dptr holds.

* ``dptr.dev/attempt`` on every PipelineTask while its attempt is open: after the
  outcome is recorded, :meth:`Endings.settle` finishes a cancel's Job deletion, starts
  the Job's TTL (never earlier: a TTL must not remove what an unreported attempt's
  fallback needs) and lets the finalizer go;
* ``dptr.dev/task-runner`` on every TaskRunner: a deleted one is held until each of its
  unfinished tasks is stopped and reported FAILED ``dptr.TaskRunnerDeleted``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from dptr_common.errors import Outcome
from dptr_common.kube import ApiError, NotFound, job_path, pipelinetask_path, taskrunner_path
from dptr_operator.events import task_runner_ref
from dptr_operator.finalizers import remove_finalizer
from dptr_operator.index import ATTEMPT_FINALIZER, TaskEntry, TaskKey
from dptr_operator.polling import RunnerWorker
from dptr_operator.reporter import Reporter
from dptr_operator.runners import Runners
from dptr_operator.services import Services

__all__ = ["FINALIZER", "RUNNER_DELETED_ERROR", "Endings"]

log = logging.getLogger(__name__)

#: Keeps a deleted TaskRunner until its unfinished tasks are reported (see docs/operator.md).
FINALIZER = "dptr.dev/task-runner"

#: errorId of tasks failed because their TaskRunner was deleted.
RUNNER_DELETED_ERROR = "dptr.TaskRunnerDeleted"


class Endings:
    def __init__(
        self, services: Services, runners: Runners, reporter: Reporter, stop: threading.Event
    ) -> None:
        self.services = services
        self.runners = runners
        self.reporter = reporter
        self._stop = stop

    def settle_later(self, entry: TaskEntry) -> None:
        if not entry.settled:
            entry.settled = True
            self.services.work.submit(self.settle, entry=entry)

    def settle(self, entry: TaskEntry) -> None:
        """After the outcome is recorded: finish a cancel's Job deletion (a canceler may
        have stopped between recording the cancel and deleting the Job), start the Job's
        TTL (never earlier, so a TTL cannot remove what an unreported attempt's fallback
        needs), then let go of the finalizer."""
        if entry.canceled and not entry.stopping:
            entry.stopping = True
            try:
                self.reporter.delete_job(entry)
            except ApiError as exc:
                log.warning("%s/%s: deleting a canceled task's Job: %s", entry.namespace, entry.name, exc)
        worker = self.runners.worker_for(entry)
        ttl = worker.spec.job_template.ttl_seconds_after_finished if worker is not None else None
        if ttl is not None and entry.job_name:
            with contextlib.suppress(NotFound):
                self.services.kube.patch(
                    job_path(entry.namespace, entry.job_name), {"spec": {"ttlSecondsAfterFinished": ttl}}
                )
        remove_finalizer(
            self.services.kube, pipelinetask_path(entry.namespace, entry.name), ATTEMPT_FINALIZER
        )

    def finalize_runner(self, worker: RunnerWorker) -> None:
        """A deleted TaskRunner: stop and fail its unfinished tasks, then let it go."""
        outcome = Outcome(
            "FAILED",
            RUNNER_DELETED_ERROR,
            f"TaskRunner {worker.namespace}/{worker.name} was deleted while the task ran",
        )
        while not self._stop.is_set():
            pending = [e for e in self.services.index.for_runner(worker.key) if not e.terminal]
            for entry in pending:
                try:
                    self.reporter.report(entry, outcome, cause="TaskRunner deleted", stop_job=True)
                except Exception as exc:
                    log.warning("%s/%s: failing on runner deletion: %s", entry.namespace, entry.name, exc)
            if not [e for e in self.services.index.for_runner(worker.key) if not e.terminal]:
                break
            self._stop.wait(max(self.services.config.scaled(5), 0.2))
        worker.stop()
        remove_finalizer(self.services.kube, taskrunner_path(*worker.key), FINALIZER)
        self.services.events.emit(
            task_runner_ref(worker.namespace, worker.name, worker.runner.metadata.uid),
            "Deleted",
            "every task is reported; the TaskRunner is released",
        )

    def add_runner_finalizer(
        self, runner_key: TaskKey, finalizers: list[str], resource_version: str | None
    ) -> None:
        patch: dict[str, Any] = {"metadata": {"finalizers": [*finalizers, FINALIZER]}}
        if resource_version:
            patch["metadata"]["resourceVersion"] = resource_version
        try:
            self.services.kube.patch(taskrunner_path(*runner_key), patch)
        except ApiError as exc:
            log.info(
                "adding the finalizer to %s/%s: %s (retried on the next event)",
                runner_key[0],
                runner_key[1],
                exc,
            )
