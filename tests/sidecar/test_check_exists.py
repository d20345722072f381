"""``dptr-sidecar check-exists`` against moto's S3 server: the Exists precondition's check."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dptr_datapipeline import LocalDataPipeline
from dptr_sidecar.preconditions import check_exists_main


def _env(
    s3_env: dict[str, str], tmp_path: Path, uri: str, kind: str = "file", **extra: str
) -> dict[str, str]:
    return {
        **s3_env,
        "DPTR_EXISTS_NODE": "In",
        "DPTR_EXISTS_URI": uri,
        "DPTR_EXISTS_KIND": kind,
        "DPTR_TERMINATION_LOG": str(tmp_path / "termination"),
        **extra,
    }


def test_a_present_key_holds_at_once(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_raw.put_object(Bucket=s3_bucket, Key="in/data.csv", Body=b"x")
    env = _env(s3_env, tmp_path, f"s3://{s3_bucket}/in/data.csv")
    assert check_exists_main([], env) == 0


def test_an_absent_key_is_false_at_the_deadline_with_a_message(
    s3_env: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    naps: list[float] = []
    now = [1000.0]

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        now[0] += seconds

    env = _env(
        s3_env, tmp_path, f"s3://{s3_bucket}/in/none.csv", DPTR_CHECK_RETRY_DELAY="4", DPTR_CHECK_BUDGET="10"
    )
    assert check_exists_main([], env, clock=lambda: now[0], sleep=sleep) == 1
    assert naps == [4, 4, 2]  # the last check comes at the deadline
    first, _, message = (tmp_path / "termination").read_text().partition("\n")
    assert first == "dptr.Exists.NotFound"
    assert f"s3://{s3_bucket}/in/none.csv" in message and "4 check(s)" in message


def test_a_directory_exists_once_an_object_is_under_it(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    env = _env(
        s3_env,
        tmp_path,
        f"s3://{s3_bucket}/day=1/",
        "directory",
        DPTR_CHECK_RETRY_DELAY="1",
        DPTR_CHECK_BUDGET="30",
    )
    threading.Timer(1.5, lambda: s3_raw.put_object(Bucket=s3_bucket, Key="day=1/part-0", Body=b"x")).start()
    started = time.monotonic()
    assert check_exists_main([], env) == 0
    assert time.monotonic() - started >= 1.5


def test_a_missing_bucket_is_not_there_yet(s3_env: dict[str, str], tmp_path: Path) -> None:
    env = _env(s3_env, tmp_path, "s3://no-such-bucket-dptr/k")
    assert check_exists_main([], env) == 1


def test_an_unreachable_s3_fails_with_an_error_id(s3_env: dict[str, str], tmp_path: Path) -> None:
    env = _env(
        {**s3_env, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"},
        tmp_path,
        "s3://b/k",
    )
    assert check_exists_main([], env) == 2
    first = (tmp_path / "termination").read_text().partition("\n")[0]
    assert first.startswith("dptr.Exists.") and first != "dptr.Exists.NotFound", first


def test_sigterm_ends_the_wait_at_once(s3_env: dict[str, str], s3_bucket: str, tmp_path: Path) -> None:
    env = _env(
        s3_env, tmp_path, f"s3://{s3_bucket}/never", DPTR_CHECK_RETRY_DELAY="60", DPTR_CHECK_BUDGET="600"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dptr_sidecar.cli", "check-exists"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    # Its first check has answered, so the handler is set and it is in its 60 s pause.
    line = proc.stderr.readline()
    assert "does not exist yet" in line, line
    started = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=10) == 128 + 15
    assert time.monotonic() - started < 5


def test_a_directory_is_not_satisfied_by_a_longer_sibling(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_raw.put_object(Bucket=s3_bucket, Key="day=10/part-0", Body=b"x")
    assert check_exists_main([], _env(s3_env, tmp_path, f"s3://{s3_bucket}/day=1", "directory")) == 1
    s3_raw.put_object(Bucket=s3_bucket, Key="day=1/part-0", Body=b"x")
    assert check_exists_main([], _env(s3_env, tmp_path, f"s3://{s3_bucket}/day=1", "directory")) == 0


def test_a_node_the_task_did_not_carry_is_looked_up_with_describe_objects(
    s3_env: dict[str, str], s3_raw: Any, s3_bucket: str, tmp_path: Path
) -> None:
    s3_raw.put_object(Bucket=s3_bucket, Key="in/2024-05-01.csv", Body=b"x")
    with LocalDataPipeline(time_scale=0.01, quotas=False) as dp:
        pipeline_id = dp.run_pipeline(
            {
                "In": {"type": "S3DataNode", "filePath": f"s3://{s3_bucket}/in/2024-05-01.csv"},
                "Other": {"type": "DynamoDBDataNode", "tableName": "t"},
                "Work": {"type": "ShellCommandActivity", "command": "true", "input": {"ref": "In"}},
            },
            worker_group="wg-lookup",
        )
        env = {
            **_env(s3_env, tmp_path, ""),
            **dp.aws_env(),
            "AWS_ENDPOINT_URL_S3": s3_env["AWS_ENDPOINT_URL_S3"],
            "DPTR_PIPELINE_ID": pipeline_id,
            "DPTR_ENDPOINT_URL": dp.endpoint_url,
        }

        # A process of its own: the Data Pipeline client takes its keys from the environment.
        def run(environment: dict[str, str]) -> int:
            argv = [sys.executable, "-m", "dptr_sidecar.cli", "check-exists"]
            return subprocess.run(argv, env=environment, timeout=60, check=False).returncode

        assert run(env) == 0
        assert [c.operation for c in dp.ledger.calls].count("DescribeObjects") == 1
        assert run({**env, "DPTR_EXISTS_NODE": "Other"}) == 2  # a data node dptr cannot check
    first = (tmp_path / "termination").read_text().partition("\n")[0]
    assert first == "dptr.PreconditionNotSupported.Exists.DynamoDBDataNode", first
