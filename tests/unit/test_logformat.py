"""--log-format=json (dptr_common.logformat): the fields, the context, and the sidecar's own."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from dptr_common.logformat import configure, log_context
from dptr_operator.config import parse_args


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    # configure() replaces the root logger's handlers: give pytest's back afterwards.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _capture() -> io.StringIO:
    stream = io.StringIO()
    configure("INFO", "json", static={"pipeline": "df-STATIC"}, stream=stream)
    return stream


def test_a_line_is_one_object_with_the_stable_fields_and_the_context() -> None:
    stream = _capture()
    log = logging.getLogger("dptr.test")
    with log_context(taskrunner="team-a/etl"):
        log.info("polling")
        with log_context(attempt="@a_1", task="df-x-a-1"):
            log.warning("héllo %s", "wörld")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("outside")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["polling", "héllo wörld", "failed", "outside"]
    assert lines[0]["taskrunner"] == "team-a/etl" and "attempt" not in lines[0]
    assert (lines[1]["attempt"], lines[1]["task"], lines[1]["level"]) == ("@a_1", "df-x-a-1", "WARNING")
    assert "ValueError: boom" in lines[2]["exception"] and "attempt" not in lines[2]
    assert "taskrunner" not in lines[3] and lines[3]["pipeline"] == "df-STATIC"
    assert lines[0]["time"].endswith("Z") and lines[0]["logger"] == "dptr.test"


def test_a_new_thread_starts_without_another_threads_context() -> None:
    stream = _capture()
    log = logging.getLogger("dptr.test")
    with log_context(attempt="@mine"):
        thread = threading.Thread(target=lambda: log.info("elsewhere"))
        thread.start()
        thread.join()
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert "attempt" not in line


def test_kopf_object_lines_name_the_object() -> None:
    stream = _capture()
    logging.getLogger("kopf.objects").info("handled", extra={"k8s_ref": {"namespace": "ns", "name": "tr"}})
    assert json.loads(stream.getvalue())["object"] == "ns/tr"


def test_the_operator_passes_its_format_to_the_sidecars() -> None:
    assert "DPTR_LOG_FORMAT" not in parse_args(["--namespace", "a"], env={}).sidecar_container_env
    config = parse_args(["--namespace", "a", "--log-format", "json"], env={})
    assert config.sidecar_container_env["DPTR_LOG_FORMAT"] == "json"


def test_the_sidecars_lines_carry_its_attempt() -> None:
    env = {
        **os.environ,
        "DPTR_LOG_FORMAT": "json",
        "POD_NAMESPACE": "team-a",
        "DPTR_TASKRUNNER": "etl",
        "DPTR_PIPELINE_ID": "df-1",
        "DPTR_ATTEMPT_ID": "@a_1",
        "DPTR_PIPELINETASK": "df-1-a-1",
    }
    code = "import logging; from dptr_sidecar.cli import _setup_logging; _setup_logging(); logging.getLogger('dptr.sidecar').info('up')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    line = json.loads(out.stderr)
    assert {k: line[k] for k in ("taskrunner", "pipeline", "attempt", "task", "message")} == {
        "taskrunner": "team-a/etl",
        "pipeline": "df-1",
        "attempt": "@a_1",
        "task": "df-1-a-1",
        "message": "up",
    }


def test_the_operator_passes_the_sidecar_log_level_and_the_sidecar_honours_it() -> None:
    assert "DPTR_LOG_LEVEL" not in parse_args(["--namespace", "a"], env={}).sidecar_container_env
    config = parse_args(["--namespace", "a", "--sidecar-log-level", "warning"], env={})
    assert config.sidecar_container_env["DPTR_LOG_LEVEL"] == "WARNING"
    from_env = parse_args(["--namespace", "a"], env={"DPTR_SIDECAR_LOG_LEVEL": "DEBUG"})
    assert from_env.sidecar_container_env["DPTR_LOG_LEVEL"] == "DEBUG"
    with pytest.raises(SystemExit):
        parse_args(["--namespace", "a", "--sidecar-log-level", "LOUD"], env={})
    code = (
        "import logging; from dptr_sidecar.cli import _setup_logging; _setup_logging(); "
        "log = logging.getLogger('dptr.sidecar'); log.info('quiet'); log.warning('loud')"
    )
    env = {**os.environ, "DPTR_LOG_LEVEL": config.sidecar_container_env["DPTR_LOG_LEVEL"]}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "loud" in out.stderr and "quiet" not in out.stderr
