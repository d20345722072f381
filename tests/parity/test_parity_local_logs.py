"""``stdout``/``stderr`` as local paths (allowed for workerGroup tasks), end to end.

The developer guide's ShellCommandActivity page: stdout and stderr may be local paths
when the activity runs on a workerGroup.  dptr appends the stream to that path inside the
task container, so it outlives the pod only on a volume the TaskRunner's jobTemplate
mounts (here a hostPath, which the kubelet stand-in binds like kubelet).  A path that
cannot be written is a Warning Event and part of the errorMessage, never silent.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from parity_helpers import WORKER_GROUP, outcomes

from dptr_datapipeline import LocalDataPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from op_helpers import Cluster

from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def host_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dptr-local-logs-"))
    path.chmod(0o777)  # the pod runs as uid 65532
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_local_stdout_lands_on_a_volume_of_the_job_template_and_a_bad_path_is_reported(
    parity_runner: Cluster, datapipeline: LocalDataPipeline, s3_endpoint: str, host_dir: Path
) -> None:
    parity_runner.create_runner(
        datapipeline,
        WORKER_GROUP,
        s3EndpointUrl=s3_endpoint,
        jobTemplate={
            "image": "debian:bookworm",
            "volumes": [{"name": "etl-logs", "hostPath": {"path": str(host_dir), "type": "Directory"}}],
            "volumeMounts": [{"name": "etl-logs", "mountPath": "/var/log/etl"}],
        },
    )
    wait_for(
        lambda: parity_runner.runner()["spec"]["jobTemplate"].get("volumes"),
        timeout=10,
        what="the TaskRunner updated",
    )
    datapipeline.run_pipeline(
        {
            "Echo": {
                "type": "ShellCommandActivity",
                "command": "echo to stdout; echo to stderr >&2",
                "stdout": "/var/log/etl/echo.out",
                "stderr": "/var/log/etl/no/such/dir/echo.err",
                "maximumRetries": "0",
            }
        },
        worker_group=WORKER_GROUP,
    )
    record = outcomes(datapipeline, "Echo", timeout=90)["Echo"]
    assert record.outcome == "FINISHED", record.error_message
    assert (host_dir / "echo.out").read_text() == "to stdout\n"
    message = record.error_message or ""
    assert "stderr was not written to the local path '/var/log/etl/no/such/dir/echo.err'" in message, message
    assert "stdout" not in message.split("log upload problems:", 1)[-1].split("stderr", 1)[0], message
    warnings = wait_for(lambda: parity_runner.events("LogUploadFailed"), timeout=30, what="the Warning Event")
    assert any("/var/log/etl/no/such/dir/echo.err" in e["message"] for e in warnings)
    datapipeline.assert_clean()
