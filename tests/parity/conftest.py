"""Fixtures for the parity tests."""

from __future__ import annotations

from typing import Any

import pytest
from parity_helpers import ParityS3


@pytest.fixture
def parity_s3(s3_endpoint: str, s3_env: dict[str, str], s3_raw: Any, s3_bucket: str) -> ParityS3:
    """The suite's moto S3 fixtures in one: endpoint, process env, boto3 client, a fresh bucket."""
    return ParityS3(endpoint=s3_endpoint, env=s3_env, raw=s3_raw, bucket=s3_bucket)
