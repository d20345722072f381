"""Fixtures for the tests that prove the test bed is real.

``bed`` is one Testbed (control plane plus a kubelet stand-in) per session
(per xdist worker); every test gets its own namespace, so tests stay
independent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from testbed_helpers import Kube, PodEvents

from dptr_testbed.controlplane import Testbed
from dptr_testbed.waiting import wait_for


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    testbed = Testbed(tmp_path_factory.mktemp("bed"))
    # The first start on a loaded 2-core machine can be slow.
    testbed.start(timeout=300)
    try:
        yield testbed
    finally:
        testbed.stop()


@pytest.fixture(scope="session")
def kube(bed: Testbed) -> Kube:
    return Kube(bed)


@pytest.fixture
def ns(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "tb-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    kube.core.create_namespace({"metadata": {"name": name}})
    # Pods are refused until the namespace's default ServiceAccount exists.
    wait_for(
        lambda: kube.core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        timeout=30,
        what="the default ServiceAccount",
        interval=0.3,
    )
    yield name
    kube.core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def pod_events(kube: Kube, ns: str) -> Iterator[PodEvents]:
    events = PodEvents(kube, ns)
    yield events
    events.stop()


@pytest.fixture
def python() -> str:
    """A Python the containers can run (commands run on the host)."""
    return str(Path("/usr/bin/python3") if Path("/usr/bin/python3").exists() else Path(sys.executable))
