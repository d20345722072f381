"""What the SqlActivity and CopyActivity parity tests share: the database server fixture
(the ``server`` and ``table`` fixtures are in conftest.py), the database object of a pipeline,
reading a table, and the grep for the password over everything the attempt said."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from parity_helpers import ParityS3

from dptr_testbed.databases import DatabaseServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster, OperatorProcess


def database(server: DatabaseServer, password: str | None = None) -> dict[str, Any]:
    driver = "org.postgresql.Driver" if server.kind == "postgresql" else "com.mysql.jdbc.Driver"
    return {
        "type": "JdbcDatabase",
        "connectionString": server.jdbc_url,
        "jdbcDriverClass": driver,
        "username": server.user,
        "*password": password or server.password,
    }


def rows(server: DatabaseServer, query: str) -> list[tuple[Any, ...]]:
    conn = server.connect()
    try:
        cur = conn.cursor()
        cur.execute(query)
        return [tuple(r) for r in cur.fetchall()]
    finally:
        conn.close()


def everything_said(cluster: Cluster, operator: OperatorProcess, s3: ParityS3) -> str:
    """Every object the attempt made (but its plan Secret), every Event, every log."""
    ns = cluster.namespace
    said = []
    for kind in ("pipelinetasks", "jobs", "pods", "events", "configmaps", "taskrunners"):
        said.append(cluster.testbed.kubectl("get", kind, "-n", ns, "-o", "json"))
    secrets = json.loads(cluster.testbed.kubectl("get", "secrets", "-n", ns, "-o", "json"))["items"]
    plans = [s for s in secrets if s["metadata"].get("labels", {}).get("dptr.dev/role") == "activity-plan"]
    said.append(json.dumps([s for s in secrets if s not in plans]))
    for plan in plans:  # its metadata, not its data
        said.append(json.dumps(plan["metadata"]))
    for pod in cluster.pods():
        for container in ("task", "dptr-sidecar"):
            said.append(
                cluster.testbed.kubectl(
                    "logs", "-n", ns, pod["metadata"]["name"], "-c", container, check=False
                )
            )
    said.append(operator.logs())
    for key in s3.keys():
        said.append(s3.read(key).decode("utf-8", "replace"))
    return "\n".join(said)


def running(server: DatabaseServer, marker: str) -> list[tuple[Any, ...]]:
    if server.kind == "postgresql":
        # A copy's query runs as a cursor's FETCH: its connection is found by application_name.
        query = (
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
            f"(query LIKE '%{marker}%' OR application_name = '{marker}')"
        )
    else:
        query = (
            "SELECT ID FROM information_schema.PROCESSLIST "
            f"WHERE INFO LIKE '%{marker}%' AND ID <> CONNECTION_ID()"
        )
    return rows(server, query)
