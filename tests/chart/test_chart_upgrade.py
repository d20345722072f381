"""The CRD upgrade path, on a control plane of its own: `helm upgrade` from the previous
chart never upgrades crds/, and the documented step (NOTES, docs/install.md) does.

Its own control plane because it puts older CRDs in place, which the other tests on the
shared bed must never see.  The previous chart is read from the repository's history
(a full clone: ci.yml checks out with fetch-depth 0): the last chart before this CRD
change. No version of dptr is released yet, so that chart is a commit, not a tag.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dptr_testbed import binaries
from dptr_testbed.controlplane import Testbed as ControlPlane

from .conftest import CHART, REPO, Helm, unique

pytestmark = pytest.mark.cluster

#: The chart before task pods gained affinity & co. (its CRD prunes jobTemplate.affinity).
PREVIOUS = "82eddb8f42c68af8bde072942bbdb39cbb0d9a11"
#: The step NOTES.txt and docs/install.md give, run as written (from the chart's source).
UPGRADE_CRDS = "kubectl apply --server-side --force-conflicts -f charts/dptr/crds/"


@pytest.fixture(scope="module")
def own_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    bed = ControlPlane(tmp_path_factory.mktemp("upgrade-bed"), nodes=(), kubelet=False)
    bed.start(timeout=240)
    try:
        yield bed
    finally:
        bed.stop()


def _previous_chart(tmp_path: Path) -> Path:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS, "charts/dptr"],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, (
        f"the previous chart ({PREVIOUS[:7]}) is not in this clone's history (a shallow clone?):"
        f" {proc.stderr.decode(errors='replace')}"
    )
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
        archive.extractall(tmp_path / "previous", filter="data")
    return tmp_path / "previous" / "charts" / "dptr"


def _apply(bed: ControlPlane, manifest: str) -> str:
    """kubectl apply's stdout and stderr (the refusal is on stderr)."""
    bins = binaries.Binaries(binaries.bin_dir())
    proc = subprocess.run(
        [str(bins.kubectl), f"--kubeconfig={bed.kubeconfig}", "apply", "-f", "-"],
        input=manifest,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout + proc.stderr


def _probe(name: str, namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "dptr.dev/v1alpha1",
            "kind": "TaskRunner",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "workerGroup": f"wg-{name}",
                "jobTemplate": {
                    "image": "registry.example.com/etl/base:1.0",
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {"key": "pool", "operator": "In", "values": ["etl"]}
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                },
            },
        }
    )


def test_upgrading_from_the_previous_chart_upgrades_the_crds_by_the_documented_step(
    own_bed: ControlPlane, helm_binary: Path, tmp_path: Path
) -> None:
    helm = Helm(helm_binary, own_bed.kubeconfig)
    previous = _previous_chart(tmp_path)
    assert yaml.safe_load((previous / "Chart.yaml").read_text())["version"]
    release, rel_ns, ns = unique("up"), unique("t-up-rel"), unique("t-up-a")
    for name in (rel_ns, ns):
        own_bed.kubectl("create", "namespace", name)
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "operator": {"watch": {"namespaces": [ns]}},
                "taskRunners": [
                    {
                        "name": "etl",
                        "namespace": ns,
                        "spec": {
                            "workerGroup": "wg-etl",
                            "jobTemplate": {"image": "registry.example.com/etl:1"},
                        },
                    }
                ],
            }
        )
    )
    helm.run("install", release, str(previous), "-n", rel_ns, "--values", str(values))
    # The previous CRD has no jobTemplate.affinity: kubectl's strict field validation says so.
    refused = _apply(own_bed, _probe("probe", ns))
    assert "affinity" in refused and "unknown field" in refused, refused

    # helm upgrade alone: the release is upgraded, its CRDs are not (Helm skips crds/).
    helm.run("upgrade", release, str(CHART), "-n", rel_ns, "--values", str(values))
    refused = _apply(own_bed, _probe("probe", ns))
    assert "unknown field" in refused, (
        f"helm upgrade changed the CRDs after all: the docs are wrong ({refused})"
    )

    # The documented step, as NOTES.txt prints it after every install and upgrade.
    notes = helm.run("get", "notes", release, "-n", rel_ns).stdout
    assert UPGRADE_CRDS in notes, notes
    assert UPGRADE_CRDS in (REPO / "docs" / "install.md").read_text()
    command = UPGRADE_CRDS.split()
    assert command[0] == "kubectl"
    own_bed.kubectl(*command[1:-1], str(REPO / command[-1]))
    own_bed.kubectl("apply", "-f", "-", input=_probe("probe", ns))
    kept = json.loads(own_bed.kubectl("get", "taskrunner", "probe", "-n", ns, "-o", "json"))
    assert kept["spec"]["jobTemplate"]["affinity"]["nodeAffinity"], kept["spec"]
    # What the previous chart created is intact, and the release upgrades again cleanly.
    etl = json.loads(own_bed.kubectl("get", "taskrunner", "etl", "-n", ns, "-o", "json"))
    assert etl["spec"]["workerGroup"] == "wg-etl"
    helm.run("upgrade", release, str(CHART), "-n", rel_ns, "--values", str(values))
    assert release in helm.run("list", "-n", rel_ns, "-q").stdout

    # Uninstalling keeps the CRDs (and so the TaskRunner the release did not make).
    helm.run("uninstall", release, "-n", rel_ns)
    assert own_bed.kubectl("get", "crd", "taskrunners.dptr.dev", "-o", "name").strip()
    assert own_bed.kubectl("get", "taskrunner", "probe", "-n", ns, "-o", "name").strip()
