"""Attack: a tenant who may create TaskRunners in one namespace reaches for what is not
theirs: another team's worker group (its tasks, their fields and the right to report
them), the runner's requests sent elsewhere, its own code run as the sidecar, the
runner's pod identity handed to a task, another team's IAM role.

The operator runs with an administrator's tenancy settings; the local Data Pipeline
service resolves STS sessions through moto's STS and stands in for IAM's
``datapipeline:workerGroup`` condition on PollForTask (docs/local-datapipeline.md).
"""

from __future__ import annotations

from typing import Any

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_common.awsauth import session_name_for
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

ECHO = {"type": "ShellCommandActivity", "command": "echo hi", "maximumRetries": "0"}
TEAM_A_ROLE = "arn:aws:iam::123456789012:role/team-a"
TEAM_B_ROLE = "arn:aws:iam::123456789012:role/team-b"


def _condition(cluster: Cluster, name: str, type_: str = "Ready") -> dict[str, Any] | None:
    return cluster.condition(name, type_)


def _refused(cluster: Cluster, name: str, reason: str) -> dict[str, Any] | None:
    ready = _condition(cluster, name)
    if ready and ready["status"] == "False" and ready["reason"] == reason:
        return ready
    return None


def _polled_groups(datapipeline: LocalDataPipeline) -> set[str]:
    return {str((c.request or {}).get("workerGroup")) for c in datapipeline.ledger.calls_to("PollForTask")}


def _operator(
    cluster: Cluster, tmp_path: Any, tenancy: tuple[str, ...], env: dict[str, str] | None = None
) -> OperatorProcess:
    return OperatorProcess(
        cluster.testbed,
        cluster.namespace,
        tmp_path,
        # The sidecar reports; the operator's fallback would only after 60 s (scaled):
        # a loaded CI machine has taken over 10 s from exit to report.
        ["--sidecar-report-grace-seconds", "6000", *QUIET_GRACES],
        tenancy=tenancy,
        env=env,
    ).start()


def test_a_tenant_serves_only_the_worker_groups_it_was_granted(
    secure_cluster: Cluster, datapipeline: LocalDataPipeline, tmp_path: Any
) -> None:
    cluster = secure_cluster
    ns = cluster.namespace
    op = _operator(
        cluster,
        tmp_path,
        (f"--worker-group-grant={ns}=team-a-*", f"--default-endpoint-url={datapipeline.endpoint_url}"),
    )
    try:
        # The administrator's default endpoint serves: a TaskRunner that sets one is
        # trying an override.
        def runner(name: str, group: str, **spec: Any) -> None:
            cluster.create_runner(datapipeline, group, name=name, endpoint=False, **spec)

        runner("mine", "team-a-etl")
        runner("theirs", "team-b-secrets")
        runner("redirect", "team-a-redirect", endpointUrl=datapipeline.endpoint_url)
        runner("own-sidecar", "team-a-sidecar", sidecarImage="registry.example.com/evil/sidecar:1")
        runner(
            "pod-identity", "team-a-pi", credentials={"mode": "PodIdentity"}, passDataPipelineCredentials=True
        )
        datapipeline.run_pipeline({"Mine": ECHO}, worker_group="team-a-etl")
        datapipeline.run_pipeline({"Theirs": ECHO}, worker_group="team-b-secrets")

        wait_for(cluster.jobs, timeout=30, what="the granted task's Job")
        for name, reason in (
            ("theirs", "WorkerGroupNotGranted"),
            ("redirect", "OverrideNotAllowed"),
            ("own-sidecar", "OverrideNotAllowed"),
            ("pod-identity", "OverrideNotAllowed"),
        ):
            ready = wait_for(
                lambda n=name, r=reason: _refused(cluster, n, r), timeout=20, what=f"{name} refused"
            )
            assert _condition(cluster, name, "Degraded")["status"] == "True"
            assert _condition(cluster, name, "Polling")["status"] == "False"
            assert "administrator" in ready["message"]
        warned = {e["involvedObject"]["name"]: e for e in cluster.events() if e["type"] == "Warning"}
        assert warned["theirs"]["reason"] == "WorkerGroupNotGranted"
        assert "team-b-secrets" in warned["theirs"]["message"]
        assert warned["redirect"]["reason"] == "OverrideNotAllowed"
        assert "endpointUrl" in warned["redirect"]["message"]
        assert "sidecarImage" in warned["own-sidecar"]["message"]
        assert "passDataPipelineCredentials" in warned["pod-identity"]["message"]

        # Nothing but the granted group was ever polled; the other team's task waits.
        assert _polled_groups(datapipeline) == {"team-a-etl"}
        assert [r.object_id for r in datapipeline.ledger.attempts.values()] == ["Mine"]
        assert (_condition(cluster, "mine") or {}).get("status") == "True"

        # Granted after all (a group in its grant): it polls.
        cluster.kube.patch(
            f"/apis/dptr.dev/v1alpha1/namespaces/{ns}/taskrunners/theirs",
            {"spec": {"workerGroup": "team-a-late"}},
        )
        wait_for(
            lambda: (_condition(cluster, "theirs") or {}).get("status") == "True", timeout=20, what="Ready"
        )
        wait_for(lambda: "team-a-late" in _polled_groups(datapipeline), timeout=20, what="team-a-late polled")
        assert cluster.events("Permitted")
        assert "team-b-secrets" not in _polled_groups(datapipeline)
    finally:
        op.stop()


