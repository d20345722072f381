"""The kubelet's log endpoint, so ``kubectl logs`` and the API's pods/log work.

The API server reaches a node's kubelet at the node's InternalIP and its
``daemonEndpoints.kubeletEndpoint.Port``, over HTTPS, presenting its
``--kubelet-client-certificate``. This server listens there with a
self-signed certificate (the bed's API server does not verify kubelets),
requires a client certificate from the cluster CA, and serves
``GET /containerLogs/{namespace}/{pod}/{container}`` with ``tailLines``,
``limitBytes``, ``previous`` and ``follow``. ``timestamps`` and
``sinceSeconds``/``sinceTime`` are accepted and ignored: logs are stored
without per-line times.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("dptr_testbed.kubelet")

# (namespace, pod, container, previous) -> (log file, is the container still running?)
Resolver = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


def self_signed(directory: Path, node: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "kubelet.crt", directory / "kubelet.key"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{node}@dptr-testbed")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(node), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def tail(data: bytes, lines: int | None, limit: int | None) -> bytes:
    if lines is not None:
        data = b"".join(data.splitlines(keepends=True)[-lines:]) if lines > 0 else b""
    if limit is not None:
        data = data[:limit]
    return data


class _Handler(BaseHTTPRequestHandler):
    server: LogServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("logs: " + format, *args)

    def _error(self, code: int, message: str) -> None:
        body = message.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            self._error(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._error(404, f"the dptr test bed's kubelet stand-in does not serve {url.path}")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        _, namespace, pod, container = parts
        previous = query.get("previous") == "true"
        found = self.server.resolve(namespace, pod, container, previous)
        if found is None:
            self._error(404, f'container "{container}" in pod "{pod}" has no logs (not started yet?)')
            return
        path, running = found
        try:
            lines = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError:
            self._error(400, "tailLines and limitBytes must be integers")
            return
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        offset = len(data)
        body = tail(data, lines, limit)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if query.get("follow") != "true":
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()
        sent = len(body)
        self.wfile.write(body)
        self.wfile.flush()
        while limit is None or sent < limit:
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    more = f.read()
            except FileNotFoundError:
                more = b""
            if more:
                if limit is not None:
                    more = more[: limit - sent]
                offset += len(more)
                sent += len(more)
                self.wfile.write(more)
                self.wfile.flush()
            elif not running():
                break
            else:
                time.sleep(0.2)


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, resolve: Resolver, cert: Path, key: Path, client_ca: str | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.resolve = resolve
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._ctx = ctx

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[ssl.SSLSocket, tuple[str, int]]:
        sock, addr = self.socket.accept()
        sock.settimeout(30)
        # The handshake runs in the handler's thread (on first read), not here.
        return self._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("logs: request from %s failed", client_address, exc_info=True)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="log-server", daemon=True)
        thread.start()
        return thread
