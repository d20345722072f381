"""The operator's settings: command-line flags, each with an environment variable fallback.

Precedence: flag > environment variable > default.  Every duration that comes from the
Data Pipeline protocol (heartbeat intervals, the 15-minute runner heartbeat, graces,
stale-claim timeouts) is given here in *protocol* seconds and multiplied by
``time_scale`` where it is used (:meth:`OperatorConfig.scaled`); tests run with
``--time-scale 0.01`` against a local service scaled the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from dptr_common.models import ProxySettings
from dptr_common.podspec import SIDECAR_RESOURCES
from dptr_common.version import ACTIVITY_IMAGE, SIDECAR_IMAGE
from dptr_operator.tenancy import DEFAULT_VOLUME_TYPES, OVERRIDES, TenancyPolicy, parse_grants

__all__ = ["LOG_LEVELS", "OperatorConfig", "SidecarResources", "parse_args"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

#: A Kubernetes quantity (apimachinery's grammar): 10m, 0.5, 64Mi, 1G, 1e3.
_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
_SUFFIXES: dict[str | None, Decimal] = {None: Decimal(1)}
_SUFFIXES.update({s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))})
_SUFFIXES.update(
    {s: Decimal(10) ** e for s, e in zip("numkMGTPE", (-9, -6, -3, 3, 6, 9, 12, 15, 18), strict=True)}
)
_RESOURCE_NAME = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _quantity(value: str) -> Decimal:
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 10m, 0.5, 64Mi or 1Gi")
    number, suffix = match.group("number"), match.group("suffix")
    if suffix not in _SUFFIXES:  # an exponent: 1e3
        return Decimal(number + suffix)
    return Decimal(number) * _SUFFIXES[suffix]


class SidecarResources(BaseModel):
    """The compute resources (core/v1 ResourceRequirements: requests and limits) of dptr's
    own containers in every task pod (``--sidecar-resources``)."""

    model_config = ConfigDict(extra="forbid")

    requests: dict[str, str] = {}
    limits: dict[str, str] = {}

    @field_validator("requests", "limits", mode="before")
    @classmethod
    def _quantities(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic says what is wrong
        out: dict[str, str] = {}
        for name, amount in value.items():
            if not isinstance(name, str) or not _RESOURCE_NAME.match(name):
                raise ValueError(f"{name!r} is not a resource name such as cpu or memory")
            if isinstance(amount, bool) or not isinstance(amount, (str, int, float)):
                raise ValueError(f"{name}: {amount!r} is not a quantity")
            text = str(amount)
            if _quantity(text) < 0:
                raise ValueError(f"{name}: {text} is negative")
            out[name] = text
        return out

    @model_validator(mode="after")
    def _requests_within_limits(self) -> SidecarResources:
        for name, request in self.requests.items():
            limit = self.limits.get(name)
            if limit is not None and _quantity(request) > _quantity(limit):
                raise ValueError(f"the {name} request ({request}) is more than its limit ({limit})")
        return self

    def to_k8s(self) -> dict[str, Any]:
        """As a container's ``resources``."""
        return {k: dict(v) for k, v in (("requests", self.requests), ("limits", self.limits)) if v}


def _default_sidecar_resources() -> SidecarResources:
    return SidecarResources.model_validate(copy.deepcopy(SIDECAR_RESOURCES))


