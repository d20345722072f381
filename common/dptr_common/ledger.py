"""The PipelineTask status as the exactly-once ledger of a task's outcome.

Whoever reports a task's outcome (the sidecar normally, the operator as a fallback) first
*claims* the report on the PipelineTask status, then calls SetTaskStatus, then marks it
reported::

    claim = claim_report(kube, ns, name, holder="sidecar/" + pod, status=..., stale_after=...)
    if claim is not None:
        dp.set_task_status(task_id, claim.status, claim.error_id, claim.error_message, trace)
        mark_reported(kube, ns, name, claim=claim)

The claim is a PUT to the status subresource carrying the ``resourceVersion`` just read,
so of two claimers racing from the same state exactly one write succeeds; the other gets
409 Conflict, re-reads, sees the claim and backs off.  A claim whose holder died before
reporting is taken over once it has stayed unchanged for ``stale_after`` seconds as the
*observer* sees it (a :class:`StalenessObserver`, on the observer's own monotonic clock,
as client-go's leader election judges a lease): ``claimedAt`` is the writer's clock, and
nodes' clocks differ, so comparing it with the reader's clock would let ten minutes of
skew take over a live claim.  A live holder refreshes its claim (:func:`revise_claim`)
while it works, which restarts every observer's count.  ``stale_after`` must exceed the
longest time a live holder may spend between refreshes or between its claim and
:func:`mark_reported` (its SetTaskStatus retry deadline), or a slow holder and its
successor could both report.

A takeover reports the outcome the first holder claimed (the holder that saw the
container's exit knew best); :attr:`Claim.status` and friends are always what to send.

Cancellation is recorded the same way: :func:`mark_canceled` refuses once a report is
claimed, and :func:`claim_report` refuses once the task is canceled, so a task gets a
SetTaskStatus or a honoured cancel, never both.

All functions work on the raw API objects (not the pydantic models), so a PUT never
drops a status field this module does not know about.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .errors import fit_api_string, fit_error_id
from .kube import Conflict, KubeClient, pipelinetask_path

if TYPE_CHECKING:
    pass

__all__ = [
    "FINAL_PHASE",
    "OBSERVER",
    "Claim",
    "ClaimDecision",
    "LedgerConflictError",
    "ReportStatus",
    "StalenessObserver",
    "claim_fingerprint",
    "claim_report",
    "decide_claim",
    "format_time",
    "heartbeat_status",
    "mark_canceled",
    "mark_reported",
    "operator_holder",
    "parse_time",
    "record_dispatch",
    "record_heartbeat",
    "revise_claim",
    "sidecar_holder",
    "take_over_heartbeats",
]

log = logging.getLogger(__name__)

ReportStatus = Literal["FINISHED", "FAILED", "FALSE"]
HeartbeatOwner = Literal["operator", "sidecar"]

#: The phase a PipelineTask ends in once its outcome is reported.
FINAL_PHASE: dict[str, str] = {"FINISHED": "Succeeded", "FAILED": "Failed", "FALSE": "Failed"}

#: How many times an optimistic write is retried after a 409 before giving up.
MAX_CONFLICT_RETRIES = 25

R = TypeVar("R")


class LedgerConflictError(Exception):
    """An optimistic write kept conflicting (someone writes the object continuously)."""


# --------------------------------------------------------------------------- identities and time


def sidecar_holder(pod: str) -> str:
    """The claim holder identity of the sidecar in ``pod``."""
    return f"sidecar/{pod}"


def operator_holder(identity: str) -> str:
    """The claim holder identity of an operator replica (its pod name, or host name)."""
    return f"operator/{identity}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as the ledger stores times."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str | datetime | None) -> datetime | None:
    """A ledger time (or None when absent or unreadable), always timezone-aware."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- staleness


