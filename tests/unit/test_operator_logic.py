"""Pure operator logic: config, conditions, pod/Job assessment, history, index, lease, pacing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dptr_common.models import HistoryLimits
from dptr_operator.config import parse_args
from dptr_operator.heartbeats import TokenBucket, sidecar_stale_after
from dptr_operator.history import expired
from dptr_operator.index import TaskEntry, TaskIndex
from dptr_operator.leader import lease_is_free
from dptr_operator.outcomes import PROBLEM_RANK, assess_job, assess_pod, assess_refused_pods
from dptr_operator.polling import RunnerHealth, conditions_for


def test_config_flags_env_and_scope() -> None:
    cfg = parse_args(["--namespace", "a", "-n", "b", "--time-scale", "0.01"], env={})
    assert cfg.namespaces == ["a", "b"]
    assert cfg.scaled(900) == pytest.approx(9)
    env_cfg = parse_args([], env={"DPTR_NAMESPACES": "x,y", "DPTR_TIME_SCALE": "0.5", "POD_NAME": "op-0"})
    assert env_cfg.namespaces == ["x", "y"] and env_cfg.time_scale == 0.5 and env_cfg.identity == "op-0"
    assert env_cfg.holder == "operator/op-0"
    assert parse_args(["-A"], env={}).all_namespaces
    with pytest.raises(SystemExit):
        parse_args([], env={})
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "a"], env={})


def test_sidecar_resources_flag_env_and_validation() -> None:
    default = parse_args(["-n", "a"], env={}).sidecar_resources.to_k8s()
    # What task pods had before the flag existed.
    assert default == {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
    given = '{"requests": {"cpu": 0.25, "memory": "256Mi"}, "limits": {"memory": "1Gi", "cpu": "1"}}'
    assert parse_args(["-n", "a", "--sidecar-resources", given], env={}).sidecar_resources.to_k8s() == {
        "requests": {"cpu": "0.25", "memory": "256Mi"},
        "limits": {"memory": "1Gi", "cpu": "1"},
    }
    from_env = parse_args(["-n", "a"], env={"DPTR_SIDECAR_RESOURCES": '{"requests": {"memory": "1e8"}}'})
    assert from_env.sidecar_resources.to_k8s() == {"requests": {"memory": "1e8"}}
    assert parse_args(["-n", "a", "--sidecar-resources", "{}"], env={}).sidecar_resources.to_k8s() == {}
    # Binary, decimal and exponent suffixes compare as the API server does (1Ei < 2E, 1e3 > 999).
    fine = '{"requests": {"memory": "1Ei", "cpu": "999m"}, "limits": {"memory": "2E", "cpu": "1e0"}}'
    assert (
        parse_args(["-n", "a", "--sidecar-resources", fine], env={}).sidecar_resources.limits["memory"]
        == "2E"
    )
    for bad in (
        "not json",
        '{"requests": {"cpu": "lots"}}',
        '{"requests": {"memory": "-1Mi"}}',
        '{"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}',  # the API would refuse every Job
        '{"requests": {"cpu": "100m"}, "limits": {"cpu": "0.05"}}',
        '{"requests": {"memory": "1e3"}, "limits": {"memory": "999"}}',
        '{"request": {"cpu": "10m"}}',  # a typo is refused, not ignored
        '{"requests": {"cpu": true}}',
        '{"requests": {"bad name!": "1"}}',
        '["10m"]',
    ):
        with pytest.raises(SystemExit):
            parse_args(["-n", "a", "--sidecar-resources", bad], env={})


def _conds(**kw: Any) -> dict[str, dict[str, Any]]:
    args: dict[str, Any] = {
        "paused": False,
        "deleting": False,
        "health": RunnerHealth(),
        "active": 0,
        "maximum": 5,
    }
    args.update(kw)
    return {c["type"]: c for c in conditions_for(**args)}


def test_conditions() -> None:
    ok = _conds()
    assert ok["Ready"]["status"] == "True" and ok["Polling"]["status"] == "True"
    assert ok["Degraded"]["status"] == "False"
    assert _conds(paused=True)["Polling"]["reason"] == "Paused"
    assert _conds(active=5)["Polling"]["reason"] == "AtCapacity"
    bad = _conds(health=RunnerHealth(degraded_reason="InvalidCredentials", degraded_message="no"))
    assert bad["Degraded"]["reason"] == "InvalidCredentials" and bad["Ready"]["status"] == "False"
    term = _conds(health=RunnerHealth(terminated=True))
    assert term["Polling"]["reason"] == "Terminated" and term["Ready"]["status"] == "False"
    assert _conds(deleting=True)["Polling"]["reason"] == "Deleting"
    budget = _conds(health=RunnerHealth(budget_message="too many"))
    assert budget["Degraded"]["reason"] == "HeartbeatBudgetExceeded"


def _pod(phase: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": phase, **status}}


def _task_state(state: dict[str, Any]) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "task", "state": state}]}


def test_assess_pod() -> None:
    evicted = assess_pod(_pod("Failed", reason="Evicted", message="low memory"), "ShellCommandActivity")
    assert evicted.problem == "Ended" and evicted.outcome and evicted.outcome.error_id == "dptr.Evicted"
    oom = assess_pod(
        _pod("Failed", **_task_state({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})), None
    )
    assert oom.outcome and oom.outcome.error_id == "dptr.OOMKilled"
    false = assess_pod(
        _pod("Failed", **_task_state({"terminated": {"exitCode": 1}})), "ShellCommandPrecondition"
    )
    assert false.outcome and false.outcome.status == "FALSE"
    ok = assess_pod(_pod("Succeeded", **_task_state({"terminated": {"exitCode": 0}})), None)
    assert ok.outcome and ok.outcome.status == "FINISHED"
    pull = assess_pod(
        _pod(
            "Pending", initContainerStatuses=[{"name": "s", "state": {"waiting": {"reason": "ErrImagePull"}}}]
        ),
        None,
    )
    assert pull.problem == "ImagePull" and pull.outcome and pull.outcome.error_id == "dptr.ImagePullFailed"
    unsched = assess_pod(
        _pod("Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]),
        None,
    )
    assert unsched.problem == "Unschedulable"
    running = assess_pod(_pod("Running", **_task_state({"running": {}})), None)
    assert running.phase == "Running" and running.problem is None
    lost = assess_pod(_pod("Running", **_task_state({"running": {}})), None, deleted=True)
    assert lost.problem == "Lost" and lost.outcome and lost.outcome.error_id == "dptr.PodLost"
    assert assess_pod(_pod("Pending"), None).problem is None


def test_assess_job_deadline() -> None:
    job = {
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}]},
    }
    verdict = assess_job(job)
    assert (
        verdict.problem == "Deadline"
        and verdict.outcome
        and verdict.outcome.error_id == "dptr.DeadlineExceeded"
    )
    assert assess_job({"metadata": {"name": "j"}, "status": {}}).problem is None
    deleted = assess_job({"metadata": {"name": "j"}}, deleted=True)
    assert deleted.problem == "JobDeleted" and deleted.outcome is not None
    assert deleted.outcome.error_id == "dptr.JobDeleted"


def test_refused_pods_are_named_by_the_job_controllers_message() -> None:
    quota = assess_refused_pods(
        "j",
        'pods "j-abcde" is forbidden: exceeded quota: q, requested: pods=1, used: pods=1, limited: pods=1',
        300,
    )
    assert quota.problem == "PodRejected" and quota.outcome is not None
    assert quota.outcome.error_id == "dptr.PodRejected.Quota"
    assert "exceeded quota" in (quota.outcome.error_message or "")
    pss = assess_refused_pods(
        "j", 'pods "j-x" is forbidden: violates PodSecurity "restricted:latest": ...', 300
    )
    assert pss.outcome is not None and pss.outcome.error_id == "dptr.PodRejected.PodSecurity"
    account = assess_refused_pods(
        "j",
        'pods "j-x" is forbidden: error looking up service account ns/x: serviceaccount "x" not found',
        300,
    )
    assert account.outcome is not None and account.outcome.error_id == "dptr.PodRejected.ServiceAccount"
    silent = assess_refused_pods("j", None, 300)
    assert silent.outcome is not None and silent.outcome.error_id == "dptr.PodRejected.NoPod"
    assert "300s" in (silent.outcome.error_message or "")


def test_the_deciding_problem_ranks() -> None:
    rank = PROBLEM_RANK
    assert rank["Deleted"] < rank["Deadline"] < rank["Ended"] < rank["JobDeleted"] < rank["PodRejected"]


def _entry(name: str, phase: str, minutes: int, runner: str = "r") -> TaskEntry:
    entry = TaskEntry("ns", name, runner, "t", "p", name, None, name, phase=phase)
    entry.finished_at = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    return entry


def test_history_limits_keep_the_newest() -> None:
    entries = [_entry(f"s{i}", "Succeeded", i) for i in range(5)]
    entries += [_entry(f"f{i}", "Failed", i) for i in range(3)] + [_entry("c", "Canceled", 10)]
    entries.append(_entry("run", "Running", 0))
    doomed = expired(entries, HistoryLimits(succeeded=2, failed=2))
    assert {k[1] for k in doomed} == {"s0", "s1", "s2", "f0", "f1"}
    assert expired(entries, HistoryLimits(succeeded=10, failed=10)) == []


def test_index_tracks_active_per_runner() -> None:
    index = TaskIndex()
    obj = {
        "metadata": {"namespace": "ns", "name": "a", "uid": "u1"},
        "spec": {"taskRunner": "r", "taskId": "t", "pipelineId": "p", "attemptId": "a"},
        "status": {"phase": "Pending", "heartbeat": {"owner": "sidecar", "lastAt": "2024-01-01T00:00:00Z"}},
    }
    entry, before = index.upsert(TaskEntry.from_k8s(obj))
    assert before is None and entry.heartbeat_owner == "sidecar"
    assert index.active_count(("ns", "r")) == 1
    obj["status"] = {"phase": "Succeeded", "report": {"reportedAt": "2024-01-01T00:01:00Z"}}
    entry2, before2 = index.upsert(TaskEntry.from_k8s(obj))
    assert entry2 is entry and before2 == "Pending" and entry.terminal
    # The heartbeat time never goes back.
    assert entry.heartbeat_last_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert index.active_count(("ns", "r")) == 0
    index.remove(("ns", "a"))
    assert len(index) == 0


def test_lease_is_free() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    fresh = {"holderIdentity": "a", "renewTime": "2024-01-01T00:00:00.000000Z", "leaseDurationSeconds": 15}
    assert lease_is_free(fresh, "a", now)
    assert not lease_is_free(fresh, "b", now + timedelta(seconds=10))
    assert lease_is_free(fresh, "b", now + timedelta(seconds=16))
    assert lease_is_free({}, "b", now)


def test_token_bucket_spreads_a_backlog() -> None:
    bucket = TokenBucket(rate=10, burst=1)
    t0 = bucket.stamp
    assert bucket.take(t0) == 0
    wait = bucket.take(t0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(t0 + 0.1 + 1e-9) == 0
    assert sidecar_stale_after(20) == 30
