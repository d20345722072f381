"""Fixtures for Task Runner parity tests: moto's S3 in server mode on loopback (never AWS).

One moto server serves the session; every test gets its own buckets (``s3_bucket``),
so tests do not see each other's objects.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dptr_sidecar.s3 import S3Client

ACCESS_KEY = "AKIDPARITYTEST"
SECRET_KEY = "parity-secret"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, tmp_path: Any) -> dict[str, str]:
    """Environment for a dptr process that talks to the moto S3 (and nothing else)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "DPTR_"))
        and k not in {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}
    }
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


@pytest.fixture
def s3(s3_env: dict[str, str]) -> Iterator[S3Client]:
    client = S3Client(env=s3_env, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    yield client
    client.close()


@pytest.fixture
def s3_raw(s3_endpoint: str) -> Any:
    """A plain boto3 S3 client for arranging and checking objects."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(s3_raw: Any) -> str:
    name = "parity-" + uuid.uuid4().hex[:12]
    s3_raw.create_bucket(Bucket=name)
    return name
