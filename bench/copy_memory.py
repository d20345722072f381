"""Peak memory of CopyActivity (``dptr-activity``) copying a 1 GiB object and a 1,000,000-row table.

Starts moto's S3 in server mode and a real PostgreSQL server (Debian's, as the suite
does: dptr_testbed.databases), both on loopback, then runs the real ``dptr-activity``
entry point in a fresh subprocess for each copy, with a plan file as the per-attempt
Secret would mount it, and prints the subprocess's peak resident memory (``VmHWM``):

* ``s3-to-s3``: a ``--size-mb`` (1 GiB by default) object, byte for byte;
* ``s3-to-s3-gzip``: the same object, gzip-compressed on the way;
* ``sql-to-s3``: a ``--rows`` (1,000,000 by default) row table to a CSV object;
* ``s3-to-sql``: that object back into a second table.

Each copy is checked (the object's SHA-256, the table's row count and a checksum of its
rows) before its figure is printed.  The bar is the activity container's default memory
limit (dptr_common.render_activity: 256 MiB).

    .venv/bin/python bench/copy_memory.py [--size-mb 1024] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BAR_MB = 256
CHILD = r"""
import json, sys
from pathlib import Path
from dptr_activities.cli import main
rc = main()
status = Path("/proc/self/status").read_text()
hwm = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "vmhwm_kb": int(hwm)}))
"""


def _chunks(size: int, digest: Any) -> Iterator[bytes]:
    block = hashlib.sha256(b"dptr").digest() * (1024 * 1024 // 32)
    sent = counter = 0
    while sent < size:
        piece = (counter.to_bytes(8, "big") + block[8:])[: size - sent]
        digest.update(piece)
        sent += len(piece)
        counter += 1
        yield piece


def _run(name: str, plan: dict[str, Any], env: dict[str, str], tmp: Path) -> float:
    plan_file = tmp / f"{name}.json"
    plan_file.write_text(json.dumps(plan))
    child_env = {
        **env,
        "DPTR_ACTIVITY_PLAN": str(plan_file),
        "DPTR_PIPELINE_ID": plan["pipeline_id"],
        "DPTR_ATTEMPT_ID": plan["attempt_id"],
        "DPTR_TERMINATION_LOG": str(tmp / f"{name}.termination"),
        "DPTR_LOG_LEVEL": "WARNING",
    }
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=child_env, capture_output=True, text=True, check=False
    )
    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}
    if out.returncode != 0 or result.get("rc") != 0:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr}")
    mb = int(result["vmhwm_kb"]) / 1024
    print(f"{name}: {time.monotonic() - started:.1f}s, peak RSS (VmHWM) {mb:.1f} MB", flush=True)
    return mb


def _sha256(s3: Any, bucket: str, key: str, *, gunzip: bool = False) -> str:
    import zlib

    body = s3._client.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    inflater = zlib.decompressobj(wbits=31) if gunzip else None
    for block in body.iter_chunks(1024 * 1024):
        digest.update(inflater.decompress(block) if inflater else block)
    if inflater:
        digest.update(inflater.flush())
    return digest.hexdigest()


def _node(node_id: str, uri: str, kind: str, compression: str = "none") -> dict[str, Any]:
    return {"id": node_id, "type": "S3DataNode", "uri": uri, "kind": kind, "compression": compression}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="object size in MiB (default 1024)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (default 1,000,000)")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024

    from moto.server import ThreadedMotoServer

    from dptr_sidecar.s3 import S3Client, S3Uri
    from dptr_testbed.databases import postgres_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "AKIDBENCH",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
            "NO_PROXY": "127.0.0.1",
        }
    )
    figures: dict[str, float] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="dptr-bench-") as tmp_name,
            S3Client(env=env) as s3,
            postgres_server(Path(tmp_name) / "pg") as pg,
        ):
            tmp = Path(tmp_name)
            s3._client.create_bucket(Bucket="bench")
            digest = hashlib.sha256()
            started = time.monotonic()
            s3.upload_stream(_chunks(size, digest), S3Uri("bench", "in/big.bin"))
            expected = digest.hexdigest()
            print(f"uploaded {args.size_mb} MiB to moto in {time.monotonic() - started:.1f}s", flush=True)
            base = {"type": "CopyActivity", "pipeline_id": "df-BENCH", "attempt_id": "@bench_Attempt"}

            figures["s3-to-s3"] = _run(
                "s3-to-s3",
                {
                    **base,
                    "input": _node("In", "s3://bench/in/big.bin", "file"),
                    "output": _node("Out", "s3://bench/out/big.bin", "file"),
                },
                env,
                tmp,
            )
            assert _sha256(s3, "bench", "out/big.bin") == expected, "the copy differs from the object"
            s3._client.delete_object(Bucket="bench", Key="out/big.bin")
            figures["s3-to-s3-gzip"] = _run(
                "s3-to-s3-gzip",
                {
                    **base,
                    "input": _node("In", "s3://bench/in/big.bin", "file"),
                    "output": _node("Out", "s3://bench/gz/big.bin.gz", "file", "gzip"),
                },
                env,
                tmp,
            )
            assert _sha256(s3, "bench", "gz/big.bin.gz", gunzip=True) == expected, "the gzip copy differs"
            s3._client.delete_object(Bucket="bench", Key="gz/big.bin.gz")
            s3._client.delete_object(Bucket="bench", Key="in/big.bin")

            conn = pg.connect()
            cur = conn.cursor()
            started = time.monotonic()
            cur.execute("CREATE TABLE source_rows (id INTEGER, name TEXT, note TEXT, at TIMESTAMP)")
            cur.execute(
                "INSERT INTO source_rows SELECT i, 'name ' || i || ', é', "
                "CASE WHEN i %% 10 = 0 THEN NULL ELSE md5(i::text) END, "
                "TIMESTAMP '2026-01-01' + i * INTERVAL '1 second' FROM generate_series(1, %s) AS i",
                (args.rows,),
            )
            cur.execute("CREATE TABLE copied_rows (LIKE source_rows)")
            conn.commit()
            print(f"filled a {args.rows}-row table in {time.monotonic() - started:.1f}s", flush=True)
            database = {
                "id": "Db",
                "type": "JdbcDatabase",
                "dialect": "postgresql",
                "host": pg.host,
                "port": pg.port,
                "database": pg.database,
                "username": pg.user,
                "password": pg.password,
            }
            figures["sql-to-s3"] = _run(
                "sql-to-s3",
                {
                    **base,
                    "input": {
                        "id": "Query",
                        "type": "SqlDataNode",
                        "select_query": "SELECT * FROM source_rows ORDER BY id",
                        "database": database,
                    },
                    "output": _node("Out", "s3://bench/rows/rows.csv", "file"),
                },
                env,
                tmp,
            )
            figures["s3-to-sql"] = _run(
                "s3-to-sql",
                {
                    **base,
                    "input": _node("In", "s3://bench/rows/rows.csv", "file"),
                    "output": {
                        "id": "Table",
                        "type": "SqlDataNode",
                        "table": "copied_rows",
                        "database": database,
                    },
                },
                env,
                tmp,
            )
            checksum = (
                "SELECT count(*), sum(id), md5(string_agg(coalesce(name, '') || coalesce(note, '<null>') "
                "|| at::text, '|' ORDER BY id)) FROM {}"
            )
            cur.execute(checksum.format("source_rows"))
            want = cur.fetchone()
            cur.execute(checksum.format("copied_rows"))
            got = cur.fetchone()
            conn.close()
            assert want == got, f"the copied table differs: {want} != {got}"
            print(f"the table came back intact: {got[0]} rows", flush=True)
    finally:
        server.stop()
    worst = max(figures.values())
    for name, mb in figures.items():
        print(f"{name}: peak RSS {mb:.1f} MB")
    verdict = "within" if worst <= BAR_MB else "ABOVE"
    print(f"peak {worst:.1f} MB, {verdict} the activity container's {BAR_MB} MiB default limit")
    return 0 if worst <= BAR_MB else 1


if __name__ == "__main__":
    sys.exit(main())
