"""A minimal Kubernetes REST client on the standard library alone.

The sidecar cannot afford the ``kubernetes`` package (its idle memory budget is small),
and the few calls dptr makes outside kopf (ledger writes, Job deletion, logs, Events)
need nothing more than ``http.client`` + ``ssl`` + ``json``.

Configuration, chosen by :meth:`KubeClient.from_env`:

* in-cluster, when ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT`` are set: the
  service-account token, CA and namespace under
  ``/var/run/secrets/kubernetes.io/serviceaccount``.  The token file is re-read whenever it
  changes on disk (projected tokens rotate) and after a 401;
* otherwise the kubeconfig at ``$KUBECONFIG`` (the first of a ``:``-separated list) or
  ``~/.kube/config``: its current context's server, CA (file or data), client certificate
  and key (files or data) or token (or tokenFile), or an ``exec`` credential plugin such as
  ``aws eks get-token`` (:mod:`dptr_common.execcred`: its credential is cached until its
  ``expirationTimestamp`` and fetched again after a 401; as in client-go, a token or client
  certificate in the same user wins over ``exec``).  JSON always works; YAML only when
  PyYAML is importable.

Every call has a timeout; connections are kept alive, one per thread (a stream, such as
a watch or a log read incrementally, gets a connection of its own:
:meth:`KubeClient.stream`).  Events are written as core ``v1`` Events (what ``kubectl
describe`` and kopf use, so one RBAC rule ``events: create`` in the core group serves the
operator and the sidecar), with ``reportingComponent``/``reportingInstance`` filled in.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from dptr_common.execcred import (
    ExecConfig,
    ExecCredential,
    ExecCredentialPlugin,
    ExecPluginError,
    exec_cluster_info,
    load_cert_chain_data,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DEFAULT_TIMEOUT",
    "SERVICE_ACCOUNT_DIR",
    "ApiError",
    "ApiUnavailable",
    "Conflict",
    "Credentials",
    "CredentialsUnavailable",
    "Forbidden",
    "Invalid",
    "KubeClient",
    "KubeConfig",
    "NotFound",
    "PatchType",
    "Unauthorized",
    "close_stream",
    "event_path",
    "job_path",
    "namespaced_path",
    "object_reference",
    "pipelinetask_path",
    "pod_path",
    "taskrunner_path",
]

API_GROUP = "dptr.dev"
API_VERSION = "v1alpha1"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT = 30.0

PatchType = Literal["merge", "json", "strategic"]
_PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """The API server refused a request (``status`` is the HTTP status, ``reason`` the
    Status reason such as ``NotFound``/``Conflict``/``AlreadyExists``/``Invalid``)."""

    def __init__(self, status: int, reason: str, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = dict(body) if body else {}


class NotFound(ApiError):  # noqa: N818 - reads as the HTTP status it is
    """404."""


class Conflict(ApiError):  # noqa: N818
    """409: a stale resourceVersion (``reason == "Conflict"``) or ``AlreadyExists``."""


class Forbidden(ApiError):  # noqa: N818
    """403: RBAC said no (or admission did)."""


class Unauthorized(ApiError):  # noqa: N818
    """401: the token or client certificate was not accepted."""


class Invalid(ApiError):  # noqa: N818
    """422: validation (OpenAPI/CEL) refused the object."""


class ApiUnavailable(ApiError):  # noqa: N818
    """No HTTP answer at all: refused, reset, TLS failure or timeout (``status`` 0)."""


class CredentialsUnavailable(ApiUnavailable):
    """No request was sent: the kubeconfig's exec credential plugin gave no usable
    credential (``reason`` ``ExecPluginFailed``; the message names the command and its
    installHint).  An :class:`ApiUnavailable`, so callers wait and retry as when the API
    server does not answer."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Invalid,
}


# --------------------------------------------------------------------------- paths


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def namespaced_path(
    api: str, plural: str, namespace: str, name: str | None = None, subresource: str | None = None
) -> str:
    """``/<api>/namespaces/<ns>/<plural>[/<name>[/<subresource>]]``; ``api`` is ``api/v1``
    for the core group or ``apis/<group>/<version>``."""
    path = f"/{api.strip('/')}/namespaces/{_q(namespace)}/{plural}"
    if name is not None:
        path += f"/{_q(name)}"
        if subresource:
            path += f"/{subresource}"
    elif subresource:
        raise ValueError("a subresource needs a name")
    return path


