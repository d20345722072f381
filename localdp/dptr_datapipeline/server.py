"""HTTP front end: AWS JSON 1.1 over ``POST /``, plus a small ``/_dptr/`` admin API.

Request handling order mirrors AWS's: authentication, then the account
quota, then (for tests) injected faults, then model validation, then the
operation itself. Every call, refused or not, lands in the ledger.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dptr_datapipeline.engine import Engine
from dptr_datapipeline.errors import (
    AccessDeniedException,
    IncompleteSignatureException,
    InternalServiceError,
    MissingAuthenticationTokenException,
    SerializationException,
    ServiceError,
    ThrottlingException,
    UnknownOperationException,
    UnrecognizedClientException,
)
from dptr_datapipeline.ledger import CallRecord, Ledger
from dptr_datapipeline.model import operation_names, validate_request

log = logging.getLogger("dptr_datapipeline")

DEFAULT_ACCESS_KEY_ID = "AKIDDPTRLOCAL"
DEFAULT_SECRET_ACCESS_KEY = "dptr-local-secret"

# Account-wide rates (requests per second) and burst, from the Data Pipeline quotas.
DEFAULT_QUOTAS: dict[str, float] = {
    "PollForTask": 2.0,
    "ReportTaskProgress": 10.0,
    "SetTaskStatus": 10.0,
    "ReportTaskRunnerHeartbeat": 1.0,
}
QUOTA_BURST = 100.0

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
#: The account every principal of the local service belongs to (moto's default too).
ACCOUNT_ID = "123456789012"
_ASSUMED_ROLE = re.compile(r"^arn:aws:sts::(\d{12}):assumed-role/([^/]+)/(.+)$")


@dataclass(frozen=True)
class Principal:
    """Who made a call, as IAM would name them."""

    access_key: str
    arn: str

    @property
    def role_arn(self) -> str | None:
        """``arn:aws:iam::<account>:role/<name>`` for an assumed-role session."""
        match = _ASSUMED_ROLE.match(self.arn)
        return f"arn:aws:iam::{match.group(1)}:role/{match.group(2)}" if match else None


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$", re.DOTALL)


class StsIdentities:
    """Resolves access keys that STS issued (AssumeRole, AssumeRoleWithWebIdentity) to
    their assumed-role ARN, by asking that STS (moto's, in tests) ``GetCallerIdentity``
    as the caller: a stand-in for AWS's own resolution of session credentials.  Only
    assumed-role sessions count; anything else is an unknown key."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._cache: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def arn(self, access_key: str) -> str | None:
        with self._lock:
            if access_key in self._cache:
                return self._cache[access_key]
        import botocore.session

        client = botocore.session.get_session().create_client(
            "sts",
            region_name="us-east-1",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key="not-checked",
            aws_session_token="not-checked",
        )
        try:
            arn = str(client.get_caller_identity()["Arn"])
        except Exception:
            log.warning("STS could not resolve access key %s", access_key, exc_info=True)
            return None
        finally:
            client.close()
        resolved = arn if _ASSUMED_ROLE.match(arn) else None
        with self._lock:
            self._cache[access_key] = resolved
        return resolved


_CONTENT_TYPE = "application/x-amz-json-1.1"


@dataclass
class Fault:
    """Injected misbehaviour for one operation (or ``*`` for all)."""

    error_rate: float = 0.0
    latency: float = 0.0
    throttle: bool = False


class _TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Frontend:
    """Everything between the socket and the engine; shared by all handler threads."""

    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        access_keys: Mapping[str, str],
        quotas: bool | Mapping[str, float],
        record_requests: bool = True,
        *,
        sts_endpoint: str | None = None,
        worker_group_policy: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.engine = engine
        self.ledger = ledger
        self.access_keys = dict(access_keys)
        self.sts = StsIdentities(sts_endpoint) if sts_endpoint else None
        #: role ARN -> worker groups (``*`` globs) its PollForTask may name: what an IAM
        #: policy with the ``datapipeline:workerGroup`` condition key allows.  Roles not
        #: listed (and static keys) are not restricted.
        self.worker_group_policy = {
            arn: [_glob(p) for p in patterns] for arn, patterns in (worker_group_policy or {}).items()
        }
        if quotas is True:
            self.quotas: dict[str, float] = dict(DEFAULT_QUOTAS)
        elif quotas is False:
            self.quotas = {}
        else:
            self.quotas = dict(quotas)
        self.record_requests = record_requests
        self.faults: dict[str, Fault] = {}
        self._buckets: dict[tuple[str, str], _TokenBucket] = {}
        self._lock = threading.Lock()
        self._random = random.Random()
        e = engine
        self.operations: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "ActivatePipeline": e.activate,
            "AddTags": e.add_tags,
            "CreatePipeline": e.create_pipeline,
            "DeactivatePipeline": e.deactivate,
            "DeletePipeline": e.delete,
            "DescribeObjects": e.describe_objects,
            "DescribePipelines": e.describe_pipelines,
            "EvaluateExpression": e.evaluate_expression,
            "GetPipelineDefinition": e.get_definition,
            "ListPipelines": e.list_pipelines,
            "PollForTask": e.poll,
            "PutPipelineDefinition": e.put_definition,
            "QueryObjects": e.query_objects,
            "RemoveTags": e.remove_tags,
            "ReportTaskProgress": e.report_progress,
            "ReportTaskRunnerHeartbeat": e.runner_heartbeat,
            "SetStatus": e.set_status,
            "SetTaskStatus": e.set_task_status,
            "ValidatePipelineDefinition": e.validate_definition,
        }
        missing = set(operation_names()) - set(self.operations)
        assert not missing, f"operations without a handler: {missing}"

    # -- policy -------------------------------------------------------------

    def set_fault(self, operation: str, fault: Fault | None) -> None:
        if operation != "*" and operation not in self.operations:
            raise ValueError(f"unknown operation {operation!r}")
        with self._lock:
            if fault is None or fault == Fault():
                self.faults.pop(operation, None)
            else:
                self.faults[operation] = fault

    def _throttled(self, operation: str) -> bool:
        # The quotas are the account's, shared by every identity in it.
        rate = self.quotas.get(operation)
        if rate is None:
            return False
        now = time.monotonic()
        with self._lock:
            key = (ACCOUNT_ID, operation)
            bucket = self._buckets.get(key)
            if bucket is None:
                # Quotas are rates, so they scale with time like every other
                # duration: at time_scale 0.01 a heartbeat interval is 100x
                # shorter and the quota 100x larger, keeping their ratio real.
                bucket = self._buckets[key] = _TokenBucket(rate / self.engine.time_scale, QUOTA_BURST, now)
            return not bucket.take(now)

    def _fault(self, operation: str) -> Fault | None:
        with self._lock:
            return self.faults.get(operation) or self.faults.get("*")

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise MissingAuthenticationTokenException("Missing Authentication Token")
        match = _CREDENTIAL.search(authorization)
        if not authorization.startswith("AWS4-HMAC-SHA256") or match is None:
            raise IncompleteSignatureException(
                "Authorization header requires 'Credential', 'Signature' and 'SignedHeaders' parameters"
            )
        access_key = match.group(1)
        # Only the key id is checked; the signature is not verified (see docs).
        if access_key in self.access_keys:
            return Principal(access_key, f"arn:aws:iam::{ACCOUNT_ID}:user/dptr-local")
        arn = self.sts.arn(access_key) if self.sts is not None else None
        if arn is None:
            raise UnrecognizedClientException("The security token included in the request is invalid.")
        return Principal(access_key, arn)

    def authorize(self, principal: Principal, operation: str, body: Any) -> None:
        """IAM's part: the ``datapipeline:workerGroup`` condition on PollForTask (the one
        task-runner action that key applies to)."""
        role = principal.role_arn
        if operation != "PollForTask" or role is None or role not in self.worker_group_policy:
            return
        group = body.get("workerGroup") if isinstance(body, dict) else None
        if not any(p.match(str(group)) for p in self.worker_group_policy[role]):
            raise AccessDeniedException(
                f"User: {principal.arn} is not authorized to perform: datapipeline:PollForTask "
                f"(workerGroup {group!r}) because no identity-based policy allows it"
            )

    # -- one API call ---------------------------------------------------------

    def handle(self, target: str | None, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        started, wall = time.monotonic(), time.time()
        operation = (
            target.split(".", 1)[1] if target and target.startswith("DataPipeline.") else (target or "")
        )
        principal: Principal | None = None
        body: Any = None
        status, error = 200, None
        try:
            principal = self.authenticate(authorization)
            if operation not in self.operations:
                raise UnknownOperationException(f"Unknown operation: {target}")
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                raise SerializationException(f"Request body is not valid JSON: {exc}") from None
            self.authorize(principal, operation, body)
            if self._throttled(operation):
                raise ThrottlingException("Rate exceeded")
            fault = self._fault(operation)
            if fault is not None:
                if fault.latency > 0:
                    time.sleep(fault.latency)
                if fault.throttle:
                    raise ThrottlingException("Rate exceeded")
                if fault.error_rate > 0 and self._random.random() < fault.error_rate:
                    raise InternalServiceError("Injected fault: internal service error")
            validate_request(operation, body)
            result = self.operations[operation](body)
        except ServiceError as exc:
            status, error, result = exc.status, exc.code, exc.body()
        except Exception:
            log.exception("unexpected error in %s", operation)
            status, error = 500, InternalServiceError.code
            result = InternalServiceError("Internal service error").body()
        self.ledger.add_call(
            CallRecord(
                at=wall,
                operation=operation,
                access_key=principal.access_key if principal else None,
                principal=principal.arn if principal else None,
                status=status,
                error=error,
                duration=time.monotonic() - started,
                task_id=body.get("taskId") if isinstance(body, dict) else None,
                pipeline_id=_pipeline_id(body, result),
                request=_summary(body) if self.record_requests else None,
            )
        )
        return status, result


def _pipeline_id(body: Any, result: Mapping[str, Any]) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("pipelineId"), str):
        return str(body["pipelineId"])
    task = result.get("taskObject")
    if isinstance(task, dict):
        return str(task.get("pipelineId"))
    created = result.get("pipelineId")
    return created if isinstance(created, str) else None


