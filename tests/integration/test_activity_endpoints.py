"""RdsDatabase and RedshiftDatabase endpoints, looked up as dptr-activity does, against moto's
server (the suite's stand-in for the RDS and Redshift APIs: DescribeDBInstances and
DescribeClusters over the real AWS query protocol)."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest

from dptr_activities.connect import resolve_endpoint
from dptr_common.activity_plan import DatabasePlan
from dptr_common.errors import TaskError


def _client(service: str, endpoint: str, env: dict[str, str]) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def aws_env(s3_env: dict[str, str], s3_endpoint: str) -> dict[str, str]:
    return {**s3_env, "AWS_ENDPOINT_URL_RDS": s3_endpoint, "AWS_ENDPOINT_URL_REDSHIFT": s3_endpoint}


@pytest.mark.parametrize(("engine", "dialect"), [("postgres", "postgresql"), ("mysql", "mysql")])
def test_an_rds_instance_is_found_by_id_and_its_engine_picks_the_driver(
    aws_env: dict[str, str], s3_endpoint: str, engine: str, dialect: str
) -> None:
    name = f"db-{uuid.uuid4().hex[:8]}"
    rds = _client("rds", s3_endpoint, aws_env)
    rds.create_db_instance(
        DBInstanceIdentifier=name,
        Engine=engine,
        DBInstanceClass="db.t3.micro",
        MasterUsername="admin",
        MasterUserPassword="password123",
        AllocatedStorage=20,
        DBName="sales",
    )
    found = rds.describe_db_instances(DBInstanceIdentifier=name)["DBInstances"][0]["Endpoint"]
    plan = DatabasePlan(id="Db", type="RdsDatabase", rds_instance_id=name, username="etl", password="x")
    endpoint = resolve_endpoint(plan, aws_env)
    assert (endpoint.dialect, endpoint.host, endpoint.port) == (dialect, found["Address"], found["Port"])
    assert endpoint.database == "sales"  # the instance's DBName when databaseName is not set


def test_an_unknown_rds_instance_fails_with_the_apis_error_code(aws_env: dict[str, str]) -> None:
    plan = DatabasePlan(id="Db", type="RdsDatabase", rds_instance_id="no-such-db", password="pw-never-shown")
    with pytest.raises(TaskError) as err:
        resolve_endpoint(plan, aws_env)
    assert err.value.error_id == "dptr.Sql.EndpointLookup.DBInstanceNotFound"
    assert "pw-never-shown" not in err.value.message


def test_a_redshift_cluster_is_found_by_id(aws_env: dict[str, str], s3_endpoint: str) -> None:
    name = f"rs-{uuid.uuid4().hex[:8]}"
    redshift = _client("redshift", s3_endpoint, aws_env)
    redshift.create_cluster(
        ClusterIdentifier=name,
        NodeType="dc2.large",
        MasterUsername="admin",
        MasterUserPassword="Password123",
        DBName="dev",
    )
    cluster = redshift.describe_clusters(ClusterIdentifier=name)["Clusters"][0]
    plan = DatabasePlan(id="Db", type="RedshiftDatabase", dialect="redshift", cluster_id=name)
    endpoint = resolve_endpoint(plan, aws_env)
    assert (endpoint.dialect, endpoint.host) == ("redshift", cluster["Endpoint"]["Address"])
    assert endpoint.port == cluster["Endpoint"]["Port"]
