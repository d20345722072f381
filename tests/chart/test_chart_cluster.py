"""The chart against the bed's real API server: server-side dry runs of several value
sets, and a real install, upgrades and uninstall."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dptr_datapipeline import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed, free_port
from dptr_testbed.waiting import wait_for

from .conftest import CHART, REPO, Helm, unique
from .value_sets import VALUE_SETS

pytestmark = pytest.mark.cluster


def _exists(bed: RunningTestbed, kind: str, name: str, namespace: str | None = None) -> bool:
    ns = ["-n", namespace] if namespace else []
    return bool(bed.kubectl("get", kind, name, *ns, "--ignore-not-found", "-o", "name").strip())


def _wait_gone(
    bed: RunningTestbed, kind: str, name: str, namespace: str | None = None, timeout: float = 30
) -> None:
    wait_for(
        lambda: not _exists(bed, kind, name, namespace),
        timeout=timeout,
        interval=0.3,
        what=f"{kind} {namespace}/{name} gone",
    )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_value_set_applies_dry_run_server(
    name: str,
    bed_helm: Helm,
    testbed: RunningTestbed,
    make_namespace: Callable[..., str],
    service_monitor_crd: None,
) -> None:
    release_ns, a, b = make_namespace("t-chart-rel"), make_namespace("t-chart-a"), make_namespace("t-chart-b")
    # What `helm install` applies; `helm test`'s hook (which needs its own account to exist
    # first) runs for real in test_helm_test_checks_crds_operator_and_taskrunners.
    proc = bed_helm.template(
        release=unique("dry"),
        namespace=release_ns,
        values=VALUE_SETS[name](release_ns, a, b),
        extra=["--skip-tests"],
    )
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    out = testbed.kubectl("apply", "--dry-run=server", "-f", "-", input=proc.stdout)
    # One line per object, each accepted by the real API server (schemas, CEL rules of the
    # TaskRunner CRD, RBAC escalation checks, Pod Security of the Deployment's pod).
    assert out.count("(server dry run)") == len(rendered), out


def test_manifests_apply_dry_run_server(testbed: RunningTestbed, crds: RunningTestbed) -> None:
    manifests = REPO / "manifests"
    # The namespace for real (nothing else uses it); the rest as a server-side dry run.
    testbed.kubectl("apply", "-f", str(manifests / "00-namespace.yaml"))
    for name in ("01-crds.yaml", "02-dptr.yaml"):
        text = (manifests / name).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        out = testbed.kubectl(
            "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-", input=text
        )
        assert out.count("(server dry run)") == len(docs), out


def test_install_upgrade_uninstall(
    bed_helm: Helm, testbed: RunningTestbed, make_namespace: Callable[..., str], tmp_path: Path
) -> None:
    bed = testbed
    release = unique("inst")
    full = f"{release}-dptr"
    rel_ns, a, b = make_namespace("t-chart-rel"), make_namespace("t-chart-a"), make_namespace("t-chart-b")

    def values(path: str, data: dict[str, object]) -> str:
        file = tmp_path / path
        file.write_text(yaml.safe_dump(data))
        return str(file)

    # -- install: serve namespace a
    v1 = values("v1.yaml", {"operator": {"watch": {"namespaces": [a]}}})
    proc = bed_helm.run("install", release, str(CHART), "-n", rel_ns, "--values", v1)
    assert "kubectl apply --server-side --force-conflicts -f charts/dptr/crds/" in proc.stdout  # NOTES
    assert f"The operator serves the namespaces: {a}." in proc.stdout
    present = [
        ("deployment", full, rel_ns), ("serviceaccount", full, rel_ns), ("service", f"{full}-metrics", rel_ns),
        ("role", f"{full}-leader-election", rel_ns), ("rolebinding", f"{full}-leader-election", rel_ns),
        ("role", full, a), ("rolebinding", full, a),
        ("serviceaccount", "dptr-sidecar", a), ("role", f"{full}-sidecar", a), ("rolebinding", f"{full}-sidecar", a),
    ]  # fmt: skip
    for kind, name, ns in present:
        assert _exists(bed, kind, name, ns), f"{kind} {ns}/{name} missing after install"
    for kind, name, ns in [("role", full, b), ("serviceaccount", "dptr-sidecar", b), ("role", full, rel_ns)]:
        assert not _exists(bed, kind, name, ns), f"{kind} {ns}/{name} should not exist"
    assert not _exists(bed, "clusterrole", full)
    args = bed.kubectl(
        "get", "deployment", full, "-n", rel_ns, "-o", "jsonpath={.spec.template.spec.containers[0].args}"
    )
    assert f"--namespace={a}" in args and f"--namespace={b}" not in args
    # The CRDs were installed from crds/ (or already there), never as part of the release.
    manifest = bed_helm.run("get", "manifest", release, "-n", rel_ns).stdout
    assert "CustomResourceDefinition" not in manifest

    # -- upgrade: serve a and b, two replicas with a PDB, a NetworkPolicy, a TaskRunner,
    #    and no metrics Service.
    v2 = values(
        "v2.yaml",
        {
            "operator": {
                "watch": {"namespaces": [a, b]},
                "replicaCount": 2,
                "credentialsSecretNames": ["dp-creds"],
            },
            "podDisruptionBudget": {"enabled": True},
            "networkPolicy": {"enabled": True},
            "metrics": {"service": {"enabled": False}},
            "taskRunners": [
                {
                    "name": "etl",
                    "namespace": b,
                    "spec": {
                        "workerGroup": "wg-etl",
                        "credentials": {"mode": "Secret", "secretRef": {"name": "dp-creds"}},
                        "jobTemplate": {"image": "registry.example.com/etl/base:1.0"},
                    },
                }
            ],
        },
    )
    bed_helm.run("upgrade", release, str(CHART), "-n", rel_ns, "--values", v2)
    for kind, name, ns in [
        ("role", full, b), ("rolebinding", full, b), ("serviceaccount", "dptr-sidecar", b), ("role", f"{full}-sidecar", b),
        ("poddisruptionbudget", full, rel_ns), ("networkpolicy", full, rel_ns), ("taskrunner", "etl", b),
        ("role", full, a),
    ]:  # fmt: skip
        assert _exists(bed, kind, name, ns), f"{kind} {ns}/{name} missing after upgrade"
    _wait_gone(bed, "service", f"{full}-metrics", rel_ns)
    assert bed.kubectl("get", "deployment", full, "-n", rel_ns, "-o", "jsonpath={.spec.replicas}") == "2"
    rules = yaml.safe_load(bed.kubectl("get", "role", full, "-n", b, "-o", "yaml"))["rules"]
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["dp-creds"],
        "verbs": ["get"],
    } in rules
    spec = yaml.safe_load(bed.kubectl("get", "taskrunner", "etl", "-n", b, "-o", "yaml"))["spec"]
    assert spec["workerGroup"] == "wg-etl" and spec["maxConcurrentTasks"] == 10  # CRD defaults applied

    # -- upgrade: stop serving a; its Role and the sidecar's objects there go.
    v3 = values("v3.yaml", {"operator": {"watch": {"namespaces": [b]}}})
    bed_helm.run("upgrade", release, str(CHART), "-n", rel_ns, "--values", v3)
    for kind, name in [
        ("role", full),
        ("rolebinding", full),
        ("serviceaccount", "dptr-sidecar"),
        ("role", f"{full}-sidecar"),
    ]:
        _wait_gone(bed, kind, name, a)
    for kind, name, ns in [
        ("poddisruptionbudget", full, rel_ns),
        ("networkpolicy", full, rel_ns),
        ("taskrunner", "etl", b),
    ]:
        _wait_gone(bed, kind, name, ns)
    assert _exists(bed, "role", full, b) and _exists(bed, "service", f"{full}-metrics", rel_ns)

    # -- uninstall: every object goes; the CRDs stay (Helm never deletes crds/).
    bed_helm.run("uninstall", release, "-n", rel_ns)
    gone = [
        ("deployment", full, rel_ns), ("serviceaccount", full, rel_ns), ("service", f"{full}-metrics", rel_ns),
        ("role", f"{full}-leader-election", rel_ns), ("rolebinding", f"{full}-leader-election", rel_ns),
        ("role", full, b), ("rolebinding", full, b), ("serviceaccount", "dptr-sidecar", b),
        ("role", f"{full}-sidecar", b), ("rolebinding", f"{full}-sidecar", b),
    ]  # fmt: skip
    for kind, name, ns in gone:
        _wait_gone(bed, kind, name, ns)
    assert release not in bed_helm.run("list", "-n", rel_ns, "-q").stdout
    for crd in ("taskrunners.dptr.dev", "pipelinetasks.dptr.dev"):
        assert _exists(bed, "crd", crd), f"{crd} was deleted by helm uninstall"


def test_install_cluster_wide_and_uninstall(
    bed_helm: Helm, testbed: RunningTestbed, make_namespace: Callable[..., str]
) -> None:
    release = unique("cw")
    full = f"{release}-dptr"
    rel_ns, a = make_namespace("t-chart-rel"), make_namespace("t-chart-a")
    bed_helm.run(
        "install", release, str(CHART), "-n", rel_ns,
        "--set", "operator.watch.allNamespaces=true", "--set", f"sidecar.namespaces={{{a}}}",
    )  # fmt: skip
    assert _exists(testbed, "clusterrole", full) and _exists(testbed, "clusterrolebinding", full)
    assert _exists(testbed, "role", f"{full}-sidecar", a)
    args = testbed.kubectl(
        "get", "deployment", full, "-n", rel_ns, "-o", "jsonpath={.spec.template.spec.containers[0].args}"
    )
    assert "--all-namespaces" in args
    bed_helm.run("uninstall", release, "-n", rel_ns)
    _wait_gone(testbed, "clusterrole", full)
    _wait_gone(testbed, "clusterrolebinding", full)
    _wait_gone(testbed, "role", f"{full}-sidecar", a)


def test_helm_test_checks_crds_operator_and_taskrunners(
    bed_helm: Helm,
    testbed: RunningTestbed,
    crds: RunningTestbed,
    make_namespace: Callable[..., str],
    datapipeline: LocalDataPipeline,
    tmp_path: Path,
) -> None:
    """`helm test` runs dptr-install-check in its own pod (the stand-in runs it): it fails
    while the operator has no ready replica, and passes once it runs, with one TaskRunner
    Ready and one Degraded (its Secret is missing) named with its reason."""
    release = unique("ht")
    full = f"{release}-dptr"
    rel_ns, a = make_namespace("t-chart-rel"), make_namespace("t-chart-a")
    for ns in (a, rel_ns):
        testbed.kubectl(
            "create", "secret", "generic", "dp-creds", "-n", ns,
            f"--from-literal=AWS_ACCESS_KEY_ID={DEFAULT_ACCESS_KEY_ID}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={DEFAULT_SECRET_ACCESS_KEY}",
        )  # fmt: skip
    job_template = {"image": "debian:bookworm", "nodeSelector": {"dptr.dev/test": "no-such-node"}}
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "operator": {
                    "watch": {"namespaces": [a, rel_ns]},
                    "credentialsSecretNames": ["dp-creds", "not-there"],
                    # Pods of the stand-in share the host's network: a port of its own.
                    "httpPort": free_port(),
                },
                "tenancy": {"allowedOverrides": ["endpointUrl"]},
                "installCheck": {"timeoutSeconds": 5},
                "taskRunners": [
                    {
                        "name": name,
                        "namespace": a,
                        "spec": {
                            "workerGroup": f"wg-{name}-{release}",
                            "endpointUrl": datapipeline.endpoint_url,
                            "credentials": {"mode": "Secret", "secretRef": {"name": secret}},
                            "jobTemplate": job_template,
                        },
                    }
                    for name, secret in (("etl", "dp-creds"), ("broken", "not-there"))
                ]
                # One in the release namespace too: its Role is the Deployment's as well.
                + [
                    {
                        "name": "local",
                        "spec": {
                            "workerGroup": f"wg-local-{release}",
                            "endpointUrl": datapipeline.endpoint_url,
                            "credentials": {"mode": "Secret", "secretRef": {"name": "dp-creds"}},
                            "jobTemplate": job_template,
                        },
                    }
                ],
            }
        )
    )
    bed_helm.run("install", release, str(CHART), "-n", rel_ns, "--values", str(values))

    # The operator's pod cannot start on the stand-in (no image entrypoint): helm test fails.
    failed = bed_helm.run("test", release, "-n", rel_ns, "--logs", check=False)
    assert failed.returncode != 0
    assert (
        f"FAIL  the operator Deployment {rel_ns}/{full}: 0/1 replicas of the current spec are available"
        in failed.stdout
    ), failed.stdout
    assert "ok    the CRDs are served" in failed.stdout

    # The image's ENTRYPOINT as the command, which the stand-in needs: now it runs.
    testbed.kubectl(
        "patch", "deployment", full, "-n", rel_ns, "--type=json",
        "-p", '[{"op": "add", "path": "/spec/template/spec/containers/0/command", "value": ["dptr-operator"]}]',
    )  # fmt: skip
    wait_for(
        lambda: (
            testbed.kubectl("get", "deployment", full, "-n", rel_ns, "-o", "jsonpath={.status.readyReplicas}")
            == "1"
        ),
        timeout=60,
        interval=0.5,
        what="the operator ready",
    )
    # Time for the operator to serve the TaskRunners (the patched command stays: helm's
    # three-way merge keeps a live field the chart does not set).
    bed_helm.run(
        "upgrade",
        release,
        str(CHART),
        "-n",
        rel_ns,
        "--reuse-values",
        "--set",
        "installCheck.timeoutSeconds=120",
    )
    assert "dptr-operator" in testbed.kubectl(
        "get", "deployment", full, "-n", rel_ns, "-o", "jsonpath={.spec.template.spec.containers[0].command}"
    )
    passed = bed_helm.run("test", release, "-n", rel_ns, "--logs", "--timeout", "3m", check=False)
    operator_log = testbed.kubectl("logs", f"deployment/{full}", "-n", rel_ns, "--tail=60", check=False)
    assert passed.returncode == 0, passed.stdout + passed.stderr + "\n--- operator log ---\n" + operator_log
    assert f"ok    TaskRunner {a}/etl is Ready (last poll " in passed.stdout
    assert f"ok    TaskRunner {a}/broken is Degraded: InvalidCredentials" in passed.stdout
    assert f"ok    TaskRunner {rel_ns}/local is Ready (last poll " in passed.stdout
    assert "dptr-install-check: 5/5 checks passed" in passed.stdout
    # Passed: its account and Roles are gone (hook-succeeded); its pod stays for the logs.
    _wait_gone(testbed, "role", f"{full}-install-check", a)
    _wait_gone(testbed, "serviceaccount", f"{full}-install-check", rel_ns)
    phase = testbed.kubectl(
        "get", "pod", f"{full}-install-check", "-n", rel_ns, "-o", "jsonpath={.status.phase}"
    )
    assert phase == "Succeeded"

    # A broken upgrade: the new pod cannot start, the old one stays ready (maxUnavailable
    # 0). A ready replica is not enough: helm test fails until the rollout completes.
    bed_helm.run(
        "upgrade", release, str(CHART), "-n", rel_ns, "--reuse-values", "--set", "installCheck.timeoutSeconds=5"
    )  # fmt: skip
    testbed.kubectl(
        "patch", "deployment", full, "-n", rel_ns, "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/template/spec/containers/0/command", "value": ["/no/such/dptr"]}]',
    )  # fmt: skip
    wait_for(
        lambda: testbed.kubectl(
            "get", "deployment", full, "-n", rel_ns,
            "-o", "jsonpath={.status.replicas}/{.status.updatedReplicas}/{.status.readyReplicas}",
        ) == "2/1/1",
        timeout=60,
        interval=0.5,
        what="a new pod beside the ready old one",
    )  # fmt: skip
    broken = bed_helm.run("test", release, "-n", rel_ns, "--logs", check=False)
    assert broken.returncode != 0, broken.stdout
    assert f"FAIL  the operator Deployment {rel_ns}/{full}: pods of an older spec still run (1 of 2)" in (
        broken.stdout
    ), broken.stdout
    bed_helm.run("uninstall", release, "-n", rel_ns)
