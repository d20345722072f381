"""``dptr-sidecar fetch-script`` (``dptr_sidecar.staging.fetch_script_main``) against moto's
S3 in server mode (real HTTP, loopback), as the ``dptr-fetch-script`` init container runs it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dptr_sidecar.staging import outcome_for_init_failure

SIDECAR = str(Path(sys.executable).parent / "dptr-sidecar")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def run_fetch(endpoint: str, uri: str, path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(path.parent),
        "DPTR_SCRIPT_URI": uri,
        "DPTR_SCRIPT_PATH": str(path),
        "DPTR_TERMINATION_LOG": str(path.parent / "termination-log"),
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    return subprocess.run(
        [SIDECAR, "fetch-script"], check=False, env=env, capture_output=True, text=True, timeout=60
    )


def test_fetch_script_streams_to_an_executable_file(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="scripts")
    body = b"#!/bin/sh\necho hello\n" + b"#" * (3 * 1024 * 1024)  # several chunks
    s3.put_object(Bucket="scripts", Key="dir/run.sh", Body=body)
    target = tmp_path / "script"
    result = run_fetch(s3_endpoint, "s3://scripts/dir/run.sh", target)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == body
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["script"]  # no temporary file left


def test_fetch_script_fails_clearly(s3_endpoint: str, tmp_path: Path) -> None:
    target = tmp_path / "script"
    result = run_fetch(s3_endpoint, "s3://scripts/missing.sh", target)
    assert result.returncode == 1
    assert "s3://scripts/missing.sh" in result.stderr and "NoSuchKey" in result.stderr, result.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["termination-log"]  # no temporary file left
    # The termination message is what the sidecar turns into the outcome.
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("dptr.ScriptFetchFailed.NoSuchKey\n"), message
    assert "s3://scripts/missing.sh" in message
    outcome = outcome_for_init_failure("dptr-fetch-script", {"exitCode": 1, "message": message})
    assert (outcome.status, outcome.error_id) == ("FAILED", "dptr.ScriptFetchFailed.NoSuchKey")

    for bad in ("https://example.com/x.sh", "s3://scripts", "s3://scripts/dir/"):
        result = run_fetch(s3_endpoint, bad, target)
        assert result.returncode == 1 and "not an s3://bucket/key URI" in result.stderr, (bad, result.stderr)
        message = (tmp_path / "termination-log").read_text()
        assert message.startswith("dptr.ScriptFetchFailed.InvalidUri\n"), message


def test_fetch_script_without_configuration_says_so(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "DPTR_TERMINATION_LOG": str(tmp_path / "termination-log")}
    result = subprocess.run(
        [SIDECAR, "fetch-script"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert (tmp_path / "termination-log").read_text().startswith("dptr.ScriptFetchFailed.NotConfigured\n")
