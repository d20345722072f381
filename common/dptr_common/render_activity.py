"""The task container and the per-attempt Secret of a SqlActivity.

The container runs ``dptr-activity`` (:mod:`dptr_activities`) in the activity image (the
operator's ``--activity-image``, or the TaskRunner's ``activityImage``): dptr's own code
with the database drivers, acting with the runner's AWS identity like ``dptr-stage-in``
(for ``scriptUri`` and RDS/Redshift endpoint lookups).  Its plan, which holds the
database's ``*password``, is a per-attempt Secret named after the Job and the plan's
digest (:func:`secret_name`), owned by the PipelineTask (deleted with it), immutable, and mounted read-only into this container
only: the sidecar, the init containers and the Job's spec never see it.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

from dptr_common import naming
from dptr_common.activity_plan import ActivityPlan
from dptr_common.podspec import TASK_CONTAINER, command, identity_env
from dptr_common.podspec import env as _env

__all__ = [
    "PLAN_DIR",
    "PLAN_FILE",
    "PLAN_VOLUME",
    "activity_container",
    "activity_secret",
    "plan_volume",
    "secret_name",
]

PLAN_VOLUME = "dptr-activity-plan"
PLAN_DIR = "/var/run/secrets/dptr.dev/activity"
PLAN_FILE = "plan.json"


def secret_name(job_name: str, plan: ActivityPlan) -> str:
    """The plan Secret's name: the Job's and a digest of the plan.  The plan holds the
    password, so nobody who may create Secrets in the namespace can guess the name and plant
    a plan of theirs for another TaskRunner's attempt before the operator creates it."""
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:16]
    return f"{job_name}-{digest}"


def activity_container(
    sidecar: dict[str, Any],
    *,
    image: str,
    region: str,
    s3_endpoint_url: str | None,
    resources: dict[str, Any] | None,
    image_pull_policy: str | None,
    plan: ActivityPlan,
) -> dict[str, Any]:
    env = [
        _env("DPTR_ACTIVITY_PLAN", f"{PLAN_DIR}/{PLAN_FILE}"),
        # dptr-activity runs a plan for this attempt only (a mounted plan of another is refused).
        _env("DPTR_PIPELINE_ID", plan.pipeline_id),
        _env("DPTR_ATTEMPT_ID", plan.attempt_id),
        _env("DPTR_REGION", region),
        _env("AWS_REGION", region),
        _env("PYTHONUNBUFFERED", "1"),
        _env("PYTHONDONTWRITEBYTECODE", "1"),
    ]
    if s3_endpoint_url:
        env.append(_env("AWS_ENDPOINT_URL_S3", s3_endpoint_url))
    container: dict[str, Any] = {
        "name": TASK_CONTAINER,
        "image": image,
        "command": command(["dptr-activity"]),
        "env": [*env, *identity_env(sidecar)],
        "resources": resources
        or {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": copy.deepcopy(sidecar.get("securityContext", {})),
        "volumeMounts": [{"name": PLAN_VOLUME, "mountPath": PLAN_DIR, "readOnly": True}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if image_pull_policy:
        container["imagePullPolicy"] = image_pull_policy
    return container


def plan_volume(secret_name: str) -> dict[str, Any]:
    # 0440: the pod's fsGroup owns the files; no other user of the node reads them.
    return {
        "name": PLAN_VOLUME,
        "secret": {
            "secretName": secret_name,
            "defaultMode": 0o440,
            "items": [{"key": PLAN_FILE, "path": PLAN_FILE}],
        },
    }


def activity_secret(
    plan: ActivityPlan, *, name: str, namespace: str, owner_ref: dict[str, Any], labels: dict[str, str]
) -> dict[str, Any]:
    """The per-attempt Secret holding the plan (``data``, so nothing echoes it as text);
    ``name`` is :func:`secret_name`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "immutable": True,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, naming.LABEL_ROLE: "activity-plan"},
            "ownerReferences": [owner_ref],
        },
        "data": {PLAN_FILE: base64.b64encode(plan.to_json().encode()).decode()},
    }
