from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import botocore
import pytest
from botocore.validate import ParamValidator

from dptr_common.errors import (
    ContainerTermination,
    Outcome,
    TaskError,
    api_string_pattern,
    error_id,
    fit_api_string,
    fit_error_id,
    is_precondition,
    outcome_for_pod_failure,
    outcome_for_task_error,
    outcome_for_termination,
    signal_name,
)


def _model() -> dict:  # type: ignore[type-arg]
    # Read the service model straight from botocore's data directory, independently of
    # the code under test.
    path = Path(botocore.__file__).parent / "data" / "datapipeline" / "2012-10-29" / "service-2.json.gz"
    with gzip.open(path) as fh:
        return json.load(fh)  # type: ignore[no-any-return]


def _accepted(value: str) -> bool:
    """Would the service accept this as its ``string`` shape (pattern and max)?"""
    shape = _model()["shapes"]["string"]
    # UTF-16 length, as the Java service counts.
    units = len(value.encode("utf-16-le")) // 2
    return units <= shape["max"] and api_string_pattern().fullmatch(value) is not None


def _validate_set_task_status(kwargs: dict[str, str]) -> None:
    from botocore.loaders import create_loader
    from botocore.model import ServiceModel

    service = ServiceModel(create_loader().load_service_model("datapipeline", "service-2"))
    report = ParamValidator().validate(kwargs, service.operation_model("SetTaskStatus").input_shape)
    assert not report.has_errors(), report.generate_report()


def test_pattern_comes_from_the_model() -> None:
    raw = _model()["shapes"]["string"]["pattern"]
    assert "\\uD800\\uDC00-\\uDBFF\\uDFFF" in raw  # the Java surrogate-pair form
    pattern = api_string_pattern()
    assert pattern.fullmatch("hello\tworld\r\n")
    assert pattern.fullmatch("emoji \U0001f600 and \U0010fffd")
    assert not pattern.fullmatch("bell \x07")
    assert not pattern.fullmatch("lone \udc80")
    assert not pattern.fullmatch("\ufffe")


def test_short_clean_text_is_unchanged() -> None:
    assert fit_api_string("Traceback: boom\n\tat line 3") == "Traceback: boom\n\tat line 3"
    assert fit_api_string(None) == ""
    assert fit_api_string(b"") == ""


def test_two_thousand_chars_keep_the_tail() -> None:
    text = "".join(f"line {i:04d}\n" for i in range(200))  # 2,000 characters
    assert len(text) == 2000
    fitted = fit_api_string(text)
    assert _accepted(fitted)
    assert len(fitted) == 1024
    assert fitted.endswith("line 0199\n")
    assert fitted.startswith("[...]")
    head = fit_api_string(text, keep="head")
    assert head.startswith("line 0000") and head.endswith("[...]") and len(head) == 1024


def test_invalid_utf8_bytes() -> None:
    raw = b"ok \xff\xfe\xc3\x28 bad \xed\xa0\x80 surrogate \x00\x07 ctl \xf0\x9f\x98\x80" * 100
    fitted = fit_api_string(raw)
    assert _accepted(fitted)
    assert "\ufffd" in fitted  # invalid sequences are marked, not silently merged
    assert "\x00" not in fitted and "\x07" not in fitted
    assert "\U0001f600" in fitted


def test_surrogate_escaped_and_control_text() -> None:
    text = b"abc\xffdef".decode("utf-8", "surrogateescape") + "\x1b[31mred\x1b[0m"
    fitted = fit_api_string(text)
    assert fitted == "abcdef[31mred[0m"
    assert _accepted(fitted)


def test_non_bmp_characters_count_twice() -> None:
    text = "\U0001f600" * 1000  # 1000 code points, 2000 UTF-16 units
    fitted = fit_api_string(text)
    assert _accepted(fitted)
    assert len(fitted.encode("utf-16-le")) // 2 <= 1024
    assert fitted.endswith("\U0001f600")


@pytest.mark.parametrize("limit", [0, 1, 3, 5, 6, 100])
def test_small_limits(limit: int) -> None:
    fitted = fit_api_string("x" * 50, limit=limit)
    assert len(fitted) <= limit
    assert _accepted(fitted)


def test_one_megabyte_of_output() -> None:
    data = (b"progress 42%\r" + bytes(range(256))) * 4000
    assert len(data) > 1_000_000
    fitted = fit_api_string(data)
    assert _accepted(fitted)
    kwargs = Outcome("FAILED", "dptr.ExitCode.1", "boom").set_task_status_kwargs("tid", data)
    _validate_set_task_status(kwargs)
    assert _accepted(kwargs["errorStackTrace"])


def test_error_ids() -> None:
    assert error_id("ExitCode", 3) == "dptr.ExitCode.3"
    assert error_id("PodFailed", "Weird Reason!") == "dptr.PodFailed.Weird_Reason"
    assert fit_error_id("Service_Internal") == "dptr.Service_Internal"
    assert fit_error_id("") == "dptr.Unknown"
    long_id = fit_error_id("dptr.X." + "y" * 3000)
    assert _accepted(long_id) and len(long_id) <= 200
    assert TaskError("Service_Bad", "m").error_id == "dptr.Service_Bad"