class OperatorConfig(BaseModel):
    """Everything the operator is configured with (see docs/operator.md for each)."""

    namespaces: list[str] = []
    all_namespaces: bool = False
    kubeconfig: str | None = None
    identity: str = Field(default_factory=socket.gethostname)
    time_scale: float = Field(default=1.0, gt=0, le=10)

    sidecar_image: str = SIDECAR_IMAGE
    #: The image of SqlActivity and CopyActivity attempts (a TaskRunner's activityImage wins).
    activity_image: str = ACTIVITY_IMAGE
    sidecar_service_account: str = "dptr-sidecar"
    #: NAME=VALUE pairs every dptr container of a task pod gets (not the task's own).
    sidecar_env: list[str] = []
    #: Requests and limits of dptr's containers in every task pod.
    sidecar_resources: SidecarResources = Field(default_factory=_default_sidecar_resources)
    #: DPTR_LOG_LEVEL of dptr's containers in every task pod.
    sidecar_log_level: LogLevel = "INFO"
    #: The operator's own proxy (HTTPS_PROXY/HTTP_PROXY/NO_PROXY in its environment, from
    #: the Helm values): the default for every task pod's dptr containers.
    proxy: ProxySettings | None = None

    # Tenancy: the administrator's grants (see dptr_operator.tenancy).
    worker_group_grants: list[str] = []
    role_grants: list[str] = []
    allow_any_worker_group: bool = False
    allowed_overrides: list[str] = []
    #: Volume types jobTemplate.volumes may use; empty: DEFAULT_VOLUME_TYPES.
    allowed_volume_types: list[str] = []
    #: PriorityClasses jobTemplate.priorityClassName may name; empty: none.
    allowed_priority_classes: list[str] = []
    #: Where every TaskRunner's requests go unless it may and does say otherwise.
    default_endpoint_url: str | None = None
    default_s3_endpoint_url: str | None = None

    # Protocol-derived durations, in protocol seconds (scaled at use).
    runner_heartbeat_seconds: float = Field(default=15 * 60, gt=0)
    image_pull_grace_seconds: float = Field(default=10 * 60, ge=0)
    unschedulable_grace_seconds: float = Field(default=30 * 60, ge=0)
    #: A Job with no pod after this long was refused its pods (quota, admission, a missing
    #: ServiceAccount): the attempt ends FAILED dptr.PodRejected.*.
    pod_create_grace_seconds: float = Field(default=5 * 60, ge=0)
    #: How long the sidecar gets to report a pod's end before the operator reports it.
    sidecar_report_grace_seconds: float = Field(default=60, ge=0)
    #: A report claim older than this, and not reported, is taken over.
    claim_stale_after_seconds: float = Field(default=10 * 60, gt=0)
    #: Between runs of the sweep (graces, history limits, status publishing).
    sweep_interval_seconds: float = Field(default=5, gt=0)

    # Not protocol durations: real seconds.
    lease_namespace: str | None = None
    lease_name: str = "dptr-operator"
    lease_duration_seconds: float = Field(default=15, gt=0)
    lease_renew_seconds: float = Field(default=5, gt=0)
    leader_election: bool = True
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    watch_server_timeout: float = Field(default=300, gt=0)
    watch_client_timeout: float = Field(default=330, gt=0)
    heartbeat_workers: int = Field(default=16, ge=1, le=256)
    log_level: str = "INFO"
    #: text, or json (dptr_common.logformat); the sidecars of the task pods follow it.
    log_format: Literal["text", "json"] = "text"
    _policy: TenancyPolicy = PrivateAttr(default_factory=TenancyPolicy)

    @model_validator(mode="after")
    def _tenancy(self) -> OperatorConfig:
        unknown = sorted(set(self.allowed_overrides) - set(OVERRIDES))
        if unknown:
            raise ValueError(f"--allow-override {', '.join(unknown)}: not one of {', '.join(OVERRIDES)}")
        for item in self.sidecar_env:
            name, sep, _ = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--sidecar-env {item!r} is not NAME=VALUE")
        self._policy = TenancyPolicy(
            worker_groups=parse_grants(self.worker_group_grants, what="worker group"),
            role_arns=parse_grants(self.role_grants, what="role"),
            allow_any_worker_group=self.allow_any_worker_group,
            allowed_overrides=frozenset(self.allowed_overrides),
            allowed_volume_types=frozenset(self.allowed_volume_types) or DEFAULT_VOLUME_TYPES,
            allowed_priority_classes=frozenset(self.allowed_priority_classes),
        )
        return self

    @property
    def tenancy(self) -> TenancyPolicy:
        return self._policy

    @property
    def extra_sidecar_env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.sidecar_env)

    @property
    def sidecar_container_env(self) -> dict[str, str]:
        """What every sidecar is given besides the task's own values."""
        env = {**self.extra_sidecar_env, "DPTR_TIME_SCALE": repr(self.time_scale)}
        if self.log_format != "text":
            env["DPTR_LOG_FORMAT"] = self.log_format
        if self.sidecar_log_level != "INFO":
            env["DPTR_LOG_LEVEL"] = self.sidecar_log_level
        return env

    @model_validator(mode="after")
    def _scope(self) -> OperatorConfig:
        if self.all_namespaces and self.namespaces:
            raise ValueError("give --namespace or --all-namespaces, not both")
        if not self.all_namespaces and not self.namespaces:
            raise ValueError("give at least one --namespace, or --all-namespaces")
        if self.lease_renew_seconds >= self.lease_duration_seconds:
            raise ValueError("the lease renew interval must be shorter than the lease duration")
        return self

    def scaled(self, protocol_seconds: float) -> float:
        """Real seconds for a duration of the protocol."""
        return protocol_seconds * self.time_scale

    @property
    def holder(self) -> str:
        """This replica's identity in report claims and heartbeat records."""
        return f"operator/{self.identity}"

    @property
    def effective_lease_namespace(self) -> str:
        if self.lease_namespace:
            return self.lease_namespace
        return os.environ.get("POD_NAMESPACE") or (self.namespaces[0] if self.namespaces else "default")


