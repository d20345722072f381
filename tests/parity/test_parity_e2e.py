"""Task Runner parity end to end on the test bed.

The real ``dptr-operator`` process polls the local Data Pipeline service, renders the
Job with ``render_job`` (staging included) and creates it; the kubelet stand-in runs the
pod's containers as host processes (``dptr-sidecar``, ``dptr-fetch-script``,
``dptr-stage-in``, the task under the log-capture wrapper) with the TaskRunner's
``s3EndpointUrl`` pointing at moto's S3 in server mode on loopback.  Every outcome is the
one the real sidecar reported with SetTaskStatus; objects in S3 are checked byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from parity_helpers import WORKER_GROUP, keys_under, read_gzip_object, read_object
from parity_helpers import outcomes as _outcomes

from dptr_datapipeline import LocalDataPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster

SCRIPT = b"""#!/bin/sh
i=0
for a in "$@"; do i=$((i+1)); printf '%s:<%s>\\n' "$i" "$a"; done
echo "script stderr" >&2
"""
TRICKY_ARGS = ["two words", "it's", 'say "hi"', "$HOME `id` $(id)", "", "  lead and trail  ", "*"]

TRANSFORM = (
    'tr a-z A-Z < "${INPUT1_STAGING_DIR}/data.bin" > "$OUTPUT1_STAGING_DIR/upper.bin"; '
    'mkdir -p "$OUTPUT1_STAGING_DIR/nested" && printf "\\000\\377" > "$OUTPUT1_STAGING_DIR/nested/raw"; '
    'echo "transformed $(wc -c < "${INPUT1_STAGING_DIR}/data.bin") bytes"; echo "a warning" >&2'
)
BROKEN = 'echo partial > "$OUTPUT1_STAGING_DIR/partial"; echo out; echo "it broke" >&2; exit 3'


def _log_prefix(record: Any, base: str) -> str:
    return f"{base}{record.pipeline_id}/{record.object_id}/{record.instance_id}/{record.attempt_id}/"


def _pod_containers(cluster: Cluster) -> set[str]:
    return {
        c["name"]
        for pod in cluster.pods()
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    }


def test_script_uri_runs_with_arguments_exactly_as_given(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_raw: Any, s3_bucket: str
) -> None:
    s3_raw.put_object(Bucket=s3_bucket, Key="scripts/echo args.sh", Body=SCRIPT)
    datapipeline.run_pipeline(
        {
            "Default": {"pipelineLogUri": f"s3://{s3_bucket}/logs/"},
            "Script": {
                "type": "ShellCommandActivity",
                "scriptUri": f"s3://{s3_bucket}/scripts/echo args.sh",
                "scriptArgument": TRICKY_ARGS,
                "maximumRetries": "0",
            },
        },
        worker_group=WORKER_GROUP,
    )
    record = _outcomes(datapipeline, "Script")["Script"]
    assert (record.outcome, record.error_id) == ("FINISHED", None), record.error_message
    expected = "".join(f"{i}:<{a}>\n" for i, a in enumerate(TRICKY_ARGS, start=1)).encode()
    prefix = _log_prefix(record, "logs/")
    assert keys_under(s3_raw, s3_bucket, "logs/") == [
        prefix + "Activity.log.gz",
        prefix + "StdError.gz",
        prefix + "StdOutput.gz",
    ]
    assert read_gzip_object(s3_raw, s3_bucket, prefix + "StdOutput.gz") == expected
    assert read_gzip_object(s3_raw, s3_bucket, prefix + "StdError.gz") == b"script stderr\n"
    assert "dptr-fetch-script" in _pod_containers(parity_runner)
    (task,) = wait_for(
        lambda: [t for t in parity_runner.tasks() if t["status"].get("report", {}).get("reportedAt")],
        timeout=30,
        what="the report recorded on the PipelineTask",
    )
    assert task["status"]["report"]["reportedBy"].startswith("sidecar/")
    datapipeline.assert_clean()


def _staged(bucket: str, name: str, command: str) -> dict[str, Any]:
    return {
        name: {
            "type": "ShellCommandActivity",
            "command": command,
            "stage": "true",
            "input": {"ref": "In"},
            "output": {"ref": f"{name}Out"},
            "stdout": f"s3://{bucket}/{name}/stdout.txt",
            "stderr": f"s3://{bucket}/{name}/stderr.txt",
            "maximumRetries": "0",
        },
        f"{name}Out": {
            "type": "S3DataNode",
            "directoryPath": f"s3://{bucket}/output/{name}/#{{myRunDate}}",
            "myRunDate": "2024-05-01",
        },
    }


def test_staged_transform_and_logs_after_success_and_failure(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_raw: Any, s3_bucket: str
) -> None:
    data = b"hello, staging\n" * 1000 + bytes(range(256))
    s3_raw.put_object(Bucket=s3_bucket, Key="input/data.bin", Body=data)
    datapipeline.run_pipeline(
        {
            "Default": {"pipelineLogUri": f"s3://{s3_bucket}/pipeline-logs"},
            "In": {"type": "S3DataNode", "filePath": f"s3://{s3_bucket}/input/data.bin"},
            **_staged(s3_bucket, "Transform", TRANSFORM),
            **_staged(s3_bucket, "Broken", BROKEN),
        },
        worker_group=WORKER_GROUP,
    )
    records = _outcomes(datapipeline, "Transform", "Broken")
    ok, broken = records["Transform"], records["Broken"]
    assert (ok.outcome, ok.error_id) == ("FINISHED", None), ok.error_message
    assert (broken.outcome, broken.error_id) == ("FAILED", "dptr.ExitCode.3")

    # The staged output, byte for byte; nothing from the failed command.
    out = "output/Transform/2024-05-01/"
    assert keys_under(s3_raw, s3_bucket, "output/") == [out + "nested/raw", out + "upper.bin"]
    upper = data.translate(bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    assert read_object(s3_raw, s3_bucket, out + "upper.bin") == upper
    assert read_object(s3_raw, s3_bucket, out + "nested/raw") == b"\x00\xff"

    # stdout/stderr where each activity says, after success and after failure.
    stdout = f"transformed {len(data)} bytes\n".encode()
    assert read_object(s3_raw, s3_bucket, "Transform/stdout.txt") == stdout
    assert read_object(s3_raw, s3_bucket, "Transform/stderr.txt") == b"a warning\n"
    assert read_object(s3_raw, s3_bucket, "Broken/stdout.txt") == b"out\n"
    assert read_object(s3_raw, s3_bucket, "Broken/stderr.txt") == b"it broke\n"

    # pipelineLogUri: the official runner's layout and names, for both attempts.
    ok_prefix, broken_prefix = _log_prefix(ok, "pipeline-logs/"), _log_prefix(broken, "pipeline-logs/")
    names = ["Activity.log.gz", "StdError.gz", "StdOutput.gz"]
    assert keys_under(s3_raw, s3_bucket, "pipeline-logs/") == sorted(
        [ok_prefix + n for n in names] + [broken_prefix + n for n in names]
    )
    assert read_gzip_object(s3_raw, s3_bucket, ok_prefix + "StdOutput.gz") == stdout
    assert read_gzip_object(s3_raw, s3_bucket, ok_prefix + "StdError.gz") == b"a warning\n"
    assert b"upper.bin" in read_gzip_object(s3_raw, s3_bucket, ok_prefix + "Activity.log.gz")
    assert read_gzip_object(s3_raw, s3_bucket, broken_prefix + "StdOutput.gz") == b"out\n"
    assert read_gzip_object(s3_raw, s3_bucket, broken_prefix + "StdError.gz") == b"it broke\n"
    assert b"exited with code 3" in read_gzip_object(s3_raw, s3_bucket, broken_prefix + "Activity.log.gz")
    assert "dptr-stage-in" in _pod_containers(parity_runner)
    datapipeline.assert_clean()


def test_missing_input_object_ends_failed_with_a_staging_error_id(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_raw: Any, s3_bucket: str
) -> None:
    datapipeline.run_pipeline(
        {
            "Default": {"pipelineLogUri": f"s3://{s3_bucket}/logs/"},
            "In": {"type": "S3DataNode", "filePath": f"s3://{s3_bucket}/input/missing.bin"},
            **_staged(s3_bucket, "Transform", "echo never runs"),
        },
        worker_group=WORKER_GROUP,
    )
    record = _outcomes(datapipeline, "Transform")["Transform"]
    assert (record.outcome, record.error_id) == ("FAILED", "dptr.StagingFailed.NoSuchKey")
    assert f"s3://{s3_bucket}/input/missing.bin" in (record.error_message or "")
    # The task never ran and no output was written; the attempt's activity log says why.
    assert keys_under(s3_raw, s3_bucket, "output/") == []
    prefix = _log_prefix(record, "logs/")
    activity = read_gzip_object(s3_raw, s3_bucket, prefix + "Activity.log.gz")
    assert b"dptr-stage-in failed: dptr.StagingFailed.NoSuchKey" in activity
    assert b"task container did not run" in activity
    (task,) = wait_for(
        lambda: [t for t in parity_runner.tasks() if t["status"].get("report", {}).get("reportedAt")],
        timeout=30,
        what="the report recorded on the PipelineTask",
    )
    assert task["status"]["report"]["reportedBy"].startswith("sidecar/")
    assert task["status"]["phase"] == "Failed"
    datapipeline.assert_clean()


def test_failed_log_upload_is_reported_without_changing_the_outcome(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_bucket: str
) -> None:
    datapipeline.run_pipeline(
        {
            "Echo": {
                "type": "ShellCommandActivity",
                "command": "echo fine",
                "stdout": "s3://no-such-bucket-parity-e2e/stdout",
                "maximumRetries": "0",
            }
        },
        worker_group=WORKER_GROUP,
    )
    record = _outcomes(datapipeline, "Echo")["Echo"]
    assert (record.outcome, record.error_id) == ("FINISHED", None)
    assert "NoSuchBucket" in (record.error_message or ""), record.error_message
    warned = wait_for(
        lambda: parity_runner.events("LogUploadFailed"), timeout=10, what="a LogUploadFailed Event"
    )
    assert warned[0]["type"] == "Warning" and "NoSuchBucket" in warned[0]["message"]
    datapipeline.assert_clean()
