"""Harness for the chart tests: the bed's helm, a helm bound to the bed, and namespaces.

Every test uses its own release name and namespaces (random suffixes), and cluster-scoped
names derive from the release name, so the tests are safe under pytest-xdist.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dptr_testbed import binaries
from dptr_testbed.controlplane import RunningTestbed

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptr"
FILES = CHART / "files"
KUBE_VERSION = "v1.34.4"


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class Helm:
    """The bed's helm; bound to the bed's kubeconfig when ``kubeconfig`` is set."""

    binary: Path
    kubeconfig: Path | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        # Keep helm's caches and config out of the user's home.
        env["HELM_CACHE_HOME"] = env["HELM_CONFIG_HOME"] = env["HELM_DATA_HOME"] = str(
            Path(os.environ.get("TMPDIR", "/tmp")) / "dptr-helm-home"
        )
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=env, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template(
        self,
        *,
        release: str = "dptr",
        namespace: str = "dptr-system",
        sets: Sequence[str] = (),
        values: Any = None,
        extra: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            *extra,
        ]
        for item in sets:
            args += ["--set", item]
        if values is None:
            return self.run(*args, check=False)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="dptr-values-") as file:
            yaml.safe_dump(values, file)
            file.flush()
            return self.run(*args, "--values", file.name, check=False)

    def render(self, **kw: Any) -> list[dict[str, Any]]:
        proc = self.template(**kw)
        assert proc.returncode == 0, proc.stderr
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    path = binaries.Binaries(binaries.bin_dir()).helm
    # `make test` builds helm first; a missing binary is a broken setup, not a skip.
    assert path.exists(), f"helm is not built ({path}); run `make binaries`"
    return path


@pytest.fixture(scope="session")
def helm(helm_binary: Path) -> Helm:
    return Helm(helm_binary)


@pytest.fixture(scope="session")
def bed_helm(helm_binary: Path, crds: RunningTestbed) -> Helm:
    return Helm(helm_binary, crds.kubeconfig)


@pytest.fixture
def make_namespace(testbed: RunningTestbed) -> Iterator[Callable[..., str]]:
    """``make_namespace(prefix, labels={})`` creates a namespace deleted after the test."""
    made: list[str] = []

    def make(prefix: str = "t-chart", labels: dict[str, str] | None = None) -> str:
        name = unique(prefix)
        manifest = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}},
        }
        testbed.kubectl("create", "-f", "-", input=yaml.safe_dump(manifest))
        made.append(name)
        return name

    yield make
    for name in made:
        testbed.kubectl("delete", "namespace", name, "--wait=false", check=False)


SERVICE_MONITOR_CRD = """\
# A stand-in for prometheus-operator's ServiceMonitor CRD (schema-less), so a chart with
# metrics.serviceMonitor.enabled can be applied to the bed.
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {plural: servicemonitors, singular: servicemonitor, kind: ServiceMonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""


@pytest.fixture(scope="session")
def service_monitor_crd(testbed: RunningTestbed) -> None:
    testbed.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=SERVICE_MONITOR_CRD)
    testbed.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com"
    )


def rules_file(name: str) -> list[dict[str, Any]]:
    rules = yaml.safe_load((FILES / name).read_text())
    assert isinstance(rules, list)
    return rules
