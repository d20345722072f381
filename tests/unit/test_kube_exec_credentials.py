"""kubeconfig exec credential plugins (dptr_common.execcred): the configuration rules, the
plugin's input and output, caching, errors, and KubeClient and kopf's login using them.

The plugin is a real executable (a Python script in tmp_path); the API server here is a
local HTTP stand-in that accepts one token (tests/integration/test_kube_exec_credentials.py
runs the same against the test bed's real API server)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dptr_common.execcred import (
    ExecConfig,
    ExecCredential,
    ExecCredentialPlugin,
    ExecPluginError,
    _parse_rfc3339,
)
from dptr_common.kube import ApiUnavailable, CredentialsUnavailable, KubeClient, KubeConfig, Unauthorized

V1 = "client.authentication.k8s.io/v1"
V1BETA1 = "client.authentication.k8s.io/v1beta1"

PLUGIN = f"""#!{sys.executable}
import datetime, json, os, pathlib, sys, time
state = pathlib.Path(os.environ["PLUGIN_STATE"])
conf = json.loads((state / "plugin.json").read_text())
count = state / "count"
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
(state / f"exec-info-{{n}}.json").write_text(os.environ.get("KUBERNETES_EXEC_INFO", ""))
(state / f"stdin-{{n}}").write_text(sys.stdin.read())
time.sleep(conf.get("sleep", 0))
if conf.get("stderr"):
    sys.stderr.write(conf["stderr"])
if conf.get("exit"):
    sys.exit(conf["exit"])
if "raw" in conf:
    sys.stdout.write(conf["raw"])
    sys.exit(0)
tokens = conf.get("tokens") or []
status = {{}}
if tokens:
    status["token"] = tokens[min(n, len(tokens)) - 1]
if conf.get("cert"):
    status["clientCertificateData"] = pathlib.Path(conf["cert"]).read_text()
    status["clientKeyData"] = pathlib.Path(conf["key"]).read_text()
if conf.get("ttl") is not None:
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=conf["ttl"])
    status["expirationTimestamp"] = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
print(json.dumps({{"apiVersion": conf.get("apiVersion", "{V1}"), "kind": "ExecCredential", "status": status}}))
"""


class Plugin:
    """The plugin script, its state directory (counter, recorded KUBERNETES_EXEC_INFO) and
    its behaviour (``plugin.json``, re-read on every run)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir()
        self.path = root / "bin" / "credential-plugin"
        self.path.parent.mkdir()
        self.path.write_text(PLUGIN)
        self.path.chmod(0o755)
        self.configure(tokens=["good"])

    def configure(self, **conf: Any) -> None:
        (self.state / "plugin.json").write_text(json.dumps(conf))

    @property
    def runs(self) -> int:
        count = self.state / "count"
        return int(count.read_text()) if count.exists() else 0

    def exec_info(self, run: int) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.state / f"exec-info-{run}.json").read_text())
        return result

    def exec_section(self, **more: Any) -> dict[str, Any]:
        section: dict[str, Any] = {
            "apiVersion": V1,
            "command": "./bin/credential-plugin",  # relative to the kubeconfig's directory
            "env": [{"name": "PLUGIN_STATE", "value": str(self.state)}],
            "interactiveMode": "Never",
            "installHint": "install credential-plugin: see the team wiki",
        }
        section.update(more)
        return section


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def write_kubeconfig(
    path: Path, server: str, exec_section: dict[str, Any], cluster: dict[str, Any] | None = None
) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
                "users": [{"name": "u", "user": {"exec": exec_section}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
                "current-context": "x",
            }
        )
    )
    return path


def exec_config(plugin: Plugin, **more: Any) -> ExecConfig:
    return ExecConfig.parse(plugin.exec_section(**more), base_dir=plugin.root, source="kc", user="u")


# --------------------------------------------------------------------------- configuration


def test_command_paths_resolve_like_client_go(plugin: Plugin) -> None:
    assert exec_config(plugin).command == str(plugin.root / "bin" / "credential-plugin")
    # A bare name is looked up in PATH; an absolute path is kept.
    assert exec_config(plugin, command="aws").command == "aws"
    assert exec_config(plugin, command="/usr/local/bin/aws").command == "/usr/local/bin/aws"


