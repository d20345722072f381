"""pydantic models of the ``dptr.dev/v1alpha1`` custom resources.

They mirror ``charts/dptr/crds/*.yaml`` (same names, same defaults: a unit test compares
them) so that the operator and the sidecar read a CR once, at the boundary, with
``TaskRunner.from_k8s(obj)`` / ``PipelineTask.from_k8s(obj)`` and work on typed values
after that.  Field names are snake_case in Python and camelCase on the wire
(``populate_by_name`` accepts both); ``to_k8s()`` gives the wire form back.

Pass-through Kubernetes types the operator never interprets (resources, tolerations,
env, security contexts) stay plain dicts: they are copied into the Job as given, and the
apiserver validates them there.

Unknown fields are ignored rather than rejected: the apiserver already prunes them, and an
older operator must keep working against a newer CRD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dptr_common import images
from dptr_common.task import Task, TaskField

__all__ = [
    "API_VERSION",
    "GROUP",
    "PIPELINE_TASK_KIND",
    "PIPELINE_TASK_PLURAL",
    "TASK_RUNNER_KIND",
    "TASK_RUNNER_PLURAL",
    "VERSION",
    "Activity",
    "CamelModel",
    "Canceled",
    "Condition",
    "Credentials",
    "Heartbeat",
    "HeartbeatSpec",
    "HistoryLimits",
    "ImagePolicy",
    "JobTemplate",
    "LocalObjectReference",
    "ObjectMeta",
    "PipelineTask",
    "PipelineTaskSpec",
    "PipelineTaskStatus",
    "Report",
    "SecretRef",
    "TaskCounts",
    "TaskIOLimits",
    "TaskRunner",
    "TaskRunnerSpec",
    "TaskRunnerStatus",
    "parse_byte_quantity",
    "utcnow",
]

GROUP = "dptr.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
TASK_RUNNER_KIND = "TaskRunner"
TASK_RUNNER_PLURAL = "taskrunners"
PIPELINE_TASK_KIND = "PipelineTask"
PIPELINE_TASK_PLURAL = "pipelinetasks"

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Canceled", "Lost"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Canceled", "Lost"})


def utcnow() -> datetime:
    """Now, in UTC, to the second (Kubernetes timestamps carry no fractions)."""
    return datetime.now(UTC).replace(microsecond=0)


class CamelModel(BaseModel):
    """Base: camelCase on the wire, snake_case in Python, unknown fields ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_k8s(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(CamelModel):
    """The parts of ``metadata`` dptr uses."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class Condition(CamelModel):
    """A standard ``metav1.Condition``."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = "Unknown"
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


def _owner_reference(api_version: str, kind: str, meta: ObjectMeta) -> dict[str, Any]:
    if not meta.uid:
        raise ValueError(f"{kind} {meta.name!r} has no uid; it must come from the API server")
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --------------------------------------------------------------------------- TaskRunner


#: An IAM role ARN, as AssumeRole takes it (the CRD's pattern too).
ROLE_ARN_PATTERN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]{1,512}$"


class SecretRef(CamelModel):
    """A Secret in the TaskRunner's namespace holding static AWS keys."""

    name: str = Field(min_length=1, max_length=253)
    access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"


class Credentials(CamelModel):
    """Where Data Pipeline credentials come from."""

    mode: Literal["Secret", "PodIdentity"] = "PodIdentity"
    secret_ref: SecretRef | None = None
    #: An IAM role to assume (from the credentials above) for every call of this runner.
    role_arn: str | None = Field(default=None, pattern=ROLE_ARN_PATTERN, max_length=2048)

    @model_validator(mode="after")
    def _secret_ref_iff_secret_mode(self) -> Self:
        # Mirrors the CRD's CEL rule, for objects that did not pass through admission.
        if (self.mode == "Secret") != (self.secret_ref is not None):
            raise ValueError("credentials.secretRef is required when mode is Secret, and only then")
        return self


class HeartbeatSpec(CamelModel):
    """ReportTaskProgress pacing (see :mod:`dptr_common.pacing`)."""

    budget_per_second: float = Field(default=8.0, gt=0, le=100)
    base_interval_seconds: int = Field(default=60, ge=10, le=3600)


