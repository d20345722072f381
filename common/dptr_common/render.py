"""Render the Kubernetes Job for a task: a pure function of (task, TaskRunner).

The pod has up to three containers:

``dptr-sidecar`` (native sidecar: an init container with ``restartPolicy: Always``)
    Starts first and keeps running beside the task: heartbeats, honours cancels and
    reports the task container's exit with SetTaskStatus.  Configured only through
    env and the downward API.  It alone mounts a Kubernetes API token.
``dptr-fetch-script`` (init container, only for ``scriptUri``)
    ``dptr-sidecar fetch-script`` downloads ``$DPTR_SCRIPT_URI`` to
    ``$DPTR_SCRIPT_PATH`` (mode 0755) in an emptyDir.  It runs after the sidecar has
    started, so the task is heartbeated while the script downloads.
``task``
    The user's work.  ``command`` runs as ``/bin/sh -c <command> dptr-task <args...>``
    so ``scriptArgument`` values are ``$1``, ``$2``... exactly as given (never re-split
    by a shell); a script runs as ``/bin/sh -c 'exec "$0" "$@"' /dptr/script/script <args...>``,
    which honours its ``#!`` line and falls back to ``sh`` without one.

Environment of the ``task`` container (documented contract):

=====================  ==============================================================
DPTR_PIPELINE_ID       the pipeline id (``df-...``)
DPTR_ATTEMPT_ID        the attempt object's id
DPTR_OBJECT_TYPE       ``ShellCommandActivity`` or ``ShellCommandPrecondition``
DPTR_COMPONENT_ID      the activity's component id (``@componentParent``), if any
DPTR_INSTANCE_ID       the instance id (``@instanceParent``), if any
DPTR_TASK_RUNNER       the TaskRunner's name
DPTR_FIELD_<key>       each ``my*`` field (key as written, non ``[A-Za-z0-9_]`` -> ``_``);
                       several values are joined with newlines
DPTR_FIELDS_JSON       all ``my*`` fields as a JSON object of key -> list of values
=====================  ==============================================================

The taskId is deliberately absent: whoever holds it can report the task's outcome.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

from dptr_common import naming
from dptr_common.activity_plan import (
    ACTIVITY_TYPES,
    COPY_ACTIVITY,
    MANAGED_RESOURCE_TYPES,
    SQL_ACTIVITY,
    ActivityPlan,
)
from dptr_common.awsauth import AssumedRole, external_id_for, session_name_for
from dptr_common.bounds import check_job, check_string
from dptr_common.errors import TaskError
from dptr_common.images import InvalidReference
from dptr_common.models import API_VERSION, PIPELINE_TASK_KIND, ProxySettings, TaskRunner
from dptr_common.podspec import (
    FETCH_CONTAINER,
    SIDECAR_CONTAINER,
    SIDECAR_RESOURCES,
    SKIP_CONTAINERS,
    STAGE_IN_CONTAINER,
    TASK_CONTAINER,
    command,
    set_env,
)
from dptr_common.podspec import env as _env
from dptr_common.render_activity import activity_container, plan_volume, secret_name
from dptr_common.render_preconditions import check_timing, exists_container, wrap_check
from dptr_common.render_staging import render_staging, wants_task_io
from dptr_common.task import EXISTS_PRECONDITION, SHELL_COMMAND_ACTIVITY, SHELL_COMMAND_PRECONDITION, Task
from dptr_common.version import ACTIVITY_IMAGE

__all__ = [
    "FETCH_CONTAINER",
    "RUN_AS_USER",
    "SCRIPT_DIR",
    "SCRIPT_PATH",
    "SIDECAR_CONTAINER",
    "SIDECAR_RESOURCES",
    "SUPPORTED_TYPES",
    "TASK_CONTAINER",
    "TOKEN_MOUNT_PATH",
    "TOKEN_VOLUME",
    "choose_image",
    "render_base_job",
    "render_job",
    "task_argv",
]

SUPPORTED_TYPES = frozenset(
    {SHELL_COMMAND_ACTIVITY, SHELL_COMMAND_PRECONDITION, EXISTS_PRECONDITION, SQL_ACTIVITY, COPY_ACTIVITY}
)
#: Types whose task container runs dptr's own code, as the runner (its AWS identity).
OWN_CODE_TYPES = frozenset({EXISTS_PRECONDITION, *ACTIVITY_TYPES})
#: The activity image when the operator is given none (--activity-image).
DEFAULT_ACTIVITY_IMAGE = ACTIVITY_IMAGE

SCRIPT_VOLUME = "dptr-script"
SCRIPT_DIR = "/dptr/script"
SCRIPT_PATH = f"{SCRIPT_DIR}/script"
SIDECAR_TMP_VOLUME = "dptr-sidecar-tmp"
TOKEN_VOLUME = "dptr-kube-api-access"
#: Where client libraries look for in-cluster credentials (the default automount path).
TOKEN_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Non-root uid/gid for all containers unless the TaskRunner overrides it (65532 = "nonroot").
RUN_AS_USER = 65532
#: Time the sidecar has, after SIGTERM, to see the task's final status and report it.
TERMINATION_GRACE_SECONDS = 30
#: Added when the task stages outputs or uploads logs: the sidecar uploads them after
#: the task exited, within the pod's grace (killed past it, its claim reports FAILED
#: dptr.StagingFailed.Interrupted).  A TaskRunner can set its own grace.
UPLOAD_GRACE_SECONDS = 300
_TOKEN_EXPIRATION_SECONDS = 3607  # what kubelet uses for the default automounted token
_SHELL_NAME = "dptr-task"  # $0 of the shell running `command`; names it in error messages

_ENV_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def _restricted_container_security(*, read_only_root: bool) -> dict[str, Any]:
    # The "restricted" Pod Security Standard, per container, so it holds even if a pod-level
    # override is loosened.  The uid is set once, on the pod, so a podSecurityContext
    # override of runAsUser applies to every container.
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _role_env(runner: TaskRunner, who: str) -> list[dict[str, Any]]:
    """The TaskRunner's IAM role, which dptr's containers assume on top of their
    credentials (dptr_common.awsauth): session ``dptr-<who>-<namespace>-<name>``."""
    arn = runner.spec.credentials.role_arn
    if arn is None:
        return []
    namespace = str(runner.metadata.namespace)
    role = AssumedRole(
        arn, session_name_for(namespace, runner.metadata.name, who), external_id_for(namespace)
    )
    return [_env(name, value) for name, value in role.to_env().items()]


#: dptr's own projected token for the runner's role when the pod runs as the task's own
#: ServiceAccount under PodIdentity credentials: a distinct audience, which only dptr's
#: containers mount, so the task (whose webhook-given token says sts.amazonaws.com)
#: cannot assume the runner's role even though both tokens name the same account.
RUNNER_TOKEN_AUDIENCE = "dptr.dev/runner"
RUNNER_TOKEN_VOLUME = "dptr-runner-token"
RUNNER_TOKEN_DIR = "/var/run/secrets/dptr.dev/runner"
#: The containers of dptr's own in a task pod (the task's is dptr's too for Exists).
DPTR_CONTAINERS = (SIDECAR_CONTAINER, FETCH_CONTAINER, STAGE_IN_CONTAINER)


def _own_account(runner: TaskRunner, default_account: str | None) -> bool:
    """Whether the pod runs as a ServiceAccount of the task's own (the Job template's),
    rather than dptr's sidecar account, which carries the runner's identity.  Decided from
    the account the pod really runs as, so no spelling of "none" can skip the wrong side."""
    runs_as = runner.spec.job_template.service_account_name or default_account
    return bool(runs_as) and runs_as != default_account


def _web_identity(runner: TaskRunner, own_account: bool) -> bool:
    """dptr's containers use the runner's role through dptr's own token (see
    :data:`RUNNER_TOKEN_AUDIENCE`): PodIdentity credentials in a pod of the task's account."""
    return own_account and runner.spec.credentials.mode == "PodIdentity"


