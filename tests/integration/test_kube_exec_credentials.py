"""kubeconfig exec credential plugins against the test bed's real API server: a real plugin
script (as ``aws eks get-token`` is used against EKS) hands out a ServiceAccount token the
API server accepts, or the bed's admin client certificate.  No mocks.

The plugin counts its runs and records its KUBERNETES_EXEC_INFO in a state directory; its
behaviour (``plugin.json``) is re-read on every run, so a test can change what the next
run prints."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dptr_common.kube import CredentialsUnavailable, KubeClient, KubeConfig, Unauthorized, namespaced_path
from dptr_operator.main import KopfLogin
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.pki import Pki
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

V1 = "client.authentication.k8s.io/v1"
INSTALL_HINT = "kube-token is in the team's tools repository: make install-kube-token"

PLUGIN = f"""#!{sys.executable}
import datetime, json, os, pathlib, sys
state = pathlib.Path(os.environ["PLUGIN_STATE"])
conf = json.loads((state / "plugin.json").read_text())
count = state / "count"
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
(state / f"exec-info-{{n}}.json").write_text(os.environ.get("KUBERNETES_EXEC_INFO", ""))
if conf.get("exit"):
    sys.stderr.write("kube-token: cannot reach the identity provider\\n")
    sys.exit(conf["exit"])
status = {{}}
tokens = conf.get("tokens") or []
if tokens:
    status["token"] = tokens[min(n, len(tokens)) - 1]
certs = conf.get("certs") or []
if certs:
    cert, key = certs[min(n, len(certs)) - 1]
    status["clientCertificateData"] = pathlib.Path(cert).read_text()
    status["clientKeyData"] = pathlib.Path(key).read_text()
if conf.get("ttl") is not None:
    at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=conf["ttl"])
    status["expirationTimestamp"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({{"apiVersion": "{V1}", "kind": "ExecCredential", "status": status}}))
