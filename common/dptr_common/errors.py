"""How a task ended, in the words Data Pipeline understands.

Everything that reports an outcome (the sidecar normally, the operator as a fallback) goes
through this module, so that the same container termination always produces the same
``SetTaskStatus`` call no matter who reports it.

Two rules from the API shape the code:

* ``errorId`` and ``errorStackTrace`` use the model's ``string`` shape: at most 1024
  characters, restricted to a character pattern.  A value outside it is rejected with
  a validation error, and a rejected SetTaskStatus is a lost outcome.  So every string
  we send goes through :func:`fit_api_string`, which reads the pattern from botocore's
  service model instead of hard-coding a guess.
* ``errorId`` must not start with ``Service_`` (reserved by the service).  All our ids
  start with ``dptr.``.
"""

from __future__ import annotations

import functools
import re
import signal as _signal
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "API_STRING_MAX",
    "ERROR_ID_PREFIX",
    "ContainerTermination",
    "Outcome",
    "TaskError",
    "TaskStatus",
    "api_string_pattern",
    "error_id",
    "fit_api_string",
    "fit_error_id",
    "is_precondition",
    "outcome_for_pod_failure",
    "outcome_for_task_error",
    "outcome_for_termination",
    "signal_name",
]

TaskStatus = Literal["FINISHED", "FAILED", "FALSE"]

#: Every errorId we produce starts with this; it can never collide with ``Service_``.
ERROR_ID_PREFIX = "dptr."

#: The ``max`` of the ``string`` shape (read at runtime too; this is the documented value).
API_STRING_MAX = 1024

#: Object types whose non-zero exit means "the condition does not hold" (FALSE), not an error.
PRECONDITION_TYPES = frozenset({"ShellCommandPrecondition", "Exists"})


class TaskError(Exception):
    """A task that cannot be run as given; it ends FAILED with ``error_id``/``message``.

    Raised by parsing (:mod:`dptr_common.task`) and rendering (:mod:`dptr_common.render`)
    and turned into an :class:`Outcome` by :func:`outcome_for_task_error`.
    """

    def __init__(self, error_id: str, message: str) -> None:
        super().__init__(f"{error_id}: {message}")
        self.error_id = fit_error_id(error_id)
        self.message = message


# --------------------------------------------------------------------------- API strings


