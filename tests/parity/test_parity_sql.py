"""SqlActivity end to end on the test bed, against real PostgreSQL and MariaDB servers.

The local service queues the SqlActivity with its JdbcDatabase (``*password`` included)
in the polled task; the real operator resolves the plan, writes it to a per-attempt
Secret and creates the Job; the kubelet stand-in runs ``dptr-activity`` (the task
container) beside the real sidecar, which heartbeats and reports.  The servers are
Debian's, started by the suite on loopback (tests/conftest.py, dptr_testbed.databases).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from parity_helpers import WORKER_GROUP, ParityS3, outcomes
from sql_helpers import database, everything_said, rows, running

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.databases import DatabaseServer
from dptr_testbed.waiting import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster, OperatorProcess

pytestmark = pytest.mark.cluster


def test_a_sql_activity_creates_and_fills_a_table_and_its_password_is_said_nowhere(
    parity_runner: Cluster,
    parity_operator: OperatorProcess,
    datapipeline: LocalDataPipeline,
    parity_s3: ParityS3,
    server: DatabaseServer,
    table: str,
) -> None:
    hostile = "x'); DROP TABLE " + table + "; --"
    script = (
        f"CREATE TABLE {table} (id INTEGER, name VARCHAR(200), note VARCHAR(200));\n"
        f"INSERT INTO {table} VALUES (1, ?, '100% sure; really?');\n"
        f"INSERT INTO {table} VALUES (2, ?, NULL);"
    )
    datapipeline.run_pipeline(
        {
            # dptr's own code: its log is the container's, nothing is uploaded here.
            "Default": {"pipelineLogUri": parity_s3.uri("logs/")},
            "Db": database(server),
            "Fill": {
                "type": "SqlActivity",
                "database": {"ref": "Db"},
                "script": script,
                "scriptArgument": ["Zoë 東京", hostile],
                "maximumRetries": "0",
            },
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Fill", timeout=120)["Fill"]
    assert record.outcome == "FINISHED", (record.error_id, record.error_message)
    assert rows(server, f"SELECT id, name, note FROM {table} ORDER BY id") == [
        (1, "Zoë 東京", "100% sure; really?"),
        (2, hostile, None),
    ]
    # The plan Secret exists, owned by the PipelineTask, and only the task container mounts it.
    (pt,) = parity_runner.tasks()
    secrets = json.loads(
        parity_runner.testbed.kubectl("get", "secrets", "-n", parity_runner.namespace, "-o", "json")
    )
    (plan,) = [
        s for s in secrets["items"] if s["metadata"].get("labels", {}).get("dptr.dev/role") == "activity-plan"
    ]
    assert plan["metadata"]["ownerReferences"][0]["uid"] == pt["metadata"]["uid"]
    (pod,) = parity_runner.pods()
    mounts = {
        c["name"]: [m["name"] for m in c.get("volumeMounts", [])]
        for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]
    }
    assert [name for name, ms in mounts.items() if "dptr-activity-plan" in ms] == ["task"]
    assert server.password not in everything_said(parity_runner, parity_operator, parity_s3)
    datapipeline.assert_clean()


def test_a_failed_statement_rolls_the_script_back_and_names_the_error(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, server: DatabaseServer, table: str
) -> None:
    conn = server.connect()
    try:
        conn.cursor().execute(f"CREATE TABLE {table} (id INTEGER)")
    finally:
        conn.close()
    datapipeline.run_pipeline(
        {
            "Db": database(server),
            "Broken": {
                "type": "SqlActivity",
                "database": {"ref": "Db"},
                "script": f"INSERT INTO {table} VALUES (1);\nINSERT INTO no_such_table_{table} VALUES (2);",
                "maximumRetries": "0",
            },
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Broken", timeout=120)["Broken"]
    assert record.outcome == "FAILED"
    expected = (
        "dptr.Sql.UndefinedTable"
        if server.kind == "postgresql"
        else "dptr.Sql.ProgrammingError.NO_SUCH_TABLE"
    )
    assert record.error_id == expected, record.error_message
    assert "statement 2 of 2 (line 2, column 1)" in record.error_message
    assert rows(server, f"SELECT id FROM {table}") == []  # the first INSERT rolled back
    datapipeline.assert_clean()


def test_a_cancel_stops_the_running_query_on_the_server(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, server: DatabaseServer
) -> None:
    marker = f"dptr_cancel_{uuid.uuid4().hex[:8]}"
    sleep = "SELECT pg_sleep(600)" if server.kind == "postgresql" else "SELECT SLEEP(600)"
    pipeline_id = datapipeline.run_pipeline(
        {
            "Db": database(server),
            "Long": {
                "type": "SqlActivity",
                "database": {"ref": "Db"},
                "script": f"{sleep} /* {marker} */",
                "maximumRetries": "0",
            },
        },
        worker_group=WORKER_GROUP,
    )
    wait_for(lambda: running(server, marker), timeout=120, what="the long query running on the server")
    (attempt,) = [r for r in datapipeline.ledger.attempts.values() if r.object_id == "Long"]
    datapipeline.client().set_status(pipelineId=pipeline_id, objectIds=[attempt.instance_id], status="CANCEL")
    record = outcomes(datapipeline, "Long", timeout=60)["Long"]
    assert record.outcome == "CANCELED"
    started = time.monotonic()
    wait_for(lambda: not running(server, marker), timeout=30, what="the query gone from the server")
    assert time.monotonic() - started < 30
    wait_for(lambda: not parity_runner.pods(), timeout=60, what="the pod gone after the cancel")
    datapipeline.assert_clean()


def test_a_non_ascii_password_logs_in(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, server: DatabaseServer, table: str
) -> None:
    """PyMySQL would send a str password as Latin-1 (and fail on €); dptr sends UTF-8, as
    the server's own clients do.  The fixture's user gets the password for this test only."""
    password = "pä55-€-東京"
    admin = server.connect()  # stays open: the login is restored through it
    try:
        cur = admin.cursor()
        if server.kind == "postgresql":
            cur.execute(f"ALTER ROLE CURRENT_USER PASSWORD '{password}'")
        else:
            cur.execute(f"SET PASSWORD = PASSWORD('{password}')")
        try:
            datapipeline.run_pipeline(
                {
                    "Db": database(server, password),
                    "Fill": {
                        "type": "SqlActivity",
                        "database": {"ref": "Db"},
                        "script": f"CREATE TABLE {table} (id INTEGER)",
                        "maximumRetries": "0",
                    },
                },
                worker_group=WORKER_GROUP,
            )
            record = outcomes(datapipeline, "Fill", timeout=120)["Fill"]
        finally:
            if server.kind == "postgresql":
                cur.execute(f"ALTER ROLE CURRENT_USER PASSWORD '{server.password}'")
            else:
                cur.execute(f"SET PASSWORD = PASSWORD('{server.password}')")
    finally:
        admin.close()
    assert record.outcome == "FINISHED", (record.error_id, record.error_message)
    assert rows(server, f"SELECT count(*) FROM {table}") == [(0,)]
    datapipeline.assert_clean()