def _identity_env(runner: TaskRunner, who: str, *, web_identity: bool) -> list[dict[str, Any]]:
    """The runner's AWS identity for one of dptr's containers."""
    if not web_identity:
        return [*_role_env(runner, who), *_credential_env(runner)]
    arn = str(runner.spec.credentials.role_arn)  # required with a task account (models)
    namespace = str(runner.metadata.namespace)
    return [
        _env("AWS_ROLE_ARN", arn),
        _env("AWS_WEB_IDENTITY_TOKEN_FILE", f"{RUNNER_TOKEN_DIR}/token"),
        _env("AWS_ROLE_SESSION_NAME", session_name_for(namespace, runner.metadata.name, who)),
    ]


def _credential_env(runner: TaskRunner) -> list[dict[str, Any]]:
    """Static keys from the Secret (mode Secret); PodIdentity needs no env of ours."""
    ref = runner.spec.credentials.secret_ref
    if runner.spec.credentials.mode != "Secret" or ref is None:
        return []
    return [
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.access_key_id_key}},
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.secret_access_key_key}},
        },
    ]


def choose_image(task: Task, runner: TaskRunner) -> str:
    """The TaskRunner's image, or the task's ``myImage`` if the allow-list permits it."""
    if task.my_image is None:
        return runner.spec.job_template.image
    policy = runner.spec.image_policy
    try:
        allowed = policy.allows(task.my_image)
    except InvalidReference as exc:
        raise TaskError("dptr.InvalidTask.BadField.myImage", str(exc)) from None
    if allowed:
        return task.my_image
    pinned = " (imagePolicy.requireDigest: it must name an @sha256: digest)" if policy.require_digest else ""
    raise TaskError(
        "dptr.ImageNotAllowed",
        f"myImage {task.my_image!r} is not in imagePolicy.allowedImages of TaskRunner "
        f"{runner.metadata.name}{pinned}",
    )