def test_configuration_rules(plugin: Plugin) -> None:
    def refused(match: str, **more: Any) -> None:
        with pytest.raises(ExecPluginError, match=match):
            exec_config(plugin, **more)

    refused("apiVersion must be specified", apiVersion="")
    refused("not supported", apiVersion="client.authentication.k8s.io/v1alpha1")
    refused("command must be specified", command="")
    refused("interactiveMode must be specified", interactiveMode=None)
    refused("invalid interactiveMode", interactiveMode="Sometimes")
    refused("interactiveMode Always: it needs a terminal", interactiveMode="Always")
    refused("needs a name", env=[{"value": "x"}])
    refused("list of strings", args="--region us-east-1")
    # v1beta1 defaults interactiveMode to IfAvailable.
    beta = exec_config(plugin, apiVersion=V1BETA1, interactiveMode=None)
    assert beta.interactive_mode == "IfAvailable"


def test_kubeconfig_exec_and_static_credentials(plugin: Plugin, tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kubeconfig", "https://k:6443", plugin.exec_section())
    cfg = KubeConfig.from_kubeconfig(path)
    assert cfg.exec_config is not None and cfg.exec_plugin is not None
    assert cfg.exec_config.command == str(plugin.root / "bin" / "credential-plugin")
    assert "good" not in repr(cfg.credentials())  # tokens stay out of reprs
    # As in client-go, a token (or certificate) in the same user wins over exec.
    doc = json.loads(path.read_text())
    doc["users"][0]["user"]["token"] = "static"
    path.write_text(json.dumps(doc))
    static = KubeConfig.from_kubeconfig(path)
    assert static.exec_plugin is None and static.credentials().token == "static"
    assert plugin.runs == 1  # only the first config's credentials() ran it


def test_exec_info_with_and_without_cluster_info(plugin: Plugin, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n")
    cluster = {
        "certificate-authority": "ca.crt",
        "tls-server-name": "api.internal",
        "extensions": [
            {"name": "other", "extension": {"no": 1}},
            {"name": "client.authentication.k8s.io/exec", "extension": {"clusterName": "prod"}},
        ],
    }
    path = write_kubeconfig(
        tmp_path / "kubeconfig", "https://k:6443", plugin.exec_section(provideClusterInfo=True), cluster
    )
    KubeConfig.from_kubeconfig(path).credentials()
    info = plugin.exec_info(1)
    assert info == {
        "apiVersion": V1,
        "kind": "ExecCredential",
        "spec": {
            "interactive": False,
            "cluster": {
                "server": "https://k:6443",
                "tls-server-name": "api.internal",
                "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
                "config": {"clusterName": "prod"},
            },
        },
    }
    assert (plugin.state / "stdin-1").read_text() == ""  # stdin is never passed

    path = write_kubeconfig(
        tmp_path / "kubeconfig",
        "https://k:6443",
        plugin.exec_section(apiVersion=V1BETA1),
        {"insecure-skip-tls-verify": True},
    )
    plugin.configure(tokens=["good"], apiVersion=V1BETA1)
    KubeConfig.from_kubeconfig(path).credentials()
    assert plugin.exec_info(2) == {
        "apiVersion": V1BETA1,
        "kind": "ExecCredential",
        "spec": {"interactive": False},
    }


# --------------------------------------------------------------------------- output and errors


def test_rfc3339() -> None:
    assert _parse_rfc3339("2018-03-05T17:30:20-08:00") == datetime(2018, 3, 6, 1, 30, 20, tzinfo=UTC)
    assert _parse_rfc3339("2024-01-02T03:04:05.123456789Z").microsecond == 123456
    for bad in ("2024-01-02", "2024-01-02T03:04:05", "tomorrow"):
        with pytest.raises(ValueError):
            _parse_rfc3339(bad)


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"raw": "token: secret-token"}, "not JSON"),
        ({"raw": "[]"}, "not an ExecCredential object"),
        ({"tokens": ["secret-token"], "apiVersion": V1BETA1}, "configured to use API version .*/v1, "),
        ({"raw": json.dumps({"apiVersion": V1, "kind": "Secret", "status": {"token": "t"}})}, "kind"),
        ({"raw": json.dumps({"apiVersion": V1, "kind": "ExecCredential"})}, "no status"),
        ({"raw": json.dumps({"apiVersion": V1, "kind": "ExecCredential", "status": {}})}, "no token"),
        (
            {
                "raw": json.dumps(
                    {"apiVersion": V1, "kind": "ExecCredential", "status": {"clientKeyData": "k"}}
                )
            },
            "only one of",
        ),
        (
            {
                "raw": json.dumps(
                    {
                        "apiVersion": V1,
                        "kind": "ExecCredential",
                        "status": {"token": "secret-token", "expirationTimestamp": "soon"},
                    }
                )
            },
            "not an RFC 3339 time",
        ),
    ],
)
def test_invalid_output(plugin: Plugin, conf: dict[str, Any], match: str) -> None:
    plugin.configure(**conf)
    with pytest.raises(ExecPluginError, match=match) as refused:
        ExecCredentialPlugin(exec_config(plugin)).get()
    assert "credential-plugin" in str(refused.value)
    assert "secret-token" not in str(refused.value)


