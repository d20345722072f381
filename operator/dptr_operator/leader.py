"""Leader election on a ``coordination.k8s.io/v1`` Lease: only the leader polls.

Why a Lease and not kopf peering: peering is built to pause *handlers* while another
operator (say, a developer's) is active, decides by priority, and leaves a window in
which both replicas act; it also needs its own CRDs.  Polling Data Pipeline twice is a
correctness problem (two runners holding one capacity budget, two heartbeaters per task),
so dptr uses the mechanism Kubernetes' own controllers use: the replica holding the
Lease runs; the others wait to acquire it.

Fencing: the leader renews every ``renew`` seconds.  If it cannot renew for
``duration - renew`` seconds it stops at once (the process exits and is restarted as a
standby) - before any other replica could see the Lease expire.  A replica restarted
under the same identity (the same pod) takes its own Lease back at once, so a crashed
operator resumes in seconds instead of waiting out the lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from dptr_common.kube import ApiError, Conflict, KubeClient, NotFound, namespaced_path

__all__ = ["LeaderElector", "lease_path"]

log = logging.getLogger(__name__)


def lease_path(namespace: str, name: str | None = None) -> str:
    return namespaced_path("apis/coordination.k8s.io/v1", "leases", namespace, name)


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def lease_is_free(spec: dict[str, Any], identity: str, now: datetime) -> bool:
    """Whether ``identity`` may take a Lease with this ``spec`` now (pure)."""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = float(spec.get("leaseDurationSeconds") or 15)
    return renewed is None or now > renewed + timedelta(seconds=duration)


class LeaderElector:
    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: float,
        renew: float,
        on_lost: Callable[[], None],
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew = renew
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leading = False
        #: The Lease's leaseTransitions as last read (how often its holder changed, cluster
        #: wide: dptr_lease_transitions).
        self.transitions = 0

    def _try(self) -> bool:
        now = datetime.now(UTC)
        path = lease_path(self.namespace, self.name)
        try:
            lease = self.kube.get(path)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, acquire=True, transitions=0),
            }
            try:
                self.kube.create(lease_path(self.namespace), body)
                return True
            except Conflict:
                return False
        spec = lease.get("spec") or {}
        self.transitions = int(spec.get("leaseTransitions") or 0)
        if not lease_is_free(spec, self.identity, now):
            return False
        mine = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        lease["spec"] = self._spec(now, acquire=not mine or not self.leading, transitions=transitions)
        if mine and self.leading and spec.get("acquireTime"):
            lease["spec"]["acquireTime"] = spec["acquireTime"]
        try:
            self.kube.replace(path, lease)
        except Conflict:
            return False
        self.transitions = transitions
        return True

    def _spec(self, now: datetime, *, acquire: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(round(self.duration), 1),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = _micro_time(now)
        return spec

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until the Lease is ours (True) or ``stop`` is set (False)."""
        waiting_logged = False
        while not (stop and stop.is_set()):
            try:
                if self._try():
                    self.leading = True
                    log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return True
            except ApiError as exc:
                log.warning("leader election: %s", exc)
            if not waiting_logged:
                log.info("standing by: Lease %s/%s is held by another replica", self.namespace, self.name)
                waiting_logged = True
            time.sleep(min(self.renew, 2.0))
        return False

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        deadline = self.duration - self.renew
        while not self._stop.wait(self.renew):
            try:
                if self._try():
                    last_ok = time.monotonic()
                    continue
                log.error("the Lease %s/%s was taken by another replica", self.namespace, self.name)
            except ApiError as exc:
                log.warning("could not renew the Lease: %s", exc)
                if time.monotonic() - last_ok < deadline:
                    continue
            self.leading = False
            self.on_lost()
            return

    def release(self) -> None:
        """Give the Lease up (clean shutdown) so a standby takes over without waiting."""
        self._stop.set()
        if not self.leading:
            return
        self.leading = False
        try:
            path = lease_path(self.namespace, self.name)
            lease = self.kube.get(path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                spec["holderIdentity"] = None
                spec["renewTime"] = _micro_time(datetime.now(UTC) - timedelta(seconds=self.duration))
                lease["spec"] = {k: v for k, v in spec.items() if v is not None}
                self.kube.replace(path, lease)
        except ApiError as exc:
            log.debug("could not release the Lease: %s", exc)
