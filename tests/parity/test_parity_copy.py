"""CopyActivity end to end on the test bed: S3 to a real PostgreSQL or MariaDB table and
back, S3 to S3, a refused record, a 100,000-row copy and a cancel.

The local service queues each CopyActivity with its data nodes, their data formats and
the SqlDataNode's database (``*password`` included); the real operator resolves the plan
and its Secret; the kubelet stand-in runs ``dptr-activity`` beside the real sidecar;
moto's S3 server holds the objects.  The CSV the tests write by hand follows the guide's
rules for CopyActivity (no quoting, ``\\`` escapes the next character, ``\\n`` ends a
record) and dptr's ``\\N`` for NULL (docs/task-runner-parity.md).
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from op_helpers import Cluster, OperatorProcess
from parity_helpers import WORKER_GROUP, ParityS3, outcomes
from sql_helpers import database, everything_said, rows, running

from dptr_activities.records import RecordFormat, parse_records
from dptr_datapipeline import LocalDataPipeline
from dptr_datapipeline.definition import definition_file_to_api
from dptr_testbed.databases import DatabaseServer
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]

# Commas, quotes, a newline, backslashes, NULL, an empty string, a literal "\N", non-ASCII.
HOSTILE_CSV = (
    "1,plain,text\n"
    '2,a\\,b,say "hi"\n'
    "3,line\\\nbreak,back\\\\slash\n"
    "4,\\N,\n"
    "5,\\\\N,N\n"
    "6,Zoë 東京 €,tab\there\n"
    "7,'; DROP TABLE x; --,\\,\\\n\\\\\n"
).encode()
HOSTILE_ROWS = [
    (1, "plain", "text"),
    (2, "a,b", 'say "hi"'),
    (3, "line\nbreak", "back\\slash"),
    (4, None, ""),
    (5, "\\N", "N"),
    (6, "Zoë 東京 €", "tab\there"),
    (7, "'; DROP TABLE x; --", ",\n\\"),
]


def _create(server: DatabaseServer, table: str) -> None:
    conn = server.connect()
    try:
        conn.cursor().execute(f"CREATE TABLE {table} (id INTEGER, name VARCHAR(200), note VARCHAR(200))")
        conn.commit()
    finally:
        conn.close()


def _s3_node(path: str, **fields: Any) -> dict[str, Any]:
    key = "directoryPath" if path.endswith("/") else "filePath"
    return {"type": "S3DataNode", key: path, **fields}


def _copy(source: str, target: str) -> dict[str, Any]:
    return {
        "type": "CopyActivity",
        "input": {"ref": source},
        "output": {"ref": target},
        "maximumRetries": "0",
    }


def test_a_table_round_trip_through_s3_keeps_every_byte_and_the_password_is_said_nowhere(
    parity_runner: Cluster,
    parity_operator: OperatorProcess,
    datapipeline: LocalDataPipeline,
    parity_s3: ParityS3,
    server: DatabaseServer,
    table: str,
) -> None:
    _create(server, table)
    parity_s3.put("in/people.csv", HOSTILE_CSV)
    datapipeline.run_pipeline(
        {
            "Db": database(server),
            "Csv": {"type": "CSV", "column": ["id INT", "name STRING", "note STRING"]},
            "Source": _s3_node(parity_s3.uri("in/people.csv"), dataFormat={"ref": "Csv"}),
            "Table": {"type": "SqlDataNode", "database": {"ref": "Db"}, "table": table},
            "Load": _copy("Source", "Table"),
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Load", timeout=120)["Load"]
    assert record.outcome == "FINISHED", (record.error_id, record.error_message)
    assert rows(server, f"SELECT id, name, note FROM {table} ORDER BY id") == HOSTILE_ROWS

    datapipeline.run_pipeline(
        {
            "Db": database(server),
            "Query": {
                "type": "SqlDataNode",
                "database": {"ref": "Db"},
                "table": table,
                "selectQuery": f"SELECT id, name, note FROM {table} ORDER BY id",
            },
            "Csv": {"type": "CSV"},
            "Target": _s3_node(parity_s3.uri("out/"), dataFormat={"ref": "Csv"}, compression="gzip"),
            "Unload": _copy("Query", "Target"),
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Unload", timeout=120)["Unload"]
    assert record.outcome == "FINISHED", (record.error_id, record.error_message)
    assert parity_s3.keys("out/") == ["out/part-00000"]
    assert parity_s3.read_gzip("out/part-00000") == HOSTILE_CSV
    assert server.password not in everything_said(parity_runner, parity_operator, parity_s3)
    datapipeline.assert_clean()


def test_s3_to_s3_copies_a_directory_with_gzip_and_a_file_between_formats(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, parity_s3: ParityS3
) -> None:
    blob = bytes(range(256)) * 4096 + "Zoë\n".encode()  # bytes, not text: copied as they are
    parity_s3.put("src/a/blob.bin", blob)
    parity_s3.put("src/a/deeper/b.txt", b"second object\n")
    parity_s3.put("src/people.tsv", "1\ta,b\tZoë\n2\t\\N\tx\\\ty\n".encode())
    datapipeline.run_pipeline(
        {
            "Dir": _s3_node(parity_s3.uri("src/a/")),
            "Zipped": _s3_node(parity_s3.uri("dst/zipped/"), compression="gzip"),
            "Unzipped": _s3_node(parity_s3.uri("dst/plain/")),
            "Zip": _copy("Dir", "Zipped"),
            "Unzip": {**_copy("Zipped", "Unzipped"), "dependsOn": {"ref": "Zip"}},
            "Tsv": {"type": "TSV"},
            "Csv": {"type": "CSV"},
            "TsvFile": _s3_node(parity_s3.uri("src/people.tsv"), dataFormat={"ref": "Tsv"}),
            "CsvFile": _s3_node(parity_s3.uri("dst/people.csv"), dataFormat={"ref": "Csv"}),
            "Convert": _copy("TsvFile", "CsvFile"),
        },
        worker_group=WORKER_GROUP,
    )
    done = outcomes(datapipeline, "Zip", "Unzip", "Convert", timeout=180)
    for name, record in done.items():
        assert record.outcome == "FINISHED", (name, record.error_id, record.error_message)
    assert parity_s3.keys("dst/zipped/") == ["dst/zipped/blob.bin", "dst/zipped/deeper/b.txt"]
    assert gzip.decompress(parity_s3.read("dst/zipped/blob.bin")) == blob
    assert parity_s3.read("dst/plain/blob.bin") == blob
    assert parity_s3.read("dst/plain/deeper/b.txt") == b"second object\n"
    assert parity_s3.read("dst/people.csv") == "1,a\\,b,Zoë\n2,\\N,x\ty\n".encode()
    datapipeline.assert_clean()


def test_a_bad_record_fails_the_copy_and_inserts_nothing(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, parity_s3: ParityS3, postgres: DatabaseServer
) -> None:
    table = f"t_{uuid.uuid4().hex[:10]}"
    _create(postgres, table)
    # A Custom format, as the guide's Hive-style exports write it.
    good = "".join(f"{i}|name {i}|a\\|b\u0001" for i in range(1, 5001))
    parity_s3.put("bad/in.txt", (good + "5001|only two\u0001").encode())
    datapipeline.run_pipeline(
        {
            "Db": database(postgres),
            "Custom": {"type": "Custom", "columnSeparator": "|", "recordSeparator": "\\u0001"},
            "Source": _s3_node(parity_s3.uri("bad/in.txt"), dataFormat={"ref": "Custom"}),
            "Table": {"type": "SqlDataNode", "database": {"ref": "Db"}, "table": table},
            "Load": _copy("Source", "Table"),
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Load", timeout=120)["Load"]
    assert record.outcome == "FAILED"
    assert record.error_id == "dptr.Copy.BadRecord"
    assert (
        "record 5001" in record.error_message and "has 2 field(s); the insert takes 3" in record.error_message
    )
    assert rows(postgres, f"SELECT count(*) FROM {table}") == [(0,)]  # 4,000 were inserted, then rolled back
    datapipeline.assert_clean()


def test_a_hundred_thousand_rows_copy_in_and_out(
    parity_runner: Cluster,
    datapipeline: LocalDataPipeline,
    parity_s3: ParityS3,
    server: DatabaseServer,
    table: str,
) -> None:
    """TSV, gzip in, createTableSql (the table does not exist yet), insertQuery, selectQuery."""
    data = "".join(f"{i}\tname {i} é\tnote\\\t{i % 97}\n" for i in range(1, 100_001)).encode()
    parity_s3.put("big/in.tsv.gz", gzip.compress(data))
    datapipeline.run_pipeline(
        {
            "Db": database(server),
            "Tsv": {"type": "TSV"},
            "Source": _s3_node(parity_s3.uri("big/in.tsv.gz"), compression="gzip", dataFormat={"ref": "Tsv"}),
            "Table": {
                "type": "SqlDataNode",
                "database": {"ref": "Db"},
                "table": table,
                "createTableSql": f"CREATE TABLE {table} (id INTEGER, name VARCHAR(200), note VARCHAR(200))",
                "insertQuery": f"INSERT INTO {table} (id, name, note) VALUES (?, ?, ?)",
                "selectQuery": f"SELECT id, name, note FROM {table} ORDER BY id",
            },
            "Target": _s3_node(parity_s3.uri("big/out.tsv"), dataFormat={"ref": "Tsv"}),
            "Load": _copy("Source", "Table"),
            "Unload": {**_copy("Table", "Target"), "dependsOn": {"ref": "Load"}},
        },
        worker_group=WORKER_GROUP,
    )
    done = outcomes(datapipeline, "Load", "Unload", timeout=300)
    for name, record in done.items():
        assert record.outcome == "FINISHED", (name, record.error_id, record.error_message)
    assert rows(server, f"SELECT count(*), min(id), max(id) FROM {table}") == [(100_000, 1, 100_000)]
    assert rows(server, f"SELECT note FROM {table} WHERE id = 5") == [("note\t5",)]
    assert parity_s3.read("big/out.tsv") == data
    datapipeline.assert_clean()


def test_a_cancel_stops_the_copys_query_on_the_server(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, parity_s3: ParityS3, server: DatabaseServer
) -> None:
    marker = f"dptr_copy_cancel_{uuid.uuid4().hex[:8]}"
    sleep = "SELECT pg_sleep(600)" if server.kind == "postgresql" else "SELECT SLEEP(600)"
    pipeline_id = datapipeline.run_pipeline(
        {
            # PostgreSQL shows the cursor's FETCH, not the query: the marker names the connection.
            "Db": {**database(server), "jdbcProperties": [f"ApplicationName={marker}"]},
            "Query": {
                "type": "SqlDataNode",
                "database": {"ref": "Db"},
                "selectQuery": f"{sleep} /* {marker} */",
            },
            "Target": _s3_node(parity_s3.uri("cancelled/out.csv")),
            "Unload": _copy("Query", "Target"),
        },
        worker_group=WORKER_GROUP,
    )
    wait_for(lambda: running(server, marker), timeout=120, what="the copy's query running on the server")
    (attempt,) = [r for r in datapipeline.ledger.attempts.values() if r.object_id == "Unload"]
    datapipeline.client().set_status(pipelineId=pipeline_id, objectIds=[attempt.instance_id], status="CANCEL")
    record = outcomes(datapipeline, "Unload", timeout=60)["Unload"]
    assert record.outcome == "CANCELED"
    wait_for(lambda: not running(server, marker), timeout=30, what="the query gone from the server")
    wait_for(lambda: not parity_runner.pods(), timeout=60, what="the pod gone after the cancel")
    assert parity_s3.keys("cancelled/") == []  # the multipart upload was aborted, not completed
    datapipeline.assert_clean()


def test_the_guides_mysql_example_validates_and_runs(
    parity_runner: Cluster,
    parity_operator: OperatorProcess,
    datapipeline: LocalDataPipeline,
    parity_s3: ParityS3,
    mariadb: DatabaseServer,
) -> None:
    """docs/examples/copy-mysql-to-s3.json: the guide's "Copy MySQL data" pipeline
    (dp-copymysql-cli, and the "Full copy of RDS MySQL table to S3" template's
    parameters), with a workerGroup for runsOn, and back into a MySqlDataNode."""
    table = f"t_{uuid.uuid4().hex[:10]}"
    conn = mariadb.connect()
    try:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {table} (id INTEGER, name VARCHAR(200), note VARCHAR(200))")
        cur.execute(f"CREATE TABLE {table}_copy LIKE {table}")
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s, %s)", HOSTILE_ROWS)
        conn.commit()
    finally:
        conn.close()
    definition = json.loads((REPO / "docs" / "examples" / "copy-mysql-to-s3.json").read_text())
    values = {
        "myRDSConnectStr": mariadb.jdbc_url,
        "myRDSUsername": mariadb.user,
        "*myRDSPassword": mariadb.password,
        "myRDSTableName": table,
        "myOutputS3Loc": parity_s3.uri("guide/"),
        "myWorkerGroup": WORKER_GROUP,
    }
    client = datapipeline.client()
    pipeline_id = client.create_pipeline(name="guide-mysql", uniqueId=uuid.uuid4().hex)["pipelineId"]
    api = definition_file_to_api({**definition, "values": values})
    checked = client.validate_pipeline_definition(pipelineId=pipeline_id, **api)
    assert not checked["errored"], checked["validationErrors"]
    put = client.put_pipeline_definition(pipelineId=pipeline_id, **api)
    assert not put["errored"], put["validationErrors"]
    client.activate_pipeline(pipelineId=pipeline_id)
    done = outcomes(datapipeline, "RDStoS3CopyActivity", "S3toMySqlCopyActivity", timeout=180)
    for name, record in done.items():
        assert record.outcome == "FINISHED", (name, record.error_id, record.error_message)
    # "select * from" has no order: the unload holds the input's records, in some order.
    unload = list(parse_records([parity_s3.read("guide/part-00000").decode()], RecordFormat.of(None)))
    assert sorted(unload, key=lambda r: int(str(r[0]))) == [[str(r[0]), r[1], r[2]] for r in HOSTILE_ROWS]
    assert rows(mariadb, f"SELECT id, name, note FROM {table}_copy ORDER BY id") == HOSTILE_ROWS
    # The MySqlDataNode's own *password, and the encrypted parameter it came from.
    assert mariadb.password not in everything_said(parity_runner, parity_operator, parity_s3)
    datapipeline.assert_clean()
