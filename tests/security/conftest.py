"""Fixtures for the attack tests: the real operator and sidecar on the shared bed, the
local Data Pipeline service and moto's S3, with a canary secret that must never leak.

Each test in this package performs one attack from docs/security.md against the real
code paths and checks what the attacker could get.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.installs import sidecar_rbac

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster, OperatorProcess


@pytest.fixture
def canary() -> str:
    """The TaskRunner's AWS secret key: a value no attacker may ever see."""
    return "CANARY-" + uuid.uuid4().hex


@pytest.fixture
def secure_cluster(crds: RunningTestbed, namespace: str) -> Cluster:
    """The test's namespace with the sidecar's RBAC, from the chart's single source."""
    cluster = Cluster(crds, namespace)
    for obj in sidecar_rbac(namespace):
        cluster.apply(obj)
    return cluster


@pytest.fixture
def start_operator(secure_cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(*extra: str) -> OperatorProcess:
        op = OperatorProcess(secure_cluster.testbed, secure_cluster.namespace, tmp_path, list(extra))
        started.append(op.start())
        return op

    yield start
    for op in started:
        op.stop()
        sys.stdout.write(f"\n----- operator log -----\n{op.logs()[-8000:]}\n")
