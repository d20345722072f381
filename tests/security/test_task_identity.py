"""The task's own AWS identity, through the API server's real admission path.

A TaskRunner whose jobTemplate names a ServiceAccount of the task's own: EKS's identity
webhook gives that account's role to the task container, and dptr's containers keep the
runner's.  The EKS webhook's Go module is not served here, so the test bed's stand-in
(``dptr_testbed.identitywebhook``, the webhook's documented contract) is registered with a
real MutatingWebhookConfiguration over TLS for this test's namespace.  moto's server is
STS and S3; the local Data Pipeline service checks every caller's STS session (and lets
only the runner's role poll the worker group), so the ledger names the principal of each
call.  moto's own records say which roles were assumed, and with what.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_common.awsauth import session_name_for
from dptr_common.render import RUNNER_TOKEN_AUDIENCE
from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.identitywebhook import IdentityWebhook
from dptr_testbed.installs import sidecar_rbac
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

ACCOUNT = "123456789012"
RUNNER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/dptr-runner"
TASK_ROLE = f"arn:aws:iam::{ACCOUNT}:role/etl-task"
TASK_ACCOUNT = "etl-task"
BASE_KEY = "AKIDBASEONLYFORSTS"  # unknown to Data Pipeline: only the runner's role may call it


@pytest.fixture
def identity_cluster(crds: RunningTestbed, namespace: str) -> Iterator[tuple[Cluster, IdentityWebhook]]:
    cluster = Cluster(crds, namespace)
    for obj in sidecar_rbac(namespace):
        cluster.apply(obj)
    # The task's own account: IRSA's annotation names its role; it also needs the
    # sidecar's Role, since the pod (and so the sidecar) runs as it.
    for obj in sidecar_rbac(namespace, TASK_ACCOUNT):
        if obj["kind"] == "ServiceAccount":
            obj["metadata"]["annotations"] = {"eks.amazonaws.com/role-arn": TASK_ROLE}
        cluster.apply(obj)
    with IdentityWebhook(crds, namespace) as webhook:
        yield cluster, webhook


def _assumed_roles() -> list[str]:
    """The assumed-role ARN of every session moto's STS handed out, from moto's own state."""
    from moto.backends import get_backend

    return [role.arn for role in get_backend("sts")[ACCOUNT]["aws"].assumed_roles]


def _whoami_command(bucket: str, key: str) -> str:
    # The host's Debian python3 with this environment's boto3 stands in for the image's
    # AWS SDK (the kubelet stand-in runs the pod's processes from the host's filesystem;
    # the virtualenv's own interpreter may live under a home the pod's user cannot enter).
    code = (
        "import boto3; arn = boto3.client('sts').get_caller_identity()['Arn']; "
        f"boto3.client('s3').put_object(Bucket='{bucket}', Key='{key}', Body=arn.encode()); print(arn)"
    )
    site = sysconfig.get_paths()["purelib"]
    return f'PYTHONPATH={site} /usr/bin/python3 -c "{code}"'


def test_a_task_gets_its_own_accounts_role_and_the_sidecar_keeps_the_runners(
    identity_cluster: tuple[Cluster, IdentityWebhook],
    s3_endpoint: str,
    s3_raw: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    cluster, webhook = identity_cluster
    ns = cluster.namespace
    dp = LocalDataPipeline(
        time_scale=0.01, sts_endpoint=s3_endpoint, worker_group_policy={RUNNER_ROLE: ["wg-id-*"]}
    )
    dp.start()
    sts = {"AWS_ENDPOINT_URL_STS": s3_endpoint}
    op = OperatorProcess(
        cluster.testbed,
        ns,
        tmp_path,
        [
            "--sidecar-report-grace-seconds",
            "6000",
            *QUIET_GRACES,
            f"--sidecar-env=AWS_ENDPOINT_URL_STS={s3_endpoint}",
        ],
        tenancy=(
            "--allow-any-worker-group",
            f"--role-grant={ns}={RUNNER_ROLE}",
            f"--default-endpoint-url={dp.endpoint_url}",
            f"--default-s3-endpoint-url={s3_endpoint}",
        ),
        # PodIdentity runners: the operator's own chain (keys here; IRSA on EKS), then the role.
        env={**sts, "AWS_ACCESS_KEY_ID": BASE_KEY, "AWS_SECRET_ACCESS_KEY": "base"},
    ).start()
    try:
        template = {
            "image": "debian:bookworm",
            "serviceAccountName": TASK_ACCOUNT,
            "env": [
                {"name": "AWS_ENDPOINT_URL_STS", "value": s3_endpoint},
                {"name": "AWS_ENDPOINT_URL_S3", "value": s3_endpoint},
                {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
            ],
        }
        secret = {"mode": "Secret", "secretRef": {"name": "dp-credentials"}, "roleArn": RUNNER_ROLE}
        cluster.create_runner(
            dp,
            "wg-id-keys",
            name="keys",
            endpoint=False,
            secret_key_id=BASE_KEY,
            credentials=secret,
            jobTemplate=template,
        )
        pod_identity = {"mode": "PodIdentity", "roleArn": RUNNER_ROLE}
        cluster.create_runner(
            dp, "wg-id-podid", name="podid", endpoint=False, credentials=pod_identity, jobTemplate=template
        )
        for runner in ("keys", "podid"):
            dp.run_pipeline(
                {
                    "WhoAmI": {
                        "type": "ShellCommandActivity",
                        "command": _whoami_command(s3_bucket, runner),
                        "maximumRetries": "0",
                    }
                },
                worker_group=f"wg-id-{runner}",
            )
        records = wait_for(
            lambda: (
                (done := [r for r in dp.ledger.attempts.values() if r.outcome]) and len(done) == 2 and done
            ),
            timeout=120,
            what="both outcomes",
        )
        for record in records:
            assert record.outcome == "FINISHED", (record.worker_group, record.error_message)

        for runner in ("keys", "podid"):
            # The task's own role, through the webhook's token (AssumeRoleWithWebIdentity).
            arn = s3_raw.get_object(Bucket=s3_bucket, Key=runner)["Body"].read().decode()
            assert arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/etl-task/"), (runner, arn)
            # The sidecar's calls were the runner's role, never the task's.
            record = next(r for r in dp.ledger.attempts.values() if r.worker_group == f"wg-id-{runner}")
            by_operation: dict[str, set[str]] = {}
            for call in dp.ledger.calls:
                if call.task_id == record.task_id and call.error is None:
                    by_operation.setdefault(call.operation, set()).add(str(call.principal))
            prefix = f"arn:aws:sts::{ACCOUNT}:assumed-role/dptr-runner/"
            sidecar, operator = (
                prefix + session_name_for(ns, runner, who) for who in ("sidecar", "operator")
            )
            # The operator acks; the sidecar heartbeats and reports: both as the runner's role.
            assert by_operation["SetTaskStatus"] == {sidecar}, (runner, by_operation)
            assert sidecar in by_operation["ReportTaskProgress"], (runner, by_operation)
            assert by_operation["ReportTaskProgress"] <= {sidecar, operator}, (runner, by_operation)
        assumed = _assumed_roles()
        assert any(a.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/etl-task/") for a in assumed), assumed
        assert not any("etl-task" in str(c.principal) for c in dp.ledger.calls), (
            "the task's role called Data Pipeline"
        )

        # The pods as the API server admitted them (after the webhook).
        pods = {p["metadata"]["labels"]["dptr.dev/task-runner"]: p for p in cluster.pods()}
        assert set(pods) == {"keys", "podid"} and len(webhook.mutated) >= 2
        for runner, pod in pods.items():
            spec = pod["spec"]
            assert spec["serviceAccountName"] == TASK_ACCOUNT
            skipped = pod["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"].split(",")
            assert "task" not in skipped and "dptr-sidecar" in skipped
            containers = {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}
            task_env = {e["name"]: e.get("value") for e in containers["task"].get("env", [])}
            assert task_env["AWS_ROLE_ARN"] == TASK_ROLE
            assert task_env["AWS_WEB_IDENTITY_TOKEN_FILE"].startswith("/var/run/secrets/eks.amazonaws.com/")
            assert not {"AWS_ACCESS_KEY_ID", "DPTR_ROLE_ARN"} & set(task_env)
            sidecar_env = {e["name"]: e.get("value") for e in containers["dptr-sidecar"].get("env", [])}
            assert sidecar_env.get("AWS_ROLE_ARN") in (None, RUNNER_ROLE)
            assert not str(sidecar_env.get("AWS_WEB_IDENTITY_TOKEN_FILE", "")).startswith(
                "/var/run/secrets/eks"
            )
            task_mounts = {m["name"] for m in containers["task"].get("volumeMounts", [])}
            assert "dptr-runner-token" not in task_mounts
            if runner == "podid":
                # dptr's own token for the runner's role: an audience the task's token lacks.
                volume = next(v for v in spec["volumes"] if v["name"] == "dptr-runner-token")
                source = volume["projected"]["sources"][0]["serviceAccountToken"]
                assert source["audience"] == RUNNER_TOKEN_AUDIENCE != "sts.amazonaws.com"
                assert sidecar_env["AWS_ROLE_ARN"] == RUNNER_ROLE
            else:
                assert "AWS_ACCESS_KEY_ID" in sidecar_env  # the Secret's keys (valueFrom)
        dp.assert_clean()
    finally:
        op.stop()
        sys.stdout.write(f"\n----- operator log -----\n{op.logs()[-6000:]}\n")
        dp.stop()
