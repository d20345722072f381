"""What the chart installs, for installs without Helm on the bed.

The demo, the tests and the benchmarks install dptr's CRDs and put the sidecar's
ServiceAccount, Role and RoleBinding into a task namespace themselves; they all take
them from here: the CRDs from charts/dptr/crds, the rules from the chart's single source
(charts/dptr/files/sidecar-role.yaml), the sidecar's admission policy from the chart's
own template (rendered with ``helm template``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Protocol

from .waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dptr"
CRD_DIR = CHART / "crds"
SIDECAR_RULES = REPO / "charts" / "dptr" / "files" / "sidecar-role.yaml"
SIDECAR_ACCOUNT = "dptr-sidecar"


class _Kubectl(Protocol):
    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str: ...


def install_crds(bed: _Kubectl) -> None:
    """Apply dptr's CRDs and wait until the API server serves them.  Idempotent (every
    xdist worker may call it): server-side apply, taking over fields if need be."""
    bed.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))

    # Not `kubectl wait --for=condition=Established`: on a CRD just created, before the
    # API server has written any condition, it fails at once (".status.conditions
    # accessor error: <nil>") instead of waiting; a CI run lost 194 tests to it.
    def established() -> bool:
        out = bed.kubectl(
            "get",
            "crd/taskrunners.dptr.dev",
            "crd/pipelinetasks.dptr.dev",
            "-o",
            'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Established")].status}{" "}{end}',
            check=False,
        )
        return out.split() == ["True", "True"]

    wait_for(established, timeout=60, interval=0.2, what="dptr's CRDs Established")


def sidecar_rules() -> list[dict[str, Any]]:
    import yaml

    rules = yaml.safe_load(SIDECAR_RULES.read_text())
    assert isinstance(rules, list), f"{SIDECAR_RULES} must hold a list of PolicyRules"
    return rules


def sidecar_rbac(namespace: str, account: str = SIDECAR_ACCOUNT) -> list[dict[str, Any]]:
    """The sidecar's ServiceAccount, Role and RoleBinding in ``namespace``."""
    meta = {"name": account, "namespace": namespace}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": sidecar_rules(),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    ]


def sidecar_admission_policy() -> str:
    """The chart's ValidatingAdmissionPolicy and its binding for the sidecar's account
    (release ``dptr``), as YAML, rendered by the bed's own helm."""
    from dptr_testbed import binaries

    helm = binaries.Binaries(binaries.bin_dir()).helm
    return subprocess.run(
        [
            str(helm),
            "template",
            "dptr",
            str(CHART),
            "--show-only",
            "templates/sidecar-admission-policy.yaml",
            # The chart's kubeVersion: helm template assumes 1.20 unless told the bed's.
            "--kube-version",
            binaries.KUBERNETES_VERSION,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def install_sidecar_admission_policy(bed: _Kubectl) -> None:
    """Apply the sidecar's admission policy (cluster-scoped; idempotent)."""
    bed.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=sidecar_admission_policy())