def test_failing_missing_and_slow_plugins(plugin: Plugin) -> None:
    plugin.configure(exit=1, stderr="no AWS credentials")
    with pytest.raises(ExecPluginError) as failed:
        ExecCredentialPlugin(exec_config(plugin)).get()
    message = str(failed.value)
    assert "credential-plugin failed with exit code 1" in message
    assert "no AWS credentials" in message
    assert "install credential-plugin: see the team wiki" in message

    with pytest.raises(ExecPluginError, match=r"executable .*/bin/nope not found") as missing:
        ExecCredentialPlugin(exec_config(plugin, command="./bin/nope")).get()
    assert "see the team wiki" in str(missing.value)

    plugin.configure(tokens=["good"], sleep=30)
    slow = ExecCredentialPlugin(dataclasses.replace(exec_config(plugin), timeout=0.5))
    started = time.monotonic()
    with pytest.raises(ExecPluginError, match=r"did not finish within 0.5s"):
        slow.get()
    assert time.monotonic() - started < 10


# --------------------------------------------------------------------------- caching


def test_cached_until_expiry_and_forever_without_one(plugin: Plugin) -> None:
    plugin.configure(tokens=["t1", "t2", "t3"], ttl=1.5)
    runner = ExecCredentialPlugin(exec_config(plugin))
    first = runner.get()
    assert first.token == "t1" and first.expiration is not None
    assert first.expiration > datetime.now(UTC)
    assert runner.get() is first and plugin.runs == 1
    time.sleep(1.6)
    assert runner.get().token == "t2" and plugin.runs == 2

    plugin.configure(tokens=["forever"])
    (plugin.state / "count").unlink()
    runner = ExecCredentialPlugin(exec_config(plugin))
    for _ in range(5):
        assert runner.get().token == "forever"
    assert plugin.runs == 1


def test_refresh_runs_once_for_a_stale_credential(plugin: Plugin) -> None:
    plugin.configure(tokens=["t1", "t2", "t3"])
    runner = ExecCredentialPlugin(exec_config(plugin))
    first = runner.get()
    second = runner.refresh(first)
    assert second.token == "t2" and plugin.runs == 2
    # Another caller refused with the first one: already replaced, no run.
    assert runner.refresh(first) is second and plugin.runs == 2
    assert runner.refresh(ExecCredential(token="x")) is second


