"""DataPipelineClient against the local Data Pipeline service (real JSON 1.1 protocol,
requests validated against botocore's model).  No mocks."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dptr_common.datapipeline import (
    CredentialsError,
    DataPipelineClient,
    EndpointUnreachable,
    StaticCredentials,
    TaskGone,
    Throttled,
    call_with_retry,
)
from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, REGION, LocalDataPipeline
from dptr_operator.metrics import Metrics
from dptr_testbed.waiting import wait_for

CREDS = StaticCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY)


@pytest.fixture
def svc(datapipeline: LocalDataPipeline) -> LocalDataPipeline:
    """The suite's local Data Pipeline service (time-scaled 100x, real quotas)."""
    return datapipeline


@pytest.fixture
def dp(svc: LocalDataPipeline) -> Iterator[DataPipelineClient]:
    client = DataPipelineClient(REGION, endpoint_url=svc.endpoint_url, credentials=CREDS)
    yield client
    client.close()


def worker_group() -> str:
    return "wg-" + uuid.uuid4().hex[:8]


def start_task(svc: LocalDataPipeline, dp: DataPipelineClient, command: str = "echo hi") -> dict[str, Any]:
    wg = worker_group()
    svc.run_pipeline({"Echo": {"type": "ShellCommandActivity", "command": command}}, worker_group=wg)
    # No pause between tries: each is a long poll.
    task: dict[str, Any] = wait_for(
        lambda: dp.poll_for_task(wg, "host-1"), timeout=20, interval=0, what="a task polled"
    )
    return task


def test_poll_empty(dp: DataPipelineClient) -> None:
    started = time.monotonic()
    assert dp.poll_for_task(worker_group(), "host-1") is None
    assert time.monotonic() - started < 10  # the scaled long poll (0.9 s)