class StalenessObserver:
    """How long *this process* has seen a value unchanged, on its own monotonic clock.

    ``unchanged_for(key, value)`` returns 0 the first time a value is seen for ``key``
    (or when it differs from the last one seen) and afterwards the time since.  This is
    how client-go's leader election judges a lease: never by comparing a timestamp the
    writer put in the object with the reader's wall clock, which clock skew between
    nodes would make wrong in either direction.  After a restart every value starts at
    0 again: a takeover waits one full ``stale_after`` more, never less.  Thread-safe;
    remembers at most ``limit`` keys (the oldest go first).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, limit: int = 100_000) -> None:
        self._clock = clock
        self._limit = limit
        self._seen: OrderedDict[Hashable, tuple[Hashable, float]] = OrderedDict()
        self._lock = threading.Lock()

    def unchanged_for(self, key: Hashable, value: Hashable) -> float:
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or seen[0] != value:
                self._seen[key] = (value, now)
                self._seen.move_to_end(key)
                while len(self._seen) > self._limit:
                    self._seen.popitem(last=False)
                return 0.0
            return now - seen[1]

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._seen.pop(key, None)


#: The process's observer of report claims (the operator and the sidecar each have one).
OBSERVER = StalenessObserver()


# --------------------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Claim:
    """A report claim that ``holder`` owns: send exactly this to SetTaskStatus."""

    namespace: str
    name: str
    holder: str
    status: ReportStatus
    error_id: str | None
    error_message: str | None
    claimed_at: str
    resource_version: str
    #: True when the ledger already held our claim (we restarted, or the answer to our
    #: write was lost).  SetTaskStatus may or may not have been called already.
    resumed: bool = False
    #: The holder whose stale claim we took over, if any.
    taken_over_from: str | None = None


ClaimAction = Literal["claim", "own", "take_over", "refuse"]


@dataclass(frozen=True)
class ClaimDecision:
    action: ClaimAction
    why: str


def _section(status: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = status.get(key)
    return value if isinstance(value, Mapping) else {}


def is_canceled(status: Mapping[str, Any]) -> bool:
    return status.get("phase") == "Canceled" or bool(_section(status, "canceled").get("at"))


def claim_fingerprint(status: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies one version of a claim: any refresh or change makes a new one."""
    report = _section(status, "report")
    return (report.get("claimedBy"), report.get("claimedAt"), report.get("status"))


def decide_claim(
    status: Mapping[str, Any], holder: str, *, unchanged_for: float, stale_after: float
) -> ClaimDecision:
    """What ``holder`` may do with the report, given the PipelineTask ``status`` as read and
    how long the observer has seen its current claim unchanged (:class:`StalenessObserver`)."""
    report = _section(status, "report")
    if report.get("reportedAt"):
        return ClaimDecision("refuse", f"already reported by {report.get('reportedBy') or 'someone'}")
    if is_canceled(status):
        return ClaimDecision("refuse", "the task is canceled")
    claimed_by = report.get("claimedBy")
    if not claimed_by:
        return ClaimDecision("claim", "no claim yet")
    if claimed_by == holder:
        return ClaimDecision("own", "we hold the claim already")
    if unchanged_for >= stale_after:
        return ClaimDecision(
            "take_over",
            f"the claim by {claimed_by} is unreported and unchanged for {unchanged_for:.1f}s as seen here",
        )
    return ClaimDecision(
        "refuse", f"claimed by {claimed_by} (unchanged for {unchanged_for:.1f}s as seen here)"
    )


# --------------------------------------------------------------------------- writes


def _optimistic_update(
    kube: KubeClient,
    namespace: str,
    name: str,
    decide: Callable[[dict[str, Any]], tuple[bool, R]],
) -> tuple[R, dict[str, Any] | None]:
    """Read the PipelineTask, let ``decide`` change its ``status`` in place and say whether
    to write, and PUT it to the status subresource with the resourceVersion read.  On 409
    start over.  Returns ``decide``'s result and the written object (None if not written).
    Raises :class:`~dptr_common.kube.NotFound` if the PipelineTask does not exist."""
    for _ in range(MAX_CONFLICT_RETRIES):
        obj = kube.get(pipelinetask_path(namespace, name))
        if not isinstance(obj.get("status"), dict):
            obj["status"] = {}
        write, result = decide(obj)
        if not write:
            return result, None
        try:
            written = kube.replace(pipelinetask_path(namespace, name, "status"), obj)
        except Conflict as exc:
            if exc.reason == "AlreadyExists":  # pragma: no cover - never for a PUT
                raise
            log.debug("ledger write to %s/%s conflicted; re-reading", namespace, name)
            continue
        return result, written
    raise LedgerConflictError(
        f"PipelineTask {namespace}/{name}: {MAX_CONFLICT_RETRIES} conflicting writes in a row"
    )