def pipelinetask_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """Path of PipelineTasks (``subresource="status"`` for the status subresource)."""
    return namespaced_path(f"apis/{API_GROUP}/{API_VERSION}", "pipelinetasks", namespace, name, subresource)


def taskrunner_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """Path of TaskRunners (``subresource="status"`` for the status subresource)."""
    return namespaced_path(f"apis/{API_GROUP}/{API_VERSION}", "taskrunners", namespace, name, subresource)


def job_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """Path of batch/v1 Jobs."""
    return namespaced_path("apis/batch/v1", "jobs", namespace, name, subresource)


def pod_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    """Path of core v1 Pods (``subresource="log"`` is what :meth:`KubeClient.read_log` uses)."""
    return namespaced_path("api/v1", "pods", namespace, name, subresource)


def event_path(namespace: str) -> str:
    """Path of core v1 Events."""
    return namespaced_path("api/v1", "events", namespace)


def object_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An ObjectReference for a full object (or pass through one that already is)."""
    if "metadata" not in obj:
        return {k: v for k, v in obj.items() if v is not None}
    meta = obj["metadata"]
    ref = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
    }
    return {k: v for k, v in ref.items() if v}


# --------------------------------------------------------------------------- config


class _TokenFile:
    """A token file re-read whenever it changes on disk (projected tokens rotate)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def get(self, force: bool = False) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError:
                return self._token
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if force or stamp != self._stamp:
                self._token = self.path.read_text().strip()
                self._stamp = stamp
            return self._token


@dataclass(frozen=True, eq=False)
class Credentials:
    """What to authenticate one request with (:meth:`KubeConfig.credentials`).  A bearer
    token and/or a client certificate (files, or data from an exec plugin)."""

    token: str | None = field(default=None, repr=False)
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = field(default=None, repr=False)
    key_data: bytes | None = field(default=None, repr=False)
    #: When they stop being valid (an exec plugin's expirationTimestamp); None: not known.
    expiration: datetime | None = None
    #: A token file or an exec plugin: after a 401, fresh ones may be accepted.
    refreshable: bool = False
    exec_credential: ExecCredential | None = field(default=None, repr=False)


