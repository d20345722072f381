"""Names and the two builders every string of a rendered pod goes through.

Kubelet expands ``$(NAME)`` in a container's ``command``, ``args`` and env ``value``
from the container's earlier env, and turns ``$$`` into ``$``.  Every string dptr puts
there is meant literally: a task's command, its arguments, its ``my*`` fields, its S3
paths, the staging plan, dptr's own shell wrapper.  Unescaped,
``stdout: "s3://b/$(AWS_SECRET_ACCESS_KEY)"`` hands the sidecar its own key inside a
URI, and ``echo $$`` reaches the shell as ``echo $``.  So the renderers never write such
a string themselves: :func:`env` and :func:`command` escape it (``$`` -> ``$$``) and
kubelet gives the process back exactly what was built.  The only values left as written
are the TaskRunner's own ``jobTemplate.env`` entries, copied as given: their author may
use ``$(VAR)`` on purpose (docs/operator.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CREDENTIAL_VARS",
    "FETCH_CONTAINER",
    "IDENTITY_VARS",
    "SIDECAR_CONTAINER",
    "SIDECAR_RESOURCES",
    "SKIP_CONTAINERS",
    "STAGE_IN_CONTAINER",
    "TASK_CONTAINER",
    "command",
    "env",
    "identity_env",
    "kubelet_literal",
    "set_env",
]

TASK_CONTAINER = "task"
SIDECAR_CONTAINER = "dptr-sidecar"
FETCH_CONTAINER = "dptr-fetch-script"
STAGE_IN_CONTAINER = "dptr-stage-in"
#: Compute resources of each of dptr's own containers in a task pod (the sidecar, and the
#: script fetcher, stage-in and an Exists check, which run the same program) unless the
#: operator is given others (``--sidecar-resources``, Helm ``sidecar.resources``).
SIDECAR_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "10m", "memory": "64Mi"},
    "limits": {"memory": "128Mi"},
}
#: The AWS keys a Secret-mode TaskRunner gives dptr's containers (and, opted in, the task).
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
#: Everything that makes up the runner's AWS identity in one of dptr's containers: keys,
#: the role dptr assumes on top (dptr_common.awsauth), or a web identity of dptr's own.
IDENTITY_VARS = CREDENTIAL_VARS | frozenset(
    {
        "DPTR_ROLE_ARN",
        "DPTR_ROLE_SESSION_NAME",
        "DPTR_ROLE_EXTERNAL_ID",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_SESSION_NAME",
    }
)
#: The EKS identity webhook's pod annotation: containers it must not give the account's role.
SKIP_CONTAINERS = "eks.amazonaws.com/skip-containers"


def kubelet_literal(text: str) -> str:
    """``text`` escaped so that kubelet's expansion gives exactly ``text`` back."""
    return text.replace("$", "$$")


def env(name: str, value: str) -> dict[str, Any]:
    """An env entry whose process sees exactly ``value``."""
    return {"name": name, "value": kubelet_literal(value)}


def command(argv: Iterable[str]) -> list[str]:
    """A container ``command`` whose process gets exactly ``argv``."""
    return [kubelet_literal(part) for part in argv]


def identity_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    """A copy of the entries of ``container``'s env that make up its AWS identity
    (:data:`IDENTITY_VARS`), for another container of dptr's that acts as the runner."""
    return copy.deepcopy([e for e in container.get("env", []) if e.get("name") in IDENTITY_VARS])


def set_env(container: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Add ``entries`` to the container's env (replacing entries of the same names),
    keeping the AWS keys from a Secret last.

    Kubelet expands ``$(VAR)`` from earlier entries only: with the keys last, no value
    could name them even if one were not escaped."""
    names = {e["name"] for e in entries}
    merged = [e for e in container.get("env", []) if e.get("name") not in names] + entries
    keys = [e for e in merged if e.get("name") in CREDENTIAL_VARS and "valueFrom" in e]
    container["env"] = [e for e in merged if not any(e is k for k in keys)] + keys
