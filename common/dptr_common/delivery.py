"""A claimed report's one SetTaskStatus: the part of the report sequence the sidecar and
the operator's fallback share.

Both report the same way (``ledger``: claim, then their own checks, then this, then
``ledger.mark_reported``).  This is the step where a mistake costs an outcome:

* a claim that may have been reported already (its holder restarted, or it was taken
  over from a holder that went silent) asks Data Pipeline first whether the attempt is
  final; when Data Pipeline cannot say, nothing is sent (``deferred``): guessing "no"
  could report twice, guessing "yes" could lose the outcome;
* SetTaskStatus is retried (throttling, 5xx, timeouts) until the deadline;
* a refusal after a possible earlier report is the service refusing a repeat, which
  means the report was made (``repeat-refused``), not that it failed.

It returns what happened and records nothing: each caller records and tells it its way
(Events, metrics, exit codes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .datapipeline import DataPipelineClient, DataPipelineError, InvalidRequest, TaskGone, call_with_retry
from .errors import Outcome

__all__ = ["Delivery", "deliver"]

DeliveryStatus = Literal[
    "reported", "already-final", "repeat-refused", "deferred", "gone", "refused", "failed"
]


@dataclass(frozen=True)
class Delivery:
    status: DeliveryStatus
    #: What the service answered, when it was not a plain success.
    error: DataPipelineError | None = None

    @property
    def detail(self) -> str:
        return "" if self.error is None else str(self.error)

    @property
    def delivered(self) -> bool:
        """Data Pipeline holds the attempt's final status (sent now or before)."""
        return self.status in ("reported", "already-final", "repeat-refused")


def deliver(
    dp: DataPipelineClient,
    outcome: Outcome,
    *,
    task_id: str,
    pipeline_id: str,
    attempt_id: str,
    maybe_reported: bool,
    deadline: float,
    base: float,
    cap: float,
    stack_trace: str | bytes | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> Delivery:
    """Send ``outcome`` for the attempt once, unless Data Pipeline already has one."""

    def retried(fn: Callable[[], object]) -> object:
        return call_with_retry(fn, deadline=deadline, base=base, cap=cap, on_retry=on_retry)

    if maybe_reported:
        try:
            if retried(lambda: dp.attempt_is_final(pipeline_id, attempt_id)):
                return Delivery("already-final")
        except DataPipelineError as exc:
            return Delivery("deferred", exc)
    kwargs = outcome.set_task_status_kwargs(task_id, stack_trace)
    try:
        retried(
            lambda: dp.set_task_status(
                task_id,
                outcome.status,
                kwargs.get("errorId"),
                kwargs.get("errorMessage"),
                kwargs.get("errorStackTrace"),
            )
        )
    except InvalidRequest as exc:
        return Delivery("repeat-refused" if maybe_reported else "refused", exc)
    except TaskGone as exc:
        return Delivery("gone", exc)
    except DataPipelineError as exc:
        return Delivery("failed", exc)
    return Delivery("reported")
