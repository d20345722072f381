"""Deterministic Kubernetes names, labels and annotations for a task.

Invariant 3 ("polling the same attempt twice creates nothing new") rests on the names:
the PipelineTask and its Job are named from the task's identity alone, so a second create
of the same attempt is an AlreadyExists, never a second Job.

The identity is (pipelineId, attemptId): attempt ids such as
``@MyActivity_2024-05-01T00:00:00_Attempt=1`` are only unique inside their pipeline, and
two pipelines may well share a TaskRunner and a namespace.

Label values are limited to 63 characters of ``[A-Za-z0-9_.-]``; ids do not fit that, so
labels carry a sanitised (and, when cut, hash-suffixed) form for selectors and the
annotations carry the exact values.
"""

from __future__ import annotations

import base64
import hashlib
import re

__all__ = [
    "ANNOTATION_ATTEMPT_ID",
    "ANNOTATION_COMPONENT_ID",
    "ANNOTATION_INSTANCE_ID",
    "ANNOTATION_OBJECT_TYPE",
    "ANNOTATION_PIPELINE_ID",
    "DOMAIN",
    "LABEL_ATTEMPT_ID",
    "LABEL_COMPONENT_ID",
    "LABEL_MANAGED_BY",
    "LABEL_PIPELINE_ID",
    "LABEL_PIPELINE_TASK",
    "LABEL_ROLE",
    "LABEL_TASK_RUNNER",
    "MANAGED_BY",
    "MAX_NAME_LENGTH",
    "MAX_TASK_NAME_LENGTH",
    "is_dns1123_label",
    "is_label_value",
    "job_name",
    "label_value",
    "pipeline_task_name",
    "short_hash",
]

DOMAIN = "dptr.dev"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "dptr"
LABEL_ROLE = f"{DOMAIN}/role"
LABEL_TASK_RUNNER = f"{DOMAIN}/task-runner"
LABEL_PIPELINE_TASK = f"{DOMAIN}/pipeline-task"
LABEL_PIPELINE_ID = f"{DOMAIN}/pipeline-id"
LABEL_ATTEMPT_ID = f"{DOMAIN}/attempt-id"
LABEL_COMPONENT_ID = f"{DOMAIN}/component-id"

ANNOTATION_PIPELINE_ID = f"{DOMAIN}/pipeline-id"
ANNOTATION_ATTEMPT_ID = f"{DOMAIN}/attempt-id"
ANNOTATION_COMPONENT_ID = f"{DOMAIN}/component-id"
ANNOTATION_INSTANCE_ID = f"{DOMAIN}/instance-id"
ANNOTATION_OBJECT_TYPE = f"{DOMAIN}/object-type"

#: DNS-1123 label limit; also what a Job's name must respect so its pods' labels fit.
MAX_NAME_LENGTH = 63
#: PipelineTask and Job names stay this short, so that every pod the Job controller
#: creates is named exactly ``<job>-<5 random characters>``: the API server cuts a
#: generateName base to 58 characters.  The sidecar's admission policy relies on it to
#: tie a pod-bound token to its own Job and PipelineTask (charts/dptr/templates/
#: sidecar-admission-policy.yaml).
MAX_TASK_NAME_LENGTH = 57
_HASH_LENGTH = 10  # 50 bits of base32: a collision needs ~2**25 attempts in one namespace
_PREFIX = "dptr-"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def short_hash(*parts: str, length: int = _HASH_LENGTH) -> str:
    """Lowercase base32 of SHA-256 over the parts (NUL-separated, so ("a","bc") != ("ab","c"))."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:length]


def is_dns1123_label(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and bool(_DNS1123_LABEL.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= MAX_NAME_LENGTH and bool(_LABEL_VALUE.match(value))


def _readable(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pipeline_task_name(pipeline_id: str, attempt_id: str) -> str:
    """``dptr-<readable attempt>-<hash>``: a DNS-1123 label of at most 57 characters
    (:data:`MAX_TASK_NAME_LENGTH`).

    The readable part (the head of the attempt id, usually the activity's name) is for
    people; the hash of (pipelineId, attemptId) is what makes distinct attempts distinct.
    """
    suffix = "-" + short_hash(pipeline_id, attempt_id)
    room = MAX_TASK_NAME_LENGTH - len(_PREFIX) - len(suffix)
    readable = _readable(attempt_id)[:room].strip("-")
    return f"{_PREFIX}{readable}{suffix}" if readable else f"{_PREFIX}{suffix[1:]}"


def job_name(pipeline_id: str, attempt_id: str) -> str:
    """The Job is named like its PipelineTask: one attempt, one record, one Job."""
    return pipeline_task_name(pipeline_id, attempt_id)


def label_value(value: str) -> str:
    """``value`` in label syntax, stable across calls.

    Valid values are returned unchanged (``df-0123ABC`` stays selectable as is).
    Otherwise invalid characters become ``_`` and, if the result is still too long,
    it is cut and suffixed with a hash of the full value so different long values
    keep different labels.
    """
    if is_label_value(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", value)
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    if len(cleaned) > MAX_NAME_LENGTH or cleaned != value:
        # Changed values get a hash too: "a:b" and "a;b" must not share a label.
        suffix = short_hash(value)
        head = cleaned[: MAX_NAME_LENGTH - len(suffix) - 1]
        head = re.sub(r"[^A-Za-z0-9]+$", "", head)
        cleaned = f"{head}-{suffix}" if head else suffix
    return cleaned
