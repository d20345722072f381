"""Pure parts of dptr_common.kube: paths, configuration loading, token rotation, errors."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from dptr_common import kube
from dptr_common.kube import (
    ApiError,
    Conflict,
    Forbidden,
    Invalid,
    KubeClient,
    KubeConfig,
    NotFound,
    Unauthorized,
    event_path,
    job_path,
    object_reference,
    pipelinetask_path,
    pod_path,
    taskrunner_path,
)


def test_paths() -> None:
    assert pipelinetask_path("ns") == "/apis/dptr.dev/v1alpha1/namespaces/ns/pipelinetasks"
    assert (
        pipelinetask_path("ns", "a", "status")
        == "/apis/dptr.dev/v1alpha1/namespaces/ns/pipelinetasks/a/status"
    )
    assert taskrunner_path("ns", "r") == "/apis/dptr.dev/v1alpha1/namespaces/ns/taskrunners/r"
    assert job_path("ns", "j") == "/apis/batch/v1/namespaces/ns/jobs/j"
    assert pod_path("ns", "p", "log") == "/api/v1/namespaces/ns/pods/p/log"
    assert event_path("ns") == "/api/v1/namespaces/ns/events"
    assert pod_path("ns", "a/b") == "/api/v1/namespaces/ns/pods/a%2Fb"
    with pytest.raises(ValueError):
        pod_path("ns", None, "log")


def test_object_reference() -> None:
    obj = {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "metadata": {"name": "t", "namespace": "ns", "uid": "u1", "resourceVersion": "5", "labels": {}},
        "spec": {},
    }
    assert object_reference(obj) == {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "name": "t",
        "namespace": "ns",
        "uid": "u1",
        "resourceVersion": "5",
    }
    ref = {"kind": "Pod", "name": "p", "namespace": "ns", "uid": None}
    assert object_reference(ref) == {"kind": "Pod", "name": "p", "namespace": "ns"}


def write_kubeconfig(path: Path, cluster: dict, user: dict, namespace: str | None = None) -> None:
    ctx: dict = {"cluster": "c", "user": "u"}
    if namespace:
        ctx["namespace"] = namespace
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": ctx}],
                "current-context": "ctx",
            }
        )
    )


def test_kubeconfig_json_with_files(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kubeconfig"
    write_kubeconfig(
        cfg_path,
        {"server": "https://127.0.0.1:6443/", "certificate-authority": "pki/ca.crt"},
        {"client-certificate": "/abs/admin.crt", "client-key": "pki/admin.key"},
        namespace="team",
    )
    cfg = KubeConfig.from_kubeconfig(cfg_path)
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.namespace == "team"
    assert cfg.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert cfg.cert_file == "/abs/admin.crt"
    assert cfg.key_file == str(tmp_path / "pki" / "admin.key")
    assert cfg.token is None


def test_kubeconfig_with_data_and_token(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kubeconfig"
    write_kubeconfig(
        cfg_path,
        {"server": "https://k:443", "certificate-authority-data": base64.b64encode(b"PEM").decode()},
        {"token": "abc"},
    )
    cfg = KubeConfig.from_kubeconfig(cfg_path)
    assert cfg.ca_data == "PEM"
    assert cfg.bearer_token() == "abc"
    assert cfg.namespace == "default"


def test_kubeconfig_yaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    cfg_path = tmp_path / "kubeconfig"
    cfg_path.write_text(
        """
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "http://127.0.0.1:8080", insecure-skip-tls-verify: true}
users:
- name: u
  user: {tokenFile: tok}
contexts:
- name: x
  context: {cluster: c, user: u, namespace: ns1}
current-context: x
"""
    )
    (tmp_path / "tok").write_text("t0k\n")
    cfg = KubeConfig.from_kubeconfig(cfg_path)
    assert cfg.insecure
    assert cfg.namespace == "ns1"
    assert cfg.bearer_token() == "t0k"
    client = KubeClient(cfg)
    assert client.namespace == "ns1"


def test_kubeconfig_errors(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kubeconfig"
    cfg_path.write_text(json.dumps({"clusters": [], "contexts": [], "users": []}))
    with pytest.raises(RuntimeError, match="current-context"):
        KubeConfig.from_kubeconfig(cfg_path)
    write_kubeconfig(cfg_path, {"server": "https://k"}, {})
    with pytest.raises(RuntimeError, match="no context named 'nope'"):
        KubeConfig.from_kubeconfig(cfg_path, context="nope")


def test_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("first")
    (tmp_path / "namespace").write_text("jobs\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    cfg = KubeConfig.in_cluster(tmp_path)
    assert cfg.server == "https://[fd00::1]:443"
    assert cfg.namespace == "jobs"
    assert cfg.ca_file is None
    assert cfg.bearer_token() == "first"
    # A projected token is rotated by swapping the file: the new one is picked up.
    new = tmp_path / "token.new"
    new.write_text("second")
    later = time.time() + 5
    os.utime(new, (later, later))
    os.replace(new, tmp_path / "token")
    assert cfg.bearer_token() == "second"


def test_from_env_prefers_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = tmp_path / "kubeconfig"
    write_kubeconfig(cfg_path, {"server": "http://127.0.0.1:1"}, {"token": "x"}, namespace="from-file")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{cfg_path}{os.pathsep}/nonexistent")
    assert KubeClient.from_env().namespace == "from-file"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="no Kubernetes configuration"):
        KubeClient.from_env()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path)
    assert KubeClient.from_env().config.source == "in-cluster"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (404, NotFound),
        (409, Conflict),
        (403, Forbidden),
        (401, Unauthorized),
        (422, Invalid),
        (500, ApiError),
    ],
)
def test_error_mapping(status: int, kind: type[ApiError]) -> None:
    body = {"kind": "Status", "reason": "SomeReason", "message": "the message", "code": status}
    err = KubeClient._error(status, json.dumps(body).encode(), "GET", "/x")
    assert type(err) is kind
    assert (err.status, err.reason, err.message) == (status, "SomeReason", "the message")


def test_error_without_status_body() -> None:
    err = KubeClient._error(404, b"404 page not found", "GET", "/x")
    assert isinstance(err, NotFound)
    assert err.reason == "NotFound"
    assert "page not found" in err.message


def test_bad_server_url() -> None:
    with pytest.raises(ValueError):
        KubeClient(KubeConfig(server="ftp://x"))
