"""Taking a finalizer off an object without losing anyone else's."""

from __future__ import annotations

import logging
import time

from dptr_common.kube import ApiError, KubeClient, NotFound

__all__ = ["remove_finalizer"]

log = logging.getLogger(__name__)


def remove_finalizer(kube: KubeClient, path: str, finalizer: str) -> None:
    """Take ``finalizer`` off the object at ``path`` (conditional on the version read, so
    another controller's finalizers are never lost); gone is done."""
    for _ in range(10):
        try:
            obj = kube.get(path)
        except NotFound:
            return
        meta = obj.get("metadata") or {}
        current = meta.get("finalizers") or []
        if finalizer not in current:
            return
        kept = [f for f in current if f != finalizer]
        try:
            kube.patch(
                path, {"metadata": {"finalizers": kept, "resourceVersion": meta.get("resourceVersion")}}
            )
            return
        except NotFound:
            return
        except ApiError as exc:
            log.info("removing the finalizer %s of %s: %s", finalizer, path, exc)
            time.sleep(0.2)
