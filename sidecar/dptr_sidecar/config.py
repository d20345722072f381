"""The sidecar's configuration: environment variables and the downward API only.

``render_job`` (``dptr_common.render``) sets these on the ``dptr-sidecar`` container;
docs/sidecar.md lists them.  Durations that come from the Data Pipeline protocol
(heartbeat interval, reportProgressTimeout, retry back-off, claim staleness) are in
protocol seconds and multiplied by ``DPTR_TIME_SCALE`` (default 1; tests run at 0.01,
like the local Data Pipeline service), so a time-scaled test sees the same ratios as
production.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ConfigError", "SidecarConfig", "time_scale_from_env"]

#: Default ReportTaskProgress interval (the API reference recommends one a minute).
DEFAULT_HEARTBEAT_INTERVAL = 60.0
#: The service's default reportProgressTimeout.
DEFAULT_REPORT_PROGRESS_TIMEOUT = 15 * 60.0
#: The pod's grace period, when the pod spec cannot be read (Kubernetes' default).
DEFAULT_TERMINATION_GRACE = 30.0


class ConfigError(RuntimeError):
    """A required variable is missing or malformed."""


def _float(env: Mapping[str, str], name: str, default: float, *, positive: bool = True) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if positive and not value > 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value


def time_scale_from_env(env: Mapping[str, str] | None = None) -> float:
    """``DPTR_TIME_SCALE`` (the name the operator uses too): protocol seconds -> real seconds."""
    return _float(os.environ if env is None else env, "DPTR_TIME_SCALE", 1.0)


@dataclass(frozen=True)
class SidecarConfig:
    """What the sidecar knows about itself before it talks to any API."""

    pod_name: str
    namespace: str
    pipeline_task: str
    task_runner: str | None
    region: str
    endpoint_url: str | None
    main_container: str
    object_type: str | None
    #: Protocol seconds between heartbeats until the TaskRunner publishes another value.
    heartbeat_interval: float
    time_scale: float
    #: Real seconds to wait for the final container status after SIGTERM (None: from the pod).
    termination_grace: float | None
    pod_uid: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SidecarConfig:
        env = os.environ if env is None else env

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is not set (the Job renderer sets it; see docs/sidecar.md)")
            return value

        grace = env.get("DPTR_TERMINATION_GRACE", "").strip()
        return cls(
            pod_name=required("POD_NAME"),
            namespace=required("POD_NAMESPACE"),
            pipeline_task=required("DPTR_PIPELINETASK"),
            task_runner=env.get("DPTR_TASKRUNNER") or None,
            region=env.get("DPTR_REGION") or env.get("AWS_REGION") or "us-east-1",
            endpoint_url=env.get("DPTR_ENDPOINT_URL") or None,
            main_container=env.get("DPTR_MAIN_CONTAINER") or "task",
            object_type=env.get("DPTR_OBJECT_TYPE") or None,
            heartbeat_interval=_float(env, "DPTR_HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL),
            time_scale=time_scale_from_env(env),
            termination_grace=_float(env, "DPTR_TERMINATION_GRACE", 1.0) if grace else None,
            pod_uid=env.get("POD_UID") or None,
        )

    def scaled(self, protocol_seconds: float) -> float:
        """Protocol seconds -> real seconds."""
        return protocol_seconds * self.time_scale
