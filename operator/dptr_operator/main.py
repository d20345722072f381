"""kopf wiring: thin, stateless event handlers that hand everything to :class:`Operator`.

* TaskRunners and PipelineTasks: ``on.event`` (the operator keeps its own in-memory index;
  no kopf progress annotations are written on either).
* Jobs and Pods: ``on.event`` with a server-side label selector (only dptr's task Jobs
  and pods are streamed), never patched.
* Watches use ``server_timeout``/``client_timeout`` so a silent stream is re-opened.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from dptr_common import naming
from dptr_common.kube import Credentials, KubeConfig
from dptr_common.models import GROUP, PIPELINE_TASK_PLURAL, TASK_RUNNER_PLURAL, VERSION
from dptr_operator.config import OperatorConfig
from dptr_operator.runtime import Operator

__all__ = ["KopfLogin", "NoEssenceStorage", "build_registry", "configure"]

_TASK_SELECTOR = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY},{naming.LABEL_ROLE}=task"


class NoEssenceStorage(kopf.DiffBaseStorage):
    """A diff-base storage that keeps nothing and builds an empty essence.

    On every watch event kopf builds the object's "essence" to diff it with the last
    handled state: a deep copy of the whole body, and then another copy of that.  Only
    change-detecting handlers (on.create/update/resume/delete, daemons, timers) use it.
    dptr registers on.event handlers only, so the copies were pure cost: the largest
    item in a profile of kopf's event loop during a dispatch burst (7.2 of 29.6 profiled
    seconds, 3,175 watch events), and about 1.5 s of CPU per 1,000 dispatched tasks
    without the profiler (bench/RESULTS.md), CPU the API server on the same node can use.
    tests/unit/test_kopf_wiring.py checks that the registry stays on.event-only, as this
    storage requires.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: dptr's own prefixes, watch timeouts, selectors, no kopf Events, no scans."""
    settings.persistence.finalizer = "dptr.dev/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.DOMAIN)
    settings.persistence.diffbase_storage = NoEssenceStorage()
    settings.watching.server_timeout = int(config.watch_server_timeout)  # the API wants an integer
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.watching.label_selectors[("batch", "v1", "jobs")] = _TASK_SELECTOR
    settings.watching.label_selectors[("v1", "pods")] = _TASK_SELECTOR
    settings.posting.enabled = False  # dptr writes its own Events
    # No cluster-wide scans: the chart's least-privilege RBAC grants nothing cluster-scoped,
    # so kopf's CRD and namespace observers would only be refused (retried for about a
    # minute before the watches start, then logged forever).  dptr serves fixed namespaces
    # (or all of them through cluster-wide watches) and its CRDs are installed beforehand.
    settings.scanning.disabled = True
    settings.execution.max_workers = 4


class KopfLogin:
    """kopf's credentials, from dptr's own client config (kubeconfig or in-cluster): no
    kubernetes package import, and the same credentials as dptr's own client.

    kopf logs in again only when the credentials it has expired (``expiration``, an exec
    plugin's expirationTimestamp) or got a 401.  So a second login that would hand kopf
    the same credentials as the last one asks for fresh ones: a rotated projected token is
    re-read, an exec plugin runs again (unless dptr's client already refreshed them after
    its own 401).  kopf will not take back credentials it saw refused.
    """

    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._last: Credentials | None = None

    def connection_info(self) -> kopf.ConnectionInfo:
        """Blocking (an exec plugin may run): call it from a thread."""
        kc = self.config
        creds = kc.credentials(stale=self._last)
        self._last = creds
        return kopf.ConnectionInfo(
            server=kc.server,
            ca_path=kc.ca_file,
            ca_data=kc.ca_data,
            insecure=kc.insecure or None,
            token=creds.token,
            scheme="Bearer" if creds.token else None,
            certificate_path=creds.cert_file,
            certificate_data=creds.cert_data,
            private_key_path=creds.key_file,
            private_key_data=creds.key_data,
            default_namespace=kc.namespace,
            expiration=creds.expiration,
        )


def build_registry(op: Operator, config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    logins: list[KopfLogin] = []

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        if not logins:
            logins.append(KopfLogin(op.kube.config))
        # In a thread: an exec credential plugin must not stall kopf's event loop.
        return await asyncio.to_thread(logins[0].connection_info)

    @kopf.on.startup(registry=registry)
    async def startup(**kwargs: Any) -> None:
        configure(kwargs["settings"], config)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    # The event handlers below are coroutines in kopf's one event loop, shared by every
    # watch: the Operator methods they call only read and update the index and hand
    # work to the work pool (keyed where it repeats).  Nothing here may block on the
    # Kubernetes API or Data Pipeline: one slow call would stall every watch at once.
    @kopf.on.event(GROUP, VERSION, TASK_RUNNER_PLURAL, registry=registry)
    async def task_runner_event(**kwargs: Any) -> None:
        op.on_runner_event(kwargs["event"].get("type"), kwargs["body"])

    @kopf.on.event(GROUP, VERSION, PIPELINE_TASK_PLURAL, registry=registry)
    async def pipeline_task_event(**kwargs: Any) -> None:
        op.on_task_event(kwargs["event"].get("type"), kwargs["body"])

    @kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_ROLE: "task"}, registry=registry)
    async def job_event(**kwargs: Any) -> None:
        op.on_job_event(kwargs["event"].get("type"), kwargs["body"])

    @kopf.on.event("", "v1", "pods", labels={naming.LABEL_ROLE: "task"}, registry=registry)
    async def pod_event(**kwargs: Any) -> None:
        op.on_pod_event(kwargs["event"].get("type"), kwargs["body"])

    return registry
