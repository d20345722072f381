"""What the processes of a rendered pod see, after kubelet's ``$(VAR)`` expansion.

Kubelet builds a container's env in order, expanding each ``value`` from the entries
before it, then expands ``command`` and ``args`` from the whole env (``$$`` -> ``$``,
references to undefined names kept).  The expansion itself is the kubelet stand-in's
(``dptr_testbed.kubelet.spec.expand``, the same rules); values that come from the API
(``valueFrom``) are stood in for by a recognisable placeholder, so a test can tell when
one of them leaks into another value.
"""

from __future__ import annotations

from typing import Any

from dptr_testbed.kubelet.spec import expand


def placeholder(source: dict[str, Any]) -> str:
    """``<secretKeyRef:name/key>``, ``<fieldRef:metadata.name>``, ..."""
    kind, ref = next(iter(source.items()))
    detail = ref.get("fieldPath") or f"{ref.get('name')}/{ref.get('key')}" or ref.get("resource")
    return f"<{kind}:{detail}>"


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = placeholder(item["valueFrom"])
        else:
            env[item["name"]] = expand(item.get("value") or "", env)
    return env


def container_argv(container: dict[str, Any]) -> list[str]:
    env = container_env(container)
    return [expand(part, env) for part in container.get("command", []) + container.get("args", [])]


def seen(container: dict[str, Any]) -> dict[str, Any]:
    """The container with its env values and command as its process gets them."""
    out = dict(container)
    env = container_env(container)
    out["env"] = [
        {"name": e["name"], "valueFrom": e["valueFrom"]}
        if "valueFrom" in e
        else {**e, "value": env[e["name"]]}
        for e in container.get("env", [])
    ]
    out["command"] = container_argv(container)
    return out
