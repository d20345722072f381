"""The one AWS Data Pipeline client, shared by the operator and the sidecar.

It wraps the five task-runner calls dptr makes, built on botocore directly (not boto3)
and imported lazily, because the sidecar's idle memory budget is small.

* botocore's own retries are off (``total_max_attempts=1``); callers retry through
  :func:`call_with_retry`, which knows about deadlines, so a heartbeat never sleeps past
  its task's ``reportProgressTimeout``.
* PollForTask long-polls for up to 90 s, longer than botocore's default 60 s read timeout,
  so polls go through their own botocore client with :data:`POLL_READ_TIMEOUT` (created on
  first poll: the sidecar never polls); every other call uses :data:`CALL_READ_TIMEOUT`.
* Every failure is raised as a :class:`DataPipelineError` subclass with a short
  machine-readable ``reason`` (used for Degraded conditions and errorIds) and a message
  for people.
* Credentials: explicit :class:`StaticCredentials`, or botocore's default chain
  (environment, shared files, IRSA web identity, EKS Pod Identity / container
  credentials).  The EC2 instance metadata service is left out of the chain unless
  ``instance_metadata=True``: a pod should not silently act as its node's role.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from .awsauth import AssumedRole, StaticCredentials, make_session
from .errors import fit_api_string, fit_error_id
from .pacing import full_jitter_delay

__all__ = [
    "CALL_READ_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_RETRY_ON",
    "POLL_READ_TIMEOUT",
    "CredentialsError",
    "DataPipelineClient",
    "DataPipelineError",
    "EndpointUnreachable",
    "InvalidRequest",
    "StaticCredentials",
    "TaskGone",
    "Throttled",
    "TransientError",
    "call_with_retry",
    "classify_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Read timeout for PollForTask: the service holds a poll open for up to 90 s.
POLL_READ_TIMEOUT = 100.0
#: Read timeout for every other call.
CALL_READ_TIMEOUT = 20.0
#: Connect timeout for every call.
CONNECT_TIMEOUT = 10.0

#: DescribeObjects takes at most this many object ids per call.
DESCRIBE_OBJECTS_BATCH = 25

SetStatus = Literal["FINISHED", "FAILED", "FALSE"]


# --------------------------------------------------------------------------- errors


#: Attempt @status values after which SetTaskStatus would be refused.
FINAL_ATTEMPT_STATUSES = frozenset({"FINISHED", "FAILED", "FALSE", "CANCELED", "CASCADE_FAILED", "TIMEDOUT"})


class DataPipelineError(Exception):
    """A Data Pipeline call failed.

    ``reason`` is short and machine-readable (a condition reason); ``code`` is the
    service's error code when it sent one; ``operation`` the API operation.
    """

    reason: ClassVar[str] = "DataPipelineError"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        operation: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.operation = operation
        self.http_status = http_status

    def __str__(self) -> str:
        where = f"{self.operation}: " if self.operation else ""
        code = f" [{self.code}]" if self.code else ""
        return f"{where}{self.message}{code}"


class TaskGone(DataPipelineError):  # noqa: N818 - the names the callers use
    """The task, or its pipeline, no longer exists: treat it like ``canceled: true``."""

    reason = "TaskGone"


class Throttled(DataPipelineError):  # noqa: N818 - the names the callers use
    """The account's request quota for the call was exceeded; retry with back-off."""

    reason = "Throttled"


class TransientError(DataPipelineError):
    """A server error (5xx, InternalServiceError) or a reset/timed-out connection."""

    reason = "TransientError"


class EndpointUnreachable(DataPipelineError):  # noqa: N818 - the names the callers use
    """No connection could be made: refused, DNS failure, proxy or TLS failure."""

    reason = "EndpointUnreachable"


class CredentialsError(DataPipelineError):
    """Missing, unknown, expired or insufficient credentials."""

    reason = "InvalidCredentials"


