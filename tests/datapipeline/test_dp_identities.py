"""Identities in the local service: STS sessions (moto's STS) and the stand-in for IAM's
``datapipeline:workerGroup`` condition on PollForTask."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from dptr_common.awsauth import AssumedRole, StaticCredentials
from dptr_common.datapipeline import CredentialsError, DataPipelineClient
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline

TEAM_A = "arn:aws:iam::123456789012:role/team-a"


@pytest.fixture
def sts_svc(s3_endpoint: str) -> Any:
    # moto's server serves every service, STS included, on one port.
    with LocalDataPipeline(
        time_scale=0.01,
        quotas=False,
        sts_endpoint=s3_endpoint,
        worker_group_policy={TEAM_A: ["team-a-*"]},
    ) as service:
        yield service


def _assumed(sts_endpoint: str, role_arn: str) -> dict[str, str]:
    sts = boto3.client(
        "sts",
        endpoint_url=sts_endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDBASE",
        aws_secret_access_key="base",
    )
    creds = sts.assume_role(RoleArn=role_arn, RoleSessionName="test")["Credentials"]
    return {
        "access_key_id": creds["AccessKeyId"],
        "secret_access_key": creds["SecretAccessKey"],
        "session_token": creds["SessionToken"],
    }


def test_an_assumed_role_polls_only_its_worker_groups(sts_svc: LocalDataPipeline, s3_endpoint: str) -> None:
    dp = sts_svc.client(retries={"total_max_attempts": 1}, **_assumed(s3_endpoint, TEAM_A))
    assert dp.poll_for_task(workerGroup="team-a-etl")["ResponseMetadata"]["HTTPStatusCode"] == 200
    with pytest.raises(ClientError) as info:
        dp.poll_for_task(workerGroup="team-b-secrets")
    assert info.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "team-b-secrets" in info.value.response["Error"]["Message"]
    polls = sts_svc.ledger.calls_to("PollForTask")
    assert [c.principal for c in polls] == ["arn:aws:sts::123456789012:assumed-role/team-a/test"] * 2
    assert [c.error for c in polls] == [None, "AccessDeniedException"]


def test_static_keys_and_unlisted_roles_are_not_restricted(
    sts_svc: LocalDataPipeline, s3_endpoint: str
) -> None:
    static = sts_svc.client(retries={"total_max_attempts": 1})
    static.poll_for_task(workerGroup="team-b-secrets")
    other = sts_svc.client(
        retries={"total_max_attempts": 1}, **_assumed(s3_endpoint, "arn:aws:iam::123456789012:role/ops")
    )
    other.poll_for_task(workerGroup="team-b-secrets")
    principals = {c.principal for c in sts_svc.ledger.calls_to("PollForTask")}
    assert principals == {
        "arn:aws:iam::123456789012:user/dptr-local",
        "arn:aws:sts::123456789012:assumed-role/ops/test",
    }


def test_an_unknown_key_is_refused_even_with_sts(sts_svc: LocalDataPipeline) -> None:
    dp = sts_svc.client(access_key_id="AKIDNOBODY", secret_access_key="x", retries={"total_max_attempts": 1})
    with pytest.raises(ClientError) as info:
        dp.list_pipelines()
    assert info.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_dptr_client_assumes_the_role_through_botocore(
    sts_svc: LocalDataPipeline, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dptr's own client: static base keys, the TaskRunner's role assumed on top, STS found
    through botocore's own setting (AWS_ENDPOINT_URL_STS)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3_endpoint)
    role = AssumedRole(TEAM_A, "dptr-operator-ns-etl", "dptr:ns")
    client = DataPipelineClient(
        "us-east-1",
        sts_svc.endpoint_url,
        StaticCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY),
        role=role,
    )
    try:
        assert client.poll_for_task("team-a-etl", "host") is None
        with pytest.raises(CredentialsError):
            client.poll_for_task("team-b-secrets", "host")
    finally:
        client.close()
    (first, _) = sts_svc.ledger.calls_to("PollForTask")
    assert first.principal == "arn:aws:sts::123456789012:assumed-role/team-a/dptr-operator-ns-etl"
