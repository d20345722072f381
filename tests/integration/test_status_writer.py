"""The operator's background status writer against the test bed's real API server."""

from __future__ import annotations

import pytest

from dptr_common.kube import KubeClient, pipelinetask_path
from dptr_common.ledger import heartbeat_status, take_over_heartbeats
from dptr_operator.index import TaskEntry, TaskIndex
from dptr_operator.statuswriter import StatusWriter
from dptr_testbed.controlplane import RunningTestbed

from .test_ledger import create_task, status_of

pytestmark = pytest.mark.cluster


@pytest.fixture
def kube(crds: RunningTestbed) -> KubeClient:
    return KubeClient.from_kubeconfig(crds.kubeconfig, timeout=15)


def indexed(kube: KubeClient, index: TaskIndex, namespace: str) -> tuple[str, tuple[str, str]]:
    name = create_task(kube, namespace)
    entry, _ = index.upsert(TaskEntry.from_k8s(kube.get(pipelinetask_path(namespace, name))))
    return name, entry.key


def test_patches_queued_for_one_task_become_one_write(kube: KubeClient, namespace: str) -> None:
    index = TaskIndex()
    writer = StatusWriter(kube, index)
    name, key = indexed(kube, index, namespace)
    writer.put(key, {"jobName": "job-1", "heartbeat": {"lastError": "Throttled"}})
    writer.put(key, heartbeat_status(by="operator-0"))
    writer.put(key, {"phase": "Pending"})
    assert len(writer) == 1
    writer.start()
    assert writer.flush(15)
    assert (writer.written, writer.coalesced) == (1, 2)
    status = status_of(kube, namespace, name)
    assert (status["jobName"], status["phase"], status["heartbeat"]["by"]) == (
        "job-1",
        "Pending",
        "operator-0",
    )
    assert "lastError" not in status["heartbeat"]  # the later success cleared it
    writer.close()


def test_a_sidecar_takeover_since_the_beat_wins(kube: KubeClient, namespace: str) -> None:
    index = TaskIndex()
    writer = StatusWriter(kube, index)
    name, key = indexed(kube, index, namespace)
    writer.put(key, heartbeat_status(by="operator-0"))
    index.upsert(TaskEntry.from_k8s(kube.get(pipelinetask_path(namespace, name))))
    taken = take_over_heartbeats(kube, namespace, name, owner="sidecar", by="task-pod")
    index.update(key, heartbeat_owner="sidecar")
    writer.start()
    assert writer.flush(15)
    assert writer.written == 0
    assert status_of(kube, namespace, name)["heartbeat"] == taken["heartbeat"]
    writer.close()


def test_ended_and_deleted_tasks(kube: KubeClient, namespace: str) -> None:
    index = TaskIndex()
    writer = StatusWriter(kube, index)
    gone: list[tuple[str, str]] = []
    writer.on_gone = gone.append
    ended, ended_key = indexed(kube, index, namespace)
    deleted, deleted_key = indexed(kube, index, namespace)
    index.update(ended_key, phase="Succeeded")
    kube.delete(pipelinetask_path(namespace, deleted))
    writer.put(ended_key, heartbeat_status(by="operator-0"))
    writer.put(deleted_key, heartbeat_status(by="operator-0"))
    writer.start()
    assert writer.flush(15)
    assert "heartbeat" not in status_of(kube, namespace, ended)
    assert gone == [deleted_key]
    writer.close()
    writer.put(ended_key, heartbeat_status(by="operator-0"))
    assert len(writer) == 0  # closed: nothing more is queued


def test_patches_that_cannot_be_merged_are_written_in_order(kube: KubeClient, namespace: str) -> None:
    index = TaskIndex()
    writer = StatusWriter(kube, index)  # not started: only put() itself writes
    name, key = indexed(kube, index, namespace)
    take_over_heartbeats(kube, namespace, name, owner="operator", by="operator-0")
    writer.put(key, {"heartbeat": None})
    writer.put(key, heartbeat_status(by="operator-1"))
    assert (len(writer), writer.written) == (0, 2)
    heartbeat = status_of(kube, namespace, name)["heartbeat"]
    assert heartbeat["by"] == "operator-1"
    assert "owner" not in heartbeat  # deleted with the object, then a fresh one written
