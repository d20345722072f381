"""Which heartbeats the sidecar records on its PipelineTask (``status.heartbeat``).

A beat within a tenth of an interval of the takeover is not recorded (the takeover
stamped ``lastAt`` a moment before: bench/overhead.py counted that write on every task;
the operator calls the sidecar stale after 1.5 intervals without a change, and the next
record still comes within 1.2), but an error shown on the PipelineTask is always cleared
by the next success, however soon it comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dptr_common.datapipeline import DataPipelineClient, DataPipelineError
from dptr_sidecar.config import SidecarConfig
from dptr_sidecar.heartbeats import Heartbeater
from dptr_sidecar.shared import TaskInfo

ENV = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "DPTR_PIPELINETASK": "pt", "DPTR_HEARTBEAT_INTERVAL": "60"}


class Kube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch(self, path: str, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.patches.append(body["status"]["heartbeat"])
        return body


class Service:
    """``DataPipeline.call`` with scripted answers: False (not canceled) or an error."""

    def __init__(self) -> None:
        self.answers: list[bool | Exception] = []

    def call(self, fn: Callable[[DataPipelineClient], Any], deadline: float) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def heartbeater() -> tuple[Heartbeater, Kube, Service]:
    kube, service = Kube(), Service()
    beats = Heartbeater(
        SidecarConfig.from_env(ENV),
        kube,  # type: ignore[arg-type]
        service,  # type: ignore[arg-type]
        TaskInfo("task", "pipeline", "attempt", 900.0),
        lambda reason, detail: None,
        since=0.0,
    )
    return beats, kube, service


def test_the_beat_after_the_takeover_is_not_recorded_but_later_ones_are() -> None:
    beats, kube, service = heartbeater()
    beats.note_recorded()
    service.answers = [False]
    assert beats._beat()
    assert kube.patches == []
    beats._recorded_at -= 6.1  # type: ignore[operator]  # a tenth of the interval later
    service.answers = [False]
    assert beats._beat()
    assert [p["lastError"] for p in kube.patches] == [None]


def test_an_error_is_cleared_by_the_next_success_however_soon() -> None:
    beats, kube, service = heartbeater()
    beats.note_recorded()
    service.answers = [DataPipelineError("ReportTaskProgress: 503"), False, False]
    assert not beats._beat()
    assert beats._beat()
    assert [p.get("lastError") for p in kube.patches] == ["ReportTaskProgress: 503", None]
    assert "lastAt" in kube.patches[1]
    assert beats._beat()  # right after a recorded success: nothing new to say
    assert len(kube.patches) == 2


def test_without_a_takeover_stamp_every_success_is_recorded() -> None:
    beats, kube, service = heartbeater()
    service.answers = [False]
    assert beats._beat()
    assert len(kube.patches) == 1
