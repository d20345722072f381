"""Small helpers shared by the Data Pipeline service tests."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from typing import Any


def fields_of(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """A pipeline object's fields as (key, value) pairs, ref or string."""
    return [(f["key"], f.get("stringValue", f.get("refValue", ""))) for f in obj["fields"]]


def field(obj: dict[str, Any], key: str) -> str | None:
    return next((v for k, v in fields_of(obj) if k == key), None)


def status_of(dp: Any, pipeline_id: str, object_id: str) -> str | None:
    objects = dp.describe_objects(pipelineId=pipeline_id, objectIds=[object_id])["pipelineObjects"]
    return field(objects[0], "@status") if objects else None


# From the AWS Data Pipeline Developer Guide: the ShellCommandActivity example
# object, given the workerGroup that "Executing Work on Existing Resources
# Using Task Runner" adds, and the "On-demand using the Default object"
# example from the Schedule page.
DEVELOPER_GUIDE_DEFINITION = {
    "objects": [
        {
            "name": "Default",
            "resourceRole": "DataPipelineDefaultResourceRole",
            "role": "DataPipelineDefaultRole",
            "scheduleType": "ondemand",
            "id": "Default",
        },
        {
            "id": "CreateDirectory",
            "type": "ShellCommandActivity",
            "workerGroup": "myWorkerGroup",
            "command": "mkdir new-directory",
        },
    ]
}


class AwsCli:
    """The real AWS CLI (awscli from PyPI), run in-process through its driver.

    In-process saves a Python start-up per command on a busy 2-core machine;
    test_dp_cli.py also runs the ``aws`` executable as a subprocess once.
    """

    def __init__(self, endpoint_url: str, env: dict[str, str]) -> None:
        self.endpoint_url = endpoint_url
        self.env = env

    def __call__(self, *args: str, check: bool = True) -> tuple[int, Any, str]:
        from awscli.clidriver import create_clidriver

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                rc = create_clidriver().main(
                    ["datapipeline", *args, "--endpoint-url", self.endpoint_url, "--output", "json"]
                )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if check and rc != 0:
            raise AssertionError(f"aws datapipeline {' '.join(args)} exited {rc}: {err.getvalue()}")
        text = out.getvalue().strip()
        return rc, json.loads(text) if text else None, err.getvalue()
