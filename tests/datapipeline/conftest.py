"""Fixtures for the local Data Pipeline service's tests.

Every test gets its own service on its own free port, so the files are safe
under pytest-xdist. Time runs at 1/100: the 2-minute ack deadline is 1.2 s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from dp_helpers import AwsCli

from dptr_datapipeline import LocalDataPipeline

SCALE = 0.01


@pytest.fixture
def svc() -> Iterator[LocalDataPipeline]:
    # Quotas off by default: the quota tests turn them on at real time.
    with LocalDataPipeline(time_scale=SCALE, quotas=False) as service:
        yield service


@pytest.fixture
def dp(svc: LocalDataPipeline) -> Any:
    # One attempt per call: botocore's own retries would hide the service's answers.
    return svc.client(retries={"total_max_attempts": 1})


@pytest.fixture
def aws(svc: LocalDataPipeline) -> AwsCli:
    env = svc.aws_env()
    env["AWS_MAX_ATTEMPTS"] = "1"
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    return AwsCli(svc.endpoint_url, env)
