"""Fixtures for the parity tests."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from parity_helpers import WORKER_GROUP, ParityS3

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.databases import DatabaseServer
from dptr_testbed.installs import sidecar_rbac

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess


@pytest.fixture
def parity_s3(s3_endpoint: str, s3_env: dict[str, str], s3_raw: Any, s3_bucket: str) -> ParityS3:
    """The suite's moto S3 fixtures in one: endpoint, process env, boto3 client, a fresh bucket."""
    return ParityS3(endpoint=s3_endpoint, env=s3_env, raw=s3_raw, bucket=s3_bucket)


@pytest.fixture
def node_cluster(crds: RunningTestbed, namespace: str) -> Cluster:
    """The test's namespace with the sidecar's RBAC, from the chart's single source."""
    cluster = Cluster(crds, namespace)
    for obj in sidecar_rbac(namespace):
        cluster.apply(obj)
    return cluster


@pytest.fixture
def parity_operator(node_cluster: Cluster, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The real operator, for the parity tests' namespace."""
    # The sidecar reports; the operator's fallback waits 60 s (scaled) before it would
    # (a loaded CI machine has taken over 10 s from exit to report).
    extra = [*QUIET_GRACES, "--sidecar-report-grace-seconds", "6000"]
    # hostPath stands in for a PersistentVolumeClaim (the kubelet stand-in has no PVCs).
    extra += ["--allow-volume-type", "hostPath", "--allow-volume-type", "persistentVolumeClaim"]
    op = OperatorProcess(node_cluster.testbed, node_cluster.namespace, tmp_path, extra).start()
    try:
        yield op
    finally:
        op.stop()
        sys.stdout.write(f"\n----- operator log -----\n{op.logs()[-8000:]}\n")


@pytest.fixture
def parity_runner(
    node_cluster: Cluster, parity_operator: OperatorProcess, datapipeline: LocalDataPipeline, s3_endpoint: str
) -> Cluster:
    """The real operator serving a TaskRunner (worker group WORKER_GROUP) whose pods use moto's S3."""
    node_cluster.create_runner(
        datapipeline, WORKER_GROUP, s3EndpointUrl=s3_endpoint, jobTemplate={"image": "debian:bookworm"}
    )
    return node_cluster


@pytest.fixture(params=["postgresql", "mariadb"])
def server(request: pytest.FixtureRequest) -> DatabaseServer:
    db: DatabaseServer = request.getfixturevalue("postgres" if request.param == "postgresql" else "mariadb")
    return db


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"
