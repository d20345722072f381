"""The proxy setting reaches dptr's containers (and the task's only when asked)."""

from __future__ import annotations

from typing import Any

from dptr_samples import pipeline_task_owner, set_attempt_fields, task_object, task_runner_object
from kubelet_view import seen

from dptr_common.models import DEFAULT_NO_PROXY, ProxySettings, TaskRunner
from dptr_common.render import TASK_CONTAINER, render_job
from dptr_common.task import parse_task
from dptr_operator.config import parse_args
from dptr_operator.tenancy import TenancyPolicy

OPERATORS = ProxySettings(https_proxy="http://proxy.internal:3128")


def _job(runner_spec: dict[str, Any] | None = None, **fields: str) -> dict[str, Any]:
    given = {"command": "true", **fields}
    listed = [{"key": k, "stringValue": v} for k, v in given.items() if v]
    task = parse_task(
        set_attempt_fields(task_object(), [{"key": "type", "stringValue": "ShellCommandActivity"}, *listed])
    )
    return render_job(
        task,
        TaskRunner.from_k8s(task_runner_object(**(runner_spec or {}))),
        sidecar_image="dptr:1",
        namespace="data",
        owner=pipeline_task_owner(),
        proxy=OPERATORS,
    )


def _envs(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return {
        c["name"]: {e["name"]: e.get("value") for e in seen(c).get("env", [])}
        for c in pod.get("initContainers", []) + pod["containers"]
    }


def test_the_operators_proxy_reaches_every_dptr_container_and_not_the_task() -> None:
    envs = _envs(_job(stdout="s3://b/out", scriptUri="s3://b/script.sh", command=""))
    for name, env in envs.items():
        if name == TASK_CONTAINER:
            assert not {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "NO_PROXY"} & set(env), env
        else:
            assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.internal:3128", name
            assert env["NO_PROXY"] == env["no_proxy"] == DEFAULT_NO_PROXY
            assert "HTTP_PROXY" not in env
    assert {"dptr-sidecar", "dptr-fetch-script"} <= set(envs)


def test_a_taskrunners_proxy_wins_and_may_reach_the_task() -> None:
    proxy = {"httpProxy": "http://team-proxy:8080", "noProxy": ".corp", "passToTask": True}
    envs = _envs(_job({"proxy": proxy}))
    for env in envs.values():
        assert env["HTTP_PROXY"] == "http://team-proxy:8080" and env["NO_PROXY"] == ".corp"
        assert "HTTPS_PROXY" not in env  # the TaskRunner's setting replaces the operator's


def test_a_proxy_on_a_taskrunner_is_an_override_the_administrator_allows() -> None:
    runner = TaskRunner.from_k8s(task_runner_object(proxy={"httpsProxy": "http://p:3128"}))
    refusal = TenancyPolicy(allow_any_worker_group=True).check(runner)
    assert refusal is not None and refusal.reason == "OverrideNotAllowed" and "proxy" in refusal.message
    allowed = TenancyPolicy(allow_any_worker_group=True, allowed_overrides=frozenset({"proxy"}))
    assert allowed.check(runner) is None


def test_the_operator_takes_its_own_proxy_environment_as_the_default() -> None:
    config = parse_args(
        ["--namespace", "x"], env={"https_proxy": "http://proxy.internal:3128", "NO_PROXY": ".corp"}
    )
    assert config.proxy == ProxySettings(https_proxy="http://proxy.internal:3128", no_proxy=".corp")
    assert parse_args(["--namespace", "x"], env={}).proxy is None