T = ContainerTermination


@pytest.mark.parametrize(
    ("termination", "object_type", "status", "ident"),
    [
        (T(0, reason="Completed"), "ShellCommandActivity", "FINISHED", None),
        (T(0, reason="Completed"), "ShellCommandPrecondition", "FINISHED", None),
        (T(3, reason="Error"), "ShellCommandActivity", "FAILED", "dptr.ExitCode.3"),
        (T(1, reason="Error"), "ShellCommandPrecondition", "FALSE", "dptr.ExitCode.1"),
        (T(137, reason="OOMKilled"), "ShellCommandActivity", "FAILED", "dptr.OOMKilled"),
        (T(137, reason="OOMKilled"), "ShellCommandPrecondition", "FAILED", "dptr.OOMKilled"),
        (T(137, reason="Error"), "ShellCommandActivity", "FAILED", "dptr.Signal.SIGKILL"),
        (T(143, reason="Error"), "ShellCommandPrecondition", "FAILED", "dptr.Signal.SIGTERM"),
        (T(1, signal=9), "ShellCommandActivity", "FAILED", "dptr.Signal.SIGKILL"),
        (T(127, reason="Error"), "ShellCommandActivity", "FAILED", "dptr.ExitCode.127"),
        (T(255, reason="Error"), "ShellCommandActivity", "FAILED", "dptr.ExitCode.255"),
        (
            T(None, reason="ContainerStatusUnknown"),
            "ShellCommandActivity",
            "FAILED",
            "dptr.ContainerStatusUnknown",
        ),
        (T(128, reason="StartError"), "ShellCommandActivity", "FAILED", "dptr.StartError"),
        (T(137, reason="DeadlineExceeded"), "ShellCommandActivity", "FAILED", "dptr.DeadlineExceeded"),
        (T(137, reason="Evicted"), "ShellCommandActivity", "FAILED", "dptr.Evicted"),
    ],
)
def test_outcome_for_termination(
    termination: ContainerTermination, object_type: str, status: str, ident: str | None
) -> None:
    outcome = outcome_for_termination(termination, object_type)
    assert outcome.status == status
    assert outcome.error_id == ident
    if ident:
        assert not ident.startswith("Service_")
        assert outcome.error_message


def test_never_finished_without_exit_zero() -> None:
    for code in [None, *range(1, 256)]:
        for reason in [None, "Error", "Completed", "OOMKilled"]:
            assert (
                outcome_for_termination(T(code, reason=reason), "ShellCommandActivity").status != "FINISHED"
            )


def test_termination_from_k8s() -> None:
    term = ContainerTermination.from_k8s(
        {"exitCode": 3, "reason": "Error", "message": "disk full\n", "startedAt": "x", "finishedAt": "y"}
    )
    assert term == ContainerTermination(exit_code=3, signal=None, reason="Error", message="disk full\n")
    outcome = outcome_for_termination(term, "ShellCommandActivity")
    assert outcome.error_message == "the task container exited with code 3: disk full"
    hint = outcome_for_termination(T(127), "ShellCommandActivity")
    assert "command not found" in (hint.error_message or "")


@pytest.mark.parametrize(
    ("reason", "ident"),
    [
        ("Evicted", "dptr.Evicted"),
        ("DeadlineExceeded", "dptr.DeadlineExceeded"),
        ("ErrImagePull", "dptr.ImagePullFailed"),
        ("ImagePullBackOff", "dptr.ImagePullFailed"),
        ("InvalidImageName", "dptr.ImagePullFailed"),
        ("Unschedulable", "dptr.Unschedulable"),
        ("NodeLost", "dptr.NodeLost"),
        ("PodLost", "dptr.PodLost"),
        ("SomethingNew", "dptr.PodFailed.SomethingNew"),
    ],
)
def test_pod_failures(reason: str, ident: str) -> None:
    outcome = outcome_for_pod_failure(reason, "details")
    assert outcome.status == "FAILED"
    assert outcome.error_id == ident
    assert (outcome.error_message or "").endswith(": details")


def test_task_error_outcome_and_kwargs() -> None:
    outcome = outcome_for_task_error(TaskError("dptr.InvalidTask.NoCommand", "no command"))
    kwargs = outcome.set_task_status_kwargs("tid", b"trace \xff")
    assert kwargs == {
        "taskId": "tid",
        "taskStatus": "FAILED",
        "errorId": "dptr.InvalidTask.NoCommand",
        "errorMessage": "no command",
        "errorStackTrace": "trace \ufffd",
    }
    _validate_set_task_status(kwargs)
    assert Outcome("FINISHED").set_task_status_kwargs("tid", "ignored") == {
        "taskId": "tid",
        "taskStatus": "FINISHED",
    }


def test_misc() -> None:
    assert signal_name(9) == "SIGKILL"
    assert signal_name(99) == "SIG99"
    assert is_precondition("ShellCommandPrecondition")
    assert not is_precondition("ShellCommandActivity")
    assert not is_precondition(None)
    assert re.fullmatch(r"dptr\.[A-Za-z]+", error_id("OOMKilled"))
