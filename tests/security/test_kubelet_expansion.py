"""Attack: a pipeline author writes ``$(AWS_SECRET_ACCESS_KEY)`` into task fields.

Kubelet expands ``$(VAR)`` in command, args and env values from the container's earlier
env (the kubelet stand-in does it by the same rules; tests/realnode repeats this on a real
kubelet).  The sidecar holds the TaskRunner's Data Pipeline keys in its env; the author
chooses the S3 paths that land there, the command, the arguments and the ``my*`` fields.
Every one of them must reach its process byte for byte, and the key must show up
nowhere the author (or anyone reading the cluster) can look.
"""

from __future__ import annotations

from typing import Any

import pytest
from op_helpers import Cluster
from security_helpers import find_leaks, outcomes

from dptr_datapipeline import LocalDataPipeline

pytestmark = pytest.mark.cluster

WORKER_GROUP = "wg-expansion"
#: What the author writes; kubelet must not touch any of it.
REFS = "$(AWS_SECRET_ACCESS_KEY)|$(DPTR_PIPELINE_ID)|$(DPTR_TASK_ID)|$(POD_NAME)|$$|$"
COMMAND = (
    f"printf 'cmd:%s\\n' '{REFS}'; printf 'arg:%s\\n' \"$@\"; "
    'printf \'field:%s\\n\' "$DPTR_FIELD_myValue"; echo "pid:$$"'
)
ARGS = ["$(AWS_SECRET_ACCESS_KEY)", "$(DPTR_PIPELINE_ID)", "$$", "$(DPTR_TASK_ID)"]


def hostile_activity(bucket: str) -> dict[str, Any]:
    return {
        "type": "ShellCommandActivity",
        "command": COMMAND,
        "scriptArgument": ARGS,
        "myValue": REFS,
        "stdout": f"s3://{bucket}/out/$(AWS_SECRET_ACCESS_KEY)/stdout",
        "stderr": f"s3://{bucket}/out/$(POD_NAME)/stderr",
        "maximumRetries": "0",
    }


def expected_stdout(pid_line: str) -> bytes:
    lines = [f"cmd:{REFS}", *(f"arg:{a}" for a in ARGS), f"field:{REFS}", pid_line]
    return ("\n".join(lines) + "\n").encode()


def test_kubelet_expansion_leaks_nothing_and_changes_nothing(
    secure_cluster: Cluster,
    start_operator: Any,
    datapipeline: LocalDataPipeline,
    s3_endpoint: str,
    s3_raw: Any,
    s3_bucket: str,
    canary: str,
) -> None:
    start_operator("--sidecar-report-grace-seconds", "6000")
    secure_cluster.create_runner(
        datapipeline,
        WORKER_GROUP,
        secret_access_key=canary,
        s3EndpointUrl=s3_endpoint,
        jobTemplate={"image": "debian:bookworm"},
    )
    datapipeline.run_pipeline(
        {
            "Default": {"pipelineLogUri": f"s3://{s3_bucket}/logs/$(AWS_SECRET_ACCESS_KEY)/"},
            "Hostile": hostile_activity(s3_bucket),
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Hostile")["Hostile"]
    assert (record.outcome, record.error_id) == ("FINISHED", None), record.error_message

    # Byte for byte what the task's process saw, from the S3 path exactly as written.
    stdout = s3_raw.get_object(Bucket=s3_bucket, Key="out/$(AWS_SECRET_ACCESS_KEY)/stdout")["Body"].read()
    pid_line = stdout.decode().splitlines()[-1]
    assert pid_line.startswith("pid:") and pid_line[4:].isdigit(), stdout  # $$ is the shell's pid
    assert stdout == expected_stdout(pid_line)
    keys = {i["Key"] for i in s3_raw.list_objects_v2(Bucket=s3_bucket).get("Contents", [])}
    assert "out/$(POD_NAME)/stderr" in keys, keys
    prefix = f"logs/$(AWS_SECRET_ACCESS_KEY)/{record.pipeline_id}/Hostile/"
    assert any(k.startswith(prefix) and k.endswith("StdOutput.gz") for k in keys), keys

    leaks = find_leaks(
        canary, cluster=secure_cluster, datapipeline=datapipeline, s3_raw=s3_raw, buckets=[s3_bucket]
    )
    assert leaks == [], f"the TaskRunner's secret key leaked to: {leaks}"
    datapipeline.assert_clean()