@dataclass
class KubeConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    namespace: str = "default"
    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    #: A kubeconfig ``exec`` credential plugin (used only without a token or certificate).
    exec_config: ExecConfig | None = None
    source: str = ""
    _token_source: _TokenFile | None = field(default=None, repr=False)
    _exec: ExecCredentialPlugin | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.exec_config is not None:
            self._exec = ExecCredentialPlugin(self.exec_config)

    @property
    def exec_plugin(self) -> ExecCredentialPlugin | None:
        """The exec credential plugin runner, when the kubeconfig's user has one."""
        return self._exec

    def credentials(self, *, stale: Credentials | None = None) -> Credentials:
        """The credentials to send now.  ``stale``: ones the API server refused (a 401) or
        that expired; then a token file is re-read and an exec plugin run again (unless
        another thread already replaced them).  Raises :class:`ExecPluginError` when an
        exec plugin gives none."""
        if self._exec is not None:
            cred = self._exec.get() if stale is None else self._exec.refresh(stale.exec_credential)
            return Credentials(
                token=cred.token,
                cert_data=cred.client_certificate_data,
                key_data=cred.client_key_data,
                expiration=cred.expiration,
                refreshable=True,
                exec_credential=cred,
            )
        return Credentials(
            token=self.bearer_token(force=stale is not None),
            cert_file=self.cert_file,
            key_file=self.key_file,
            cert_data=self.cert_data,
            key_data=self.key_data,
            refreshable=bool(self.token_file),
        )

    def bearer_token(self, force: bool = False) -> str | None:
        if self._exec is not None:
            return (self._exec.refresh(self._exec.cached) if force else self._exec.get()).token
        if self.token_file:
            if self._token_source is None:
                self._token_source = _TokenFile(Path(self.token_file))
            return self._token_source.get(force) or self.token
        return self.token

    def ssl_context(self, client_cert: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
        """The TLS context: the CA, and the client certificate (``client_cert``, PEM
        certificate and key data from an exec plugin, else the kubeconfig's)."""
        context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if client_cert is not None:
            load_cert_chain_data(context, *client_cert)
        elif self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        elif self.cert_data and self.key_data:
            load_cert_chain_data(context, self.cert_data, self.key_data)
        return context

    # ---- loaders ----------------------------------------------------------

    @classmethod
    def in_cluster(cls, sa_dir: Path | None = None) -> KubeConfig:
        sa_dir = SERVICE_ACCOUNT_DIR if sa_dir is None else sa_dir
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise RuntimeError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        namespace_file = sa_dir / "namespace"
        namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
        ca_file = sa_dir / "ca.crt"
        return cls(
            server=f"https://{host}:{port}",
            namespace=os.environ.get("POD_NAMESPACE") or namespace,
            ca_file=str(ca_file) if ca_file.exists() else None,
            token_file=str(sa_dir / "token"),
            source="in-cluster",
        )

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None) -> KubeConfig:
        path = Path(path).expanduser()
        text = path.read_text()
        doc = _parse_kubeconfig(text, path)
        base = path.parent

        def named(section: str, name: str | None) -> dict[str, Any]:
            for entry in doc.get(section) or []:
                if entry.get("name") == name:
                    return dict(entry)
            raise RuntimeError(f"{path}: no {section[:-1]} named {name!r}")

        ctx_name = context or doc.get("current-context")
        if not ctx_name:
            raise RuntimeError(f"{path}: no current-context")
        ctx = named("contexts", ctx_name).get("context") or {}
        cluster = named("clusters", ctx.get("cluster")).get("cluster") or {}
        user: dict[str, Any] = {}
        if ctx.get("user"):
            user = named("users", ctx.get("user")).get("user") or {}

        def file_of(value: str | None) -> str | None:
            if not value:
                return None
            return str((base / value).resolve()) if not os.path.isabs(value) else value

        def data_of(value: str | None) -> bytes | None:
            return base64.b64decode(value) if value else None

        ca_data = data_of(cluster.get("certificate-authority-data"))
        if not cluster.get("server"):
            raise RuntimeError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
        exec_config = None
        static = ("token", "tokenFile", "client-certificate", "client-certificate-data")
        if user.get("exec") and not any(user.get(k) for k in static):
            cluster_info = None
            if isinstance(user["exec"], Mapping) and user["exec"].get("provideClusterInfo"):
                ca_pem = ca_data
                if ca_pem is None and cluster.get("certificate-authority"):
                    ca_path = str(file_of(cluster["certificate-authority"]))
                    try:
                        ca_pem = Path(ca_path).read_bytes()
                    except OSError as exc:
                        raise ExecPluginError(
                            f"{path}: cannot read the CA bundle {ca_path} for the exec plugin: {exc}"
                        ) from exc
                cluster_info = exec_cluster_info(
                    cluster, ca_pem=ca_pem, extensions_of=str(ctx.get("cluster"))
                )
            exec_config = ExecConfig.parse(
                user["exec"], base_dir=base, cluster=cluster_info, source=str(path), user=str(ctx.get("user"))
            )
        return cls(
            server=str(cluster["server"]).rstrip("/"),
            namespace=ctx.get("namespace") or "default",
            ca_file=file_of(cluster.get("certificate-authority")),
            ca_data=ca_data.decode() if ca_data else None,
            insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
            cert_file=file_of(user.get("client-certificate")),
            key_file=file_of(user.get("client-key")),
            cert_data=data_of(user.get("client-certificate-data")),
            key_data=data_of(user.get("client-key-data")),
            token=user.get("token") or None,
            token_file=file_of(user.get("tokenFile")),
            exec_config=exec_config,
            source=str(path),
        )


