"""Wire protocol: authentication, model validation, errors, quotas, faults, admin API."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from botocore.exceptions import ClientError

from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, LocalDataPipeline


def _raw(svc: LocalDataPipeline, target: str, body: bytes, auth: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"}
    if auth is not None:
        headers["Authorization"] = auth
    request = urllib.request.Request(svc.endpoint_url + "/", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _error(exc: ClientError) -> tuple[str, int]:
    return exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"]


def test_unknown_access_key_is_refused_like_aws(svc: LocalDataPipeline) -> None:
    stranger = svc.client(access_key_id="AKIDSTRANGER", retries={"total_max_attempts": 1})
    with pytest.raises(ClientError) as caught:
        stranger.list_pipelines()
    assert _error(caught.value) == ("UnrecognizedClientException", 403)
    assert svc.ledger.calls[-1].error == "UnrecognizedClientException"


def test_configured_keys_replace_the_default() -> None:
    with LocalDataPipeline(time_scale=0.01, quotas=False, access_keys={"AKIDOTHER": "s3cret"}) as other:
        assert "pipelineIdList" in other.client("AKIDOTHER", "s3cret").list_pipelines()
        with pytest.raises(ClientError) as caught:
            other.client(retries={"total_max_attempts": 1}).list_pipelines()
        assert _error(caught.value)[0] == "UnrecognizedClientException"


def test_missing_or_malformed_signature(svc: LocalDataPipeline) -> None:
    status, body = _raw(svc, "DataPipeline.ListPipelines", b"{}", None)
    assert (status, body["__type"]) == (403, "MissingAuthenticationTokenException")
    status, body = _raw(svc, "DataPipeline.ListPipelines", b"{}", "Bearer nope")
    assert (status, body["__type"]) == (400, "IncompleteSignatureException")
    auth = f"AWS4-HMAC-SHA256 Credential={DEFAULT_ACCESS_KEY_ID}/20240101/us-east-1/datapipeline/aws4_request"
    assert _raw(svc, "DataPipeline.ListPipelines", b"{}", auth)[0] == 200
    status, body = _raw(svc, "DataPipeline.NoSuchThing", b"{}", auth)
    assert (status, body["__type"]) == (400, "UnknownOperationException")
    status, body = _raw(svc, "DataPipeline.ListPipelines", b"{not json", auth)
    assert (status, body["__type"]) == (400, "SerializationException")


def test_long_error_stack_trace_is_refused_naming_the_member(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline({"E": {"type": "ShellCommandActivity", "command": "x"}}, worker_group="wg-val")
    task = dp.poll_for_task(workerGroup="wg-val")["taskObject"]
    with pytest.raises(dp.exceptions.InvalidRequestException) as caught:
        dp.set_task_status(taskId=task["taskId"], taskStatus="FAILED", errorStackTrace="x" * 2000)
    message = caught.value.response["Error"]["Message"]
    assert "'errorStackTrace'" in message and "less than or equal to 1024" in message
    # The refused call did not count as the outcome.
    assert svc.ledger.outcomes()[task["attemptId"]] is None
    dp.set_task_status(taskId=task["taskId"], taskStatus="FAILED", errorStackTrace="x" * 1024)
    svc.assert_clean()


def test_model_checks_botocore_leaves_to_the_service(svc: LocalDataPipeline) -> None:
    # With client-side validation off, the service is the only line of defence.
    raw = svc.client(retries={"total_max_attempts": 1}, parameter_validation=False)
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "set_task_status",
            {"taskId": "t", "taskStatus": "DONE"},
            "enum value set: [FINISHED, FAILED, FALSE]",
        ),
        ("set_task_status", {"taskStatus": "FINISHED"}, "Value null at 'taskId'"),
        ("poll_for_task", {"workerGroup": "bad\x01group"}, "regular expression pattern"),
        ("create_pipeline", {"name": "", "uniqueId": "u"}, "at 'name' failed to satisfy constraint"),
        (
            "put_pipeline_definition",
            {
                "pipelineId": "df-x",
                "pipelineObjects": [{"id": "a", "name": "a", "fields": [{"stringValue": "v"}]}],
            },
            "Value null at 'pipelineObjects.1.member.fields.1.member.key'",
        ),
        ("add_tags", {"pipelineId": "df-x", "tags": [{"key": "k", "value": "v"}] * 11}, "at 'tags'"),
    ]
    for method, params, expected in cases:
        with pytest.raises(raw.exceptions.InvalidRequestException) as caught:
            getattr(raw, method)(**params)
        assert expected in caught.value.response["Error"]["Message"], (method, params)
    # Astral characters are allowed by the model's (Java, UTF-16) patterns.
    assert "taskObject" not in raw.poll_for_task(workerGroup="emoji-\U0001f600-group")


def test_quotas_throttle_after_the_burst() -> None:
    # Real time: at time_scale 0.01 the quota's refill rate would be 100x larger.
    with LocalDataPipeline(time_scale=1.0, quotas=True) as limited:
        dp = limited.client(retries={"total_max_attempts": 1})
        throttled = 0
        for _ in range(110):
            try:
                dp.report_task_runner_heartbeat(taskrunnerId="tr")
            except ClientError as exc:
                assert _error(exc) == ("ThrottlingException", 400)
                throttled += 1
        # Burst 100 plus at most a couple refilled at 1/s during the loop.
        assert 5 <= throttled <= 10
        # Other operations have their own buckets; ListPipelines has no quota.
        dp.list_pipelines()
        with pytest.raises(dp.exceptions.TaskNotFoundException):
            dp.report_task_progress(taskId="unknown")


def test_quotas_can_be_switched_off(svc: LocalDataPipeline, dp: Any) -> None:
    for _ in range(120):
        dp.report_task_runner_heartbeat(taskrunnerId="tr")
    assert not [c for c in svc.ledger.calls if c.error]


def test_botocore_retries_throttling_by_itself(svc: LocalDataPipeline) -> None:
    svc.set_fault("ReportTaskRunnerHeartbeat", throttle=True)
    patient = svc.client(retries={"mode": "standard", "total_max_attempts": 3})
    with pytest.raises(ClientError):
        patient.report_task_runner_heartbeat(taskrunnerId="tr")
    assert len(svc.ledger.calls_to("ReportTaskRunnerHeartbeat")) == 3


def test_fault_injection_errors_latency_and_clear(svc: LocalDataPipeline, dp: Any) -> None:
    svc.set_fault("ListPipelines", error_rate=1.0)
    with pytest.raises(dp.exceptions.InternalServiceError) as caught:
        dp.list_pipelines()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    svc.set_fault("*", latency=0.3)
    svc.set_fault("ListPipelines")
    started = time.monotonic()
    dp.list_pipelines()
    assert time.monotonic() - started >= 0.3
    svc.clear_faults()
    started = time.monotonic()
    dp.list_pipelines()
    assert time.monotonic() - started < 0.3
    with pytest.raises(ValueError):
        svc.set_fault("NoSuchOperation", error_rate=1.0)


def test_partial_error_rate_fails_some_calls(svc: LocalDataPipeline, dp: Any) -> None:
    svc.set_fault("ListPipelines", error_rate=0.5)
    failures = 0
    for _ in range(60):
        try:
            dp.list_pipelines()
        except dp.exceptions.InternalServiceError:
            failures += 1
    assert 10 <= failures <= 50


def test_admin_http_api(svc: LocalDataPipeline, dp: Any) -> None:
    svc.run_pipeline({"E": {"type": "ShellCommandActivity", "command": "x"}}, worker_group="wg-admin")
    task = dp.poll_for_task(workerGroup="wg-admin")["taskObject"]
    dp.set_task_status(taskId=task["taskId"], taskStatus="FINISHED")

    def call(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(svc.endpoint_url + path, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    ledger = call("/_dptr/ledger")
    assert ledger["outcomes"] == {task["attemptId"]: "FINISHED"}
    assert ledger["attempts"][task["attemptId"]]["taskId"] == task["taskId"]
    assert ledger["problems"] == []
    assert [c["operation"] for c in ledger["calls"]] == ["PollForTask", "SetTaskStatus"]
    assert call("/_dptr/ledger?calls=0")["calls"] == []

    call("/_dptr/faults", {"operation": "ListPipelines", "throttle": True})
    with pytest.raises(ClientError) as caught:
        dp.list_pipelines()
    assert _error(caught.value)[0] == "ThrottlingException"
    call("/_dptr/faults", {"operation": "ListPipelines"})
    dp.list_pipelines()

    assert call("/_dptr/runner-terminate", {"terminate": True}) == {"terminate": True}
    assert dp.report_task_runner_heartbeat(taskrunnerId="tr")["terminate"] is True
    assert call("/_dptr/health") == {"ok": True}