#: A DNS-1123 subdomain: the name of a PriorityClass or a Secret.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class LocalObjectReference(CamelModel):
    """An object of the TaskRunner's namespace, by name (core/v1 LocalObjectReference)."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


class JobTemplate(CamelModel):
    """What every task's Job starts from."""

    image: str = Field(min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    service_account_name: str | None = Field(default=None, min_length=1, max_length=253)
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    #: The task pod's grace: what the sidecar has after the task exits to upload and
    #: report.  Unset: 30 s, plus 300 s when the task stages data or uploads logs.
    termination_grace_period_seconds: int | None = Field(default=None, ge=5, le=86400)
    pod_security_context: dict[str, Any] | None = None
    container_security_context: dict[str, Any] | None = None
    #: Volumes of the task pods (core/v1 Volume) and where the task container mounts them
    #: (core/v1 VolumeMount): e.g. a PersistentVolumeClaim that local ``stdout`` paths and
    #: the task's own files outlive the pod on.  dptr's containers never mount them.
    volumes: list[dict[str, Any]] = []
    volume_mounts: list[dict[str, Any]] = []
    #: Scheduling of the task pods, copied into the pod as given (core/v1 Affinity and
    #: TopologySpreadConstraint); the pods carry dptr's labels (``dptr.dev/task-runner``,
    #: ``dptr.dev/role: task``...) and the template's own to select on.
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] = []
    #: The task pods' PriorityClass: one of the administrator's (``--allow-priority-class``),
    #: since a higher priority preempts other tenants' pods.
    priority_class_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN
    )
    #: Secrets of the namespace the pod's images (the task's and dptr's) are pulled with;
    #: they replace the pod ServiceAccount's (added only to a pod that names none).
    image_pull_secrets: list[LocalObjectReference] = []

    @model_validator(mode="after")
    def _volumes_stay_clear_of_dptrs(self) -> Self:
        names = [str(v.get("name") or "") for v in self.volumes]
        for volume, name in zip(self.volumes, names, strict=True):
            if not name or name.startswith("dptr-"):
                raise ValueError(f"jobTemplate.volumes: name {name!r} must be set and not start with 'dptr-'")
            sources = [k for k in volume if k != "name"]
            if len(sources) != 1:
                raise ValueError(f"jobTemplate.volumes: {name!r} must have exactly one volume source")
            projected = volume.get("projected") or {}
            if any("serviceAccountToken" in (src or {}) for src in projected.get("sources") or []):
                # A token of the pod's account is an identity (IRSA, Pod Identity, the API):
                # only dptr mounts one, and only into its own containers.
                raise ValueError(f"jobTemplate.volumes: {name!r} may not project a ServiceAccount token")
        if len(set(names)) != len(names):
            raise ValueError("jobTemplate.volumes: names must be unique")
        for mount in self.volume_mounts:
            name, path = str(mount.get("name") or ""), str(mount.get("mountPath") or "")
            if name not in names:
                raise ValueError(f"jobTemplate.volumeMounts: {name!r} is not one of jobTemplate.volumes")
            if mount.get("subPathExpr"):
                raise ValueError("jobTemplate.volumeMounts: subPathExpr is not supported (use subPath)")
            clean = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
            if not path.startswith("/") or ".." in path.split("/") or clean == "/":
                raise ValueError(
                    f"jobTemplate.volumeMounts: mountPath {path!r} must be an absolute path below /"
                )
            if clean == "/dptr" or clean.startswith("/dptr/") or clean.startswith("/var/run/secrets"):
                raise ValueError(f"jobTemplate.volumeMounts: mountPath {path!r} is reserved for dptr")
        return self


class ImagePolicy(CamelModel):
    """Images a task may choose with its ``myImage`` field (see :mod:`dptr_common.images`)."""

    allowed_images: list[str] = []
    #: Refuse a ``myImage`` that is not pinned to a digest (``@sha256:...``).
    require_digest: bool = False

    @field_validator("allowed_images")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            images.parse_pattern(pattern)  # raises InvalidReference, a ValueError
        return value

    def allows(self, image: str) -> bool:
        """Whether ``image`` may run; raises :class:`~dptr_common.images.InvalidReference`
        when it is not an image reference at all."""
        return images.image_allowed(image, self.allowed_images, require_digest=self.require_digest)


