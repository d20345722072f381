"""SqlActivity's pure parts: JDBC URLs, the script scanner, the plan, the rendered pod."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from dptr_samples import pipeline_task_owner, task_object, task_runner_object

from dptr_activities.sqlscript import manages_own_transaction, split_script
from dptr_common.activity_plan import build_plan, missing_objects
from dptr_common.errors import ContainerTermination, TaskError, outcome_for_termination
from dptr_common.jdbc import parse_jdbc_url
from dptr_common.models import PipelineTaskSpec, TaskRunner
from dptr_common.render import render_job
from dptr_common.render_activity import activity_secret, secret_name
from dptr_common.task import Task, parse_task

PASSWORD = "s3cr3t-Pa55-$(HOME)"


def _sql_task(*fields: dict[str, str], database: dict[str, Any] | None = None, carry: bool = True) -> Task:
    raw = task_object()
    attempt = raw["objects"][raw["attemptId"]]
    attempt["fields"] = [
        {"key": "type", "stringValue": "SqlActivity"},
        {"key": "database", "refValue": "Db"},
        *fields,
    ]
    raw["objects"] = {raw["attemptId"]: attempt}
    if carry:
        db = database or {
            "type": "JdbcDatabase",
            "connectionString": "jdbc:postgresql://db.internal:6543/sales?sslmode=require&ApplicationName=etl",
            "jdbcDriverClass": "org.postgresql.Driver",
            "username": "etl",
            "*password": PASSWORD,
            "jdbcProperties": ["connectTimeout=5"],
        }
        raw["objects"]["Db"] = {
            "id": "Db",
            "name": "Db",
            "fields": [
                {"key": k, "stringValue": v}
                for k, vs in db.items()
                for v in (vs if isinstance(vs, list) else [vs])
            ],
        }
    return parse_task(raw)


def test_jdbc_urls_translate_and_unknown_schemes_are_refused() -> None:
    target = parse_jdbc_url("jdbc:mysql://[::1]:3307/shop?user=u&password=p&useSSL=true")
    assert (target.dialect, target.host, target.port, target.database) == ("mysql", "::1", 3307, "shop")
    assert (target.user, target.password, target.properties) == ("u", "p", {"useSSL": "true"})
    assert parse_jdbc_url("jdbc:redshift://c.example:5439/dev").dialect == "redshift"
    assert parse_jdbc_url("jdbc:mariadb://h/db").port == 3306
    with pytest.raises(TaskError) as err:
        parse_jdbc_url("jdbc:sqlserver://h:1433;databaseName=x")
    assert err.value.error_id == "dptr.Sql.UnsupportedUrl.sqlserver"
    with pytest.raises(TaskError) as err:
        parse_jdbc_url("jdbc:postgresql://h/db", driver_class="com.mysql.jdbc.Driver")
    assert err.value.error_id == "dptr.Sql.UnsupportedDriver.com_mysql_jdbc_Driver"
    with pytest.raises(TaskError) as err:
        parse_jdbc_url("jdbc:postgresql://h/db", driver_class="oracle.jdbc.OracleDriver")
    assert err.value.error_id.startswith("dptr.Sql.UnsupportedDriver.")
    with pytest.raises(TaskError) as err:
        parse_jdbc_url("jdbc:postgresql://a,b/db")
    assert err.value.error_id == "dptr.Sql.BadConnectionString"


def test_the_scanner_binds_only_placeholders_outside_literals_and_comments() -> None:
    script = """-- setup; not a statement?
