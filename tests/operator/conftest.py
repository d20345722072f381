"""Fixtures for the operator's cluster tests (helpers in op_helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess, namespace_state

from dptr_testbed.controlplane import RunningTestbed


@pytest.fixture
def cluster(crds: RunningTestbed, namespace: str) -> Cluster:
    return Cluster(crds, namespace)


@pytest.fixture
def operator_factory(
    crds: RunningTestbed, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def make(*extra: str) -> OperatorProcess:
        op = OperatorProcess(crds, namespace, tmp_path, list(extra))
        started.append(op)
        return op

    yield make
    for op in started:
        op.stop()
    # Make failures readable: the operator's log goes into the test report.
    for op in started:
        sys.stdout.write(f"\n----- operator log ({op.log_path}) -----\n{op.logs()[-20000:]}\n")
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stdout.write(
            f"\n----- the namespace as the cluster saw it -----\n{namespace_state(crds, namespace)}\n"
        )


@pytest.fixture
def operator(operator_factory: Callable[..., OperatorProcess]) -> OperatorProcess:
    return operator_factory(*QUIET_GRACES).start()