"""


class Plugin:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.state.mkdir()
        path = root / "plugins" / "kube-token"
        path.parent.mkdir()
        path.write_text(PLUGIN)
        path.chmod(0o755)

    def configure(self, **conf: Any) -> None:
        (self.state / "plugin.json").write_text(json.dumps(conf))

    @property
    def runs(self) -> int:
        count = self.state / "count"
        return int(count.read_text()) if count.exists() else 0

    def exec_info(self, run: int) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.state / f"exec-info-{run}.json").read_text())
        return info


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def bed_kubeconfig(testbed: RunningTestbed) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(testbed.kubeconfig.read_text())
    return doc


def exec_kubeconfig(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, path: Path, *, cluster_info: bool = False
) -> Path:
    """A kubeconfig for the bed whose user is the plugin, named by a relative path."""
    cluster = dict(bed_kubeconfig(testbed)["clusters"][0]["cluster"])
    cluster["extensions"] = [
        {"name": "client.authentication.k8s.io/exec", "extension": {"audience": "dptr-test"}}
    ]
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "bed", "cluster": cluster}],
                "users": [
                    {
                        "name": "plugged",
                        "user": {
                            "exec": {
                                "apiVersion": V1,
                                "command": "./plugins/kube-token",
                                "args": ["--cluster", "bed"],
                                "env": [{"name": "PLUGIN_STATE", "value": str(plugin.state)}],
                                "interactiveMode": "Never",
                                "installHint": INSTALL_HINT,
                                "provideClusterInfo": cluster_info,
                            }
                        },
                    }
                ],
                "contexts": [
                    {"name": "bed", "context": {"cluster": "bed", "user": "plugged", "namespace": namespace}}
                ],
                "current-context": "bed",
            }
        )
    )
    return path


def service_account_token(testbed: RunningTestbed, namespace: str, name: str = "plugged") -> str:
    """A real token for a ServiceAccount that may edit the namespace."""
    testbed.kubectl("create", "serviceaccount", name, "-n", namespace)
    testbed.kubectl(
        "create",
        "rolebinding",
        name,
        "-n",
        namespace,
        "--clusterrole=edit",
        f"--serviceaccount={namespace}:{name}",
    )
    return testbed.kubectl("create", "token", name, "-n", namespace, "--duration=10m").strip()


def whoami(client: KubeClient) -> str:
    review = client.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    return str(review["status"]["userInfo"]["username"])


def cm_path(namespace: str, name: str | None = None) -> str:
    return namespaced_path("api/v1", "configmaps", namespace, name)


def test_token_cached_until_it_expires(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    token = service_account_token(testbed, namespace)
    plugin.configure(tokens=[token], ttl=4)
    client = KubeClient.from_kubeconfig(exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig"))
    assert whoami(client) == f"system:serviceaccount:{namespace}:plugged"
    client.create(cm_path(namespace), {"metadata": {"name": "via-plugin"}, "data": {"k": "v"}})
    assert client.get(cm_path(namespace, "via-plugin"))["data"] == {"k": "v"}
    assert plugin.runs == 1  # cached while valid
    info = plugin.exec_info(1)
    assert info == {"apiVersion": V1, "kind": "ExecCredential", "spec": {"interactive": False}}

    time.sleep(4.5)
    client.list(cm_path(namespace))
    assert plugin.runs == 2  # expired: the plugin ran again
    client.list(cm_path(namespace))
    assert plugin.runs == 2


def test_token_without_expiry_runs_once(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    plugin.configure(tokens=[service_account_token(testbed, namespace)])
    client = KubeClient.from_kubeconfig(exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig"))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                client.list(cm_path(namespace))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert plugin.runs == 1


def test_401_runs_the_plugin_again_and_retries_once(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    token = service_account_token(testbed, namespace)
    plugin.configure(tokens=["not-a-token-the-server-knows", token])
    kubeconfig = exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig")
    client = KubeClient.from_kubeconfig(kubeconfig)
    assert [i["metadata"]["name"] for i in client.list(cm_path(namespace))] == ["kube-root-ca.crt"]
    assert plugin.runs == 2  # the bogus token got a 401, the second run's token worked
    client.list(cm_path(namespace))
    assert plugin.runs == 2

    # A plugin that keeps printing a refused token: one re-run, then the 401 is the caller's.
    plugin.configure(tokens=["not-a-token-the-server-knows"])
    again = KubeClient.from_kubeconfig(kubeconfig)
    with pytest.raises(Unauthorized):
        again.list(cm_path(namespace))
    assert plugin.runs == 4


def test_failing_plugin_names_the_install_hint(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    plugin.configure(exit=1)
    client = KubeClient.from_kubeconfig(exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig"))
    with pytest.raises(CredentialsUnavailable) as failed:
        client.list(cm_path(namespace))
    message = str(failed.value)
    assert "kube-token failed with exit code 1" in message
    assert "cannot reach the identity provider" in message
    assert INSTALL_HINT in message
    # It recovers once the plugin works.
    plugin.configure(tokens=[service_account_token(testbed, namespace)])
    client.list(cm_path(namespace))


def test_cluster_info_is_provided(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    plugin.configure(tokens=[service_account_token(testbed, namespace)])
    client = KubeClient.from_kubeconfig(
        exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig", cluster_info=True)
    )
    client.list(cm_path(namespace))
    spec = plugin.exec_info(1)["spec"]
    ca = Path(bed_kubeconfig(testbed)["clusters"][0]["cluster"]["certificate-authority"])
    assert spec == {
        "interactive": False,
        "cluster": {
            "server": testbed.server,
            "certificate-authority-data": base64.b64encode(ca.read_bytes()).decode(),
            "config": {"audience": "dptr-test"},
        },
    }
    # What a plugin would do with it: talk to the cluster with the CA it was given.
    cluster = spec["cluster"]
    with_info = KubeClient(
        KubeConfig(
            server=cluster["server"],
            ca_data=base64.b64decode(cluster["certificate-authority-data"]).decode(),
            token=plugin_token(plugin),
        )
    )
    assert with_info.get("/version")["gitVersion"].startswith("v1.")


def plugin_token(plugin: Plugin) -> str:
    tokens: list[str] = json.loads((plugin.state / "plugin.json").read_text())["tokens"]
    return tokens[0]


def test_client_certificates_from_the_plugin_and_their_rotation(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    user = bed_kubeconfig(testbed)["users"][0]["user"]
    admin = (user["client-certificate"], user["client-key"])
    other = Pki(testbed.state_dir / "pki").issue("exec-credential-test", cn="dptr-exec-test", client=True)
    plugin.configure(certs=[admin, (str(other.cert), str(other.key))], ttl=3)
    client = KubeClient.from_kubeconfig(exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig"))
    assert whoami(client) == "dptr-testbed-admin"
    assert whoami(client) == "dptr-testbed-admin"
    assert plugin.runs == 1
    time.sleep(3.5)
    # A new certificate after the expiry: the kept-alive connection, made with the old one,
    # is replaced.
    assert whoami(client) == "dptr-exec-test"
    assert plugin.runs == 2


def test_kopf_login_credentials_are_accepted(
    testbed: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    """What the operator hands kopf: the plugin's token and its expiry, and fresh ones when
    kopf logs in again; checked with a plain HTTPS call carrying them."""
    token = service_account_token(testbed, namespace)
    second = testbed.kubectl("create", "token", "plugged", "-n", namespace, "--duration=10m").strip()
    plugin.configure(tokens=[token, second], ttl=300)
    config = KubeConfig.from_kubeconfig(exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig"))
    login = KopfLogin(config)
    for expected in (token, second):
        info = login.connection_info()
        assert info.token == expected and info.expiration is not None
        as_kopf = KubeClient(KubeConfig(server=info.server, ca_file=str(info.ca_path), token=info.token))
        assert whoami(as_kopf) == f"system:serviceaccount:{namespace}:plugged"
    assert plugin.runs == 2


def test_operator_runs_on_an_exec_plugin(
    crds: RunningTestbed, plugin: Plugin, namespace: str, tmp_path: Path
) -> None:
    """The operator, out of cluster with ``--kubeconfig``, on short-lived plugin tokens:
    it becomes ready (Lease, kopf's watches) and stays so past several expiries, kopf
    logging in again with the plugin's next token."""
    testbed = crds
    token = service_account_token(testbed, namespace, "operator")
    binding = f"dptr-exec-{namespace}"[:63]
    testbed.kubectl(
        "create",
        "clusterrolebinding",
        binding,
        "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:operator",
    )
    plugin.configure(tokens=[token], ttl=3)
    kubeconfig = exec_kubeconfig(testbed, plugin, namespace, tmp_path / "kubeconfig")
    log_path = tmp_path / "operator.log"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dptr_operator.cli",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
            "--identity",
            "op-exec",
            "--http-port",
            "0",
            # Watches re-opened every 2 s: kopf makes requests, so sees its credentials expire.
            "--watch-server-timeout",
            "2",
            "--watch-client-timeout",
            "5",
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            match = re.search(r"http port (\d+)", log_path.read_text(errors="replace"))
            if not match:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/readyz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=60, interval=0.3, what="the operator to be ready")
        first = plugin.runs
        time.sleep(8)  # past two expiries: the Lease renewals and kopf's re-logins run it again
        assert ready(), log_path.read_text()
        assert plugin.runs > first
        log = log_path.read_text(errors="replace")
        assert "Unauthorized" not in log and "LoginError" not in log and "ExecPlugin" not in log, log
        assert "Re-authentication has finished" in log, log  # kopf logged in again after an expiry
        assert token not in log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        testbed.kubectl("delete", "clusterrolebinding", binding, check=False)