CREATE TABLE t (a text, b text);
INSERT INTO t VALUES (?, 'it''s ?; 100%');
DO $body$ BEGIN PERFORM 1; END $body$;
/* ? ; */ SELECT "col?" FROM t WHERE a = ? ;;
"""
    statements = split_script(script, dialect="postgresql")
    assert [s.parameters for s in statements] == [0, 1, 0, 1]
    assert statements[1].text == "INSERT INTO t VALUES (%s, 'it''s ?; 100%%')"
    assert statements[2].text == "DO $body$ BEGIN PERFORM 1; END $body$"
    assert (statements[1].line, statements[1].column) == (3, 1)
    mysql = split_script("INSERT INTO t VALUES ('a\\'; ?', ?); # ?;\nSELECT 1", dialect="mysql")
    assert [s.parameters for s in mysql] == [1, 0]
    assert not manages_own_transaction(statements)
    assert manages_own_transaction(
        split_script("-- x\nBEGIN; INSERT INTO t VALUES (1); COMMIT;", dialect="mysql")
    )


def test_the_plan_carries_the_database_and_its_password_stays_out_of_its_repr() -> None:
    task = _sql_task(
        {"key": "script", "stringValue": "SELECT ?"},
        {"key": "scriptArgument", "stringValue": "x"},
    )
    plan = build_plan(task)
    assert plan.database is not None
    assert (plan.database.host, plan.database.port, plan.database.database) == ("db.internal", 6543, "sales")
    assert plan.database.properties == {"sslmode": "require", "ApplicationName": "etl", "connectTimeout": "5"}
    assert plan.database.password == PASSWORD
    assert PASSWORD not in repr(plan)
    assert plan.script_arguments == ("x",)


def test_objects_the_task_did_not_carry_are_listed_for_describe_objects() -> None:
    task = _sql_task({"key": "script", "stringValue": "SELECT 1"}, carry=False)
    assert missing_objects(task) == ["Db"]
    with pytest.raises(TaskError) as err:
        build_plan(task)
    assert err.value.error_id == "dptr.InvalidTask.MissingObject.database"


@pytest.mark.parametrize(
    ("fields", "database", "error_id"),
    [
        ([], None, "dptr.InvalidTask.Sql.NoScript"),
        (
            [{"key": "script", "stringValue": "x"}, {"key": "scriptUri", "stringValue": "s3://b/k"}],
            None,
            "dptr.InvalidTask.Sql.ScriptAndScriptUri",
        ),
        (
            [{"key": "script", "stringValue": "x"}],
            {"type": "JdbcDatabase", "connectionString": "jdbc:db2://h/x"},
            "dptr.Sql.UnsupportedUrl.db2",
        ),
        (
            [{"key": "script", "stringValue": "x"}],
            {"type": "RedshiftDatabase", "databaseName": "dev"},
            "dptr.Sql.BadDatabase",
        ),
        (
            [{"key": "script", "stringValue": "x"}],
            {"type": "DynamoDBTable"},
            "dptr.Sql.UnsupportedDatabase.DynamoDBTable",
        ),
    ],
)
def test_a_sql_activity_dptr_cannot_run_is_refused_with_an_error_id(
    fields: list[dict[str, str]], database: dict[str, Any] | None, error_id: str
) -> None:
    with pytest.raises(TaskError) as err:
        build_plan(_sql_task(*fields, database=database))
    assert err.value.error_id == error_id


def test_the_password_is_in_the_plan_secret_only_and_only_the_task_container_mounts_it() -> None:
    task = _sql_task({"key": "script", "stringValue": "SELECT 1"})
    plan = build_plan(task)
    runner = TaskRunner.from_k8s(task_runner_object())
    job = render_job(
        task,
        runner,
        sidecar_image="ghcr.io/dptr/sidecar:0.1.0",
        namespace="data",
        owner=pipeline_task_owner(),
        activity_image="ghcr.io/dptr/activity:0.1.0",
        activity_plan=plan,
    )
    assert PASSWORD not in json.dumps(job)
    pod = job["spec"]["template"]["spec"]
    (task_container,) = pod["containers"]
    assert task_container["image"] == "ghcr.io/dptr/activity:0.1.0"
    assert task_container["command"] == ["dptr-activity"]
    mounting = [
        c["name"]
        for c in pod["containers"] + pod["initContainers"]
        if any(m["name"] == "dptr-activity-plan" for m in c.get("volumeMounts", []))
    ]
    assert mounting == ["task"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "dptr-activity-plan"]
    # The Job's name and a digest of the plan: nobody can plant a plan under it beforehand.
    assert volume["secret"]["secretName"] == secret_name(job["metadata"]["name"], plan)
    assert volume["secret"]["secretName"].startswith(job["metadata"]["name"] + "-")
    # dptr's own code: the runner's identity, never the pod account's role from the webhook.
    assert "task" in pod.get("metadata", {}).get("annotations", {}).get(
        "eks.amazonaws.com/skip-containers", "task"
    )
    secret = activity_secret(
        plan,
        name=secret_name(job["metadata"]["name"], plan),
        namespace="data",
        owner_ref=job["metadata"]["ownerReferences"][0],
        labels=job["metadata"]["labels"],
    )
    assert PASSWORD not in json.dumps(secret)  # base64 data, not text
    decoded = json.loads(base64.b64decode(secret["data"]["plan.json"]))
    assert decoded["database"]["password"] == PASSWORD
    assert secret["immutable"] is True
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "PipelineTask"


def test_star_fields_never_reach_the_pipeline_task() -> None:
    task = _sql_task(
        {"key": "script", "stringValue": "SELECT 1"}, {"key": "*myToken", "stringValue": PASSWORD}
    )
    spec = PipelineTaskSpec.from_task(task, task_runner="r")
    assert PASSWORD not in json.dumps(spec.to_k8s())


def test_dptr_activity_failures_are_reported_with_their_error_id() -> None:
    outcome = outcome_for_termination(
        ContainerTermination(
            exit_code=1, message="dptr.Sql.UndefinedTable\nstatement 2 of 2 (line 2, column 1): x"
        ),
        "SqlActivity",
    )
    assert (outcome.status, outcome.error_id) == ("FAILED", "dptr.Sql.UndefinedTable")
    assert (
        outcome_for_termination(ContainerTermination(exit_code=143), "SqlActivity").error_id
        == "dptr.Signal.SIGTERM"
    )


@pytest.mark.parametrize(
    "url",
    [
        "jdbc:mysql://bob:pw-in-url@db/app",
        "jdbc:mysql://address=(host=db)(user=u)(password=pw-in-url)/app",
        "JDBC:postgresql:db/app?password=pw-in-url",
        "jdbc:postgresql://db/a/b?password=pw-in-url",
        "not-a-url?password=pw-in-url",
    ],
)
def test_a_malformed_connection_string_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(TaskError) as err:
        parse_jdbc_url(url)
    assert "pw-in-url" not in err.value.message


def test_a_failed_statement_is_echoed_with_its_literals_masked() -> None:
    from dptr_activities.sql import _masked

    assert _masked("CREATE USER x PASSWORD 'hunter''2'") == "CREATE USER x PASSWORD '…'"