def test_poll_ack_heartbeat_finish(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    assert task["taskId"]
    assert task["attemptId"] in task["objects"]
    assert task["objects"][task["attemptId"]]["fields"]
    assert dp.report_task_progress(task["taskId"]) is False  # ack
    assert dp.report_task_progress(task["taskId"], fields=[{"key": "k", "stringValue": "v"}]) is False
    dp.set_task_status(task["taskId"], "FINISHED")
    assert svc.ledger.outcomes()[task["attemptId"]] == "FINISHED"
    svc.assert_clean()


def test_attempt_is_final_only_after_the_final_status(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    dp.report_task_progress(task["taskId"])
    assert dp.attempt_is_final(task["pipelineId"], task["attemptId"]) is False
    dp.set_task_status(task["taskId"], "FAILED", "dptr.ExitCode.3")
    assert dp.attempt_is_final(task["pipelineId"], task["attemptId"]) is True
    svc.assert_clean()


def test_describe_objects(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    objects = dp.describe_objects(task["pipelineId"], [task["attemptId"]])
    assert [o["id"] for o in objects] == [task["attemptId"]]
    assert any(f["key"] == "@status" for f in objects[0]["fields"])
    dp.report_task_progress(task["taskId"])
    dp.set_task_status(task["taskId"], "FINISHED")


def test_canceled_after_set_status_cancel(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    assert dp.report_task_progress(task["taskId"]) is False
    record = svc.ledger.attempt(task["attemptId"])
    assert record is not None
    svc.client().set_status(pipelineId=task["pipelineId"], objectIds=[record.instance_id], status="CANCEL")
    assert dp.report_task_progress(task["taskId"]) is True
    assert svc.ledger.outcomes()[task["attemptId"]] == "CANCELED"
    svc.assert_clean()


def test_task_gone_for_unknown_task(dp: DataPipelineClient) -> None:
    with pytest.raises(TaskGone) as info:
        dp.report_task_progress("no-such-task-" + uuid.uuid4().hex)
    assert info.value.code == "TaskNotFoundException"
    assert info.value.reason == "TaskGone"


def test_task_gone_for_deleted_pipeline(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    dp.report_task_progress(task["taskId"])
    svc.client().delete_pipeline(pipelineId=task["pipelineId"])
    with pytest.raises(TaskGone):
        dp.report_task_progress(task["taskId"])
    with pytest.raises(TaskGone):
        dp.set_task_status(task["taskId"], "FINISHED")
    svc.assert_clean()


def test_set_task_status_with_long_invalid_trace(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    dp.report_task_progress(task["taskId"])
    trace = b"line\n" * 1000 + b"\xff\xfe\x00\x07 bad utf-8 \xc3\x28 " + b"\xed\xa0\x80" + b"the end\n"
    assert len(trace) > 5000
    dp.set_task_status(
        task["taskId"],
        "FAILED",
        error_id="dptr.ExitCode.3\x00",
        error_message="exit 3 \x1b[31mred\x1b[0m " + "m" * 3000,
        error_stack_trace=trace,
    )
    record = svc.ledger.attempt(task["attemptId"])
    assert record is not None
    assert record.outcome == "FAILED"
    assert record.error_id == "dptr.ExitCode.3"
    assert record.error_stack_trace is not None
    assert len(record.error_stack_trace) <= 1024
    assert record.error_stack_trace.endswith("the end\n")
    svc.assert_clean()


def test_error_id_service_prefix_rewritten(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    dp.report_task_progress(task["taskId"])
    dp.set_task_status(task["taskId"], "FAILED", error_id="Service_Crash", error_message="boom")
    record = svc.ledger.attempt(task["attemptId"])
    assert record is not None
    assert record.error_id is not None
    assert not record.error_id.startswith("Service_")
    assert "Service_Crash" in record.error_id
    svc.assert_clean()


def test_forced_throttle_retried_until_success(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    task = start_task(svc, dp)
    svc.set_fault("ReportTaskProgress", throttle=True)
    timer = threading.Timer(0.6, lambda: svc.set_fault("ReportTaskProgress"))
    timer.start()
    retries: list[BaseException] = []
    try:
        canceled = call_with_retry(
            lambda: dp.report_task_progress(task["taskId"]),
            deadline=time.monotonic() + 15,
            base=0.05,
            cap=0.2,
            on_retry=lambda exc, _delay: retries.append(exc),
        )
    finally:
        timer.cancel()
    assert canceled is False
    assert retries and all(isinstance(e, Throttled) for e in retries)
    statuses = [c.error for c in svc.ledger.calls_to("ReportTaskProgress")]
    assert "ThrottlingException" in statuses
    assert statuses[-1] is None
    dp.set_task_status(task["taskId"], "FINISHED")
    svc.assert_clean()


def test_throttles_a_retry_hides_are_counted(svc: LocalDataPipeline) -> None:
    """The operator's dptr_api_throttled_total counts each throttled try through the
    client's on_error hook, also when the retry then succeeds (the call's own error count
    stays 0)."""
    metrics = Metrics()
    client = DataPipelineClient(
        REGION, endpoint_url=svc.endpoint_url, credentials=CREDS, on_error=metrics.attempt_failed
    )
    try:
        task = start_task(svc, client)
        svc.set_fault("ReportTaskProgress", throttle=True)
        retries: list[BaseException] = []

        def on_retry(exc: BaseException, _delay: float) -> None:
            retries.append(exc)
            if len(retries) == 3:
                svc.set_fault("ReportTaskProgress")  # the fourth try goes through

        with metrics.timed("ReportTaskProgress"):
            call_with_retry(
                lambda: client.report_task_progress(task["taskId"]),
                deadline=time.monotonic() + 15,
                base=0.01,
                cap=0.05,
                on_retry=on_retry,
            )
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in metrics.registry.collect()
            for s in family.samples
        }
        assert samples[("dptr_api_throttled_total", (("operation", "ReportTaskProgress"),))] == 3
        # (The SetTaskStatus reasons exist from the start, at 0.)
        errors = {k: v for k, v in samples.items() if k[0] == "dptr_api_call_errors_total" and v}
        assert not errors, errors
        client.set_task_status(task["taskId"], "FINISHED")
        svc.assert_clean()
    finally:
        client.close()


def test_account_quota_throttles_and_retry_recovers() -> None:
    # Real (unscaled) quota: ReportTaskRunnerHeartbeat 1/s with a burst of 100.
    with LocalDataPipeline(time_scale=1.0, quotas={"ReportTaskRunnerHeartbeat": 1.0}) as svc:
        dp = DataPipelineClient(REGION, endpoint_url=svc.endpoint_url, credentials=CREDS)
        throttled = 0
        for _ in range(150):
            try:
                dp.report_task_runner_heartbeat("runner-1", "wg", "host-1")
            except Throttled:
                throttled += 1
                break
        assert throttled == 1, "the burst of 100 should have run out"
        retries: list[BaseException] = []
        assert (
            call_with_retry(
                lambda: dp.report_task_runner_heartbeat("runner-1", "wg", "host-1"),
                deadline=time.monotonic() + 20,
                base=0.25,
                cap=1.0,
                on_retry=lambda exc, _delay: retries.append(exc),
            )
            is False
        )
        assert all(isinstance(e, Throttled) for e in retries)
        dp.close()


def test_deadline_respected(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    svc.set_fault("ReportTaskRunnerHeartbeat", throttle=True)
    started = time.monotonic()
    calls = 0

    def heartbeat() -> bool:
        nonlocal calls
        calls += 1
        return dp.report_task_runner_heartbeat("runner-1", "wg", "host-1")

    with pytest.raises(Throttled):
        call_with_retry(heartbeat, deadline=started + 1.0, base=0.2, cap=5.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5, elapsed  # past the deadline only by the last call
    assert calls >= 2


def test_bad_access_key(svc: LocalDataPipeline) -> None:
    dp = DataPipelineClient(
        REGION, endpoint_url=svc.endpoint_url, credentials=StaticCredentials("AKIDWRONG", "nope")
    )
    with pytest.raises(CredentialsError) as info:
        dp.poll_for_task(worker_group(), "host-1")
    assert info.value.code == "UnrecognizedClientException"
    assert info.value.reason == "InvalidCredentials"


def test_missing_credentials(svc: LocalDataPipeline, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # belt and braces: never leave loopback
    dp = DataPipelineClient(REGION, endpoint_url=svc.endpoint_url)
    with pytest.raises(CredentialsError):
        dp.report_task_progress("t-1")


def test_default_chain_reads_the_environment(svc: LocalDataPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_ACCESS_KEY)
    dp = DataPipelineClient(REGION, endpoint_url=svc.endpoint_url)
    assert dp.report_task_runner_heartbeat("runner-env", "wg", "host-1") is False


def test_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dp = DataPipelineClient(REGION, endpoint_url=f"http://127.0.0.1:{port}", credentials=CREDS)
    with pytest.raises(EndpointUnreachable) as info:
        dp.report_task_runner_heartbeat("runner-1", "wg", "host-1")
    assert info.value.reason == "EndpointUnreachable"
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable):
        call_with_retry(
            lambda: dp.poll_for_task("wg", "host-1"), deadline=time.monotonic() + 0.5, base=0.1, cap=0.2
        )
    assert time.monotonic() - started < 2


def test_runner_heartbeat_terminate(svc: LocalDataPipeline, dp: DataPipelineClient) -> None:
    assert dp.report_task_runner_heartbeat("runner-1", "wg", "host-1") is False
    svc.set_runner_terminate(True)
    assert dp.report_task_runner_heartbeat("runner-1", "wg", "host-1") is True
    assert svc.ledger.runners["runner-1"].heartbeats == 2


def test_pod_identity_container_credentials(
    svc: LocalDataPipeline, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """EKS Pod Identity: botocore's container provider fetches credentials from a loopback
    agent with the projected token file as Authorization; the client signs with them."""
    import http.server
    import json

    seen: list[str | None] = []

    class Agent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps(
                {
                    "AccessKeyId": DEFAULT_ACCESS_KEY_ID,
                    "SecretAccessKey": DEFAULT_SECRET_ACCESS_KEY,
                    "Token": "session-token",
                    "Expiration": "2999-01-01T00:00:00Z",
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
    thread = threading.Thread(target=agent.serve_forever, daemon=True)
    thread.start()
    try:
        token = tmp_path / "eks-pod-identity-token"
        token.write_text("projected-sa-token")
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{agent.server_address[1]}/v1/credentials"
        )
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
        dp = DataPipelineClient(REGION, endpoint_url=svc.endpoint_url)
        assert dp.report_task_runner_heartbeat("runner-pod-identity", "wg", "host-1") is False
        assert seen == ["projected-sa-token"]
        dp.close()
    finally:
        agent.shutdown()
        agent.server_close()
