"""kubeconfig ``exec`` credential plugins (``aws eks get-token`` and the like), run the way
client-go runs them: the ``client.authentication.k8s.io`` ExecCredential protocol, ``v1``
and ``v1beta1``.

* The plugin is ``users[].user.exec.command`` with ``args`` and ``env`` (name/value pairs
  added to dptr's own environment); a command with a path separator that is not absolute
  is taken relative to the kubeconfig file's directory (a bare name is looked up in
  ``PATH``).
* It gets ``KUBERNETES_EXEC_INFO``: an ExecCredential of the configured ``apiVersion`` whose
  ``spec.interactive`` is false, and, with ``provideClusterInfo``, ``spec.cluster`` (server,
  CA data, insecure-skip-tls-verify, tls-server-name, proxy-url and ``config`` from the
  cluster's ``client.authentication.k8s.io/exec`` extension).
* dptr is never interactive: standard input is not passed (``/dev/null``), so
  ``interactiveMode: Always`` is refused when the kubeconfig is read; ``Never`` and
  ``IfAvailable`` run.  ``interactiveMode`` is required with ``v1`` and defaults to
  ``IfAvailable`` with ``v1beta1``, as in client-go.
* Its stdout must be an ExecCredential of the same ``apiVersion`` with ``status.token``
  and/or ``status.clientCertificateData`` + ``status.clientKeyData`` (PEM, both or
  neither), and optionally ``status.expirationTimestamp`` (RFC 3339).
* The credential is cached until it expires, or for the life of the process without an
  expiry; a caller that got a 401 with it asks for a fresh one (:meth:`refresh`), which
  drops it and runs the plugin again unless another thread already did.  One lock
  serialises runs, so concurrent callers wait for one run rather than starting several.
* A run has a timeout (the plugin's process group is killed past it).  A plugin that is
  missing, fails, times out or prints something else is an :class:`ExecPluginError`
  naming the command (and its ``installHint``); the plugin's stdout, which holds the
  secret, is never put in a message or a log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "API_VERSIONS",
    "CLUSTER_EXTENSION",
    "DEFAULT_PLUGIN_TIMEOUT",
    "EXEC_INFO_ENV",
    "ExecConfig",
    "ExecCredential",
    "ExecCredentialPlugin",
    "ExecPluginError",
    "exec_cluster_info",
    "load_cert_chain_data",
]

log = logging.getLogger(__name__)

API_V1 = "client.authentication.k8s.io/v1"
API_V1BETA1 = "client.authentication.k8s.io/v1beta1"
API_VERSIONS = (API_V1, API_V1BETA1)
#: The reserved cluster extension whose value becomes ``spec.cluster.config``.
CLUSTER_EXTENSION = "client.authentication.k8s.io/exec"
EXEC_INFO_ENV = "KUBERNETES_EXEC_INFO"
DEFAULT_PLUGIN_TIMEOUT = 60.0
INTERACTIVE_MODES = ("Never", "IfAvailable", "Always")

_RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_STDERR_TAIL = 800


class ExecPluginError(RuntimeError):
    """The exec credential plugin could not give a credential (the message says why)."""


def _parse_rfc3339(value: str) -> datetime:
    match = _RFC3339.match(value.strip())
    if not match:
        raise ValueError(value)
    date, clock, fraction, zone = match.groups()
    fraction = (fraction or "")[:7]  # fromisoformat takes up to microseconds
    zone = "+00:00" if zone in ("Z", "z") else zone
    return datetime.fromisoformat(f"{date}T{clock}{fraction}{zone}")


def load_cert_chain_data(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a PEM client certificate and key given as data (``ssl`` only reads files:
    they go to private temporary ones, removed at once)."""
    with tempfile.TemporaryDirectory(prefix="dptr-kube-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(str(cert_path), str(key_path))


def exec_cluster_info(
    cluster: Mapping[str, Any], *, ca_pem: bytes | None, extensions_of: str = ""
) -> dict[str, Any]:
    """``spec.cluster`` for a kubeconfig ``clusters[].cluster`` (as client-go's
    ConfigToExecCluster builds it: the CA always as data, whether the kubeconfig had a file
    or data; ``config`` from the reserved extension).  ``extensions_of`` names the cluster
    in error messages."""
    info: dict[str, Any] = {"server": str(cluster.get("server") or "")}
    if cluster.get("tls-server-name"):
        info["tls-server-name"] = str(cluster["tls-server-name"])
    if cluster.get("insecure-skip-tls-verify"):
        info["insecure-skip-tls-verify"] = True
    if ca_pem:
        info["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    if cluster.get("proxy-url"):
        info["proxy-url"] = str(cluster["proxy-url"])
    for extension in cluster.get("extensions") or []:
        if not isinstance(extension, Mapping):
            raise ExecPluginError(f"cluster {extensions_of!r}: an extension is not an object")
        if extension.get("name") == CLUSTER_EXTENSION and extension.get("extension") is not None:
            info["config"] = extension["extension"]
    return info


@dataclass(frozen=True, eq=False)
class ExecCredential:
    """What one run of the plugin gave.  Compared by identity: a caller hands back the one
    it was refused with, and :meth:`ExecCredentialPlugin.refresh` knows whether it is still
    the current one."""

    token: str | None = field(default=None, repr=False)
    client_certificate_data: bytes | None = field(default=None, repr=False)
    client_key_data: bytes | None = field(default=None, repr=False)
    #: Timezone-aware; None: valid for the life of the process (or until a 401).
    expiration: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        if self.expiration is None:
            return False
        return (now or datetime.now(UTC)) >= self.expiration


@dataclass(frozen=True)
class ExecConfig:
    """A kubeconfig user's ``exec`` section, validated (:meth:`parse`)."""

    command: str
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    install_hint: str = ""
    provide_cluster_info: bool = False
    interactive_mode: str = "IfAvailable"
    #: ``spec.cluster`` (:func:`exec_cluster_info`), sent only with ``provide_cluster_info``.
    cluster: Mapping[str, Any] | None = None
    timeout: float = DEFAULT_PLUGIN_TIMEOUT
    #: Where it came from, for messages (``<kubeconfig>: user <name>``).
    source: str = ""

    @classmethod
    def parse(
        cls,
        raw: Mapping[str, Any],
        *,
        base_dir: Path,
        cluster: Mapping[str, Any] | None = None,
        source: str = "",
        user: str = "",
    ) -> ExecConfig:
        where = f"{source}: user {user!r}" if source else f"user {user!r}"
        if not isinstance(raw, Mapping):
            raise ExecPluginError(f"{where}: exec is not an object")
        command = str(raw.get("command") or "")
        if not command:
            raise ExecPluginError(f"{where}: command must be specified to use an exec credential plugin")
        api_version = str(raw.get("apiVersion") or "")
        if not api_version:
            raise ExecPluginError(f"{where}: apiVersion must be specified to use an exec credential plugin")
        if api_version not in API_VERSIONS:
            raise ExecPluginError(
                f"{where}: exec plugin apiVersion {api_version!r} is not supported "
                f"(one of {', '.join(API_VERSIONS)})"
            )
        # client-go: interactiveMode is required in v1 and defaults to IfAvailable in v1beta1.
        mode = raw.get("interactiveMode") or ("" if api_version == API_V1 else "IfAvailable")
        if not mode:
            raise ExecPluginError(f"{where}: interactiveMode must be specified with {API_V1}")
        if mode not in INTERACTIVE_MODES:
            raise ExecPluginError(f"{where}: invalid interactiveMode {mode!r}")
        if mode == "Always":
            raise ExecPluginError(
                f"{where}: exec plugin {command!r} has interactiveMode Always: it needs a terminal "
                "on standard input, and dptr runs credential plugins without one (use a plugin, "
                "or plugin flags, that work with interactiveMode Never)"
            )
        args = raw.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ExecPluginError(f"{where}: exec args must be a list of strings")
        env: list[tuple[str, str]] = []
        for entry in raw.get("env") or []:
            if not isinstance(entry, Mapping) or not entry.get("name"):
                raise ExecPluginError(f"{where}: every exec env entry needs a name")
            env.append((str(entry["name"]), str(entry.get("value") or "")))
        # client-go resolves the command against the kubeconfig's directory only when it
        # has a path separator (a bare name is looked up in PATH).
        if os.sep in command and not os.path.isabs(command):
            command = os.path.normpath(os.path.join(os.path.abspath(base_dir), command))
        return cls(
            command=command,
            api_version=api_version,
            args=tuple(args),
            env=tuple(env),
            install_hint=str(raw.get("installHint") or ""),
            provide_cluster_info=bool(raw.get("provideClusterInfo", False)),
            interactive_mode=str(mode),
            cluster=cluster,
            source=where,
        )

    def exec_info(self) -> dict[str, Any]:
        """The ``KUBERNETES_EXEC_INFO`` object."""
        spec: dict[str, Any] = {"interactive": False}
        if self.provide_cluster_info and self.cluster is not None:
            spec["cluster"] = dict(self.cluster)
        return {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}


class ExecCredentialPlugin:
    """The credential of one ``exec`` config, cached per its expiry; thread-safe."""

    def __init__(self, config: ExecConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._cached: ExecCredential | None = None
        #: How many times the plugin ran (successfully or not).
        self.runs = 0

    @property
    def cached(self) -> ExecCredential | None:
        return self._cached

    def get(self) -> ExecCredential:
        """The cached credential, or a new one when there is none or it expired."""
        with self._lock:
            cred = self._cached
            if cred is not None and not cred.expired():
                return cred
            return self._refresh_locked()

    def refresh(self, stale: ExecCredential | None) -> ExecCredential:
        """A credential other than ``stale`` (refused by the API server, or expired): the
        current one when another caller already replaced ``stale``, else a new run."""
        with self._lock:
            cred = self._cached
            if cred is not None and cred is not stale and not cred.expired():
                return cred
            return self._refresh_locked()

    # ---- running ----------------------------------------------------------

    def _refresh_locked(self) -> ExecCredential:
        self._cached = None  # a refused or expired credential is not used again
        cred = self._run()
        self._cached = cred
        log.debug(
            "exec credential plugin %s: new %s, %s",
            self.config.command,
            "token" if cred.token else "client certificate",
            f"expires {cred.expiration.isoformat()}" if cred.expiration else "no expiry",
        )
        return cred

    def _hint(self) -> str:
        return f"\n{self.config.install_hint.strip()}" if self.config.install_hint.strip() else ""

    def _run(self) -> ExecCredential:
        cfg = self.config
        env = dict(os.environ)
        env.update(cfg.env)
        env[EXEC_INFO_ENV] = json.dumps(cfg.exec_info(), separators=(",", ":"))
        self.runs += 1
        try:
            proc = subprocess.Popen(
                [cfg.command, *cfg.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed whole on a timeout
            )
        except FileNotFoundError:
            raise ExecPluginError(
                f"exec credential plugin: executable {cfg.command} not found ({cfg.source}){self._hint()}"
            ) from None
        except OSError as exc:
            raise ExecPluginError(
                f"exec credential plugin {cfg.command} could not be started: {exc.strerror or exc} "
                f"({cfg.source}){self._hint()}"
            ) from None
        try:
            out, err = proc.communicate(timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
                proc.communicate(timeout=5)
            raise ExecPluginError(
                f"exec credential plugin {cfg.command} did not finish within {cfg.timeout:g}s "
                f"({cfg.source}){self._hint()}"
            ) from None
        if proc.returncode != 0:
            how = (
                f"was killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"failed with exit code {proc.returncode}"
            )
            stderr = err.decode("utf-8", "replace").strip()
            if len(stderr) > _STDERR_TAIL:
                stderr = "..." + stderr[-_STDERR_TAIL:]
            said = f": {stderr}" if stderr else ""
            raise ExecPluginError(
                f"exec credential plugin {cfg.command} {how} ({cfg.source}){said}{self._hint()}"
            )
        return self._decode(out)

    def _decode(self, out: bytes) -> ExecCredential:
        cfg = self.config

        def invalid(why: str) -> ExecPluginError:
            # Never the output itself: it holds the secret.
            return ExecPluginError(f"exec credential plugin {cfg.command} printed invalid output: {why}")

        try:
            doc = json.loads(out)
        except ValueError:
            raise invalid(f"not JSON ({len(out)} bytes on stdout)") from None
        if not isinstance(doc, dict):
            raise invalid("not an ExecCredential object")
        if doc.get("apiVersion") != cfg.api_version:
            raise invalid(
                f"the plugin is configured to use API version {cfg.api_version}, "
                f"it returned version {doc.get('apiVersion')!r}"
            )
        if doc.get("kind") != "ExecCredential":
            raise invalid(f"kind {doc.get('kind')!r}, not ExecCredential")
        status = doc.get("status")
        if not isinstance(status, dict):
            raise invalid("no status field")
        token, cert, key = (status.get(k) for k in ("token", "clientCertificateData", "clientKeyData"))
        for name, value in (("token", token), ("clientCertificateData", cert), ("clientKeyData", key)):
            if value is not None and not isinstance(value, str):
                raise invalid(f"status.{name} is not a string")
        if not token and not cert and not key:
            raise invalid("no token and no client certificate/key pair")
        if bool(cert) != bool(key):
            raise invalid("only one of clientCertificateData and clientKeyData")
        cert_data = cert.encode() if cert else None
        key_data = key.encode() if key else None
        if cert_data and key_data:
            try:
                load_cert_chain_data(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_data, key_data)
            except (ssl.SSLError, OSError):
                raise invalid("a client certificate/key pair that does not load") from None
        expiration = None
        stamp = status.get("expirationTimestamp")
        if stamp is not None:
            try:
                expiration = _parse_rfc3339(str(stamp))
            except ValueError:
                raise invalid(f"status.expirationTimestamp {stamp!r} is not an RFC 3339 time") from None
        return ExecCredential(
            token=token or None,
            client_certificate_data=cert_data,
            client_key_data=key_data,
            expiration=expiration,
        )
