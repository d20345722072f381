"""``dptr-activity``: the task container of a SqlActivity or CopyActivity attempt.

It reads the attempt's plan from ``$DPTR_ACTIVITY_PLAN`` (a file of the per-attempt
Secret, mounted into this container only), runs it, and ends with:

* 0: done (FINISHED);
* 1: it failed; the termination message ``<errorId>\\n<message>`` says why (FAILED, with
  that errorId: dptr_common.errors.outcome_for_termination);
* 143: SIGTERM (the attempt was cancelled, timed out or evicted): the running statement
  was cancelled on the server first, and the transaction rolled back.

The work runs in a worker thread so that the main thread, where Python runs signal
handlers, can cancel a statement that blocks in the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from dptr_common import logformat
from dptr_common.activity_plan import ActivityPlan
from dptr_common.errors import TaskError, error_id

from .connect import DatabaseError, Session

__all__ = ["main"]

log = logging.getLogger("dptr.activity")

PLAN_ENV = "DPTR_ACTIVITY_PLAN"
TERMINATION_LOG = "/dev/termination-log"


def _finish(error: TaskError | None) -> int:
    if error is None:
        return 0
    text = f"{error.error_id}\n{error.message}"
    print(f"dptr-activity: {error.error_id}: {error.message}", file=sys.stderr, flush=True)
    target = Path(os.environ.get("DPTR_TERMINATION_LOG") or TERMINATION_LOG)
    with contextlib.suppress(OSError):
        target.write_text(text[:4000])
    return 1


def load_plan(path: str, env: dict[str, str] | None = None) -> ActivityPlan:
    env = dict(os.environ) if env is None else env
    try:
        plan = ActivityPlan.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise TaskError(
            "dptr.Activity.PlanMissing", f"the attempt's plan {path} cannot be read: {exc}"
        ) from exc
    except ValidationError as exc:
        # The message names fields only: a plan holds a password.
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors()[:5])
        raise TaskError("dptr.Activity.BadPlan", f"the attempt's plan is not valid: {fields}") from None
    if (plan.pipeline_id, plan.attempt_id) != (env.get("DPTR_PIPELINE_ID"), env.get("DPTR_ATTEMPT_ID")):
        raise TaskError("dptr.Activity.PlanOfAnotherAttempt", "the mounted plan is not this attempt's")
    return plan


def main(argv: list[str] | None = None) -> int:
    logformat.configure(
        os.environ.get("DPTR_LOG_LEVEL", "INFO"),
        os.environ.get("DPTR_LOG_FORMAT", "text"),  # the operator's --log-format
        static={
            "pipeline": os.environ.get("DPTR_PIPELINE_ID", ""),
            "attempt": os.environ.get("DPTR_ATTEMPT_ID", ""),
        },
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    path = os.environ.get(PLAN_ENV) or ""
    try:
        plan = load_plan(path)
    except TaskError as exc:
        return _finish(exc)
    sessions: list[Session] = []
    outcome: list[TaskError | None] = []
    terminated = threading.Event()

    def work() -> None:
        try:
            from .sql import Stopped

            try:
                if plan.type == "SqlActivity":
                    from .sql import run_sql

                    run_sql(plan, sessions, stopping=terminated)
                elif plan.type == "CopyActivity":
                    from .copying import run_copy

                    run_copy(plan, sessions, stopping=terminated)
                else:
                    raise TaskError(
                        error_id("UnknownActivityType", plan.type), f"dptr-activity does not run {plan.type}"
                    )
            except Stopped:
                return
            outcome.append(None)
        except TaskError as exc:
            outcome.append(exc)
        except DatabaseError as exc:
            outcome.append(TaskError(exc.error_id, exc.message))
        except Exception as exc:  # a bug or an unexpected driver error: still one clear line
            outcome.append(
                TaskError(error_id("Activity", type(exc).__name__), f"{type(exc).__name__}: {exc}")
            )

    def on_term(signum: int, _frame: FrameType | None) -> None:
        if terminated.is_set():
            return
        terminated.set()
        for session in list(sessions):
            session.cancel()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    worker = threading.Thread(target=work, name="dptr-activity", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        if terminated.is_set():
            worker.join(10)  # the cancelled statement returns; its transaction rolls back
            break
    if outcome and outcome[0] is None:
        return 0  # done (and committed) before the SIGTERM could stop it: the truth is success
    if terminated.is_set():
        print("dptr-activity: stopped by SIGTERM; the statement was cancelled on the server", file=sys.stderr)
        sys.stderr.flush()
        # A worker still in the driver must not go on after the process is reported gone.
        os._exit(128 + signal.SIGTERM)
    return _finish(
        outcome[0]
        if outcome
        else TaskError("dptr.Activity.NoOutcome", "the activity ended without an outcome")
    )


if __name__ == "__main__":
    sys.exit(main())
