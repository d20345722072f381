"""Killing a node's stand-in is how tests lose a node: its containers die with
it, the node goes NotReady, and a restarted stand-in reports the lost pods."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from testbed_helpers import Kube

from dptr_testbed import controlplane
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _ready(kube: Kube) -> str:
    node = kube.plain(kube.core.read_node("node-1"))
    return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")


def test_a_killed_stand_in_loses_its_containers_and_its_node(
    bed: controlplane.Testbed, kube: Kube, ns: str
) -> None:
    marker = f"3000.{os.getpid()}{int.from_bytes(os.urandom(2), 'big')}"  # a valid, unique interval
    kube.create_pod(
        ns,
        {
            "metadata": {"name": "victim"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox", "command": ["sleep", marker]}],
            },
        },
    )
    kube.wait_phase(ns, "victim", "Running")
    assert _processes_with(marker)

    bed.stop_node("node-1", kill=True)
    try:
        wait_for(
            lambda: not _processes_with(marker),
            timeout=10,
            what="the container to die with its node",
            interval=0.3,
        )
        # The node lifecycle controller notices the silence (grace period 20 s in the bed).
        wait_for(lambda: _ready(kube) != "True", timeout=90, what="the node to go NotReady", interval=1)
    finally:
        bed.start_node("node-1")

    lost = kube.wait_phase(ns, "victim", "Failed", "Succeeded", timeout=60)
    term = lost["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (137, "ContainerStatusUnknown")

    # The node comes back Ready and untainted, so later tests can schedule.
    def healthy() -> bool:
        node = kube.plain(kube.core.read_node("node-1"))
        return _ready(kube) == "True" and not node["spec"].get("taints")

    wait_for(healthy, timeout=90, what="the node to be Ready and untainted again", interval=1)