class InvalidRequest(DataPipelineError):  # noqa: N818 - the names the callers use
    """The service (or botocore's validation) rejected the request as malformed."""

    reason = "InvalidRequest"


DEFAULT_RETRY_ON: tuple[type[DataPipelineError], ...] = (Throttled, TransientError, EndpointUnreachable)

_GONE_CODES = frozenset({"TaskNotFoundException", "PipelineDeletedException", "PipelineNotFoundException"})
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "SlowDown",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalServiceError",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "AuthFailure",
        "NotAuthorized",
        "UnauthorizedOperation",
        "InvalidAccessKeyId",
    }
)
_INVALID_CODES = frozenset(
    {"InvalidRequestException", "ValidationException", "SerializationException", "InvalidParameterValue"}
)


def classify_error(exc: BaseException, operation: str | None = None) -> DataPipelineError:
    """Map a botocore exception to dptr's :class:`DataPipelineError` hierarchy.

    Anything already a :class:`DataPipelineError` is returned as is; an exception that is
    not from botocore at all becomes a :class:`TransientError` only if it is an ``OSError``
    (a socket problem) and is otherwise wrapped as a plain :class:`DataPipelineError`.
    """
    if isinstance(exc, DataPipelineError):
        return exc
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {}) or {}
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or error.get("message") or exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        kind: type[DataPipelineError]
        if code in _GONE_CODES:
            kind = TaskGone
        elif code in _THROTTLE_CODES or status == 429:
            kind = Throttled
        elif code in _CREDENTIAL_CODES or status in (401, 403):
            kind = CredentialsError
        elif code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            kind = TransientError
        elif code in _INVALID_CODES or (isinstance(status, int) and 400 <= status < 500):
            kind = InvalidRequest
        else:
            kind = DataPipelineError
        return kind(message, code=code or None, operation=operation, http_status=status)
    if isinstance(
        exc,
        bx.NoCredentialsError
        | bx.PartialCredentialsError
        | bx.CredentialRetrievalError
        | bx.NoAuthTokenError
        | bx.TokenRetrievalError
        | bx.UnknownCredentialError,
    ):
        return CredentialsError(str(exc), code=type(exc).__name__, operation=operation)
    if isinstance(exc, bx.ParamValidationError | bx.ValidationError):
        return InvalidRequest(str(exc), code=type(exc).__name__, operation=operation)
    # Timeouts first: ConnectTimeoutError is also a ConnectionError.
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError | bx.ConnectionClosedError):
        return TransientError(str(exc), code=type(exc).__name__, operation=operation)
    if isinstance(exc, bx.ConnectionError):  # refused, DNS, proxy, TLS
        return EndpointUnreachable(str(exc), code=type(exc).__name__, operation=operation)
    if isinstance(exc, bx.HTTPClientError):  # a reset mid-request and the like
        return TransientError(str(exc), code=type(exc).__name__, operation=operation)
    if isinstance(exc, ConnectionRefusedError):
        return EndpointUnreachable(str(exc), code=type(exc).__name__, operation=operation)
    if isinstance(exc, OSError):
        return TransientError(str(exc), code=type(exc).__name__, operation=operation)
    return DataPipelineError(f"{type(exc).__name__}: {exc}", operation=operation)


# --------------------------------------------------------------------------- retries


def _full_jitter(attempt: int, base: float, cap: float) -> float:
    return full_jitter_delay(attempt, base=base, cap=cap)