def _check_supported(task: Task) -> None:
    if task.object_type in MANAGED_RESOURCE_TYPES:
        raise TaskError(
            f"dptr.NeedsManagedResource.{task.object_type}",
            f"{task.object_type} needs Hadoop, Hive or Pig on an EMR cluster (Redshift's COPY from "
            "S3, for RedshiftCopyActivity), which a dptr task pod does not have: run it with runsOn, "
            "or with the official Task Runner on the cluster's master node",
        )
    if task.object_type not in SUPPORTED_TYPES:
        raise TaskError(
            "dptr.UnknownActivityType",
            f"object type {task.object_type!r} is not supported; dptr runs "
            + ", ".join(sorted(SUPPORTED_TYPES)),
        )


def task_argv(task: Task) -> list[str]:
    """The user's command line (a shell activity's or precondition's); raises TaskError
    for what cannot run."""
    _check_supported(task)
    if task.object_type in OWN_CODE_TYPES:
        raise TaskError(
            f"dptr.InvalidTask.{task.object_type}.NoCommand", f"a {task.object_type} runs no shell command"
        )
    command = task.command if task.command and task.command.strip() else None
    if command and task.script_uri:
        raise TaskError("dptr.InvalidTask.CommandAndScriptUri", "give either command or scriptUri, not both")
    for argument in task.script_arguments:
        check_string("scriptArgument", argument)
    if command:
        check_string("command", command)
        return ["/bin/sh", "-c", command, _SHELL_NAME, *task.script_arguments]
    if task.script_uri:
        if not re.match(r"^s3://[^/\s]+/\S", task.script_uri):
            raise TaskError(
                "dptr.InvalidTask.BadScriptUri",
                f"scriptUri {task.script_uri!r} is not an s3://bucket/key URI",
            )
        return ["/bin/sh", "-c", 'exec "$0" "$@"', SCRIPT_PATH, *task.script_arguments]
    raise TaskError("dptr.InvalidTask.NoCommand", f"the {task.object_type} has neither command nor scriptUri")


def _owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """Accept the PipelineTask object itself or a ready ownerReference."""
    meta = owner.get("metadata", owner)
    name, uid = meta.get("name"), meta.get("uid")
    if not name or not uid:
        raise ValueError("owner must be the PipelineTask (or its ownerReference) with a name and a uid")
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", PIPELINE_TASK_KIND),
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _heartbeat_interval(task: Task, runner: TaskRunner) -> int:
    # The operator publishes the paced interval in the TaskRunner status; the env is the
    # sidecar's starting value.  Never more than a third of this task's own timeout.
    interval = runner.status.heartbeat_interval_seconds or runner.spec.heartbeat.base_interval_seconds
    if task.report_progress_timeout_seconds:
        interval = min(interval, max(math.floor(task.report_progress_timeout_seconds / 3), 1))
    return interval


