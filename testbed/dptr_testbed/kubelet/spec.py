"""Pure helpers that read a pod spec the way kubelet does.

Nothing here talks to the API or starts a process, so all of it is tested
without a cluster.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

JSON = dict[str, Any]

POD_IP = "127.0.0.1"
HOST_IP = "127.0.0.1"

# What the stand-in's node offers; pods without limits see these as theirs.
NODE_CPU = "64"
NODE_MEMORY = "256Gi"
NODE_PODS = "500"
NODE_EPHEMERAL_STORAGE = "1Ti"

_SUFFIXES: dict[str, Decimal] = {
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def now() -> str:
    """The time as the API serialises it (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> float:
    """Seconds since the epoch for an RFC 3339 time from the API."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def parse_quantity(value: str | int | float) -> Decimal:
    """A resource.Quantity as a number (``"500m"`` -> 0.5, ``"1Gi"`` -> 1073741824)."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(f"invalid quantity {value!r}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as err:
        raise ValueError(f"invalid quantity {value!r}") from err
    return number * _SUFFIXES[match.group(2) or ""]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet's ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a
    literal ``$``, and references to undefined names are kept as written."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(sub, text)


_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: JSON, path: str) -> str:
    """The value of a downward-API ``fieldRef`` for env (and single-key files)."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    match = _SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        return format_map(meta.get(path.split(".")[1]) or {})
    raise ValueError(f"unsupported fieldPath {path!r}")


def format_map(values: dict[str, str]) -> str:
    """Labels or annotations as the downward API writes them into a file."""
    return "\n".join(f"{k}={_go_quote(v)}" for k, v in sorted(values.items()))


def _go_quote(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def resource_field_ref(container: JSON | None, ref: JSON) -> str:
    """A ``resourceFieldRef``: the container's limit (the node's allocatable
    when it has none) or request, divided by ``divisor`` and rounded up."""
    resource = ref["resource"]
    kind, _, name = resource.partition(".")
    resources = (container or {}).get("resources") or {}
    node = {"cpu": NODE_CPU, "memory": NODE_MEMORY, "ephemeral-storage": NODE_EPHEMERAL_STORAGE}
    if kind == "limits":
        raw = (resources.get("limits") or {}).get(name, node.get(name))
    elif kind == "requests":
        raw = (resources.get("requests") or {}).get(name)
        if raw is None:
            raw = (resources.get("limits") or {}).get(name, "0")
    else:
        raw = None
    if raw is None:
        raise ValueError(f"unsupported resource {resource!r}")
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(raw) / divisor))


def containers_of(pod: JSON) -> list[JSON]:
    return list(pod.get("spec", {}).get("containers") or [])


def init_containers_of(pod: JSON) -> list[JSON]:
    return list(pod.get("spec", {}).get("initContainers") or [])


def is_sidecar(container: JSON) -> bool:
    """A native sidecar: an init container with ``restartPolicy: Always``."""
    return container.get("restartPolicy") == "Always"


def run_as(pod: JSON, container: JSON) -> tuple[int | None, int | None, bool]:
    """(uid, gid, runAsNonRoot) from the container's and the pod's securityContext."""
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    sc = container.get("securityContext") or {}
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    non_root = bool(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot", False)))
    return uid, gid, non_root


def supplemental_groups(pod: JSON) -> list[int]:
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    groups: list[int] = []
    if pod_sc.get("fsGroup") is not None:
        groups.append(int(pod_sc["fsGroup"]))
    groups.extend(int(g) for g in pod_sc.get("supplementalGroups") or [])
    return sorted(set(groups))


def volume_owner(pod: JSON) -> tuple[int, int]:
    """Who owns the files of secret, configMap and projected volumes: the
    pod's user if it has one (or the only user its containers run as), and
    its fsGroup."""
    pod_sc = pod.get("spec", {}).get("securityContext") or {}
    uid = pod_sc.get("runAsUser")
    if uid is None:
        uids = {
            (c.get("securityContext") or {}).get("runAsUser")
            for c in containers_of(pod) + init_containers_of(pod)
        }
        uids.discard(None)
        if len(uids) == 1:
            uid = uids.pop()
    gid = pod_sc.get("fsGroup")
    return (int(uid) if uid is not None else 0, int(gid) if gid is not None else 0)


def hostname(pod: JSON) -> str:
    spec = pod.get("spec", {})
    return str(spec.get("hostname") or pod["metadata"]["name"])[:63]


def grace_period(pod: JSON) -> float:
    meta = pod.get("metadata", {})
    value = meta.get("deletionGracePeriodSeconds")
    if value is None:
        value = pod.get("spec", {}).get("terminationGracePeriodSeconds", 30)
    return float(value if value is not None else 30)
