"""One small HTTP server: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``.

* liveness: the process serves HTTP and its heartbeat loop has ticked recently (a wedged
  loop means tasks stop being heartbeated: better restart);
* readiness: standing by for the Lease, or leading with the watches started.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dptr_operator.metrics import Metrics

__all__ = ["HealthServer", "HealthState"]

log = logging.getLogger(__name__)


class HealthState:
    """What the probes look at; updated by the operator."""

    def __init__(self, stall_after: float = 60.0) -> None:
        self.stall_after = stall_after
        self.leader = False
        self.standby = True
        self.watching = False
        self.last_tick = time.monotonic()

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def live(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.last_tick
        ok = not self.leader or age < self.stall_after
        return ok, {"leader": self.leader, "loopAgeSeconds": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ok = self.standby or (self.leader and self.watching)
        return ok, {"leader": self.leader, "standby": self.standby, "watching": self.watching}


class HealthServer:
    def __init__(self, host: str, port: int, state: HealthState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("serving /healthz, /readyz and /metrics on port %d", self.port)

    def stop(self) -> None:
        self._server.shutdown()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                probes: dict[str, Callable[[], tuple[bool, dict[str, Any]]]] = {
                    "/healthz": outer.state.live,
                    "/livez": outer.state.live,
                    "/readyz": outer.state.ready,
                }
                if path == "/metrics":
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    ok, detail = probes[path]()
                    self._send(
                        200 if ok else 503, json.dumps({"ok": ok, **detail}).encode(), "application/json"
                    )
                else:
                    self._send(404, b"not found\n", "text/plain")

        return Handler