_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_byte_quantity(value: str | int) -> int:
    """A byte count written as a Kubernetes quantity without fractions: ``512Mi``, ``5G``,
    ``1048576``.  Raises ValueError for anything else."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a byte quantity such as 512Mi, 5Gi or 1000000")
    return int(match.group(1)) * _QUANTITY_FACTORS[match.group(2)]


#: What a proxy setting leaves out unless it says otherwise: the pod's own host, the
#: cluster's service names, and the link-local addresses of the instance metadata service
#: and EKS Pod Identity's agent (credentials must never be fetched through a proxy).
#: Kubernetes API calls of dptr's never use a proxy, whatever this says.
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1,.svc,.cluster.local,169.254.169.254,169.254.170.23,fd00:ec2::23"

#: No userinfo (user:password@): the proxy's settings are plain env values in every pod.
_PROXY_URL = re.compile(r"https?://[^\s/@]+(:[0-9]+)?/?")


class ProxySettings(CamelModel):
    """An HTTP(S) proxy for dptr's AWS calls (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``)."""

    https_proxy: str | None = None
    http_proxy: str | None = None
    no_proxy: str = DEFAULT_NO_PROXY
    #: Also give the task container the proxy environment (its own AWS CLI calls, curl...).
    pass_to_task: bool = False

    @field_validator("https_proxy", "http_proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is not None and not _PROXY_URL.fullmatch(value):
            raise ValueError(f"{value!r} is not a proxy URL such as http://proxy.internal:3128")
        return value

    @property
    def configured(self) -> bool:
        return bool(self.https_proxy or self.http_proxy)

    def env(self) -> dict[str, str]:
        """Upper- and lower-case names: botocore reads either, curl and wget the lower."""
        if not self.configured:
            return {}
        values: dict[str, str] = {}
        for name, value in (("HTTPS_PROXY", self.https_proxy), ("HTTP_PROXY", self.http_proxy)):
            if value:
                values[name] = values[name.lower()] = value
        values["NO_PROXY"] = values["no_proxy"] = self.no_proxy
        return values

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxySettings | None:
        """The proxy a process was started with (the operator's, from the Helm values)."""

        def read(name: str) -> str | None:
            return (env.get(name) or env.get(name.lower()) or "").strip() or None

        https, http = read("HTTPS_PROXY"), read("HTTP_PROXY")
        if not (https or http):
            return None
        return cls(https_proxy=https, http_proxy=http, no_proxy=read("NO_PROXY") or DEFAULT_NO_PROXY)


class TaskIOLimits(CamelModel):
    """Bounds on what the sidecar reads from the volumes the task writes (docs/security.md)."""

    #: All staged outputs of one attempt together.
    max_output_bytes: str = "50Gi"
    #: Each captured stream (stdout, stderr).
    max_log_bytes: str = "5Gi"

    @field_validator("max_output_bytes", "max_log_bytes")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if parse_byte_quantity(value) <= 0:
            raise ValueError(f"{value!r} must be more than 0 bytes")
        return value

    @property
    def output_bytes(self) -> int:
        return parse_byte_quantity(self.max_output_bytes)

    @property
    def log_bytes(self) -> int:
        return parse_byte_quantity(self.max_log_bytes)


class HistoryLimits(CamelModel):
    """How many finished PipelineTasks (with their Jobs) to keep."""

    succeeded: int = Field(default=10, ge=0)
    failed: int = Field(default=20, ge=0)


class TaskRunnerSpec(CamelModel):
    worker_group: str = Field(min_length=1, max_length=1024)
    region: str = "us-east-1"
    endpoint_url: str | None = None
    s3_endpoint_url: str | None = None
    credentials: Credentials = Field(default_factory=Credentials)
    max_concurrent_tasks: int = Field(default=10, ge=1, le=10000)
    pollers: int = Field(default=2, ge=1, le=16)
    paused: bool = False
    heartbeat: HeartbeatSpec = Field(default_factory=HeartbeatSpec)
    job_template: JobTemplate
    image_policy: ImagePolicy = Field(default_factory=ImagePolicy)
    pass_data_pipeline_credentials: bool = False
    history_limits: HistoryLimits = Field(default_factory=HistoryLimits)
    sidecar_image: str | None = None
    #: The image of SqlActivity and CopyActivity attempts (dptr-activity); unset, the operator's --activity-image.
    activity_image: str | None = Field(default=None, min_length=1, max_length=1024)
    task_io: TaskIOLimits = Field(default_factory=TaskIOLimits, alias="taskIO")
    #: The proxy of this runner's pods (dptr's containers; the task's with passToTask);
    #: unset, the operator's own (Helm ``proxy``).
    proxy: ProxySettings | None = None
    #: The official runner's ``--taskrunnerId``; unset, the operator keeps a generated one
    #: in the status, stable across restarts.
    taskrunner_id: str | None = Field(default=None, min_length=1, max_length=1024, alias="taskrunnerId")

    @field_validator("worker_group")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("workerGroup must not be blank")
        return value

    @field_validator("endpoint_url", "s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"{value!r} is not an absolute http(s) URL")
        return value


class TaskCounts(CamelModel):
    polled: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class TaskRunnerStatus(CamelModel):
    conditions: list[Condition] = []
    active: int = 0
    #: "active/maxConcurrentTasks", shown by the Active printer column (JSONPath cannot compute it).
    active_summary: str | None = None
    taskrunner_id: str | None = None
    last_poll_time: datetime | None = None
    heartbeat_interval_seconds: int | None = None
    counts: TaskCounts = Field(default_factory=TaskCounts)
    observed_generation: int | None = None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class TaskRunner(CamelModel):
    api_version: str = API_VERSION
    kind: str = TASK_RUNNER_KIND
    metadata: ObjectMeta
    spec: TaskRunnerSpec
    status: TaskRunnerStatus = Field(default_factory=TaskRunnerStatus)

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> TaskRunner:
        """Parse a TaskRunner as the API returns it (raises pydantic.ValidationError)."""
        return cls.model_validate(obj)

    def owner_reference(self) -> dict[str, Any]:
        """An ownerReference to this TaskRunner, for its PipelineTasks."""
        return _owner_reference(API_VERSION, TASK_RUNNER_KIND, self.metadata)


# --------------------------------------------------------------------------- PipelineTask


class Activity(CamelModel):
    component_id: str | None = None
    instance_id: str | None = None


class PipelineTaskSpec(CamelModel):
    """What was polled: immutable once created."""

    task_runner: str = Field(min_length=1)
    task_id: str = Field(min_length=1, max_length=2048)
    pipeline_id: str = Field(min_length=1, max_length=1024)
    attempt_id: str = Field(min_length=1, max_length=1024)
    object_type: str | None = None
    activity: Activity = Field(default_factory=Activity)
    #: The attempt object's string fields: key -> values in their original order.
    fields: dict[str, list[str]] = {}
    #: The attempt object's reference fields (refValue): key -> referenced object ids.
    refs: dict[str, list[str]] = {}
    report_progress_timeout_seconds: int | None = None
    attempt_timeout_seconds: int | None = None
    polled_at: datetime | None = None
    polled_by: str | None = None

    @classmethod
    def from_task(
        cls, task: Task, *, task_runner: str, polled_by: str | None = None, polled_at: datetime | None = None
    ) -> PipelineTaskSpec:
        strings, refs = task.fields_map()
        # '*' fields are Data Pipeline's secret ones: never in the PipelineTask (a SqlActivity
        # gets its database's from the per-attempt Secret, dptr_common.render_activity).
        strings = {k: v for k, v in strings.items() if not k.startswith("*")}
        refs = {k: v for k, v in refs.items() if not k.startswith("*")}
        return cls(
            task_runner=task_runner,
            task_id=task.task_id,
            pipeline_id=task.pipeline_id,
            attempt_id=task.attempt_id,
            object_type=task.object_type,
            activity=Activity(component_id=task.component_id, instance_id=task.instance_id),
            fields=strings,
            refs=refs,
            report_progress_timeout_seconds=task.report_progress_timeout_seconds,
            attempt_timeout_seconds=task.attempt_timeout_seconds,
            polled_at=polled_at or utcnow(),
            polled_by=polled_by,
        )

    def to_task(self) -> Task:
        """Rebuild the :class:`Task` (e.g. after an operator restart); re-validates fields.

        The interleaving of string and ref values under one key is not kept (no
        activity field mixes them); the order within each kind is.
        """
        fields = [TaskField(key=k, string_value=v) for k, vs in self.fields.items() for v in vs]
        fields += [TaskField(key=k, ref_value=v) for k, vs in self.refs.items() for v in vs]
        return Task.from_fields(
            task_id=self.task_id, pipeline_id=self.pipeline_id, attempt_id=self.attempt_id, fields=fields
        )


class Heartbeat(CamelModel):
    """Who heartbeats the task now, and how it went last time."""

    owner: Literal["operator", "sidecar"] = "operator"
    last_at: datetime | None = None
    last_error: str | None = None
    by: str | None = None


class Report(CamelModel):
    """The SetTaskStatus ledger entry: claimed first (optimistic write), then reported."""

    claimed_by: str | None = None
    claimed_at: datetime | None = None
    status: Literal["FINISHED", "FAILED", "FALSE"] | None = None
    error_id: str | None = None
    error_message: str | None = None
    reported_at: datetime | None = None
    reported_by: str | None = None


class Canceled(CamelModel):
    at: datetime | None = None
    by: str | None = None
    reason: str | None = None


class PipelineTaskStatus(CamelModel):
    phase: Phase = "Pending"
    job_name: str | None = None
    pod_name: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    acknowledged_at: datetime | None = None
    heartbeat: Heartbeat | None = None
    report: Report | None = None
    canceled: Canceled | None = None
    conditions: list[Condition] = []
    message: str | None = None

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def reported(self) -> bool:
        return self.report is not None and self.report.reported_at is not None


class PipelineTask(CamelModel):
    api_version: str = API_VERSION
    kind: str = PIPELINE_TASK_KIND
    metadata: ObjectMeta
    spec: PipelineTaskSpec
    status: PipelineTaskStatus = Field(default_factory=PipelineTaskStatus)

    @classmethod
    def from_k8s(cls, obj: dict[str, Any]) -> PipelineTask:
        """Parse a PipelineTask as the API returns it (raises pydantic.ValidationError)."""
        return cls.model_validate(obj)

    def owner_reference(self) -> dict[str, Any]:
        """An ownerReference to this PipelineTask, for its Job."""
        return _owner_reference(API_VERSION, PIPELINE_TASK_KIND, self.metadata)