def call_with_retry(
    fn: Callable[[], T],
    *,
    deadline: float,
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON,
    base: float = 1.0,
    cap: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    delay: Callable[[int, float, float], float] = _full_jitter,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying ``retry_on`` errors until ``deadline``.

    ``deadline`` is a :func:`time.monotonic` value.  ``fn`` is always tried at least once.
    Between attempts it sleeps a full-jitter delay (uniform in ``[0, min(cap,
    base * 2**attempt)]``), never past the deadline; when the deadline has passed the last
    error is re-raised.  Errors not in ``retry_on`` are raised at once.  ``on_retry(error,
    delay)`` is called before each sleep (for logs and metrics).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as exc:
            remaining = deadline - clock()
            if remaining <= 0:
                raise
            wait = min(max(delay(attempt, base, cap), 0.0), remaining)
            attempt += 1
            if on_retry is not None:
                on_retry(exc, wait)
            else:
                log.debug("retrying in %.2fs after %s", wait, exc)
            sleep(wait)


# --------------------------------------------------------------------------- client


class DataPipelineClient:
    """The task-runner half of the Data Pipeline API, with dptr's error classes.

    Each method makes exactly one API call (no retries: wrap it in :func:`call_with_retry`)
    and raises a :class:`DataPipelineError` subclass on failure.  Thread-safe as botocore
    clients are: one client may serve several pollers and heartbeaters.
    """

    def __init__(
        self,
        region: str,
        endpoint_url: str | None = None,
        credentials: StaticCredentials | None = None,
        *,
        role: AssumedRole | None = None,
        instance_metadata: bool = False,
        poll_read_timeout: float = POLL_READ_TIMEOUT,
        read_timeout: float = CALL_READ_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_pool_connections: int = 10,
        user_agent_extra: str = "dptr",
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_error(operation, reason)`` is told of every failed call, retried or not:
        how the operator counts throttling that a retry then hides."""
        from botocore.config import Config

        self.region = region
        self.endpoint_url = endpoint_url or None
        self.role = role
        # The session owns the credentials (keys, the pod's chain, or a role assumed on
        # top of either, refreshed by botocore before it expires).
        self._session = make_session(credentials, role, region=region, instance_metadata=instance_metadata)
        self._config_args: dict[str, Any] = {
            "region_name": region,
            "connect_timeout": connect_timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "max_pool_connections": max_pool_connections,
            "user_agent_extra": user_agent_extra,
            # Parameter validation stays on: a malformed call fails here as InvalidRequest.
        }
        self._config_cls = Config
        self._poll_read_timeout = poll_read_timeout
        self._client = self._make_client(read_timeout)
        self._poll_client: Any = None
        self._poll_client_lock = threading.Lock()
        self._on_error = on_error

    def _make_client(self, read_timeout: float) -> Any:
        config = self._config_cls(read_timeout=read_timeout, **self._config_args)
        return self._session.create_client(
            "datapipeline", region_name=self.region, endpoint_url=self.endpoint_url, config=config
        )

    def _call(self, operation: str, method: str, client: Any = None, **params: Any) -> dict[str, Any]:
        target = client if client is not None else self._client
        try:
            response: dict[str, Any] = getattr(target, method)(**params)
        except Exception as exc:
            error = classify_error(exc, operation)
            if self._on_error is not None:
                with contextlib.suppress(Exception):  # a metric must not change the outcome
                    self._on_error(operation, error.reason)
            raise error from exc
        return response

    # ---- the calls --------------------------------------------------------

    def poll_for_task(
        self,
        worker_group: str,
        hostname: str,
        instance_identity: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """PollForTask: the raw ``taskObject``, or None when no task came within the long poll."""
        if self._poll_client is None:
            with self._poll_client_lock:  # several pollers may start at once
                if self._poll_client is None:
                    self._poll_client = self._make_client(self._poll_read_timeout)
        params: dict[str, Any] = {"workerGroup": worker_group, "hostname": hostname}
        if instance_identity:
            params["instanceIdentity"] = dict(instance_identity)
        response = self._call("PollForTask", "poll_for_task", self._poll_client, **params)
        task = response.get("taskObject")
        if not task or not task.get("taskId"):
            return None
        result: dict[str, Any] = task
        return result

    def report_task_progress(self, task_id: str, fields: Iterable[Mapping[str, str]] | None = None) -> bool:
        """ReportTaskProgress (the ack and the heartbeat): True when the task was canceled."""
        params: dict[str, Any] = {"taskId": task_id}
        if fields:
            params["fields"] = [dict(f) for f in fields]
        response = self._call("ReportTaskProgress", "report_task_progress", **params)
        return bool(response.get("canceled", False))

    def set_task_status(
        self,
        task_id: str,
        status: SetStatus,
        error_id: str | None = None,
        error_message: str | None = None,
        error_stack_trace: str | bytes | None = None,
    ) -> None:
        """SetTaskStatus with every string made acceptable to the service.

        ``errorId`` is fitted to the ``string`` shape and never starts with ``Service_``;
        ``errorStackTrace`` keeps its last 1024 characters (where the failure usually
        is); ``errorMessage`` (unbounded in the model) is cleaned of characters the
        service refuses and bounded to the same size.  Invalid UTF-8 becomes U+FFFD.
        """
        if status not in ("FINISHED", "FAILED", "FALSE"):
            raise InvalidRequest(f"taskStatus must be FINISHED, FAILED or FALSE, not {status!r}")
        params: dict[str, Any] = {"taskId": task_id, "taskStatus": status}
        if error_id:
            params["errorId"] = fit_error_id(error_id)
        if error_message:
            message = fit_api_string(error_message, keep="head")
            if message:
                params["errorMessage"] = message
        if error_stack_trace:
            trace = fit_api_string(error_stack_trace, keep="tail")
            if trace:
                params["errorStackTrace"] = trace
        self._call("SetTaskStatus", "set_task_status", **params)

    def report_task_runner_heartbeat(self, taskrunner_id: str, worker_group: str, hostname: str) -> bool:
        """ReportTaskRunnerHeartbeat: True when the service asks this runner to terminate."""
        response = self._call(
            "ReportTaskRunnerHeartbeat",
            "report_task_runner_heartbeat",
            taskrunnerId=taskrunner_id,
            workerGroup=worker_group,
            hostname=hostname,
        )
        return bool(response.get("terminate", False))

    def describe_objects(
        self, pipeline_id: str, object_ids: Iterable[str], evaluate_expressions: bool = True
    ) -> list[dict[str, Any]]:
        """DescribeObjects for any number of ids (batched by 25, following markers)."""
        ids = list(object_ids)
        objects: list[dict[str, Any]] = []
        for start in range(0, len(ids), DESCRIBE_OBJECTS_BATCH):
            batch = ids[start : start + DESCRIBE_OBJECTS_BATCH]
            marker: str | None = None
            while True:
                params: dict[str, Any] = {
                    "pipelineId": pipeline_id,
                    "objectIds": batch,
                    "evaluateExpressions": evaluate_expressions,
                }
                if marker:
                    params["marker"] = marker
                response = self._call("DescribeObjects", "describe_objects", **params)
                objects.extend(response.get("pipelineObjects", []))
                marker = response.get("marker")
                if not response.get("hasMoreResults") or not marker:
                    break
        return objects

    def attempt_is_final(self, pipeline_id: str, attempt_id: str) -> bool:
        """Whether Data Pipeline already holds a final status for the attempt.

        A reporter that claimed a report and then restarted (or took over a
        claim whose holder went silent) cannot know whether SetTaskStatus went
        out before the crash; asking first keeps it from reporting twice.
        Raises DataPipelineError when the service cannot be asked, so callers
        retry rather than guess.
        """
        for obj in self.describe_objects(pipeline_id, [attempt_id], evaluate_expressions=False):
            for field in obj.get("fields") or []:
                if field.get("key") == "@status" and field.get("stringValue") in FINAL_ATTEMPT_STATUSES:
                    return True
        return False

    def close(self) -> None:
        """Close the HTTP connection pools."""
        for client in (self._client, self._poll_client):
            if client is not None:
                client.close()

    def __enter__(self) -> DataPipelineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
