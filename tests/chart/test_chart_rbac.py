"""Least privilege, proven on the bed: ``kubectl auth can-i --as=system:serviceaccount:...``
against the RBAC the chart installed.  The operator and the sidecar can do what they need
and nothing more."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.waiting import wait_for

from .conftest import CHART, Helm, unique

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("chart-rbac")]

CREDS = "dp-creds"


@dataclass(frozen=True)
class Install:
    release: str
    release_ns: str
    a: str  # served, task namespace
    b: str  # served, task namespace
    c: str  # not served

    @property
    def operator(self) -> str:
        return f"system:serviceaccount:{self.release_ns}:{self.release}-dptr"

    @property
    def sidecar_a(self) -> str:
        return f"system:serviceaccount:{self.a}:dptr-sidecar"


def _install(bed: RunningTestbed, helm: Helm, *sets: str, cluster_wide: bool) -> Iterator[Install]:
    names = [unique(p) for p in ("t-rbac-rel", "t-rbac-a", "t-rbac-b", "t-rbac-c")]
    for ns in names:
        bed.kubectl("create", "namespace", ns)
    inst = Install(unique("rbac"), *names)
    watch = (
        ["--set", "operator.watch.allNamespaces=true"]
        if cluster_wide
        else ["--set", f"operator.watch.namespaces={{{inst.a},{inst.b}}}"]
    )
    helm.run(
        "install", inst.release, str(CHART), "-n", inst.release_ns, *watch,
        "--set", f"sidecar.namespaces={{{inst.a},{inst.b}}}",
        "--set", f"operator.credentialsSecretNames={{{CREDS}}}", *sets,
    )  # fmt: skip
    # The API server's RBAC authorizer sees new Roles through an informer: wait until the
    # last-created binding is in effect, so no answer below comes from a half-seen install.
    wait_for(
        lambda: (
            can_i(bed, inst.operator, "create", "leases.coordination.k8s.io", inst.release_ns)
            and can_i(bed, inst.sidecar_a, "get", "taskrunners.dptr.dev", inst.a)
            and can_i(bed, inst.operator, "get", "pods", inst.b, "--subresource=log")
        ),
        timeout=30,
        interval=0.2,
        what="the chart's RBAC to take effect",
    )
    try:
        yield inst
    finally:
        helm.run("uninstall", inst.release, "-n", inst.release_ns, check=False)
        for ns in names:
            bed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def namespaced(testbed: RunningTestbed, bed_helm: Helm) -> Iterator[Install]:
    yield from _install(testbed, bed_helm, cluster_wide=False)


@pytest.fixture(scope="module")
def cluster_wide(testbed: RunningTestbed, bed_helm: Helm) -> Iterator[Install]:
    yield from _install(testbed, bed_helm, cluster_wide=True)


def can_i(
    bed: RunningTestbed, who: str, verb: str, resource: str, namespace: str | None, *extra: str
) -> bool:
    where = ["-n", namespace] if namespace else []
    out = bed.kubectl("auth", "can-i", verb, resource, *where, "--as", who, *extra, check=False).strip()
    assert out in {"yes", "no"}, f"kubectl auth can-i {verb} {resource}: {out!r}"
    return out == "yes"


PT = "pipelinetasks.dptr.dev"
TR = "taskrunners.dptr.dev"
JOBS = "jobs.batch"
LEASES = "leases.coordination.k8s.io"
STATUS = ("--subresource=status",)

# (verb, resource, namespace key, extra args); namespace key: "a", "b", "c", "rel" or None
# (cluster scope / all namespaces).
Case = tuple[str, str, str | None, tuple[str, ...]]

OPERATOR_MAY: list[Case] = [
    # patch: its own finalizer, once the attempt's outcome is recorded.
    *[(v, PT, "a", ()) for v in ("get", "list", "watch", "create", "delete", "patch")],
    *[(v, PT, "b", STATUS) for v in ("get", "patch", "update")],
    *[(v, TR, "a", ()) for v in ("get", "list", "watch", "patch")],
    *[(v, TR, "a", STATUS) for v in ("get", "patch")],
    # patch: the TTL, once the attempt's outcome is recorded.
    *[(v, JOBS, "a", ()) for v in ("get", "list", "watch", "create", "delete", "patch")],
    *[(v, "pods", "b", ()) for v in ("get", "list", "watch")],
    ("get", "pods", "a", ("--subresource=log",)),
    ("create", "events", "a", ()),
    ("list", "events", "a", ()),  # a Job's FailedCreate
    ("get", f"secrets/{CREDS}", "a", ()),
    ("create", "secrets", "a", ()),  # a SqlActivity attempt's plan (never read back)
    ("create", LEASES, "rel", ()),
    ("get", f"{LEASES}/dptr-operator", "rel", ()),
    ("update", f"{LEASES}/dptr-operator", "rel", ()),
]

OPERATOR_MAY_NOT: list[Case] = [
    # Secrets: only the configured credentials Secret, by name.
    ("get", "secrets/another-secret", "a", ()),
    ("list", "secrets", "a", ()),
    ("watch", "secrets", "a", ()),
    ("update", "secrets", "a", ()),
    ("delete", "secrets", "a", ()),
    # No way into or around pods.
    ("create", "pods", "a", ("--subresource=exec",)),
    ("create", "pods", "a", ("--subresource=attach",)),
    ("create", "pods", "a", ("--subresource=portforward",)),
    ("create", "pods", "a", ()),
    ("delete", "pods", "a", ()),
    ("patch", "pods", "a", ()),
    ("update", JOBS, "a", ()),
    ("deletecollection", JOBS, "a", ()),
    ("create", TR, "a", ()),
    ("delete", TR, "a", ()),
    ("update", TR, "a", ()),
    # The PipelineTask itself is never rewritten: only its status (and its finalizer).
    ("update", PT, "a", ()),
    ("get", "configmaps", "a", ()),
    ("create", "serviceaccounts", "a", ("--subresource=token",)),
    ("create", "roles.rbac.authorization.k8s.io", "a", ()),
    ("create", "rolebindings.rbac.authorization.k8s.io", "a", ()),
    # Leases: only its own, and only in its namespace.
    ("update", f"{LEASES}/another-lease", "rel", ()),
    ("delete", f"{LEASES}/dptr-operator", "rel", ()),
    ("create", LEASES, "a", ()),
    # Nothing cluster-scoped.
    ("create", "namespaces", None, ()),
    ("delete", "namespaces", None, ()),
    ("list", "nodes", None, ()),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, ()),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, ()),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", None, ()),
    ("create", "persistentvolumes", None, ()),
    ("impersonate", "serviceaccounts", "a", ()),
]

# Only where it serves: nothing in namespace c, nothing across all namespaces.
OPERATOR_NAMESPACED_ONLY: list[Case] = [
    ("list", PT, "c", ()),
    ("create", PT, "c", ()),
    ("create", JOBS, "c", ()),
    ("create", "secrets", "c", ()),
    ("list", "pods", "c", ()),
    ("get", f"secrets/{CREDS}", "c", ()),
    ("list", PT, None, ("--all-namespaces",)),
    ("create", JOBS, "kube-system", ()),
]

SIDECAR_MAY: list[Case] = [
    ("get", "pods", "a", ()),
    ("watch", "pods", "a", ()),
    ("get", "pods", "a", ("--subresource=log",)),
    ("delete", JOBS, "a", ()),
    ("get", JOBS, "a", ()),  # was its Job deleted?
    ("get", PT, "a", ()),
    *[(v, PT, "a", STATUS) for v in ("get", "patch", "update")],
    ("get", TR, "a", ()),
    ("create", "events", "a", ()),
]

SIDECAR_MAY_NOT: list[Case] = [
    ("list", "pods", "a", ()),
    ("create", "pods", "a", ("--subresource=exec",)),
    ("create", "pods", "a", ()),
    ("delete", "pods", "a", ()),
    ("create", JOBS, "a", ()),
    ("list", JOBS, "a", ()),
    ("patch", JOBS, "a", ()),
    ("create", PT, "a", ()),
    ("patch", PT, "a", ()),
    ("delete", PT, "a", ()),
    ("list", PT, "a", ()),
    ("update", TR, "a", ()),
    ("patch", TR, "a", STATUS),
    ("get", f"secrets/{CREDS}", "a", ()),
    ("list", "secrets", "a", ()),
    ("get", "configmaps", "a", ()),
    ("create", "serviceaccounts", "a", ("--subresource=token",)),
    ("create", LEASES, "a", ()),
    # Its own namespace only: the sidecar of namespace a cannot touch namespace b's Jobs.
    ("delete", JOBS, "b", ()),
    ("get", "pods", "b", ()),
    ("get", PT, "b", ()),
    ("patch", PT, "b", STATUS),
    ("delete", JOBS, "c", ()),
    ("delete", JOBS, None, ("--all-namespaces",)),
    # Nothing cluster-scoped.
    ("create", "namespaces", None, ()),
    ("list", "nodes", None, ()),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, ()),
]


def _ns(inst: Install, key: str | None) -> str | None:
    return {"a": inst.a, "b": inst.b, "c": inst.c, "rel": inst.release_ns}.get(key, key) if key else None


def _id(case: Case) -> str:
    verb, resource, ns, extra = case
    return " ".join([verb, resource, f"-n {ns}" if ns else "(cluster)", *extra])


@pytest.mark.parametrize("case", OPERATOR_MAY, ids=_id)
def test_operator_may(namespaced: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert can_i(testbed, namespaced.operator, verb, resource, _ns(namespaced, ns), *extra)


@pytest.mark.parametrize("case", OPERATOR_MAY_NOT + OPERATOR_NAMESPACED_ONLY, ids=_id)
def test_operator_may_not(namespaced: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert not can_i(testbed, namespaced.operator, verb, resource, _ns(namespaced, ns), *extra)


@pytest.mark.parametrize("case", SIDECAR_MAY, ids=_id)
def test_sidecar_may(namespaced: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert can_i(testbed, namespaced.sidecar_a, verb, resource, _ns(namespaced, ns), *extra)


@pytest.mark.parametrize("case", SIDECAR_MAY_NOT, ids=_id)
def test_sidecar_may_not(namespaced: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert not can_i(testbed, namespaced.sidecar_a, verb, resource, _ns(namespaced, ns), *extra)


CLUSTER_WIDE_MAY: list[Case] = [
    ("list", PT, None, ("--all-namespaces",)),
    ("watch", TR, None, ("--all-namespaces",)),
    ("create", JOBS, "c", ()),
    ("get", f"secrets/{CREDS}", "c", ()),
    ("create", LEASES, "rel", ()),
]
CLUSTER_WIDE_MAY_NOT: list[Case] = [
    ("get", "secrets/another-secret", "c", ()),
    ("list", "secrets", None, ("--all-namespaces",)),
    ("create", "pods", "c", ("--subresource=exec",)),
    ("create", LEASES, "c", ()),
    ("create", "namespaces", None, ()),
    ("list", "nodes", None, ()),
    ("create", "clusterroles.rbac.authorization.k8s.io", None, ()),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", None, ()),
]


@pytest.mark.parametrize("case", CLUSTER_WIDE_MAY, ids=_id)
def test_cluster_wide_operator_may(cluster_wide: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert can_i(testbed, cluster_wide.operator, verb, resource, _ns(cluster_wide, ns), *extra)


@pytest.mark.parametrize("case", CLUSTER_WIDE_MAY_NOT, ids=_id)
def test_cluster_wide_operator_may_not(cluster_wide: Install, testbed: RunningTestbed, case: Case) -> None:
    verb, resource, ns, extra = case
    assert not can_i(testbed, cluster_wide.operator, verb, resource, _ns(cluster_wide, ns), *extra)