def _summary(body: Any) -> dict[str, Any] | None:
    """The request as recorded: large definition lists are counted, not copied."""
    if not isinstance(body, dict):
        return None
    out = dict(body)
    for key in ("pipelineObjects", "parameterObjects", "parameterValues"):
        if isinstance(out.get(key), list):
            out[key] = f"<{len(out[key])} items>"
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Many pollers plus their heartbeats can arrive at once.
    request_queue_size = 128
    frontend: Frontend

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A runner that goes away mid long poll (shut down, killed) is normal
        # for a task-runner service, not a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Keep-alive: botocore pools connections, and a fresh TCP connection per
    # call would distort latency-sensitive tests.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, each
    # keep-alive response waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, payload: Mapping[str, Any], error: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", _CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error is not None:
            self.send_header("x-amzn-ErrorType", error)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        raw = self._body()
        frontend = self.server.frontend
        if path.startswith("/_dptr/"):
            self._admin_post(path, raw)
            return
        status, payload = frontend.handle(
            self.headers.get("X-Amz-Target"), self.headers.get("Authorization"), raw
        )
        self._send(status, payload, payload.get("__type") if status != 200 else None)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        frontend = self.server.frontend
        if parts.path == "/_dptr/ledger":
            query = parse_qs(parts.query)
            include_calls = query.get("calls", ["1"])[0] not in ("0", "false")
            data = frontend.ledger.to_json(include_calls=include_calls)
            data["problems"] = frontend.ledger.problems()
            self._send(200, data)
        elif parts.path == "/_dptr/health":
            self._send(200, {"ok": True})
        else:
            self._send(404, {"message": f"no such path {parts.path}"})

    def _admin_post(self, path: str, raw: bytes) -> None:
        frontend = self.server.frontend
        try:
            parsed = json.loads(raw or b"{}")
            if not isinstance(parsed, dict):
                raise ValueError("body must be a JSON object")
            body: dict[str, Any] = parsed
            if path == "/_dptr/faults":
                operation = str(body.get("operation", "*"))
                fault = Fault(
                    error_rate=float(body.get("error_rate", body.get("errorRate", 0.0))),
                    latency=float(body.get("latency", 0.0)),
                    throttle=bool(body.get("throttle", False)),
                )
                frontend.set_fault(operation, fault)
                self._send(200, {"operation": operation, "fault": fault.__dict__})
            elif path == "/_dptr/runner-terminate":
                with frontend.engine.cond:
                    frontend.engine.runner_terminate = bool(body.get("terminate", True))
                self._send(200, {"terminate": frontend.engine.runner_terminate})
            else:
                self._send(404, {"message": f"no such path {path}"})
        except (ValueError, TypeError) as exc:
            self._send(400, {"message": str(exc)})


def make_server(host: str, port: int, frontend: Frontend) -> _Server:
    server = _Server((host, port), _Handler)
    server.frontend = frontend
    return server
