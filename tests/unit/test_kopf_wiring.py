"""The kopf wiring: on.event handlers only, which is what lets dptr skip kopf's essences."""

from __future__ import annotations

from typing import Any

import kopf

from dptr_operator.config import OperatorConfig
from dptr_operator.main import NoEssenceStorage, build_registry, configure

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}, "annotations": {"c": "d"}},
    "spec": {"containers": [{"name": "task", "image": "debian", "env": [{"name": "X", "value": "1"}]}]},
    "status": {"phase": "Pending"},
}


def test_the_registry_has_only_watching_handlers() -> None:
    # NoEssenceStorage is only correct while no handler detects changes: on.create,
    # on.update, on.resume, on.delete, on.field, daemons and timers all diff essences.
    registry = build_registry(object(), OperatorConfig(namespaces=["team-a"]))  # type: ignore[arg-type]
    assert not list(registry._changing.get_all_handlers())
    assert not list(registry._spawning.get_all_handlers())
    watched = {handler.id.rpartition(".")[2] for handler in registry._watching.get_all_handlers()}
    assert watched == {"task_runner_event", "pipeline_task_event", "job_event", "pod_event"}


def test_no_essence_is_built_or_kept() -> None:
    storage = NoEssenceStorage()
    body = kopf.Body(POD)
    assert storage.build(body=body, extra_fields=["status.phase"]) == {}
    assert storage.fetch(body=body) is None
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=kopf.BodyEssence())
    assert not patch  # nothing written to the object


def test_configure_installs_it() -> None:
    settings = kopf.OperatorSettings()
    configure(settings, OperatorConfig(namespaces=["team-a"]))
    storage: Any = settings.persistence.diffbase_storage
    assert isinstance(storage, NoEssenceStorage)
    assert settings.posting.enabled is False
    assert settings.scanning.disabled is True