def test_a_task_runner_calls_aws_as_its_own_granted_role(
    secure_cluster: Cluster, s3_endpoint: str, tmp_path: Any
) -> None:
    cluster = secure_cluster
    ns = cluster.namespace
    # moto's server is the STS; the local service stands in for IAM: team-a's role may
    # poll team-a-* only.
    dp = LocalDataPipeline(
        time_scale=0.01, sts_endpoint=s3_endpoint, worker_group_policy={TEAM_A_ROLE: ["team-a-*"]}
    )
    dp.start()
    op = _operator(
        cluster,
        tmp_path,
        (
            "--allow-any-worker-group",
            f"--role-grant={ns}={TEAM_A_ROLE}",
            f"--default-endpoint-url={dp.endpoint_url}",
            f"--sidecar-env=AWS_ENDPOINT_URL_STS={s3_endpoint}",
        ),
        env={"AWS_ENDPOINT_URL_STS": s3_endpoint},
    )
    try:
        base = {"secret_key_id": "AKIDBASEONLYFORSTS"}  # unknown to Data Pipeline itself
        run = {"jobTemplate": {"image": "debian:bookworm"}}  # pods run: the sidecar reports

        def runner(name: str, group: str, role: str) -> None:
            credentials = {"mode": "Secret", "secretRef": {"name": "dp-credentials"}, "roleArn": role}
            cluster.create_runner(
                dp, group, name=name, endpoint=False, credentials=credentials, **base, **run
            )

        runner("team-a", "team-a-etl", TEAM_A_ROLE)
        runner("borrowed", "team-a-borrowed", TEAM_B_ROLE)
        runner("wrong-group", "team-b-data", TEAM_A_ROLE)
        dp.run_pipeline({"Echo": ECHO}, worker_group="team-a-etl")
        dp.run_pipeline({"Stolen": ECHO}, worker_group="team-b-data")

        record = wait_for(
            lambda: next((r for r in dp.ledger.attempts.values() if r.outcome), None),
            timeout=60,
            what="an outcome",
        )
        assert (record.object_id, record.outcome) == ("Echo", "FINISHED")
        wait_for(
            lambda: _refused(cluster, "borrowed", "RoleNotGranted"), timeout=20, what="borrowed role refused"
        )
        # IAM (the stand-in) refuses team-a's role for another team's worker group.
        denied = wait_for(
            lambda: _refused(cluster, "wrong-group", "InvalidCredentials"),
            timeout=30,
            what="PollForTask denied",
        )
        assert "AccessDenied" in denied["message"] or "not authorized" in denied["message"]
        assert [r.object_id for r in dp.ledger.attempts.values()] == ["Echo"]

        # Every call of the task, the operator's and the sidecar's, was made as team-a's role.
        calls = [c for c in dp.ledger.calls if c.task_id == record.task_id or c.operation == "PollForTask"]
        by_operation: dict[str, set[str]] = {}
        for call in calls:
            if call.error is None:
                by_operation.setdefault(call.operation, set()).add(str(call.principal))
        prefix = "arn:aws:sts::123456789012:assumed-role/team-a/"
        operator, sidecar = (prefix + session_name_for(ns, "team-a", who) for who in ("operator", "sidecar"))
        assert by_operation["PollForTask"] == {operator}
        assert sidecar in by_operation["ReportTaskProgress"]
        assert by_operation["SetTaskStatus"] == {sidecar}
        assert not [c for c in dp.ledger.calls if c.principal and c.principal.endswith("user/dptr-local")]
        dp.assert_clean()
    finally:
        op.stop()
        dp.stop()
