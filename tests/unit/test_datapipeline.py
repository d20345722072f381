"""Pure parts of dptr_common.datapipeline: error classification, deadline-aware retries,
and the shaping of SetTaskStatus arguments (checked with botocore's Stubber, which
validates every parameter against the service model)."""

from __future__ import annotations

import pytest
from botocore import exceptions as bx
from botocore.stub import Stubber

from dptr_common.datapipeline import (
    CredentialsError,
    DataPipelineClient,
    DataPipelineError,
    EndpointUnreachable,
    InvalidRequest,
    StaticCredentials,
    TaskGone,
    Throttled,
    TransientError,
    call_with_retry,
    classify_error,
)


def client_error(code: str, status: int = 400, message: str = "boom") -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "ReportTaskProgress",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("TaskNotFoundException", 400, TaskGone),
        ("PipelineDeletedException", 400, TaskGone),
        ("PipelineNotFoundException", 400, TaskGone),
        ("ThrottlingException", 400, Throttled),
        ("Throttling", 400, Throttled),
        ("Whatever", 429, Throttled),
        ("InternalServiceError", 500, TransientError),
        ("ServiceUnavailable", 503, TransientError),
        ("SomethingNew", 502, TransientError),
        ("UnrecognizedClientException", 400, CredentialsError),
        ("InvalidClientTokenId", 403, CredentialsError),
        ("SignatureDoesNotMatch", 403, CredentialsError),
        ("AccessDenied", 403, CredentialsError),
        ("AccessDeniedException", 400, CredentialsError),
        ("ExpiredToken", 400, CredentialsError),
        ("ExpiredTokenException", 400, CredentialsError),
        ("InvalidRequestException", 400, InvalidRequest),
        ("ValidationException", 400, InvalidRequest),
        ("SomethingElse", 400, InvalidRequest),
    ],
)
def test_client_errors_are_classified(code: str, status: int, kind: type[DataPipelineError]) -> None:
    err = classify_error(client_error(code, status, "why"), "ReportTaskProgress")
    assert type(err) is kind
    assert err.code == code
    assert err.http_status == status
    assert err.message == "why"
    assert err.operation == "ReportTaskProgress"
    assert err.reason and " " not in err.reason
    assert "why" in str(err)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), EndpointUnreachable),
        (bx.ProxyConnectionError(proxy_url="http://proxy"), EndpointUnreachable),
        (bx.SSLError(endpoint_url="https://x", error="bad cert"), EndpointUnreachable),
        (bx.ConnectTimeoutError(endpoint_url="http://x"), TransientError),
        (bx.ReadTimeoutError(endpoint_url="http://x"), TransientError),
        (bx.ConnectionClosedError(endpoint_url="http://x"), TransientError),
        (bx.HTTPClientError(error="reset"), TransientError),
        (bx.NoCredentialsError(), CredentialsError),
        (bx.PartialCredentialsError(provider="env", cred_var="secret"), CredentialsError),
        (bx.CredentialRetrievalError(provider="sts", error_msg="nope"), CredentialsError),
        (bx.ParamValidationError(report="bad"), InvalidRequest),
        (ConnectionRefusedError(111, "refused"), EndpointUnreachable),
        (ConnectionResetError(104, "reset"), TransientError),
        (ValueError("odd"), DataPipelineError),
    ],
)
def test_transport_errors_are_classified(exc: BaseException, kind: type[DataPipelineError]) -> None:
    assert type(classify_error(exc, "PollForTask")) is kind


def test_classify_passes_our_errors_through() -> None:
    err = Throttled("slow down")
    assert classify_error(err) is err


def test_reasons_are_distinct() -> None:
    kinds = [TaskGone, Throttled, TransientError, EndpointUnreachable, CredentialsError, InvalidRequest]
    assert len({k.reason for k in kinds}) == len(kinds)
    assert all(issubclass(k, DataPipelineError) for k in kinds)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, error: Exception, result: str = "ok"):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error
        return result

    return fn, calls


def test_retry_until_success() -> None:
    t = FakeTime()
    fn, calls = failing(3, Throttled("slow"))
    out = call_with_retry(fn, deadline=t.now + 1000, sleep=t.sleep, clock=t.clock, base=1.0, cap=30.0)
    assert out == "ok"
    assert calls["n"] == 4
    assert len(t.sleeps) == 3
    # full jitter: each delay within [0, min(cap, base * 2**attempt)]
    for attempt, delay in enumerate(t.sleeps):
        assert 0 <= delay <= min(30.0, 2**attempt)


def test_non_retryable_raised_at_once() -> None:
    t = FakeTime()
    fn, calls = failing(5, CredentialsError("bad key"))
    with pytest.raises(CredentialsError):
        call_with_retry(fn, deadline=t.now + 1000, sleep=t.sleep, clock=t.clock)
    assert calls["n"] == 1
    assert t.sleeps == []


def test_never_sleeps_past_the_deadline_and_reraises_last_error() -> None:
    t = FakeTime()
    errors = iter([TransientError(f"e{i}") for i in range(1000)])

    def fn() -> str:
        raise next(errors)

    deadline = t.now + 7.5
    with pytest.raises(TransientError) as info:
        call_with_retry(
            fn,
            deadline=deadline,
            sleep=t.sleep,
            clock=t.clock,
            base=10.0,
            cap=100.0,
            delay=lambda attempt, base, cap: min(cap, base * 2**attempt),  # worst case: no jitter luck
        )
    assert t.now <= deadline + 1e-9
    assert t.sleeps == [7.5]  # one sleep, cut to the deadline, then one last try
    assert str(info.value).endswith("e1")


