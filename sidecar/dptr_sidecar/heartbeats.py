"""The heartbeat thread: ReportTaskProgress on the paced interval.

:class:`Heartbeater` owns everything the thread changes (the interval, the last
successful beat, the stop flag); the main thread only starts and stops it and hears of a
cancel through ``on_cancel``.  Throttling, 5xx and connection errors are retried with
back-off, but never past the task's reportProgressTimeout; every 5th beat re-reads the
interval the operator publishes on the TaskRunner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dptr_common.datapipeline import DataPipelineError, TaskGone
from dptr_common.errors import fit_api_string
from dptr_common.kube import ApiError, KubeClient, taskrunner_path
from dptr_common.ledger import record_heartbeat
from dptr_common.pacing import jittered

from .config import SidecarConfig
from .shared import CANCELED, RETRY_CAP, DataPipeline, TaskInfo

__all__ = ["HEARTBEAT_MARGIN", "INTERVAL_REFRESH_BEATS", "MAX_INTERVAL_FRACTION", "Heartbeater"]

log = logging.getLogger("dptr.sidecar")

#: A heartbeat must land this fraction of reportProgressTimeout before it runs out.
HEARTBEAT_MARGIN = 0.1
#: The interval is never longer than this fraction of reportProgressTimeout.
MAX_INTERVAL_FRACTION = 1 / 3
#: Re-read the TaskRunner's published interval every this many heartbeats.
INTERVAL_REFRESH_BEATS = 5


class Heartbeater:
    """Heartbeats one task from its own thread until :meth:`stop` (or a cancel).

    ``on_cancel(reason, detail)`` is called from the heartbeat thread when the service
    says the task is canceled or gone; the heartbeats stop by themselves then.
    ``last_beat`` starts at ``since`` (monotonic): until its first success the sidecar
    counts from when it started, the operator having heartbeated until then.
    """

    def __init__(
        self,
        config: SidecarConfig,
        kube: KubeClient,
        dp: DataPipeline,
        task: TaskInfo,
        on_cancel: Callable[[str, str], None],
        *,
        since: float,
    ) -> None:
        self._config = config
        self._kube = kube
        self._dp = dp
        self._task = task
        self._on_cancel = on_cancel
        self._interval = config.heartbeat_interval  # protocol seconds
        self._last_beat = since
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Monotonic time ``status.heartbeat.lastAt`` was last written (by us or the
        #: takeover); None when the last write was an error, which the next success clears.
        self._recorded_at: float | None = None

    # ---------------------------------------------------------------- the main thread's side

    def start(self) -> None:
        """Beat at once, then on the interval, in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="dptr-heartbeat", daemon=True)
        self._thread.start()

    def note_recorded(self) -> None:
        """``lastAt`` was just written (the takeover stamps it): the first beat need not."""
        self._recorded_at = time.monotonic()

    def stop(self) -> None:
        """No heartbeat after the one in flight (if any); does not wait for it."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def interval(self) -> float:
        """The current interval, protocol seconds (before the cap of :meth:`effective_interval`)."""
        return self._interval

    @property
    def last_beat(self) -> float:
        """Monotonic time of the last successful heartbeat."""
        return self._last_beat

    def effective_interval(self) -> float:
        return max(min(self._interval, self._task.timeout * MAX_INTERVAL_FRACTION), 1.0)

    # ---------------------------------------------------------------- the heartbeat thread

    def _loop(self) -> None:
        beats = 0
        wait = 0.0  # beat at once: it also tells us early if the task was canceled
        while not self._stop.wait(wait):
            if beats and beats % INTERVAL_REFRESH_BEATS == 0:
                self._refresh_interval()
            beats += 1
            ok = self._beat()
            interval = self.effective_interval()
            # After a failed beat, try again sooner (the deadline keeps running).
            wait = self._config.scaled(jittered(interval if ok else interval / 4))

    def _refresh_interval(self) -> None:
        if not self._config.task_runner:
            return
        try:
            runner = self._kube.get(taskrunner_path(self._config.namespace, self._config.task_runner))
        except ApiError as exc:
            log.debug("could not read TaskRunner %s: %s", self._config.task_runner, exc)
            return
        published = (runner.get("status") or {}).get("heartbeatIntervalSeconds")
        if isinstance(published, int | float) and published > 0 and published != self._interval:
            log.info("heartbeat interval %.0fs -> %.0fs (TaskRunner status)", self._interval, published)
            self._interval = float(published)

    def _deadline(self) -> float:
        timeout = self._config.scaled(self._task.timeout)
        deadline = self._last_beat + timeout * (1 - HEARTBEAT_MARGIN)
        # Late already (a long outage): still try for a while rather than give up.
        return max(deadline, time.monotonic() + self._config.scaled(RETRY_CAP))

    def _beat(self) -> bool:
        """One heartbeat (with retries); False when it failed."""
        if self._stop.is_set():
            return True
        task_id = self._task.task_id
        try:
            canceled = self._dp.call(lambda dp: dp.report_task_progress(task_id), self._deadline())
        except TaskGone as exc:
            self._on_cancel(exc.code or "TaskGone", exc.message)
            self._stop.set()
            return True
        except DataPipelineError as exc:
            log.warning("heartbeat failed: %s", exc)
            self._record(error=fit_api_string(str(exc), limit=512, keep="head"))
            return False
        self._last_beat = time.monotonic()
        if canceled:
            self._on_cancel(*CANCELED)
            self._stop.set()
            return True
        # lastAt is for `kubectl get`, for a restarted operator (which would beat the task
        # sooner for an older one: the safe side), and for the operator's stale check (no
        # change for 1.5 intervals): a beat within a tenth of an interval of the takeover,
        # which stamped lastAt, needs no write of its own (one per task), and the next
        # record still comes within 1.2 intervals of that stamp.
        recorded = self._recorded_at
        if (
            recorded is None
            or self._last_beat - recorded >= self._config.scaled(self.effective_interval()) * 0.1
        ):
            self._record()
        return True

    def _record(self, error: str | None = None) -> None:
        if error is not None:
            # Even if this write fails (or lands unseen), the next success must write.
            self._recorded_at = None
        try:
            record_heartbeat(
                self._kube,
                self._config.namespace,
                self._config.pipeline_task,
                by=self._config.pod_name,
                error=error,
            )
            if error is None:
                self._recorded_at = time.monotonic()
        except ApiError as exc:
            log.info("could not record the heartbeat on the PipelineTask: %s", exc)