def _task_env(task: Task, runner: TaskRunner) -> list[dict[str, Any]]:
    ours: list[dict[str, Any]] = [
        _env("DPTR_PIPELINE_ID", task.pipeline_id),
        _env("DPTR_ATTEMPT_ID", task.attempt_id),
        _env("DPTR_OBJECT_TYPE", task.object_type),
    ]
    if task.component_id:
        ours.append(_env("DPTR_COMPONENT_ID", task.component_id))
    if task.instance_id:
        ours.append(_env("DPTR_INSTANCE_ID", task.instance_id))
    ours.append(_env("DPTR_TASK_RUNNER", runner.metadata.name))
    custom = task.custom_fields
    for key, values in custom.items():
        name = "DPTR_FIELD_" + _ENV_NAME_UNSAFE.sub("_", key)
        if all(e["name"] != name for e in ours):  # two keys that clean to one name: first wins
            ours.append(_env(name, "\n".join(values)))
    ours.append(_env("DPTR_FIELDS_JSON", json.dumps(custom, separators=(",", ":"), ensure_ascii=False)))
    if runner.spec.pass_data_pipeline_credentials:
        ours.append(_env("DPTR_REGION", runner.spec.region))
        if runner.spec.endpoint_url:
            ours.append(_env("DPTR_ENDPOINT_URL", runner.spec.endpoint_url))
        ours += [*_role_env(runner, "task"), *_credential_env(runner)]  # keys last: podspec.set_env
    # The template's env comes first (it may be referenced as $(VAR)), minus names we set.
    taken = {e["name"] for e in ours}
    return [e for e in runner.spec.job_template.env if e.get("name") not in taken] + ours


def _sidecar(
    task: Task,
    runner: TaskRunner,
    image: str,
    pipeline_task: str,
    *,
    web_identity: bool,
    resources: dict[str, Any],
) -> dict[str, Any]:
    env = [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_UID", "metadata.uid"),
        _env("DPTR_PIPELINETASK", pipeline_task),
        _env("DPTR_TASKRUNNER", runner.metadata.name),
        # For its log lines (dptr_common.logformat); the sidecar reads the ids it reports
        # from the PipelineTask, never from here.
        _env("DPTR_PIPELINE_ID", task.pipeline_id),
        _env("DPTR_ATTEMPT_ID", task.attempt_id),
        _env("DPTR_REGION", runner.spec.region),
    ]
    if runner.spec.endpoint_url:
        env.append(_env("DPTR_ENDPOINT_URL", runner.spec.endpoint_url))
    env += [
        _env("DPTR_HEARTBEAT_INTERVAL", str(_heartbeat_interval(task, runner))),
        _env("DPTR_MAIN_CONTAINER", TASK_CONTAINER),
        _env("DPTR_OBJECT_TYPE", task.object_type),
        _env("PYTHONUNBUFFERED", "1"),
        _env("PYTHONDONTWRITEBYTECODE", "1"),
        *_identity_env(runner, "sidecar", web_identity=web_identity),
    ]
    return {
        "name": SIDECAR_CONTAINER,
        "image": image,
        "command": command(["dptr-sidecar"]),
        "restartPolicy": "Always",
        "env": env,
        "resources": copy.deepcopy(resources),
        "securityContext": _restricted_container_security(read_only_root=True),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT_PATH, "readOnly": True},
            {"name": SIDECAR_TMP_VOLUME, "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _fetcher(
    task: Task, runner: TaskRunner, image: str, *, web_identity: bool, resources: dict[str, Any]
) -> dict[str, Any]:
    env = [
        _env("DPTR_SCRIPT_URI", str(task.script_uri)),
        _env("DPTR_SCRIPT_PATH", SCRIPT_PATH),
        _env("DPTR_REGION", runner.spec.region),
        _env("AWS_REGION", runner.spec.region),
    ]
    if runner.spec.s3_endpoint_url:
        env.append(_env("AWS_ENDPOINT_URL_S3", runner.spec.s3_endpoint_url))
    env += _identity_env(runner, "sidecar", web_identity=web_identity)
    return {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": command(["dptr-sidecar", "fetch-script"]),
        "env": env,
        "resources": copy.deepcopy(resources),
        "securityContext": _restricted_container_security(read_only_root=True),
        "volumeMounts": [{"name": SCRIPT_VOLUME, "mountPath": SCRIPT_DIR}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _runner_token_volume() -> dict[str, Any]:
    return {
        "name": RUNNER_TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {
                    "serviceAccountToken": {
                        "path": "token",
                        "audience": RUNNER_TOKEN_AUDIENCE,
                        "expirationSeconds": _TOKEN_EXPIRATION_SECONDS,
                    }
                }
            ],
        },
    }