def test_tries_once_even_when_the_deadline_has_passed() -> None:
    t = FakeTime()
    fn, calls = failing(0, Throttled("x"))
    assert call_with_retry(fn, deadline=t.now - 5, sleep=t.sleep, clock=t.clock) == "ok"
    fn, calls = failing(1, Throttled("x"))
    with pytest.raises(Throttled):
        call_with_retry(fn, deadline=t.now - 5, sleep=t.sleep, clock=t.clock)
    assert calls["n"] == 1


def test_on_retry_sees_each_error() -> None:
    t = FakeTime()
    seen: list[tuple[str, float]] = []
    fn, _ = failing(2, EndpointUnreachable("refused"))
    call_with_retry(
        fn, deadline=t.now + 100, sleep=t.sleep, clock=t.clock, on_retry=lambda e, d: seen.append((str(e), d))
    )
    assert [s[0] for s in seen] == ["refused", "refused"]


def test_custom_retry_on() -> None:
    t = FakeTime()
    fn, calls = failing(2, TaskGone("gone"))
    assert (
        call_with_retry(fn, deadline=t.now + 100, sleep=t.sleep, clock=t.clock, retry_on=(TaskGone,)) == "ok"
    )
    assert calls["n"] == 3


# --------------------------------------------------------------------------- request shaping


@pytest.fixture
def stubbed() -> tuple[DataPipelineClient, Stubber]:
    client = DataPipelineClient(
        "us-east-1", endpoint_url="http://127.0.0.1:9", credentials=StaticCredentials("AKID", "secret")
    )
    stub = Stubber(client._client)
    stub.activate()
    return client, stub


def test_set_task_status_fits_strings(stubbed: tuple[DataPipelineClient, Stubber]) -> None:
    client, stub = stubbed
    trace = "x" * 4000 + "\x00\x01 the end \udcff" + "é"
    captured: dict[str, object] = {}

    def capture(params: dict[str, object]) -> None:
        captured.update(params)

    stub.add_response("set_task_status", {}, None)
    client._client.meta.events.register(
        "provide-client-params.datapipeline.SetTaskStatus", lambda params, **_: capture(params)
    )
    client.set_task_status(
        "task-1", "FAILED", error_id="Service_Whatever", error_message="m\x00sg", error_stack_trace=trace
    )
    stub.assert_no_pending_responses()
    assert not str(captured["errorId"]).startswith("Service_")
    assert "Service_Whatever" in str(captured["errorId"])
    trace_out = str(captured["errorStackTrace"])
    assert len(trace_out) <= 1024
    assert trace_out.endswith(" the end é")
    assert "\x00" not in trace_out and "\udcff" not in trace_out
    assert captured["errorMessage"] == "msg"


def test_set_task_status_accepts_invalid_utf8_bytes(stubbed: tuple[DataPipelineClient, Stubber]) -> None:
    client, stub = stubbed
    stub.add_response("set_task_status", {}, None)
    client.set_task_status(
        "task-1", "FAILED", error_id="dptr.ExitCode.3", error_stack_trace=b"\xff\xfe bad \x80 utf8"
    )
    stub.assert_no_pending_responses()


def test_set_task_status_rejects_unknown_status(stubbed: tuple[DataPipelineClient, Stubber]) -> None:
    client, _ = stubbed
    with pytest.raises(InvalidRequest):
        client.set_task_status("task-1", "DONE")  # type: ignore[arg-type]


def test_poll_empty_and_task(stubbed: tuple[DataPipelineClient, Stubber]) -> None:
    client, _ = stubbed
    # The poll client is created lazily on first use.
    assert client._poll_client is None
    client._poll_client = client._make_client(100.0)
    stub = Stubber(client._poll_client)
    stub.activate()
    stub.add_response("poll_for_task", {}, {"workerGroup": "wg", "hostname": "h"})
    stub.add_response(
        "poll_for_task",
        {"taskObject": {"taskId": "t1", "pipelineId": "df-1", "attemptId": "@a_1", "objects": {}}},
        {"workerGroup": "wg", "hostname": "h"},
    )
    assert client.poll_for_task("wg", "h") is None
    task = client.poll_for_task("wg", "h")
    assert task is not None and task["taskId"] == "t1"
    assert client._poll_client.meta.config.read_timeout == 100.0
    assert client._client.meta.config.read_timeout == 20.0
    assert client._client.meta.config.retries["total_max_attempts"] == 1


def test_stubbed_errors_map(stubbed: tuple[DataPipelineClient, Stubber]) -> None:
    client, stub = stubbed
    stub.add_client_error("report_task_progress", "TaskNotFoundException", "no such task", 400)
    with pytest.raises(TaskGone):
        client.report_task_progress("t1")
    stub.add_response("report_task_progress", {"canceled": True}, {"taskId": "t1"})
    assert client.report_task_progress("t1") is True
    stub.add_response("report_task_runner_heartbeat", {"terminate": False}, None)
    assert client.report_task_runner_heartbeat("r1", "wg", "h") is False


def test_static_credentials_from_mapping() -> None:
    creds = StaticCredentials.from_mapping({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert creds == StaticCredentials("AK", "SK", None)
    assert "SK" not in repr(creds)
    with pytest.raises(ValueError, match="secret access key"):
        StaticCredentials.from_mapping({"AWS_ACCESS_KEY_ID": "AK"})


def test_instance_metadata_left_out_of_the_default_chain() -> None:
    client = DataPipelineClient("us-east-1", endpoint_url="http://127.0.0.1:9")
    methods = [p.METHOD for p in client._session.get_component("credential_provider").providers]
    assert "iam-role" not in methods
    assert "env" in methods
    assert "assume-role-with-web-identity" in methods
    assert "container-role" in methods