def test_concurrent_callers_share_one_run(plugin: Plugin) -> None:
    plugin.configure(tokens=["t1"], sleep=0.5)
    runner = ExecCredentialPlugin(exec_config(plugin))
    seen: list[str | None] = []
    threads = [threading.Thread(target=lambda: seen.append(runner.get().token)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["t1"] * 8
    assert plugin.runs == 1


# --------------------------------------------------------------------------- KubeClient and kopf


class _ApiStandIn(http.server.BaseHTTPRequestHandler):
    """Accepts ``Bearer good`` only (a 401 Status otherwise), and records what it saw."""

    accepted = "Bearer good"
    seen: list[str | None] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        type(self).seen.append(auth)
        if auth == self.accepted:
            code, body = 200, {"kind": "Namespace", "metadata": {"name": "ns"}}
        else:
            code, body = (
                401,
                {"kind": "Status", "reason": "Unauthorized", "code": 401, "message": "Unauthorized"},
            )
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    _ApiStandIn.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ApiStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_client_sends_the_token_and_reruns_the_plugin_after_a_401(
    plugin: Plugin, api: str, tmp_path: Path
) -> None:
    plugin.configure(tokens=["bogus", "good"])
    client = KubeClient.from_kubeconfig(write_kubeconfig(tmp_path / "kc", api, plugin.exec_section()))
    assert client.get("/api/v1/namespaces/ns")["metadata"]["name"] == "ns"
    assert _ApiStandIn.seen == ["Bearer bogus", "Bearer good"]
    assert plugin.runs == 2
    client.get("/api/v1/namespaces/ns")
    assert plugin.runs == 2  # cached


def test_client_gives_up_after_one_retry(plugin: Plugin, api: str, tmp_path: Path) -> None:
    plugin.configure(tokens=["bogus"])
    client = KubeClient.from_kubeconfig(write_kubeconfig(tmp_path / "kc", api, plugin.exec_section()))
    with pytest.raises(Unauthorized):
        client.get("/api/v1/namespaces/ns")
    assert plugin.runs == 2 and len(_ApiStandIn.seen) == 2


def test_client_plugin_failure_is_unavailable(plugin: Plugin, api: str, tmp_path: Path) -> None:
    plugin.configure(exit=3)
    client = KubeClient.from_kubeconfig(write_kubeconfig(tmp_path / "kc", api, plugin.exec_section()))
    with pytest.raises(CredentialsUnavailable) as failed:
        client.get("/api/v1/namespaces/ns")
    assert isinstance(failed.value, ApiUnavailable)
    assert failed.value.reason == "ExecPluginFailed"
    assert "exit code 3" in failed.value.message and "team wiki" in failed.value.message
    assert client.unreachable_since is not None
    assert _ApiStandIn.seen == []  # nothing was sent
    plugin.configure(tokens=["good"])
    client.get("/api/v1/namespaces/ns")  # a failed run is not cached
    assert client.unreachable_since is None


def test_kopf_login_gets_the_plugins_credential_and_its_expiry(plugin: Plugin, tmp_path: Path) -> None:
    from dptr_operator.main import KopfLogin

    plugin.configure(tokens=["t1", "t2", "t3"], ttl=600)
    cfg = KubeConfig.from_kubeconfig(
        write_kubeconfig(tmp_path / "kc", "https://k:6443", plugin.exec_section())
    )
    login = KopfLogin(cfg)
    info = login.connection_info()
    assert (info.token, info.scheme, info.server) == ("t1", "Bearer", "https://k:6443")
    assert info.expiration is not None
    assert timedelta(seconds=590) < info.expiration - datetime.now(UTC) <= timedelta(seconds=600)
    assert cfg.credentials().token == "t1" and plugin.runs == 1  # shared with dptr's client
    # kopf logs in again only after a 401 or an expiry: a fresh credential.
    assert login.connection_info().token == "t2" and plugin.runs == 2
    # ...unless dptr's client already replaced it after its own 401: no second run.
    cfg.credentials(stale=cfg.credentials())
    assert plugin.runs == 3
    assert login.connection_info().token == "t3" and plugin.runs == 3


def test_token_file_is_reread_after_a_401(api: str, tmp_path: Path) -> None:
    """The token-file path shares the retry: a token rotated unseen is re-read after a 401."""
    token_file = tmp_path / "token"
    token_file.write_text("bogu")
    client = KubeClient(KubeConfig(server=api, token_file=str(token_file)))
    with pytest.raises(Unauthorized):
        client.get("/api/v1/namespaces/ns")
    assert _ApiStandIn.seen == ["Bearer bogu", "Bearer bogu"]  # re-read once, still refused
    # Rewritten in place, same size and mtime: the stat check misses it, the 401 does not.
    stat = token_file.stat()
    token_file.write_text("good")
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _ApiStandIn.seen.clear()
    assert client.get("/api/v1/namespaces/ns")["metadata"]["name"] == "ns"
    assert _ApiStandIn.seen == ["Bearer bogu", "Bearer good"]