def _parse_kubeconfig(text: str, path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        try:
            import yaml
        except ImportError as exc:
            raise RuntimeError(
                f"{path} is YAML, and PyYAML is not installed: write the kubeconfig as JSON"
            ) from exc
        doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise RuntimeError(f"{path} is not a kubeconfig")
    return doc


# --------------------------------------------------------------------------- client


_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    ssl.SSLEOFError,  # a kept-alive TLS connection the server closed, seen on the next write
)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    """Typed JSON calls against the API server.  Paths are absolute API paths (``/api/v1/...``,
    ``/apis/<group>/<version>/...``); build them with the ``*_path`` helpers."""

    def __init__(
        self, config: KubeConfig, *, timeout: float = DEFAULT_TIMEOUT, user_agent: str = "dptr"
    ) -> None:
        self.config = config
        self.timeout = timeout
        self.user_agent = user_agent
        parsed = urllib.parse.urlsplit(config.server)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ValueError(f"bad API server URL {config.server!r}")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._prefix = parsed.path.rstrip("/")
        self._ssl = config.ssl_context() if parsed.scheme == "https" else None
        # An exec plugin's client certificate: the context is rebuilt when it changes, and
        # each thread's kept-alive connection, made with the previous one, is replaced.
        self._ssl_cert: tuple[bytes, bytes] | None = None
        self._ssl_generation = 0
        self._ssl_lock = threading.Lock()
        self._local = threading.local()
        #: Monotonic time since which no call got an answer (None: the last call did).
        #: The operator polls Data Pipeline only while it can record what it polls.
        self.unreachable_since: float | None = None

    @property
    def namespace(self) -> str:
        """The namespace of the pod (in-cluster) or of the kubeconfig's context."""
        return self.config.namespace

    @classmethod
    def from_env(cls, *, timeout: float = DEFAULT_TIMEOUT) -> KubeClient:
        """In-cluster when ``KUBERNETES_SERVICE_HOST``/``PORT`` are set, else ``$KUBECONFIG``
        (or ``~/.kube/config``)."""
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT"):
            return cls(KubeConfig.in_cluster(), timeout=timeout)
        paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        path = Path(paths[0] if paths else "~/.kube/config").expanduser()
        if not path.is_file():
            raise RuntimeError(
                f"no Kubernetes configuration: not in a cluster (KUBERNETES_SERVICE_HOST unset) "
                f"and no kubeconfig at {path}"
            )
        return cls(KubeConfig.from_kubeconfig(path), timeout=timeout)

    @classmethod
    def from_kubeconfig(
        cls, path: str | os.PathLike[str], *, context: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> KubeClient:
        return cls(KubeConfig.from_kubeconfig(path, context), timeout=timeout)

    # ---- transport --------------------------------------------------------

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", 0) != self._ssl_generation:
            self._drop_connection()  # made with a client certificate since rotated
            conn = None
        if conn is not None:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.timeout = timeout
            return conn, True
        generation = self._ssl_generation
        conn = self._new_connection(timeout)
        self._local.conn = conn
        self._local.generation = generation
        return conn, False

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._drop_connection()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float | None = None,
        raw: bool = False,
    ) -> Any:
        """One API call; the decoded JSON answer (or bytes with ``raw=True``).

        Raises :class:`ApiError` subclasses for error statuses and :class:`ApiUnavailable`
        when no answer came (:class:`CredentialsUnavailable` when an exec credential plugin
        gave none).  A request that fails on a kept-alive connection the server had closed
        is retried once on a new connection; a 401 with a token file or an exec plugin
        re-reads the token (runs the plugin again) and retries once.
        """
        url = self._url(path, query)
        payload = None if body is None else json.dumps(body).encode()
        limit = self.timeout if timeout is None else timeout
        creds = self._credentials()
        auth_retry_done = False
        stale_retry_done = False
        while True:
            headers = self._headers(accept, content_type if payload is not None else None, creds)
            conn, reused = self._connection(limit)
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except _STALE_CONNECTION_ERRORS as exc:
                self._drop_connection()
                if reused and not stale_retry_done:
                    stale_retry_done = True
                    continue
                self._unreachable()
                raise ApiUnavailable(0, "ConnectionError", f"{method} {path}: {exc!r}") from exc
            except TimeoutError as exc:
                self._drop_connection()
                self._unreachable()
                raise ApiUnavailable(0, "Timeout", f"{method} {path}: no answer within {limit:g}s") from exc
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                self._unreachable()
                raise ApiUnavailable(0, "ConnectionError", f"{method} {path}: {exc!r}") from exc
            self.unreachable_since = None
            if response.will_close:
                self._drop_connection()
            status = response.status
            if status == 401 and creds.refreshable and not auth_retry_done:
                auth_retry_done = True
                creds = self._credentials(stale=creds)
                continue
            if status >= 400:
                raise self._error(status, data, method, path)
            if raw:
                return data
            if not data:
                return None
            return json.loads(data)

    def stream(
        self, path: str, query: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """GET ``path`` on a connection of its own and return it with the response, unread:
        for a watch or a log, read incrementally so memory stays bounded.  The caller closes
        it with :func:`close_stream`, which also ends a read blocked in another thread.

        Raises like :meth:`request` for error statuses, and :class:`ApiUnavailable` when no
        answer came; a 401 with a token file or an exec plugin gets fresh credentials and
        retries once.
        """
        url = self._url(path, query)
        limit = self.timeout if timeout is None else timeout
        creds = self._credentials()
        conn = self._new_connection(limit)
        auth_retry_done = False
        while True:
            try:
                conn.request("GET", url, headers=self._headers("*/*", None, creds))
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._unreachable()
                raise ApiUnavailable(0, "ConnectionError", f"GET {path}: {exc!r}") from exc
            self.unreachable_since = None
            if response.status == 401 and creds.refreshable and not auth_retry_done:
                response.read()
                conn.close()
                auth_retry_done = True
                creds = self._credentials(stale=creds)
                conn = self._new_connection(limit)  # with a rotated client certificate, if any
                continue
            if response.status >= 400:
                data = response.read(64 * 1024)
                conn.close()
                raise self._error(response.status, data, "GET", path)
            return conn, response

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        url = self._prefix + path
        if query:
            pairs = {k: ("true" if v is True else "false" if v is False else v) for k, v in query.items()}
            url += "?" + urllib.parse.urlencode({k: v for k, v in pairs.items() if v is not None})
        return url

    def _headers(self, accept: str, content_type: str | None, creds: Credentials) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": self.user_agent}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if creds.token:
            headers["Authorization"] = f"Bearer {creds.token}"
        return headers

    def _credentials(self, stale: Credentials | None = None) -> Credentials:
        """The config's credentials (fresh ones after ``stale`` was refused), with the TLS
        context switched to an exec plugin's client certificate when it returned one."""
        try:
            creds = self.config.credentials(stale=stale)
        except ExecPluginError as exc:
            self._unreachable()
            raise CredentialsUnavailable(0, "ExecPluginFailed", str(exc)) from exc
        if self._scheme == "https" and creds.exec_credential is not None:
            pair = (creds.cert_data, creds.key_data) if creds.cert_data and creds.key_data else None
            if self._ssl_cert != pair:
                with self._ssl_lock:
                    if self._ssl_cert != pair:
                        self._ssl = self.config.ssl_context(client_cert=pair)
                        self._ssl_cert = pair
                        self._ssl_generation += 1
        return creds

    def _unreachable(self) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()

    @staticmethod
    def _error(status: int, data: bytes, method: str, path: str) -> ApiError:
        body: dict[str, Any] = {}
        try:
            parsed = json.loads(data) if data else {}
            if isinstance(parsed, dict):
                body = parsed
        except ValueError:
            pass
        reason = str(body.get("reason") or http.client.responses.get(status, "Error").replace(" ", ""))
        message = str(body.get("message") or data[:500].decode("utf-8", "replace") or f"{method} {path}")
        kind = _ERRORS_BY_STATUS.get(status, ApiError)
        return kind(status, reason, message, body)

    # ---- verbs ------------------------------------------------------------

    def get(self, path: str, *, timeout: float | None = None) -> dict[str, Any]:
        """GET an object (raises :class:`NotFound`)."""
        result: dict[str, Any] = self.request("GET", path, timeout=timeout)
        return result

    def list(
        self,
        path: str,
        label_selector: str | None = None,
        *,
        field_selector: str | None = None,
        page_size: int = 500,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """All items of a collection (following ``continue``), each with its ``kind`` and
        ``apiVersion`` filled in."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            query: dict[str, Any] = {
                "labelSelector": label_selector,
                "fieldSelector": field_selector,
                "limit": page_size,
                "continue": cont,
            }
            page: dict[str, Any] = self.request("GET", path, query=query, timeout=timeout)
            kind = str(page.get("kind") or "")
            item_kind = kind[: -len("List")] if kind.endswith("List") else None
            for item in page.get("items") or []:
                if item_kind and "kind" not in item:
                    item["kind"] = item_kind
                if page.get("apiVersion") and "apiVersion" not in item:
                    item["apiVersion"] = page["apiVersion"]
                items.append(item)
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return items

    def create(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """POST to a collection path (raises :class:`Conflict` with reason ``AlreadyExists``)."""
        result: dict[str, Any] = self.request("POST", path, body=body, timeout=timeout)
        return result

    def patch(
        self,
        path: str,
        body: Any,
        patch_type: PatchType = "merge",
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """PATCH: ``merge`` (RFC 7386), ``json`` (RFC 6902, a list of ops) or ``strategic``
        (built-in kinds only)."""
        try:
            content_type = _PATCH_CONTENT_TYPES[patch_type]
        except KeyError:
            raise ValueError(f"unknown patch type {patch_type!r}") from None
        result: dict[str, Any] = self.request(
            "PATCH", path, body=body, content_type=content_type, timeout=timeout
        )
        return result

    def replace(self, path: str, body: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """PUT a whole object.  With ``metadata.resourceVersion`` set, a stale write raises
        :class:`Conflict` (optimistic concurrency)."""
        result: dict[str, Any] = self.request("PUT", path, body=body, timeout=timeout)
        return result

    def delete(
        self,
        path: str,
        propagation_policy: Literal["Background", "Foreground", "Orphan"] | None = None,
        grace_period_seconds: int | None = None,
        preconditions: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        """DELETE with DeleteOptions.  Remember: a Job deleted through the API without
        ``propagation_policy`` orphans its pods; pass ``"Background"``."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if preconditions:
            options["preconditions"] = dict(preconditions)
        result: dict[str, Any] | None = self.request("DELETE", path, body=options, timeout=timeout)
        return result

    def read_log(
        self,
        namespace: str,
        pod: str,
        container: str,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
        *,
        previous: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """A container's log, as raw bytes (it need not be UTF-8)."""
        query = {
            "container": container,
            "tailLines": tail_lines,
            "limitBytes": limit_bytes,
            "previous": True if previous else None,
        }
        data: bytes = self.request(
            "GET", pod_path(namespace, pod, "log"), query=query, accept="*/*", raw=True, timeout=timeout
        )
        return data

    def create_event(  # noqa: PLR0917 - the signature callers were promised
        self,
        namespace: str,
        involved_object: Mapping[str, Any],
        reason: str,
        message: str,
        type: Literal["Normal", "Warning"] = "Normal",
        component: str = "dptr",
        *,
        reporting_instance: str | None = None,
        action: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Record a core v1 Event about ``involved_object`` (a full object or an
        ObjectReference) in ``namespace``.

        ``component`` becomes ``source.component`` and ``reportingComponent``;
        ``reporting_instance`` (default: ``$POD_NAME`` or the host name) becomes
        ``source.host``-free ``reportingInstance``.  The message is cut to 1024 characters
        as the API server expects.
        """
        ref = object_reference(involved_object)
        instance = reporting_instance or os.environ.get("POD_NAME") or socket.gethostname()
        now = _now()
        base = str(ref.get("name") or "object")[:200]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{base}.{time.time_ns():x}{os.urandom(2).hex()}",
                "namespace": namespace,
            },
            "involvedObject": ref,
            "reason": reason[:128],
            "message": message[:1024],
            "type": type,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        if action:
            body["action"] = action[:128]
        return self.create(event_path(namespace), body, timeout=timeout)


def close_stream(conn: http.client.HTTPConnection, response: http.client.HTTPResponse | None = None) -> None:
    """Close a :meth:`KubeClient.stream`, also while another thread is blocked reading it.

    ``conn.close()`` alone does not end that read, it waits for it: the response's buffered
    reader holds its lock while blocked, and closing needs the lock.  A watch blocks up to
    its ``timeoutSeconds``, so a sidecar closing its pod watch after reporting hung there
    until kubelet killed it at the end of the grace period (exit 137, the pod finishing
    30 s late).  Shutting the socket down first makes the blocked read return at once.
    """
    sock = conn.sock
    if sock is None and response is not None:
        # A response that will close owns the socket, not the connection.
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.close()
