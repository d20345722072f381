"""KubeClient.unreachable_since: what the operator's pollers check before PollForTask
(found by the chaos test: polling on while the API server was down lost the tasks)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from dptr_common.kube import ApiUnavailable, KubeClient, KubeConfig, NotFound


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _NotFoundHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"kind":"Status","reason":"NotFound","code":404,"message":"nope"}'
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_unreachable_since_is_set_on_no_answer_and_cleared_by_any_answer() -> None:
    down = KubeClient(KubeConfig(server=f"http://127.0.0.1:{_closed_port()}"), timeout=2)
    assert down.unreachable_since is None
    with pytest.raises(ApiUnavailable):
        down.get("/api/v1/namespaces/x")
    first = down.unreachable_since
    assert first is not None
    with pytest.raises(ApiUnavailable):
        down.get("/api/v1/namespaces/x")
    assert down.unreachable_since == first  # since the first failure

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFoundHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = KubeClient(KubeConfig(server=f"http://127.0.0.1:{server.server_address[1]}"), timeout=2)
        up.unreachable_since = 1.0
        with pytest.raises(NotFound):  # an error status is still an answer
            up.get("/api/v1/namespaces/x")
        assert up.unreachable_since is None
    finally:
        server.shutdown()
        server.server_close()
