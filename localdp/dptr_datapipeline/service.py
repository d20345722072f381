"""LocalDataPipeline: the service as one object, for pytest and the CLI."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from dptr_datapipeline.definition import DEFAULT_OBJECT_ID, definition_file_to_api
from dptr_datapipeline.engine import DEFAULT_MAXIMUM_RETRIES, LONG_POLL, Engine
from dptr_datapipeline.ledger import Ledger
from dptr_datapipeline.model import validate_request
from dptr_datapipeline.server import (
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_SECRET_ACCESS_KEY,
    Fault,
    Frontend,
    _Server,
    make_server,
)

REGION = "us-east-1"


class LocalDataPipeline:
    """A local AWS Data Pipeline endpoint.

    >>> with LocalDataPipeline(time_scale=0.01) as svc:
    ...     dp = svc.client()
    ...     pipeline_id = svc.run_pipeline({"Echo": {"type": "ShellCommandActivity",
    ...                                               "command": "echo hi"}}, worker_group="wg")
    """

    def __init__(
        self,
        time_scale: float = 1.0,
        quotas: bool | Mapping[str, float] = True,
        *,
        state_file: str | os.PathLike[str] | None = None,
        access_keys: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        default_maximum_retries: int = DEFAULT_MAXIMUM_RETRIES,
        record_requests: bool = True,
        sts_endpoint: str | None = None,
        worker_group_policy: Mapping[str, Sequence[str]] | None = None,
        precondition_retries: str = "runner",
        pipeline_log_uri_on_attempts: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.ledger = Ledger()
        self.engine = Engine(
            self.ledger,
            time_scale,
            default_maximum_retries,
            state_file,
            precondition_retries=precondition_retries,
            pipeline_log_uri_on_attempts=pipeline_log_uri_on_attempts,
        )
        keys = (
            dict(access_keys)
            if access_keys is not None
            else {DEFAULT_ACCESS_KEY_ID: DEFAULT_SECRET_ACCESS_KEY}
        )
        self.frontend = Frontend(
            self.engine,
            self.ledger,
            keys,
            quotas,
            record_requests,
            sts_endpoint=sts_endpoint,
            worker_group_policy=worker_group_policy,
        )
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def time_scale(self) -> float:
        return self.engine.time_scale

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> LocalDataPipeline:
        if self._server is not None:
            return self
        self._server = make_server(self.host, self.port, self.frontend)
        self.port = self._server.server_address[1]
        self._stop.clear()
        serve = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="dptr-dp-http",
            daemon=True,
        )
        ticker = threading.Thread(target=self._tick_loop, name="dptr-dp-ticker", daemon=True)
        self._threads = [serve, ticker]
        for thread in self._threads:
            thread.start()
        return self

    def _tick_loop(self) -> None:
        # Fine enough to catch a scaled 2-minute deadline within about 1% of it.
        interval = min(max(self.engine.time_scale, 0.01), 0.5)
        while not self._stop.wait(interval):
            self.engine.tick()

    def stop(self) -> None:
        if self._server is None:
            return
        self._stop.set()
        with self.engine.cond:
            self.engine.stopping = True
            self.engine.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._server = None
        with self.engine.cond:
            self.engine.stopping = False

    def __enter__(self) -> LocalDataPipeline:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Ask serve_forever() to return; safe from a signal handler."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until request_stop() is called, then stop."""
        self.start()
        try:
            self._stop.wait()
        finally:
            self.stop()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("service is not started")
        return f"http://{self.host}:{self.port}"

    # -- clients -------------------------------------------------------------

    def client(
        self,
        access_key_id: str = DEFAULT_ACCESS_KEY_ID,
        secret_access_key: str = DEFAULT_SECRET_ACCESS_KEY,
        session_token: str | None = None,
        **config: Any,
    ) -> Any:
        """A boto3 datapipeline client for this endpoint.

        Keyword arguments go to ``botocore.config.Config`` (e.g. ``retries=``).
        The read timeout covers the scaled 90-second long poll.
        """
        import boto3
        from botocore.config import Config

        config.setdefault("read_timeout", LONG_POLL * self.time_scale + 10)
        config.setdefault("connect_timeout", 5)
        return boto3.session.Session().client(
            "datapipeline",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            config=Config(**config),
        )

    def aws_env(self) -> dict[str, str]:
        """Environment for an ``aws`` CLI subprocess talking to this service."""
        return {
            "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    # -- test controls ---------------------------------------------------------

    def set_fault(
        self, operation: str, error_rate: float = 0.0, latency: float = 0.0, throttle: bool = False
    ) -> None:
        """Inject faults into one operation (``"*"`` for all); all zero clears it.

        ``latency`` is in real seconds and is added before the call is served;
        an injected error (InternalServiceError) or throttle changes no state.
        """
        self.frontend.set_fault(operation, Fault(error_rate, latency, throttle))

    def clear_faults(self) -> None:
        for operation in list(self.frontend.faults):
            self.frontend.set_fault(operation, None)

    def set_runner_terminate(self, terminate: bool = True) -> None:
        with self.engine.cond:
            self.engine.runner_terminate = terminate

    def assert_clean(self, allow_open: bool = False) -> None:
        """Fail unless every polled attempt got exactly one outcome and no
        protocol violation happened. ``allow_open`` tolerates attempts still
        running (no outcome yet) but not lost or doubly reported ones."""
        problems = self.ledger.problems(allow_open=allow_open)
        if problems:
            raise AssertionError("Data Pipeline ledger is not clean:\n  " + "\n  ".join(problems))

    # -- convenience -----------------------------------------------------------

    def run_pipeline(
        self,
        objects: Mapping[str, Any] | Sequence[Any],
        worker_group: str | None = None,
        name: str | None = None,
        parameter_values: Mapping[str, str] | None = None,
    ) -> str:
        """Create, define and activate an on-demand pipeline; return its id.

        ``objects`` is a definition in the CLI's file format (``{"objects": [...]}``),
        a list of such objects, or a compact ``{id: {field: value}}`` mapping;
        ``{"ref": id}`` makes a reference and a list repeats a field. With
        ``worker_group``, Default gets that workerGroup (so every activity
        inherits it) and ``scheduleType: ondemand`` unless it sets its own.
        """
        api = definition_file_to_api(objects)
        pipeline_objects: list[dict[str, Any]] = api["pipelineObjects"]
        default = next((o for o in pipeline_objects if o["id"] == DEFAULT_OBJECT_ID), None)
        if default is None:
            default = {"id": DEFAULT_OBJECT_ID, "name": DEFAULT_OBJECT_ID, "fields": []}
            pipeline_objects.insert(0, default)
        keys = {f["key"] for f in default["fields"]}
        if "scheduleType" not in keys:
            default["fields"].append({"key": "scheduleType", "stringValue": "ondemand"})
        if worker_group is not None:
            default["fields"] = [f for f in default["fields"] if f["key"] != "workerGroup"]
            default["fields"].append({"key": "workerGroup", "stringValue": worker_group})
        if parameter_values:
            api["parameterValues"] = [{"id": k, "stringValue": v} for k, v in parameter_values.items()]

        engine = self.engine
        create = {"name": name or "dptr-local", "uniqueId": str(uuid.uuid4())}
        validate_request("CreatePipeline", create)
        pipeline_id: str = engine.create_pipeline(create)["pipelineId"]
        put = {"pipelineId": pipeline_id, **api}
        validate_request("PutPipelineDefinition", put)
        result = engine.put_definition(put)
        if result["errored"]:
            raise ValueError(f"pipeline definition has errors: {result['validationErrors']}")
        engine.activate({"pipelineId": pipeline_id})
        return pipeline_id
