"""Helpers of the attack tests (fixtures are in conftest.py)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

from dptr_datapipeline import LocalDataPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster

from dptr_testbed.waiting import wait_for

__all__ = ["find_leaks", "outcomes"]


def outcomes(dp: LocalDataPipeline, *object_ids: str, timeout: float = 90.0) -> dict[str, Any]:
    """The attempt record of each object once it has its outcome."""

    def done() -> dict[str, Any] | None:
        records = {r.object_id: r for r in dp.ledger.attempts.values() if r.object_id in object_ids}
        if set(records) == set(object_ids) and all(r.outcome for r in records.values()):
            return records
        return None

    records: dict[str, Any] = wait_for(done, timeout=timeout, interval=0.2, what=f"outcomes of {object_ids}")
    return records


def find_leaks(
    secret: str, *, cluster: Cluster, datapipeline: LocalDataPipeline, s3_raw: Any, buckets: list[str]
) -> list[str]:
    """Every place an attacker (a pipeline author, a tenant) can read where ``secret`` shows:
    PipelineTasks, Jobs, pods (spec and status), Events, every S3 key and object body
    (gzipped ones decompressed), and everything Data Pipeline recorded (fields, errorIds,
    messages, stack traces)."""
    where: list[str] = []
    for kind, items in (
        ("PipelineTask", cluster.tasks()),
        ("Job", cluster.jobs()),
        ("Pod", cluster.pods()),
        ("Event", cluster.events()),
    ):
        for item in items:
            if secret in json.dumps(item):
                where.append(f"{kind} {item['metadata']['name']}")
    for bucket in buckets:
        pages = s3_raw.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in (i for page in pages for i in page.get("Contents", [])):
            key = item["Key"]
            if secret in key:
                where.append(f"S3 key s3://{bucket}/{key}")
            body = s3_raw.get_object(Bucket=bucket, Key=key)["Body"].read()
            if key.endswith(".gz"):
                body = gzip.decompress(body)
            if secret.encode() in body:
                where.append(f"S3 object s3://{bucket}/{key}")
    ledger = json.dumps(datapipeline.ledger.to_json(include_calls=True), default=str)
    if secret in ledger:
        where.append("the Data Pipeline ledger (what the service recorded)")
    return where
