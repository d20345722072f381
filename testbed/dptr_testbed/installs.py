"""What the chart installs for the sidecar, for installs without Helm on the bed.

The demo and the tests put the sidecar's ServiceAccount, Role and RoleBinding
into a task namespace themselves; they all take them from here, and the rules
from the chart's single source (charts/dptr/files/sidecar-role.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "charts" / "dptr" / "crds"
SIDECAR_RULES = REPO / "charts" / "dptr" / "files" / "sidecar-role.yaml"
SIDECAR_ACCOUNT = "dptr-sidecar"


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