def _env_list(env: Mapping[str, str], name: str) -> list[str]:
    return [part.strip() for part in env.get(name, "").split(",") if part.strip()]


def _env_items(env: Mapping[str, str], name: str) -> list[str]:
    return [part.strip() for part in env.get(name, "").split(";") if part.strip()]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Flags (with ``DPTR_*`` environment fallbacks) -> :class:`OperatorConfig`.

    Raises ``SystemExit`` (argparse's usage error) for bad flags or an invalid combination.
    """
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="dptr-operator", description="Kubernetes-native task runner for AWS Data Pipeline."
    )
    scope = parser.add_argument_group("scope")
    scope.add_argument(
        "--namespace",
        "-n",
        dest="namespaces",
        action="append",
        default=None,
        help="namespace to serve (repeatable; env DPTR_NAMESPACES, comma-separated)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        default=_truthy(env.get("DPTR_ALL_NAMESPACES")),
        help="serve every namespace (env DPTR_ALL_NAMESPACES)",
    )
    parser.add_argument(
        "--kubeconfig", default=env.get("KUBECONFIG") or None, help="out-of-cluster kubeconfig"
    )
    parser.add_argument(
        "--identity",
        default=env.get("POD_NAME") or socket.gethostname(),
        help="this replica's name in leases and report claims (env POD_NAME; default: host name)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=float(env.get("DPTR_TIME_SCALE") or 1.0),
        help="multiply every protocol-derived duration (tests: 0.01); env DPTR_TIME_SCALE",
    )
    parser.add_argument(
        "--sidecar-image",
        default=env.get("DPTR_SIDECAR_IMAGE") or SIDECAR_IMAGE,
        help="default image of the dptr sidecar (a TaskRunner's sidecarImage wins)",
    )
    parser.add_argument(
        "--activity-image",
        default=env.get("DPTR_ACTIVITY_IMAGE") or ACTIVITY_IMAGE,
        help="image of SqlActivity and CopyActivity attempts: dptr-activity and its database drivers (a TaskRunner's "
        "activityImage wins); env DPTR_ACTIVITY_IMAGE",
    )
    parser.add_argument(
        "--sidecar-service-account",
        default=env.get("DPTR_SIDECAR_SERVICE_ACCOUNT") or "dptr-sidecar",
        help="service account of task pods whose TaskRunner names none",
    )
    parser.add_argument(
        "--sidecar-env",
        action="append",
        default=_env_items(env, "DPTR_SIDECAR_ENV"),
        metavar="NAME=VALUE",
        help="environment of dptr's containers in every task pod, e.g. AWS_ENDPOINT_URL_STS=... "
        "(repeatable; env DPTR_SIDECAR_ENV, ';'-separated)",
    )
    parser.add_argument(
        "--sidecar-resources",
        default=env.get("DPTR_SIDECAR_RESOURCES") or None,
        metavar="JSON",
        help="requests and limits of dptr's containers in every task pod (the sidecar, the script "
        'fetcher, stage-in, an Exists check) as JSON, e.g. \'{"requests":{"cpu":"10m","memory":"64Mi"},'
        '"limits":{"memory":"128Mi"}}\' (the default); env DPTR_SIDECAR_RESOURCES',
    )
    parser.add_argument(
        "--sidecar-log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=(env.get("DPTR_SIDECAR_LOG_LEVEL") or "INFO").upper(),
        help="log level of dptr's containers in every task pod (their DPTR_LOG_LEVEL); "
        "env DPTR_SIDECAR_LOG_LEVEL",
    )
    tenancy = parser.add_argument_group("tenancy (what TaskRunners may do; see docs/security.md)")
    tenancy.add_argument(
        "--worker-group-grant",
        dest="worker_group_grants",
        action="append",
        default=_env_items(env, "DPTR_WORKER_GROUP_GRANTS"),
        metavar="NAMESPACE=PATTERN[,PATTERN]",
        help="worker groups (* globs) TaskRunners in NAMESPACE (* for all) may poll (repeatable; "
        "env DPTR_WORKER_GROUP_GRANTS, ';'-separated)",
    )
    tenancy.add_argument(
        "--allow-any-worker-group",
        action="store_true",
        default=_truthy(env.get("DPTR_ALLOW_ANY_WORKER_GROUP")),
        help="every TaskRunner may poll any worker group (one tenant per cluster only)",
    )
    tenancy.add_argument(
        "--role-grant",
        dest="role_grants",
        action="append",
        default=_env_items(env, "DPTR_ROLE_GRANTS"),
        metavar="NAMESPACE=ARN[,ARN]",
        help="IAM roles (* globs) TaskRunners in NAMESPACE may name in credentials.roleArn "
        "(repeatable; env DPTR_ROLE_GRANTS, ';'-separated)",
    )
    tenancy.add_argument(
        "--allow-override",
        dest="allowed_overrides",
        action="append",
        default=_env_items(env, "DPTR_ALLOWED_OVERRIDES"),
        metavar="FIELD",
        help=f"a TaskRunner field tenants may set: {', '.join(OVERRIDES)} (repeatable)",
    )
    tenancy.add_argument(
        "--allow-volume-type",
        dest="allowed_volume_types",
        action="append",
        default=_env_items(env, "DPTR_ALLOWED_VOLUME_TYPES"),
        metavar="TYPE",
        help="a volume source TaskRunners' jobTemplate.volumes may use, e.g. persistentVolumeClaim "
        f"(repeatable; replaces the default {', '.join(sorted(DEFAULT_VOLUME_TYPES))})",
    )
    tenancy.add_argument(
        "--allow-priority-class",
        dest="allowed_priority_classes",
        action="append",
        default=_env_items(env, "DPTR_ALLOWED_PRIORITY_CLASSES"),
        metavar="NAME",
        help="a PriorityClass TaskRunners' jobTemplate.priorityClassName may name (repeatable; "
        "env DPTR_ALLOWED_PRIORITY_CLASSES, ';'-separated; default: none)",
    )
    tenancy.add_argument(
        "--default-endpoint-url",
        default=env.get("DPTR_DEFAULT_ENDPOINT_URL") or None,
        help="Data Pipeline endpoint for TaskRunners that set none (e.g. a VPC endpoint)",
    )
    tenancy.add_argument(
        "--default-s3-endpoint-url",
        default=env.get("DPTR_DEFAULT_S3_ENDPOINT_URL") or None,
        help="S3 endpoint for TaskRunners that set none",
    )
    durations = parser.add_argument_group("protocol durations (seconds, multiplied by --time-scale)")
    for flag, default in (
        ("--runner-heartbeat-seconds", 15 * 60),
        ("--image-pull-grace-seconds", 10 * 60),
        ("--unschedulable-grace-seconds", 30 * 60),
        ("--pod-create-grace-seconds", 5 * 60),
        ("--sidecar-report-grace-seconds", 60),
        ("--claim-stale-after-seconds", 10 * 60),
        ("--sweep-interval-seconds", 5),
    ):
        env_name = "DPTR_" + flag[2:].upper().replace("-", "_")
        durations.add_argument(flag, type=float, default=float(env.get(env_name) or default))
    ha = parser.add_argument_group("high availability")
    ha.add_argument("--lease-namespace", default=env.get("DPTR_LEASE_NAMESPACE") or None)
    ha.add_argument("--lease-name", default=env.get("DPTR_LEASE_NAME") or "dptr-operator")
    ha.add_argument(
        "--lease-duration-seconds", type=float, default=float(env.get("DPTR_LEASE_DURATION") or 15)
    )
    ha.add_argument("--lease-renew-seconds", type=float, default=float(env.get("DPTR_LEASE_RENEW") or 5))
    ha.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        default=not _truthy(env.get("DPTR_NO_LEADER_ELECTION")),
        help="run without the Lease (only ever with a single replica)",
    )
    parser.add_argument("--http-host", default=env.get("DPTR_HTTP_HOST") or "0.0.0.0")
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(env.get("DPTR_HTTP_PORT") or 8080),
        help="/metrics, /healthz, /readyz (0: pick a free port and log it)",
    )
    parser.add_argument("--watch-server-timeout", type=float, default=300.0)
    parser.add_argument("--watch-client-timeout", type=float, default=330.0)
    parser.add_argument("--heartbeat-workers", type=int, default=int(env.get("DPTR_HEARTBEAT_WORKERS") or 16))
    parser.add_argument("--log-level", default=env.get("DPTR_LOG_LEVEL") or "INFO")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=env.get("DPTR_LOG_FORMAT") or "text",
        help="text, or json: one object per line with taskrunner, pipeline, attempt and task "
        "(docs/operator.md); the task pods' sidecars follow it; env DPTR_LOG_FORMAT",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    namespaces = args.namespaces if args.namespaces is not None else _env_list(env, "DPTR_NAMESPACES")
    values = {k: v for k, v in vars(args).items() if v is not None}
    values["namespaces"] = namespaces
    try:
        values["proxy"] = ProxySettings.from_env(env)
        if args.sidecar_resources is not None:
            try:
                values["sidecar_resources"] = json.loads(args.sidecar_resources)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--sidecar-resources is not JSON: {exc}") from None
        return OperatorConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # pragma: no cover - parser.error exits