def claim_report(
    kube: KubeClient,
    namespace: str,
    name: str,
    *,
    holder: str,
    status: ReportStatus,
    error_id: str | None = None,
    error_message: str | None = None,
    stale_after: float,
    clock: Callable[[], datetime] = _utcnow,
    observer: StalenessObserver | None = None,
) -> Claim | None:
    """Claim the right to call SetTaskStatus for this PipelineTask.

    Returns the :class:`Claim` when ``holder`` owns the report (fresh, taken over from a
    holder whose claim ``observer`` (default :data:`OBSERVER`) has seen unchanged for
    ``stale_after`` seconds, or already ours), and None when someone else holds a live
    claim, the outcome is already reported, or the task is canceled.  On a takeover the
    previous holder's outcome is kept.  ``clock`` only stamps ``claimedAt`` (for people
    and ``kubectl``); no decision reads it.  Raises ``NotFound`` if the PipelineTask is
    gone and :class:`LedgerConflictError` if the object never stops changing.
    """
    seen = OBSERVER if observer is None else observer
    if status not in FINAL_PHASE:
        raise ValueError(f"status must be FINISHED, FAILED or FALSE, not {status!r}")

    def decide(obj: dict[str, Any]) -> tuple[bool, tuple[ClaimDecision, dict[str, Any]]]:
        st = obj["status"]
        now = clock()
        age = seen.unchanged_for((namespace, name), claim_fingerprint(st))
        decision = decide_claim(st, holder, unchanged_for=age, stale_after=stale_after)
        report = dict(_section(st, "report"))
        if decision.action in ("claim", "take_over"):
            previous = report.get("claimedBy") if decision.action == "take_over" else None
            # Stored as SetTaskStatus will send them, so the ledger shows what was reported.
            outcome = {
                "status": status,
                "errorId": fit_error_id(error_id) if error_id else None,
                "errorMessage": fit_api_string(error_message, keep="head") if error_message else None,
            }
            if previous and report.get("status") in FINAL_PHASE:
                outcome = {k: report.get(k) for k in ("status", "errorId", "errorMessage")}
            new_report: dict[str, Any] = {
                "claimedBy": holder,
                "claimedAt": format_time(now),
                **{k: v for k, v in outcome.items() if v is not None},
            }
            st["report"] = new_report
            return True, (decision, {**new_report, "_previous": previous})
        return False, (decision, {**report, "_resourceVersion": obj["metadata"].get("resourceVersion")})

    (decision, report), written = _optimistic_update(kube, namespace, name, decide)
    if decision.action == "refuse":
        log.info("not claiming the report of %s/%s for %s: %s", namespace, name, holder, decision.why)
        return None
    source = (
        written["metadata"] if written is not None else {"resourceVersion": report.get("_resourceVersion")}
    )
    resource_version = str(source.get("resourceVersion") or "")
    if decision.action == "take_over":
        log.warning("claimed the report of %s/%s for %s: %s", namespace, name, holder, decision.why)
    return Claim(
        namespace=namespace,
        name=name,
        holder=holder,
        status=report.get("status") or status,
        error_id=report.get("errorId"),
        error_message=report.get("errorMessage"),
        claimed_at=str(report.get("claimedAt") or ""),
        resource_version=resource_version,
        resumed=decision.action == "own",
        taken_over_from=report.get("_previous"),
    )


