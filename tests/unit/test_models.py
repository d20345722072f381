from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dptr_samples import task_object, task_runner_object
from pydantic import BaseModel, ValidationError

from dptr_common.images import image_allowed
from dptr_common.models import (
    HeartbeatSpec,
    HistoryLimits,
    JobTemplate,
    PipelineTask,
    PipelineTaskSpec,
    PipelineTaskStatus,
    TaskRunner,
    TaskRunnerSpec,
    TaskRunnerStatus,
)
from dptr_common.task import parse_task

CRDS = Path(__file__).resolve().parents[2] / "charts" / "dptr" / "crds"


def _crd(name: str) -> dict[str, Any]:
    return yaml.safe_load((CRDS / name).read_text())  # type: ignore[no-any-return]


def _schema(name: str) -> dict[str, Any]:
    return _crd(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def test_task_runner_from_k8s_minimal_uses_crd_defaults() -> None:
    runner = TaskRunner.from_k8s(task_runner_object())
    spec = runner.spec
    assert spec.worker_group == "wg-etl"
    assert spec.credentials.mode == "PodIdentity"
    assert spec.max_concurrent_tasks == 10
    assert spec.pollers == 2
    assert spec.paused is False
    assert spec.heartbeat.budget_per_second == 8
    assert spec.heartbeat.base_interval_seconds == 60
    assert spec.pass_data_pipeline_credentials is False
    assert spec.history_limits.succeeded == 10 and spec.history_limits.failed == 20
    assert spec.image_policy.allowed_images == []
    assert runner.status.active == 0
    assert runner.owner_reference() == {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "TaskRunner",
        "name": "etl",
        "uid": "9c7e2a1e-0000-4000-8000-000000000001",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_task_runner_full_round_trip() -> None:
    obj = task_runner_object(
        endpointUrl="http://localdp.dptr-system:8080",
        credentials={"mode": "Secret", "secretRef": {"name": "dp-keys"}},
        maxConcurrentTasks=50,
        imagePolicy={"allowedImages": ["registry.example.com/etl/*"]},
    )
    obj["status"] = {
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Polling",
                "lastTransitionTime": "2024-05-01T00:00:00Z",
            }
        ],
        "active": 3,
        "taskrunnerId": "etl-9c7e2a1e",
        "heartbeatIntervalSeconds": 75,
        "counts": {"polled": 5},
        "unknownFutureField": 1,
    }
    runner = TaskRunner.from_k8s(obj)
    assert runner.spec.credentials.secret_ref is not None
    assert runner.spec.credentials.secret_ref.access_key_id_key == "AWS_ACCESS_KEY_ID"
    assert runner.status.taskrunner_id == "etl-9c7e2a1e"
    assert runner.status.condition("Ready") is not None
    wire = runner.to_k8s()
    assert wire["spec"]["endpointUrl"] == "http://localdp.dptr-system:8080"
    assert wire["status"]["taskrunnerId"] == "etl-9c7e2a1e"
    assert wire["status"]["conditions"][0]["lastTransitionTime"] == "2024-05-01T00:00:00Z"
    assert TaskRunner.from_k8s(wire) == runner


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"workerGroup": ""}, "workerGroup"),
        ({"workerGroup": "   "}, "blank"),
        ({"maxConcurrentTasks": 0}, "maxConcurrentTasks"),
        ({"pollers": 17}, "pollers"),
        ({"endpointUrl": "not a url"}, "http(s)"),
        ({"endpointUrl": "ftp://host/x"}, "http(s)"),
        ({"credentials": {"mode": "Magic"}}, "mode"),
        ({"credentials": {"mode": "Secret"}}, "secretRef"),
        ({"credentials": {"mode": "PodIdentity", "secretRef": {"name": "x"}}}, "secretRef"),
        ({"imagePolicy": {"allowedImages": ["reg/*/x"]}}, "'/*' or ':*'"),
        ({"imagePolicy": {"allowedImages": ["registry.example.com/etl*"]}}, "'/*' or ':*'"),
        ({"imagePolicy": {"allowedImages": ["registry.example.com/etl/x\n"]}}, "'/*' or ':*'"),
        ({"jobTemplate": {}}, "image"),
    ],
)
def test_task_runner_rejects_what_the_crd_rejects(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        TaskRunner.from_k8s(task_runner_object(**spec))
    assert fragment in str(info.value)


def test_image_allowed() -> None:
    allowed = ["registry.example.com/etl/*", "docker.io/library/python:3.12"]
    assert image_allowed("registry.example.com/etl/job:1.4", allowed)
    assert image_allowed("docker.io/library/python:3.12", allowed)
    assert image_allowed("python:3.12", allowed)  # normalised as the runtimes do
    assert not image_allowed("docker.io/library/python:3.12-slim", allowed)
    assert not image_allowed("registry.example.com/etlx/job:1", allowed)
    assert not image_allowed("evil.example.com/registry.example.com/etl/x", allowed)
    assert not image_allowed("anything", [])


def test_pipeline_task_spec_from_task_round_trip() -> None:
    task = parse_task(task_object())
    spec = PipelineTaskSpec.from_task(task, task_runner="etl", polled_by="dptr-operator-0")
    assert spec.fields["scriptArgument"] == list(task.script_arguments)
    assert spec.refs["@componentParent"] == [task.component_id]
    assert spec.activity.component_id == task.component_id
    assert spec.report_progress_timeout_seconds == 900
    assert spec.attempt_timeout_seconds == 7200
    wire = spec.to_k8s()
    assert set(wire) >= {"taskRunner", "taskId", "pipelineId", "attemptId", "fields", "refs", "polledAt"}
    assert wire["polledAt"].endswith("Z")
    obj = {
        "apiVersion": "dptr.dev/v1alpha1",
        "kind": "PipelineTask",
        "metadata": {"name": "pt", "namespace": "data", "uid": "u1"},
        "spec": wire,
    }
    pt = PipelineTask.from_k8s(obj)
    assert pt.status.phase == "Pending"
    assert not pt.status.terminal and not pt.status.reported
    rebuilt = pt.spec.to_task()
    for attr in (
        "task_id",
        "command",
        "script_arguments",
        "my_image",
        "inputs",
        "component_id",
        "maximum_retries",
    ):
        assert getattr(rebuilt, attr) == getattr(task, attr)
    assert pt.owner_reference()["kind"] == "PipelineTask"


def test_pipeline_task_status_ledger() -> None:
    status = PipelineTaskStatus.model_validate(
        {
            "phase": "Succeeded",
            "exitCode": 0,
            "heartbeat": {"owner": "sidecar", "lastAt": "2024-05-01T00:00:00Z", "by": "pod-1"},
            "report": {"claimedBy": "pod-1", "status": "FINISHED", "reportedAt": "2024-05-01T00:01:00Z"},
        }
    )
    assert status.terminal and status.reported
    assert status.heartbeat is not None and status.heartbeat.owner == "sidecar"
    with pytest.raises(ValidationError):
        PipelineTaskStatus.model_validate({"phase": "Weird"})
    with pytest.raises(ValidationError):
        PipelineTaskStatus.model_validate({"report": {"status": "DONE"}})


# ----------------------------------------------------------------------------- the CRDs


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for key, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("crd_file", ["taskrunners.yaml", "pipelinetasks.yaml"])
def test_crd_is_structural_and_described(crd_file: str) -> None:
    crd = _crd(crd_file)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["spec"]["group"] == "dptr.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["categories"] == ["dptr"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    for path, node in _walk(_schema(crd_file), "")[1:]:
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if path not in {".metadata"} and not path.endswith(("{}", "[]")):
            assert node.get("description"), f"{path} has no description"
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{path} rule {rule['rule']} has no message"


def test_printer_columns() -> None:
    columns = {
        c["name"]: c["jsonPath"]
        for c in _crd("taskrunners.yaml")["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert list(columns) == ["Worker Group", "Active", "Paused", "Ready", "Age"]
    assert columns["Active"] == ".status.activeSummary"
    columns = {
        c["name"]: c["jsonPath"]
        for c in _crd("pipelinetasks.yaml")["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert list(columns) == ["Pipeline", "Activity", "Phase", "Exit", "Reported", "Age"]


def _properties(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    for part in path:
        schema = schema["properties"][part]
    return schema["properties"]  # type: ignore[no-any-return]


def _aliases(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize(
    ("crd_file", "path", "model"),
    [
        ("taskrunners.yaml", ("spec",), TaskRunnerSpec),
        ("taskrunners.yaml", ("status",), TaskRunnerStatus),
        ("taskrunners.yaml", ("spec", "heartbeat"), HeartbeatSpec),
        ("taskrunners.yaml", ("spec", "historyLimits"), HistoryLimits),
        ("taskrunners.yaml", ("spec", "jobTemplate"), JobTemplate),
        ("pipelinetasks.yaml", ("spec",), PipelineTaskSpec),
        ("pipelinetasks.yaml", ("status",), PipelineTaskStatus),
    ],
)
def test_models_and_crds_have_the_same_fields(
    crd_file: str, path: tuple[str, ...], model: type[BaseModel]
) -> None:
    assert set(_properties(_schema(crd_file), *path)) == _aliases(model)


def test_crd_defaults_match_model_defaults() -> None:
    spec_props = _properties(_schema("taskrunners.yaml"), "spec")
    model = TaskRunnerSpec.model_validate({"workerGroup": "wg", "jobTemplate": {"image": "x"}}).to_k8s()

    def check(props: dict[str, Any], values: dict[str, Any], where: str) -> int:
        checked = 0
        for key, prop in props.items():
            if "default" in prop and prop["default"] != {}:
                assert values.get(key) == prop["default"] or (
                    isinstance(prop["default"], dict) and prop["default"].items() <= values[key].items()
                ), f"{where}.{key}"
                checked += 1
            if "properties" in prop and isinstance(values.get(key), dict):
                checked += check(prop["properties"], values[key], f"{where}.{key}")
        return checked

    assert check(spec_props, model, "spec") >= 11
    secret = _properties(_schema("taskrunners.yaml"), "spec", "credentials", "secretRef")
    assert secret["accessKeyIdKey"]["default"] == "AWS_ACCESS_KEY_ID"
    assert secret["secretAccessKeyKey"]["default"] == "AWS_SECRET_ACCESS_KEY"


def test_pipeline_task_spec_is_immutable_by_cel() -> None:
    rules = _schema("pipelinetasks.yaml")["properties"]["spec"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf", "message": rules[0]["message"]} in rules
    phases = _properties(_schema("pipelinetasks.yaml"), "status")["phase"]["enum"]
    assert phases == ["Pending", "Running", "Succeeded", "Failed", "Canceled", "Lost"]


def test_job_template_volumes_stay_clear_of_dptrs_own() -> None:
    from pydantic import ValidationError

    def runner(**template: Any) -> TaskRunner:
        return TaskRunner.from_k8s(task_runner_object(jobTemplate={"image": "busybox", **template}))

    ok = runner(
        volumes=[{"name": "logs", "emptyDir": {}}],
        volumeMounts=[{"name": "logs", "mountPath": "/var/log/etl"}],
    )
    assert ok.spec.job_template.volume_mounts[0]["mountPath"] == "/var/log/etl"
    for bad in (
        {"volumes": [{"name": "dptr-logs", "emptyDir": {}}]},
        {"volumes": [{"name": "x", "emptyDir": {}}], "volumeMounts": [{"name": "y", "mountPath": "/y"}]},
        {
            "volumes": [{"name": "x", "emptyDir": {}}],
            "volumeMounts": [{"name": "x", "mountPath": "/dptr/logs"}],
        },
        {
            "volumes": [{"name": "x", "emptyDir": {}}],
            "volumeMounts": [{"name": "x", "mountPath": "/a/../dptr"}],
        },
        {
            "volumes": [{"name": "x", "emptyDir": {}}],
            "volumeMounts": [{"name": "x", "mountPath": "relative"}],
        },
        {
            "volumes": [{"name": "x", "emptyDir": {}}],
            "volumeMounts": [{"name": "x", "mountPath": "/var/run/secrets/kubernetes.io"}],
        },
        # A token of the pod's account is an identity: never the task's to mount.
        {"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}]},
        {"volumes": [{"name": "x"}]},
        {"volumes": [{"name": "x", "emptyDir": {}, "configMap": {"name": "c"}}]},
        {"volumes": [{"name": "x", "emptyDir": {}}, {"name": "x", "emptyDir": {}}]},
        {"serviceAccountName": ""},
    ):
        with pytest.raises(ValidationError):
            runner(**bad)


def test_the_job_templates_scheduling_fields_are_typed_where_typos_are_made() -> None:
    """Unknown fields are pruned (or refused, with strict field validation) wherever the
    CRD does not preserve them: up to the affinity terms' lists, never below jobTemplate."""
    template = _properties(_schema("taskrunners.yaml"), "spec", "jobTemplate")
    spec = _schema("taskrunners.yaml")["properties"]["spec"]
    assert not spec.get("x-kubernetes-preserve-unknown-fields")
    assert not spec["properties"]["jobTemplate"].get("x-kubernetes-preserve-unknown-fields")
    affinity = template["affinity"]
    assert set(affinity["properties"]) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}
    for kind, node in affinity["properties"].items():
        assert not node.get("x-kubernetes-preserve-unknown-fields"), kind
        assert set(node["properties"]) == {
            "requiredDuringSchedulingIgnoredDuringExecution",
            "preferredDuringSchedulingIgnoredDuringExecution",
        }, kind
    spread = template["topologySpreadConstraints"]["items"]
    assert not spread.get("x-kubernetes-preserve-unknown-fields")
    assert spread["required"] == ["maxSkew", "topologyKey", "whenUnsatisfiable"]
    assert template["imagePullSecrets"]["items"]["required"] == ["name"]
    assert set(template["imagePullSecrets"]["items"]["properties"]) == {"name"}
    assert (
        template["priorityClassName"]["pattern"]
        == template["imagePullSecrets"]["items"]["properties"]["name"]["pattern"]
    )


def test_taskrunner_id_on_the_spec() -> None:
    runner = TaskRunner.from_k8s(task_runner_object(taskrunnerId="onprem-1"))
    assert runner.spec.taskrunner_id == "onprem-1"
    assert runner.spec.to_k8s()["taskrunnerId"] == "onprem-1"


def test_a_proxy_url_carries_no_credentials() -> None:
    from dptr_common.models import ProxySettings

    assert ProxySettings(https_proxy="http://proxy.internal:3128").configured
    for bad in ("http://user:secret@proxy:3128", "http://proxy:3128\n", "socks5://proxy:1080", "proxy:3128"):
        with pytest.raises(ValidationError):
            ProxySettings(https_proxy=bad)