def _java_pattern_to_python(pattern: str) -> str:
    r"""Translate the model's Java-flavoured pattern to Python ``re`` syntax.

    The model writes supplementary characters as UTF-16 surrogate pairs
    (``\uD800\uDC00-\uDBFF\uDFFF`` means U+10000..U+10FFFF).  Python strings hold code
    points, and ``re`` would read that text as a reversed (invalid) range, so each
    high/low pair escape becomes one ``\U`` escape.
    """

    def pair(match: re.Match[str]) -> str:
        high, low = int(match.group(1), 16), int(match.group(2), 16)
        code_point = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
        return f"\\U{code_point:08X}"

    return re.sub(r"\\u(D[89AB][0-9A-F]{2})\\u(D[C-F][0-9A-F]{2})", pair, pattern, flags=re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _string_shape() -> tuple[str, int]:
    # Lazy: botocore's loader is only touched the first time a string is fitted.
    from botocore.loaders import create_loader

    model = create_loader().load_service_model("datapipeline", "service-2")
    shape = model["shapes"]["string"]
    return _java_pattern_to_python(shape["pattern"]), int(shape["max"])


def api_string_pattern() -> re.Pattern[str]:
    """The ``string`` shape's pattern from botocore, compiled for Python (use ``fullmatch``)."""
    return _compiled_patterns()[0]


@functools.lru_cache(maxsize=1)
def _compiled_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    pattern, _ = _string_shape()
    # The pattern is "[<class>]*"; its complement finds every character to strip.
    match = re.fullmatch(r"\[(.*)\]\*", pattern, flags=re.DOTALL)
    if match is None:  # pragma: no cover - would mean the model changed shape
        raise RuntimeError(f"unexpected pattern in the datapipeline model: {pattern!r}")
    return re.compile(pattern), re.compile(f"[^{match.group(1)}]+")


def _utf16_units(char: str) -> int:
    return 2 if ord(char) > 0xFFFF else 1


def fit_api_string(
    text: str | bytes | None,
    *,
    limit: int | None = None,
    keep: Literal["tail", "head"] = "tail",
    marker: str = "[...]",
) -> str:
    """Make ``text`` acceptable as the API's ``string`` shape (errorId, errorStackTrace).

    * bytes are decoded as UTF-8; invalid sequences become U+FFFD, which the pattern allows;
    * characters outside the model's pattern (control characters, lone surrogates,
      U+FFFE/U+FFFF) are removed;
    * the result is cut to ``limit`` (default: the shape's ``max``, 1024).  Length is
      counted in UTF-16 code units, as the service (Java) counts, which is never less
      than Python's code-point count, so botocore's own check passes as well.
      ``keep="tail"`` keeps the end, which is where a stack trace says what went
      wrong; ``marker`` shows that something was cut.
    """
    if text is None:
        return ""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    _, model_max = _string_shape()
    limit = model_max if limit is None else min(limit, model_max)
    text = _compiled_patterns()[1].sub("", text)
    if sum(_utf16_units(c) for c in text) <= limit:
        return text
    room = max(limit - len(marker), 0)
    kept: list[str] = []
    used = 0
    chars = reversed(text) if keep == "tail" else iter(text)
    for char in chars:
        units = _utf16_units(char)
        if used + units > room:
            break
        kept.append(char)
        used += units
    body = "".join(reversed(kept)) if keep == "tail" else "".join(kept)
    mark = marker[: max(limit - used, 0)]
    return mark + body if keep == "tail" else body + mark


_ERROR_ID_PART = re.compile(r"[^A-Za-z0-9_-]+")


def error_id(*parts: str | int) -> str:
    """``dptr.<part>.<part>`` with each part reduced to ``[A-Za-z0-9_-]`` (dots separate)."""
    clean = [_ERROR_ID_PART.sub("_", str(p)).strip("_") or "_" for p in parts]
    return ERROR_ID_PREFIX + ".".join(clean)


def fit_error_id(value: str) -> str:
    """An errorId the service accepts: fitted (keeping the head) and never ``Service_...``."""
    fitted = fit_api_string(value, limit=200, keep="head", marker="")
    if not fitted:
        return ERROR_ID_PREFIX + "Unknown"
    if fitted.startswith("Service_"):
        fitted = fit_api_string(ERROR_ID_PREFIX + fitted, limit=200, keep="head", marker="")
    return fitted


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    """The arguments of one SetTaskStatus call (minus taskId and stack trace)."""

    status: TaskStatus
    error_id: str | None = None
    error_message: str | None = None

    def set_task_status_kwargs(self, task_id: str, stack_trace: str | bytes | None = None) -> dict[str, str]:
        """Keyword arguments for ``client.set_task_status``, every string already fitted."""
        kwargs: dict[str, str] = {"taskId": task_id, "taskStatus": self.status}
        if self.error_id:
            kwargs["errorId"] = fit_error_id(self.error_id)
        if self.error_message:
            # errorMessage has no limits in the model; keep it readable and bounded anyway.
            kwargs["errorMessage"] = fit_api_string(self.error_message, keep="head")
        if stack_trace and self.status != "FINISHED":
            trace = fit_api_string(stack_trace, keep="tail")
            if trace:
                kwargs["errorStackTrace"] = trace
        return kwargs


@dataclass(frozen=True)
class ContainerTermination:
    """The parts of a Kubernetes ``ContainerStateTerminated`` that decide an outcome."""

    exit_code: int | None
    signal: int | None = None
    reason: str | None = None
    message: str | None = None

    @classmethod
    def from_k8s(cls, terminated: dict[str, Any]) -> ContainerTermination:
        """From ``status.containerStatuses[].state.terminated`` (camelCase API dict)."""
        exit_code = terminated.get("exitCode")
        sig = terminated.get("signal")
        return cls(
            exit_code=int(exit_code) if exit_code is not None else None,
            signal=int(sig) if sig else None,
            reason=terminated.get("reason") or None,
            message=terminated.get("message") or None,
        )


def is_precondition(object_type: str | None) -> bool:
    """Preconditions report FALSE, not FAILED, when their check does not hold."""
    return object_type in PRECONDITION_TYPES


def signal_name(number: int) -> str:
    """``9`` -> ``SIGKILL``; unknown numbers -> ``SIG<n>``."""
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _with_detail(summary: str, message: str | None) -> str:
    return f"{summary}: {message.strip()}" if message and message.strip() else summary


# Exit codes whose meaning is fixed by POSIX shells; a hint saves users a search.
_EXIT_HINTS = {126: "command found but not executable", 127: "command not found"}


def outcome_for_termination(termination: ContainerTermination, object_type: str | None) -> Outcome:
    """Map the task container's termination (and the object type) to an outcome.

    * exit 0 -> FINISHED; nothing else ever is;
    * OOMKilled -> FAILED ``dptr.OOMKilled`` (checked before the exit code: the
      runtime reports 137 for it);
    * killed by a signal (``signal`` set, or exit code 128+n for a real signal n, as
      shells and runtimes report it) -> FAILED ``dptr.Signal.SIGKILL``;
    * another non-zero exit -> FAILED ``dptr.ExitCode.<n>``; for a precondition this
      is FALSE: the check ran and said no.  A precondition that was killed or ran
      out of memory did not answer, so it is FAILED.
    """
    code, reason, message = termination.exit_code, termination.reason, termination.message
    if code == 0:
        return Outcome("FINISHED")
    if reason == "OOMKilled":
        return Outcome(
            "FAILED", error_id("OOMKilled"), _with_detail("the task container ran out of memory", message)
        )
    if reason in {"DeadlineExceeded", "Evicted"}:
        return outcome_for_pod_failure(reason, message)
    if reason in {"ContainerCannotRun", "StartError", "CreateContainerError"}:
        return Outcome(
            "FAILED", error_id(reason), _with_detail("the task container could not be started", message)
        )
    if code is None:
        return Outcome(
            "FAILED",
            error_id("ContainerStatusUnknown"),
            _with_detail("the task container ended without an exit code", message or reason),
        )
    sig = termination.signal
    if sig is None and 128 < code < 128 + 65:
        try:
            sig = _signal.Signals(code - 128).value
        except ValueError:
            sig = None
    if sig is not None:
        name = signal_name(sig)
        return Outcome(
            "FAILED",
            error_id("Signal", name),
            _with_detail(f"the task container was killed by {name} (exit code {code})", message),
        )
    if object_type == "Exists":
        # dptr's own check (dptr_sidecar.preconditions): only its "not found" after the
        # timeout is FALSE; anything else means it could not check (FAILED), e.g. an
        # older sidecarImage without check-exists, or a crash.
        parsed = parse_termination_message(message)
        if code == 1 and parsed is not None and parsed[0] == "dptr.Exists.NotFound":
            return Outcome("FALSE", parsed[0], parsed[1])
        if parsed is not None and parsed[0] != "dptr.Exists.NotFound":
            return Outcome("FAILED", parsed[0], parsed[1])
        return Outcome(
            "FAILED",
            "dptr.Exists.CheckDidNotRun",
            _with_detail(f"the Exists check exited with code {code}", message),
        )
    if object_type in ("SqlActivity", "CopyActivity"):
        # dptr-activity (dptr's own code) names the database's error class and position.
        parsed = parse_termination_message(message)
        if parsed is not None:
            return Outcome("FAILED", parsed[0], parsed[1])
    summary = f"the task container exited with code {code}"
    if code in _EXIT_HINTS:
        summary += f" ({_EXIT_HINTS[code]})"
    if is_precondition(object_type):
        return Outcome(
            "FALSE",
            error_id("ExitCode", code),
            _with_detail(f"the precondition does not hold: {summary}", message),
        )
    return Outcome("FAILED", error_id("ExitCode", code), _with_detail(summary, message))


def parse_termination_message(text: str | None) -> tuple[str, str] | None:
    """(errorId, message) from a termination message written by a container of dptr's own
    (``<errorId>\\n<message>``); None for anything else."""
    first, _, rest = (text or "").strip().partition("\n")
    if not first.startswith("dptr.") or " " in first:
        return None
    return first, rest.strip()


#: Pod-level causes the operator detects, with what they mean to a user.
_POD_FAILURES: dict[str, tuple[str, str]] = {
    "DeadlineExceeded": ("DeadlineExceeded", "the task ran longer than its attemptTimeout"),
    "Evicted": ("Evicted", "the task's pod was evicted from its node"),
    "Preempted": ("Evicted", "the task's pod was preempted"),
    "ImagePullFailed": ("ImagePullFailed", "the task's image could not be pulled"),
    "ErrImagePull": ("ImagePullFailed", "the task's image could not be pulled"),
    "ImagePullBackOff": ("ImagePullFailed", "the task's image could not be pulled"),
    "InvalidImageName": ("ImagePullFailed", "the task's image name is invalid"),
    "Unschedulable": ("Unschedulable", "the task's pod could not be scheduled"),
    "NodeLost": ("NodeLost", "the task's node was lost"),
    "PodLost": ("PodLost", "the task's pod disappeared before it reported"),
    "JobDeleted": ("JobDeleted", "the task's Job was deleted while the attempt ran"),
    "PipelineTaskDeleted": ("PipelineTaskDeleted", "the attempt's PipelineTask was deleted while it ran"),
    "ScriptFetchFailed": ("ScriptFetchFailed", "the task's scriptUri could not be downloaded"),
}


def outcome_for_pod_failure(reason: str, message: str | None = None) -> Outcome:
    """FAILED for a pod that ended (or never started) without the task container's own exit.

    ``reason`` is a pod/Job reason (``Evicted``, ``DeadlineExceeded``, ``ErrImagePull``,
    ``Unschedulable``, ``NodeLost``, ...); unknown ones become ``dptr.PodFailed.<reason>``.
    """
    known = _POD_FAILURES.get(reason)
    if known is None:
        return Outcome(
            "FAILED",
            error_id("PodFailed", reason),
            _with_detail(f"the task's pod failed ({reason})", message),
        )
    ident, summary = known
    return Outcome("FAILED", error_id(ident), _with_detail(summary, message))


def outcome_for_task_error(error: TaskError) -> Outcome:
    """A task that could not be run at all ends FAILED with the error's id and message."""
    return Outcome("FAILED", error.error_id, error.message)
