"""The sidecar's pure parts: configuration from env, and reading the task's end off a pod."""

from __future__ import annotations

from typing import Any

import pytest

from dptr_sidecar.config import ConfigError, SidecarConfig
from dptr_sidecar.podstate import task_end

ENV = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "DPTR_PIPELINETASK": "pt"}


def test_config_defaults_and_scale() -> None:
    config = SidecarConfig.from_env({**ENV, "DPTR_TIME_SCALE": "0.01", "DPTR_HEARTBEAT_INTERVAL": "30"})
    assert config.main_container == "task"
    assert config.heartbeat_interval == 30
    assert config.scaled(60) == pytest.approx(0.6)
    assert SidecarConfig.from_env(ENV).time_scale == 1.0


@pytest.mark.parametrize("missing", sorted(ENV))
def test_config_requires_identity(missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        SidecarConfig.from_env({k: v for k, v in ENV.items() if k != missing})


@pytest.mark.parametrize("bad", ["0", "-1", "fast"])
def test_config_rejects_bad_time_scale(bad: str) -> None:
    with pytest.raises(ConfigError, match="DPTR_TIME_SCALE"):
        SidecarConfig.from_env({**ENV, "DPTR_TIME_SCALE": bad})


def pod(
    task_state: dict[str, Any] | None = None, fetch_state: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if task_state is not None:
        status["containerStatuses"] = [{"name": "task", "state": task_state}]
    if fetch_state is not None:
        status["initContainerStatuses"] = [
            {"name": "dptr-sidecar", "state": {"running": {}}},
            {"name": "dptr-fetch-script", "state": fetch_state},
        ]
    return {"metadata": {"name": "p", **meta}, "status": status}


def test_running_task_has_no_end() -> None:
    assert task_end(pod({"running": {}}), "task", "ShellCommandActivity") is None
    assert task_end(pod({"waiting": {"reason": "PodInitializing"}}), "task", None) is None
    assert task_end(pod(), "task", None) is None


def test_exit_codes() -> None:
    end = task_end(
        pod({"terminated": {"exitCode": 0, "reason": "Completed"}}), "task", "ShellCommandActivity"
    )
    assert end is not None and end.outcome.status == "FINISHED"
    end = task_end(pod({"terminated": {"exitCode": 3, "message": "m"}}), "task", "ShellCommandActivity")
    assert end is not None and (end.outcome.status, end.outcome.error_id) == ("FAILED", "dptr.ExitCode.3")
    end = task_end(pod({"terminated": {"exitCode": 1}}), "task", "ShellCommandPrecondition")
    assert end is not None and end.outcome.status == "FALSE"
    end = task_end(pod({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}), "task", None)
    assert end is not None and end.outcome.error_id == "dptr.OOMKilled"
    end = task_end(
        pod({"terminated": {"exitCode": 143}}, deletionTimestamp="2025-01-01T00:00:00Z"), "task", None
    )
    assert end is not None and end.outcome.error_id == "dptr.Signal.SIGTERM" and end.pod_deleting


def test_script_fetch_failure_ends_the_task() -> None:
    end = task_end(
        pod({"waiting": {}}, {"terminated": {"exitCode": 1, "message": "NoSuchKey"}}), "task", None
    )
    assert end is not None
    assert (end.outcome.status, end.outcome.error_id) == ("FAILED", "dptr.ScriptFetchFailed")
    assert "NoSuchKey" in (end.outcome.error_message or "")
    assert task_end(pod({"waiting": {}}, {"terminated": {"exitCode": 0}}), "task", None) is None
