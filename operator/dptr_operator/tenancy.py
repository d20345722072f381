"""Tenancy: what the administrator lets each namespace's TaskRunners do.

Anyone who may create a TaskRunner in a namespace is a tenant; the operator is shared.
Left to tenants, a TaskRunner could name another team's ``workerGroup`` (and receive its
tasks: commands, ``my*`` fields, inputs, and the right to report them), point the runner's
requests elsewhere (``endpointUrl``, ``s3EndpointUrl``), run its own code with the
sidecar's identity (``sidecarImage``), hand the runner's pod identity to its task
(``passDataPipelineCredentials`` with ``PodIdentity``), have the operator assume
another team's IAM role (``credentials.roleArn``), mount what the operator's pods can
reach (``jobTemplate.volumes``), or have its pods preempt other tenants'
(``jobTemplate.priorityClassName``).  So each of those is the
administrator's decision, made in the operator's flags (the chart's ``tenancy`` values),
and a TaskRunner outside it never polls: it shows ``Ready=False``/``Degraded`` with the
reason and a Warning Event (docs/security.md).

Pure: :meth:`TenancyPolicy.check` takes a TaskRunner and returns why it may not run, or
None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dptr_common.models import TaskRunner

__all__ = [
    "DEFAULT_VOLUME_TYPES",
    "OVERRIDES",
    "Refusal",
    "TenancyPolicy",
    "parse_grants",
    "task_account_refusal",
]

Override = Literal[
    "endpointUrl", "s3EndpointUrl", "sidecarImage", "activityImage", "passDataPipelineCredentials", "proxy"
]
#: TaskRunner fields that change where code runs or where requests go.
OVERRIDES: tuple[Override, ...] = (
    "endpointUrl",
    "s3EndpointUrl",
    "sidecarImage",
    "activityImage",
    "passDataPipelineCredentials",
    "proxy",
)


#: Volume sources a TaskRunner's jobTemplate may use unless the administrator says
#: otherwise: storage of the namespace's own.  Not hostPath (the node), secret or projected
#: (credentials a TaskRunner's author may not be able to read themselves: the operator
#: creates the pods), csi (secrets stores), and never a ServiceAccount token (models).
DEFAULT_VOLUME_TYPES = frozenset({"persistentVolumeClaim", "emptyDir", "configMap", "ephemeral"})


@dataclass(frozen=True)
class Refusal:
    """Why a TaskRunner may not poll: a condition reason and a message for people."""

    reason: str
    message: str


def _glob(pattern: str) -> re.Pattern[str]:
    """``*`` matches any run of characters; everything else is literal."""
    return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$", re.DOTALL)


def parse_grants(items: Iterable[str], *, what: str) -> dict[str, tuple[str, ...]]:
    """``NAMESPACE=PATTERN[,PATTERN...]`` items (``*`` as the namespace: every one) into a map;
    ValueError for a malformed one."""
    grants: dict[str, list[str]] = {}
    for item in items:
        namespace, sep, patterns = item.partition("=")
        values = [p for p in (v.strip() for v in patterns.split(",")) if p]
        if not sep or not namespace.strip() or not values:
            raise ValueError(f"{what} grant {item!r} is not NAMESPACE=PATTERN[,PATTERN...]")
        grants.setdefault(namespace.strip(), []).extend(values)
    return {ns: tuple(v) for ns, v in grants.items()}


def _allowed(grants: Mapping[str, tuple[str, ...]], namespace: str, value: str) -> bool:
    patterns = (*grants.get(namespace, ()), *grants.get("*", ()))
    return any(_glob(p).match(value) for p in patterns)


@dataclass(frozen=True)
class TenancyPolicy:
    #: namespace (or ``*``) -> worker groups its TaskRunners may poll (``*`` globs).
    worker_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: namespace (or ``*``) -> IAM role ARNs its TaskRunners may name (``*`` globs).
    role_arns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Every namespace may poll every worker group (a cluster with a single tenant).
    allow_any_worker_group: bool = False
    #: Which of :data:`OVERRIDES` tenants may set.
    allowed_overrides: frozenset[str] = frozenset()
    #: Volume types (core/v1 Volume source fields) a TaskRunner's jobTemplate may use.
    allowed_volume_types: frozenset[str] = DEFAULT_VOLUME_TYPES
    #: PriorityClasses a TaskRunner's jobTemplate may name; none by default.
    allowed_priority_classes: frozenset[str] = frozenset()

    def check(self, runner: TaskRunner) -> Refusal | None:
        spec = runner.spec
        namespace = str(runner.metadata.namespace)
        where = f"TaskRunner {namespace}/{runner.metadata.name}"
        if not self.allow_any_worker_group and not _allowed(self.worker_groups, namespace, spec.worker_group):
            return Refusal(
                "WorkerGroupNotGranted",
                f"{where}: namespace {namespace!r} may not serve worker group {spec.worker_group!r}; "
                "the administrator grants worker groups per namespace (the chart's "
                "tenancy.workerGroups, the operator's --worker-group-grant)",
            )
        used = {
            "endpointUrl": spec.endpoint_url is not None,
            "s3EndpointUrl": spec.s3_endpoint_url is not None,
            "sidecarImage": spec.sidecar_image is not None,
            # dptr's SqlActivity and CopyActivity code, with the runner's identity and the database password.
            "activityImage": spec.activity_image is not None,
            "passDataPipelineCredentials": spec.pass_data_pipeline_credentials
            and spec.credentials.mode == "PodIdentity",
            # The path of the runner's requests (and the task's, with passToTask).
            "proxy": spec.proxy is not None,
        }
        types = sorted(
            {k for v in spec.job_template.volumes for k in v if k != "name"} - self.allowed_volume_types
        )
        if types:
            return Refusal(
                "VolumeTypeNotAllowed",
                f"{where} mounts volumes of type {', '.join(types)} into its task pods; the "
                f"administrator allows {', '.join(sorted(self.allowed_volume_types))} (the chart's "
                "tenancy.allowedVolumeTypes, the operator's --allow-volume-type)",
            )
        priority_class = spec.job_template.priority_class_name
        if priority_class is not None and priority_class not in self.allowed_priority_classes:
            # A PriorityClass is cluster-wide: a higher one preempts other tenants' pods.
            allowed = ", ".join(sorted(self.allowed_priority_classes)) or "none"
            return Refusal(
                "PriorityClassNotAllowed",
                f"{where} gives its task pods priorityClassName {priority_class}; the "
                f"administrator allows {allowed} (the chart's tenancy.allowedPriorityClasses, "
                "the operator's --allow-priority-class)",
            )
        refused = [name for name in OVERRIDES if used[name] and name not in self.allowed_overrides]
        if refused:
            return Refusal(
                "OverrideNotAllowed",
                f"{where} sets {', '.join(refused)}, which change where its code runs or where the "
                "runner's requests go; the administrator has not allowed it (the chart's "
                "tenancy.allowedOverrides, the operator's --allow-override)",
            )
        role = spec.credentials.role_arn
        if role is not None and not _allowed(self.role_arns, namespace, role):
            return Refusal(
                "RoleNotGranted",
                f"{where}: namespace {namespace!r} may not use role {role}; the administrator grants "
                "roles per namespace (the chart's tenancy.roleArns, the operator's --role-grant)",
            )
        return None


def task_account_refusal(runner: TaskRunner, sidecar_account: str) -> Refusal | None:
    """A PodIdentity TaskRunner whose pods run as the task's own ServiceAccount needs
    ``credentials.roleArn``: the pod's account then carries the task's role, so dptr's
    containers reach the runner's role through a token of dptr's own (docs/install.md)."""
    spec = runner.spec
    named = spec.job_template.service_account_name
    if spec.credentials.mode != "PodIdentity" or named is None or named == sidecar_account:
        return None
    if spec.credentials.role_arn is not None:
        return None
    where = f"TaskRunner {runner.metadata.namespace}/{runner.metadata.name}"
    return Refusal(
        "TaskAccountNeedsRole",
        f"{where}: its pods run as the task's own ServiceAccount {named!r}, whose role is the "
        "task's; with credentials.mode PodIdentity, set credentials.roleArn to the runner's role "
        "(trusting dptr's token audience, docs/install.md) so that dptr's containers keep the "
        "runner's identity",
    )
