"""The bed's binaries report the pinned release, not v0.0.0-master."""

from __future__ import annotations

import json
import subprocess

import pytest

from dptr_testbed import binaries
from dptr_testbed.controlplane import RunningTestbed

pytestmark = pytest.mark.cluster


def test_kubectl_and_server_report_the_pinned_release(testbed: RunningTestbed) -> None:
    versions = json.loads(testbed.kubectl("version", "-o", "json"))
    assert versions["clientVersion"]["gitVersion"] == binaries.KUBERNETES_VERSION
    assert versions["serverVersion"]["gitVersion"] == binaries.KUBERNETES_VERSION


def test_helm_sees_the_server_version(testbed: RunningTestbed) -> None:
    bins = binaries.Binaries(binaries.bin_dir())
    out = subprocess.run(
        [str(bins.helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True, check=True
    ).stdout
    assert out == binaries.HELM_VERSION
    # helm reads the cluster's version through discovery; a template that
    # prints .Capabilities.KubeVersion proves it sees the real one.
    chart = testbed.state_dir.parent / "version-probe"
    (chart / "templates").mkdir(parents=True, exist_ok=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: version-probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\ndata: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    rendered = subprocess.run(
        [
            str(bins.helm),
            "template",
            "probe",
            str(chart),
            "--kubeconfig",
            str(testbed.kubeconfig),
            "--validate",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"kube: '{binaries.KUBERNETES_VERSION}'" in rendered