def revise_claim(
    kube: KubeClient,
    claim: Claim,
    *,
    status: ReportStatus | None = None,
    error_id: str | None = None,
    error_message: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> Claim | None:
    """Refresh a claim we hold (``claimedAt`` = now) and, with ``status``, replace its outcome.

    For a holder with work between its claim and SetTaskStatus (the sidecar uploading
    staged outputs and logs): claiming first keeps the operator's fallback away, a
    refresh keeps the claim from going stale, and a revision records the outcome that
    work decided (FAILED when outputs could not be uploaded).  Returns the updated
    :class:`Claim`, or None when the claim is no longer ours or the task is reported or
    canceled (then do not report).  Raises ``NotFound`` if the PipelineTask is gone.
    """
    if status is not None and status not in FINAL_PHASE:
        raise ValueError(f"status must be FINISHED, FAILED or FALSE, not {status!r}")

    def decide(obj: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        st = obj["status"]
        report = dict(_section(st, "report"))
        if report.get("reportedAt") or is_canceled(st) or report.get("claimedBy") != claim.holder:
            return False, None
        report["claimedAt"] = format_time(clock())
        if status is not None:
            report["status"] = status
            for key, value in (
                ("errorId", fit_error_id(error_id) if error_id else None),
                ("errorMessage", fit_api_string(error_message, keep="head") if error_message else None),
            ):
                if value is None:
                    report.pop(key, None)
                else:
                    report[key] = value
        st["report"] = report
        return True, report

    report, written = _optimistic_update(kube, claim.namespace, claim.name, decide)
    if report is None or written is None:
        return None
    return Claim(
        namespace=claim.namespace,
        name=claim.name,
        holder=claim.holder,
        status=report["status"],
        error_id=report.get("errorId"),
        error_message=report.get("errorMessage"),
        claimed_at=str(report["claimedAt"]),
        resource_version=str(written["metadata"].get("resourceVersion") or ""),
        resumed=claim.resumed,
        taken_over_from=claim.taken_over_from,
    )


def mark_reported(
    kube: KubeClient,
    namespace: str,
    name: str,
    *,
    claim: Claim,
    message: str | None = None,
    exit_status: Mapping[str, Any] | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> bool:
    """Record that ``claim.holder`` called SetTaskStatus: ``report.reportedAt``/``reportedBy``
    and the final phase (Succeeded for FINISHED, Failed for FAILED and FALSE), and with it
    ``exit_status`` (``exitCode``/``reason``/``podName``) in the same write, so that whoever sees
    the report recorded sees how the task ended too.

    Returns False (and writes nothing) when the report was already marked.  If another
    holder took the claim over meanwhile, the report is still recorded (it happened) and
    a warning is logged: that is the double report ``stale_after`` exists to prevent.
    """

    def decide(obj: dict[str, Any]) -> tuple[bool, bool]:
        st = obj["status"]
        report = dict(_section(st, "report"))
        if report.get("reportedAt"):
            return False, False
        if report.get("claimedBy") not in (None, claim.holder):
            log.warning(
                "%s/%s: %s reported, but the claim is now held by %s",
                namespace,
                name,
                claim.holder,
                report.get("claimedBy"),
            )
        report.setdefault("claimedBy", claim.holder)
        report.setdefault("claimedAt", claim.claimed_at)
        report.setdefault("status", claim.status)
        for key, value in (("errorId", claim.error_id), ("errorMessage", claim.error_message)):
            if value is not None:
                report.setdefault(key, value)
        report["reportedAt"] = format_time(clock())
        report["reportedBy"] = claim.holder
        st["report"] = report
        st["phase"] = FINAL_PHASE[claim.status]
        if message is not None:
            st["message"] = message
        st.update(exit_status or {})
        return True, True

    result, _ = _optimistic_update(kube, namespace, name, decide)
    return result


def mark_canceled(
    kube: KubeClient,
    namespace: str,
    name: str,
    *,
    by: str,
    reason: str,
    message: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
    over_own_claim: bool = False,
) -> bool:
    """Record a honoured cancel (phase Canceled, ``canceled.at/by/reason``).

    Returns True when the task is now (or already was) canceled, False when a report was
    already claimed or made: then the claim holder's SetTaskStatus stands and the task is
    not canceled in the ledger.  With ``over_own_claim`` the holder ``by`` may cancel over
    its own claim as long as it has not reported (the sidecar claims first and asks Data
    Pipeline about a cancel after: the claim is then dropped).
    """

    def decide(obj: dict[str, Any]) -> tuple[bool, bool]:
        st = obj["status"]
        if is_canceled(st):
            return False, True
        report = _section(st, "report")
        ours = over_own_claim and report.get("claimedBy") == by
        if report.get("reportedAt") or (report.get("claimedBy") and not ours):
            return False, False
        if ours:
            st["report"] = {}
        st["canceled"] = {"at": format_time(clock()), "by": by, "reason": reason}
        st["phase"] = "Canceled"
        if message is not None:
            st["message"] = message
        return True, True

    result, _ = _optimistic_update(kube, namespace, name, decide)
    if not result:
        log.info("%s/%s: not recording the cancel by %s: the report is already claimed", namespace, name, by)
    return result


def record_dispatch(
    kube: KubeClient,
    obj: Mapping[str, Any],
    *,
    job_name: str,
    acknowledged_at: datetime | None,
    by: str,
) -> dict[str, Any]:
    """Record a dispatched task: ``jobName``, ``acknowledgedAt``, the operator's heartbeat
    ownership and phase Pending, without undoing anything written since ``obj`` was read.

    The write may land after the pod started: its sidecar may have taken the heartbeats
    over, or even reported the outcome.  So every write is conditional on the
    resourceVersion it was computed from, and after a conflict the object is read again
    and only what is still missing is written.  Returns the object after the write.
    """
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    current: Mapping[str, Any] = obj
    for _ in range(MAX_CONFLICT_RETRIES):
        status = current.get("status") or {}
        patch: dict[str, Any] = {}
        if not status.get("jobName"):
            patch["jobName"] = job_name
        if acknowledged_at is not None:
            stamp = format_time(acknowledged_at)
            if not status.get("acknowledgedAt"):
                patch["acknowledgedAt"] = stamp
            if not (status.get("heartbeat") or {}).get("owner"):
                patch["heartbeat"] = {"owner": "operator", "lastAt": stamp, "by": by, "lastError": None}
        if not status.get("phase"):
            patch["phase"] = "Pending"
        if not patch:
            return dict(current)
        version = (current.get("metadata") or {}).get("resourceVersion")
        try:
            written: dict[str, Any] = kube.patch(
                pipelinetask_path(namespace, name, "status"),
                {"metadata": {"resourceVersion": version}, "status": patch},
            )
            return written
        except Conflict:
            current = kube.get(pipelinetask_path(namespace, name))
    raise LedgerConflictError(f"{namespace}/{name}: the dispatch record kept conflicting")


def take_over_heartbeats(
    kube: KubeClient,
    namespace: str,
    name: str,
    owner: HeartbeatOwner = "sidecar",
    by: str | None = None,
    *,
    clock: Callable[[], datetime] = _utcnow,
) -> dict[str, Any]:
    """Record that ``owner`` (``by``: its pod) heartbeats the task from now on, with a fresh
    ``lastAt``.  A merge patch: the last writer wins, which is what a takeover means.
    Returns the PipelineTask's status after the write (check its phase and report: a
    restarted sidecar should stop if the outcome is already reported)."""
    heartbeat = {"owner": owner, "by": by, "lastAt": format_time(clock()), "lastError": None}
    obj = kube.patch(pipelinetask_path(namespace, name, "status"), {"status": {"heartbeat": heartbeat}})
    status: dict[str, Any] = obj.get("status") or {}
    return status


def record_heartbeat(
    kube: KubeClient,
    namespace: str,
    name: str,
    *,
    by: str | None = None,
    at: datetime | None = None,
    error: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> None:
    """Record a heartbeat with a cheap merge patch; ``owner`` is left as it is.

    Without ``error``: a successful heartbeat, ``lastAt`` = ``at`` (default now) and
    ``lastError`` cleared.  With ``error``: a failed attempt, so only ``lastError`` is
    written and ``lastAt`` keeps the last success (staleness is judged on it).
    """
    status = heartbeat_status(by=by, at=at, error=error, clock=clock)
    kube.patch(pipelinetask_path(namespace, name, "status"), {"status": status})


def heartbeat_status(
    *,
    by: str | None = None,
    at: datetime | None = None,
    error: str | None = None,
    clock: Callable[[], datetime] = _utcnow,
) -> dict[str, Any]:
    """The ``status`` merge patch :func:`record_heartbeat` writes (for writers that queue it)."""
    heartbeat: dict[str, Any] = {"lastError": error}
    if error is None or at is not None:
        heartbeat["lastAt"] = format_time(at or clock())
    if by is not None:
        heartbeat["by"] = by
    return {"heartbeat": heartbeat}
