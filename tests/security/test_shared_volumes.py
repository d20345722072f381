"""Attack: the task's own process plants links, FIFOs, devices, huge files and a forged
staging plan in the volumes it shares with the sidecar.

The task container writes ``/dptr/logs`` (its captured stdout/stderr) and
``/dptr/staging`` (its outputs); the sidecar reads both after the task exits, holding
the TaskRunner's AWS keys in its env and its API token in its own mount.  Whatever the
task leaves there must never make the sidecar read anything but the regular files the
task wrote inside the volume, nor hang it: each attack ends FAILED with an errorId that
names it, and neither the canary key nor the token reaches S3.
"""

from __future__ import annotations

from typing import Any

import pytest
from op_helpers import Cluster
from security_helpers import find_leaks, outcomes

from dptr_datapipeline import LocalDataPipeline

pytestmark = pytest.mark.cluster

WORKER_GROUP = "wg-volumes"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: A plan the task writes where stage-in used to leave the resolved one.
FORGED_PLAN = (
    '{"pipelineId":"df-x","nodes":[{"direction":"output","index":1,"ref":"Out",'
    f'"staging_dir":"{TOKEN_DIR}","uri":"s3://BUCKET/stolen","kind":"directory"}}]}}'
)


def _after_capture(stream: str) -> str:
    """Write a line, then wait until the wrapper's tee has it in the capture file: only
    then is the file tee's, and replacing it is an attack rather than a race with tee."""
    redirect = " >&2" if stream == "stderr" else ""
    return f'echo hi{redirect}; while [ ! -s "$DPTR_LOG_DIR/{stream}" ]; do sleep 0.05; done; '


#: name -> (command, stages an output?, expected errorId)
ATTACKS: dict[str, tuple[str, bool, str | None]] = {
    "LogToEnviron": (
        _after_capture("stdout") + 'ln -sf /proc/self/environ "$DPTR_LOG_DIR/stdout"',
        False,
        "Symlink",
    ),
    "LogToDevZero": (_after_capture("stderr") + 'ln -sf /dev/zero "$DPTR_LOG_DIR/stderr"', False, "Symlink"),
    "LogFifo": (
        _after_capture("stdout") + 'rm -f "$DPTR_LOG_DIR/stdout"; mkfifo "$DPTR_LOG_DIR/stdout"',
        False,
        "NotRegularFile",
    ),
    "LogHuge": (_after_capture("stdout") + 'truncate -s 64M "$DPTR_LOG_DIR/stdout"', False, "TooLarge"),
    "OutToToken": (
        f'rmdir "$OUTPUT1_STAGING_DIR"; ln -s {TOKEN_DIR} "$OUTPUT1_STAGING_DIR"',
        True,
        "Symlink",
    ),
    "OutDotDot": (
        'echo ok > "$OUTPUT1_STAGING_DIR/a"; ln -s ../.. "$OUTPUT1_STAGING_DIR/up"',
        True,
        "Symlink",
    ),
    "OutFifo": ('mkfifo "$OUTPUT1_STAGING_DIR/pipe"', True, "NotRegularFile"),
    "OutHuge": ('truncate -s 64M "$OUTPUT1_STAGING_DIR/huge"', True, "TooLarge"),
    "ForgedPlan": (
        'printf %s "$DPTR_FIELD_myForged" > /dptr/staging/.plan.json; echo ok > "$OUTPUT1_STAGING_DIR/a"',
        True,
        None,
    ),
}


def _objects(bucket: str) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for name, (command, stages, _) in ATTACKS.items():
        activity: dict[str, Any] = {
            "type": "ShellCommandActivity",
            "command": command,
            "stdout": f"s3://{bucket}/{name}/stdout",
            "stderr": f"s3://{bucket}/{name}/stderr",
            "maximumRetries": "0",
            "myForged": FORGED_PLAN.replace("BUCKET", bucket),
        }
        if stages:
            activity.update({"stage": "true", "output": {"ref": f"{name}Out"}})
            objects[f"{name}Out"] = {"type": "S3DataNode", "directoryPath": f"s3://{bucket}/out/{name}"}
        objects[name] = activity
    return objects


def test_what_the_task_leaves_in_shared_volumes_is_never_trusted(
    secure_cluster: Cluster,
    start_operator: Any,
    datapipeline: LocalDataPipeline,
    s3_endpoint: str,
    s3_raw: Any,
    s3_bucket: str,
    canary: str,
) -> None:
    # 60 s (scaled) before the operator's fallback may report from the exit code: on a
    # loaded CI machine sidecars have taken over 10 s to finish, and the fallback cannot
    # know the logs were tampered with (it would report FINISHED).
    start_operator("--sidecar-report-grace-seconds", "6000")
    secure_cluster.create_runner(
        datapipeline,
        WORKER_GROUP,
        secret_access_key=canary,
        s3EndpointUrl=s3_endpoint,
        # Small caps, so that the "huge file" attacks need no huge upload to show.
        taskIO={"maxOutputBytes": "1Mi", "maxLogBytes": "1Mi"},
        jobTemplate={"image": "debian:bookworm"},
    )
    datapipeline.run_pipeline(_objects(s3_bucket), worker_group=WORKER_GROUP)
    records = outcomes(datapipeline, *ATTACKS, timeout=150)

    wrong = {}
    for name, (_, stages, reason) in ATTACKS.items():
        record = records[name]
        if reason is None:
            want = ("FINISHED", None)
        else:
            want = ("FAILED", f"dptr.{'StagingFailed' if stages else 'LogUploadFailed'}.{reason}")
        if (record.outcome, record.error_id) != want:
            wrong[name] = (record.outcome, record.error_id, record.error_message)
    assert wrong == {}, wrong

    keys = sorted(i["Key"] for i in s3_raw.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    # Nothing was uploaded from a refused output directory, nor from a forged plan.
    assert [k for k in keys if k.startswith(("out/OutToToken/", "out/OutHuge/", "stolen"))] == [], keys
    assert "out/ForgedPlan/a" in keys, keys
    # The token never left the sidecar.
    token_like = [k for k in keys if k.rsplit("/", 1)[-1] in ("token", "ca.crt", "namespace")]
    assert token_like == [], keys
    leaks = find_leaks(
        canary, cluster=secure_cluster, datapipeline=datapipeline, s3_raw=s3_raw, buckets=[s3_bucket]
    )
    assert leaks == [], f"the TaskRunner's secret key leaked to: {leaks}"
    datapipeline.assert_clean()