def _token_volume() -> dict[str, Any]:
    # The same layout as the automounted /var/run/secrets/kubernetes.io/serviceaccount, so
    # the sidecar's in-cluster config works unchanged; only the sidecar mounts it.
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": _TOKEN_EXPIRATION_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


def render_job(
    task: Task,
    runner: TaskRunner,
    *,
    sidecar_image: str,
    namespace: str,
    owner: dict[str, Any],
    service_account_name: str | None = None,
    sidecar_env: dict[str, str] | None = None,
    time_scale: float = 1.0,
    proxy: ProxySettings | None = None,
    activity_image: str = DEFAULT_ACTIVITY_IMAGE,
    activity_plan: ActivityPlan | None = None,
    sidecar_resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole Job manifest (a plain dict for the API) that runs ``task`` for ``runner``.

    :func:`render_base_job` (the sidecar, the script fetcher, the task) plus what Task
    Runner parity adds (:func:`dptr_common.render_staging.render_staging`: the
    ``dptr-stage-in`` init container, the staging and log volumes, the log-capture
    wrapper).  Every command and env value is escaped for kubelet's ``$(VAR)``
    expansion as it is built (:mod:`dptr_common.podspec`), so each process sees exactly
    what was meant.  ``sidecar_env`` reaches every init
    container of dptr's, the stage-in container included.  ``time_scale`` scales a
    precondition's ``retryDelay`` and ``preconditionTimeout`` (tests run at 0.01).
    ``proxy`` is the operator's own; the TaskRunner's ``spec.proxy`` wins.  It reaches
    every container of dptr's, and the task's only with ``passToTask``.  ``sidecar_resources``
    (core/v1 ResourceRequirements; None: :data:`SIDECAR_RESOURCES`) are those of each of
    dptr's containers of the sidecar image.  Raises :class:`TaskError`
    (``dptr.UnknownActivityType``, ``dptr.ImageNotAllowed``, ``dptr.InvalidTask.*``,
    ``dptr.StagingFailed.*``, ``dptr.InvalidTask.TooLarge.*`` past :mod:`dptr_common.bounds`)
    for a task that cannot run; nothing must be created then.
    """
    job = render_base_job(
        task,
        runner,
        sidecar_image=sidecar_image,
        namespace=namespace,
        owner=owner,
        service_account_name=service_account_name,
        time_scale=time_scale,
        activity_image=activity_image,
        activity_plan=activity_plan,
        sidecar_resources=sidecar_resources,
    )
    job = render_staging(job, task, runner)
    pod = job["spec"]["template"]["spec"]
    if runner.spec.job_template.termination_grace_period_seconds is not None:
        pod["terminationGracePeriodSeconds"] = runner.spec.job_template.termination_grace_period_seconds
    elif wants_task_io(job):
        pod["terminationGracePeriodSeconds"] = TERMINATION_GRACE_SECONDS + UPLOAD_GRACE_SECONDS
    ours = list(pod["initContainers"])
    if task.object_type in OWN_CODE_TYPES:
        ours += pod["containers"]  # dptr's own code, e.g. AWS_ENDPOINT_URL_STS for its role
    if any(v.get("name") == RUNNER_TOKEN_VOLUME for v in pod.get("volumes", [])):
        for container in ours:
            mounts = container.setdefault("volumeMounts", [])
            mounts.append({"name": RUNNER_TOKEN_VOLUME, "mountPath": RUNNER_TOKEN_DIR, "readOnly": True})
    for container in ours:
        set_env(container, [_env(name, value) for name, value in (sidecar_env or {}).items()])
    chosen = runner.spec.proxy or proxy
    if chosen is not None and chosen.configured:
        proxied = ours + (
            [] if task.object_type in OWN_CODE_TYPES or not chosen.pass_to_task else pod["containers"]
        )
        for container in proxied:
            set_env(container, [_env(name, value) for name, value in chosen.env().items()])
    check_job(job)
    return job


def render_base_job(
    task: Task,
    runner: TaskRunner,
    *,
    sidecar_image: str,
    namespace: str,
    owner: dict[str, Any],
    service_account_name: str | None = None,
    time_scale: float = 1.0,
    activity_image: str = DEFAULT_ACTIVITY_IMAGE,
    activity_plan: ActivityPlan | None = None,
    sidecar_resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Job without staging or S3 log capture (what :func:`render_job` builds on).

    ``owner`` is the PipelineTask (object or ownerReference) that owns the Job; its name
    is what the sidecar reports on.  ``sidecar_image`` is the operator's default, used
    unless the TaskRunner sets ``sidecarImage``.  ``service_account_name`` is the
    operator's default for the pod when the template names none (the account the
    sidecar's RBAC is bound to).  :func:`render_job` adds ``sidecar_env`` to every init
    container once the staging containers exist.  A SqlActivity or CopyActivity needs its
    ``activity_plan`` (:func:`dptr_common.activity_plan.build_plan`): the Job mounts it from
    the per-attempt Secret named by :func:`dptr_common.render_activity.secret_name` (the Job's
    name and the plan's digest; :func:`dptr_common.render_activity.activity_secret`), which the
    caller creates first.

    Raises :class:`TaskError` (``dptr.UnknownActivityType``, ``dptr.ImageNotAllowed``,
    ``dptr.InvalidTask.*``) for a task that cannot run; nothing must be created then.
    """
    _check_supported(task)
    exists = task.object_type == EXISTS_PRECONDITION
    own_code = task.object_type in OWN_CODE_TYPES
    if task.object_type in ACTIVITY_TYPES and activity_plan is None:
        raise ValueError(f"a {task.object_type} is rendered with its activity_plan")
    argv = [] if own_code else task_argv(task)
    if task.object_type == SHELL_COMMAND_PRECONDITION:
        argv = wrap_check(argv)
    image = runner.spec.job_template.image if own_code else choose_image(task, runner)
    owner_ref = _owner_reference(owner)
    template = runner.spec.job_template
    sidecar_image = runner.spec.sidecar_image or sidecar_image
    name = naming.job_name(task.pipeline_id, task.attempt_id)

    labels = {
        naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
        naming.LABEL_ROLE: "task",
        naming.LABEL_TASK_RUNNER: naming.label_value(runner.metadata.name),
        naming.LABEL_PIPELINE_TASK: naming.label_value(owner_ref["name"]),
        naming.LABEL_PIPELINE_ID: naming.label_value(task.pipeline_id),
        naming.LABEL_ATTEMPT_ID: naming.label_value(task.attempt_id),
    }
    annotations = {
        naming.ANNOTATION_PIPELINE_ID: task.pipeline_id,
        naming.ANNOTATION_ATTEMPT_ID: task.attempt_id,
        naming.ANNOTATION_OBJECT_TYPE: task.object_type,
    }
    if task.component_id:
        labels[naming.LABEL_COMPONENT_ID] = naming.label_value(task.component_id)
        annotations[naming.ANNOTATION_COMPONENT_ID] = task.component_id
    if task.instance_id:
        annotations[naming.ANNOTATION_INSTANCE_ID] = task.instance_id

    pod_annotations = {**template.annotations, **annotations}
    # EKS's identity webhook (IRSA, Pod Identity) gives the pod account's role to every
    # container it is not told to skip.  Skip exactly where a container must not get it.
    own_account = _own_account(runner, service_account_name)
    web_identity = _web_identity(runner, own_account)
    pod_annotations.pop(SKIP_CONTAINERS, None)  # the template's own never decides this
    if own_account:
        # The task's own account: its role is for the task; dptr's containers use the
        # runner's identity (keys, or dptr's own token) and never carry the task's.
        pod_annotations[SKIP_CONTAINERS] = ",".join(
            [*DPTR_CONTAINERS, *([TASK_CONTAINER] if own_code else [])]
        )
    elif not own_code and not (
        runner.spec.pass_data_pipeline_credentials and runner.spec.credentials.mode == "PodIdentity"
    ):
        # dptr's account carries the runner's identity: the task must not get it (in any
        # credentials mode: the account may have a role for another TaskRunner).  An Exists
        # check runs dptr's code only and needs the runner's S3 access.
        pod_annotations[SKIP_CONTAINERS] = TASK_CONTAINER

    resources = SIDECAR_RESOURCES if sidecar_resources is None else sidecar_resources
    sidecar = _sidecar(
        task, runner, sidecar_image, owner_ref["name"], web_identity=web_identity, resources=resources
    )
    timing = check_timing(task, time_scale)
    task_container: dict[str, Any]
    if exists:
        task_container = exists_container(
            task,
            sidecar,
            region=runner.spec.region,
            endpoint_url=runner.spec.endpoint_url,
            s3_endpoint_url=runner.spec.s3_endpoint_url,
            timing=timing,
        )
    elif task.object_type in ACTIVITY_TYPES:
        task_container = activity_container(
            sidecar,
            image=runner.spec.activity_image or activity_image,
            region=runner.spec.region,
            s3_endpoint_url=runner.spec.s3_endpoint_url,
            resources=template.resources,
            image_pull_policy=template.image_pull_policy,
            plan=activity_plan,  # type: ignore[arg-type]  # checked above for activity types
        )
    else:
        task_container = {
            "name": TASK_CONTAINER,
            "image": image,
            "command": command(argv),
            "env": _task_env(task, runner),
            "securityContext": {
                **_restricted_container_security(read_only_root=False),
                **(template.container_security_context or {}),
            },
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        if task.object_type == SHELL_COMMAND_PRECONDITION:
            set_env(task_container, timing.env())
        if template.image_pull_policy:
            task_container["imagePullPolicy"] = template.image_pull_policy
        if template.resources:
            task_container["resources"] = template.resources
        if template.volume_mounts:
            task_container["volumeMounts"] = [dict(m) for m in template.volume_mounts]

    init_containers = [sidecar]
    volumes = [_token_volume(), {"name": SIDECAR_TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}]
    if activity_plan is not None and task.object_type in ACTIVITY_TYPES:
        volumes.append(plan_volume(secret_name(name, activity_plan)))
    if task.script_uri and not own_code:
        init_containers.append(
            _fetcher(task, runner, sidecar_image, web_identity=web_identity, resources=resources)
        )
        volumes.append({"name": SCRIPT_VOLUME, "emptyDir": {"sizeLimit": "256Mi"}})
        task_container["volumeMounts"] = [
            *task_container.get("volumeMounts", []),
            {"name": SCRIPT_VOLUME, "mountPath": SCRIPT_DIR, "readOnly": True},
        ]
    volumes += [dict(v) for v in template.volumes]
    if web_identity:
        volumes.append(_runner_token_volume())

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {**_pod_security(), **(template.pod_security_context or {})},
        "initContainers": init_containers,
        "containers": [task_container],
        "volumes": volumes,
    }
    account = template.service_account_name or service_account_name
    if account:
        pod_spec["serviceAccountName"] = account
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = list(template.tolerations)
    if template.affinity:
        pod_spec["affinity"] = copy.deepcopy(template.affinity)
    if template.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = copy.deepcopy(template.topology_spread_constraints)
    if template.priority_class_name:
        pod_spec["priorityClassName"] = template.priority_class_name
    if template.image_pull_secrets:
        # Every image of the pod is pulled with them: the task's and dptr's own.
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in template.image_pull_secrets]

    job_spec: dict[str, Any] = {
        # Retries belong to Data Pipeline (maximumRetries), never to the Job controller.
        "backoffLimit": 0,
        "template": {
            "metadata": {"labels": {**template.labels, **labels}, "annotations": pod_annotations},
            "spec": pod_spec,
        },
    }
    if task.attempt_timeout_seconds:
        job_spec["activeDeadlineSeconds"] = task.attempt_timeout_seconds
    # No ttlSecondsAfterFinished here: the operator sets the template's TTL on the Job once
    # the outcome is recorded, so a TTL never removes a Job before its attempt is reported.

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_ref],
        },
        "spec": job_spec,
    }
