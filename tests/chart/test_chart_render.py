"""The chart without a cluster: lint, the schema, rendering, and the manifests' drift."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, REPO, Helm, rules_file
from .value_sets import VALUE_SETS

NS_A, NS_B = "data-a", "data-b"


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The install's objects of ``kind``; `helm test`'s hooks are tested on their own."""
    return [d for d in docs if d["kind"] == kind and not _is_test_hook(d)]


def _is_test_hook(doc: dict[str, Any]) -> bool:
    return (doc["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_lint_strict(helm: Helm) -> None:
    proc = helm.run("lint", "--strict", str(CHART), "--kube-version", "v1.34.4", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_value_sets(helm: Helm, name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUE_SETS[name]("dptr-system", NS_A, NS_B)))
    proc = helm.run(
        "lint", "--strict", str(CHART), "--namespace", "dptr-system", "--kube-version", "v1.34.4",
        "--values", str(values), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["operator.bogus=1"], "additional properties 'bogus' not allowed"),
        (["operator.logLevel=LOUD"], "/operator/logLevel"),
        (["operator.replicaCount=-1"], "/operator/replicaCount"),
        (["operator.replicaCount=2", "operator.leaderElection.enabled=false"], "/operator/replicaCount"),
        (
            ["operator.watch.allNamespaces=true", "operator.watch.namespaces={a}"],
            "/operator/watch/namespaces",
        ),
        (["operator.watch.namespaces={Not_A_Namespace}"], "/operator/watch/namespaces/0"),
        (["operator.watch.namespaces={a,a}"], "/operator/watch/namespaces"),
        (["operator.image.digest=latest"], "/operator/image/digest"),
        (["operator.image.tag=a:b"], "/operator/image/tag"),
        (["operator.httpPort=80"], "/operator/httpPort"),
        (["operator.extraArgs={-v}"], "/operator/extraArgs/0"),
        (["operator.credentialsSecretNames={Bad/Name}"], "/operator/credentialsSecretNames/0"),
        (["operator.leaderElection.leaseDurationSeconds=0"], "/operator/leaderElection/leaseDurationSeconds"),
        (["sidecar.serviceAccount.name="], "/sidecar/serviceAccount/name"),
        (["sidecar.image.pullPolicy=Always"], "additional properties 'pullPolicy' not allowed"),
        (["metrics.serviceMonitor.interval=often"], "/metrics/serviceMonitor/interval"),
        (["podDisruptionBudget.minAvailable=half"], "/podDisruptionBudget/minAvailable"),
        (["networkPolicy.egress.ports={99999}"], "/networkPolicy/egress/ports/0"),
        (["taskRunners[0].name=etl"], "/taskRunners/0"),
        (["taskRunners[0].name=etl", "taskRunners[0].spec.region=x"], "workerGroup"),
        (["rbac.create=maybe"], "/rbac/create"),
        (["tenancy.allowedOverrides={credentials}"], "/tenancy/allowedOverrides/0"),
        (["tenancy.workerGroups.Bad_NS={x}"], "invalid propertyName 'Bad_NS'"),
        (["tenancy.roleArns.team={not-an-arn}"], "/tenancy/roleArns/team/0"),
        (["taskPods.networkPolicy.denyCIDRs={10.0.0.0}"], "/taskPods/networkPolicy/denyCIDRs/0"),
        (["sidecar.logLevel=LOUD"], "/sidecar/logLevel"),
        (["sidecar.resources.requests.cpu=lots"], "/sidecar/resources/requests/cpu"),
        (["sidecar.resources.request.cpu=1"], "additional properties 'request' not allowed"),
        (["tenancy.allowedPriorityClasses={Not_A_Name}"], "/tenancy/allowedPriorityClasses/0"),
    ],
)
def test_schema_rejects(helm: Helm, sets: list[str], message: str) -> None:
    proc = helm.template(sets=sets)
    assert proc.returncode != 0, f"{sets} rendered:\n{proc.stdout[:2000]}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["operator.leaderElection.renewSeconds=20"],
            "operator.leaderElection.renewSeconds (20) must be shorter than operator.leaderElection.leaseDurationSeconds (15)",
        ),
        (
            ["taskRunners[0].name=etl", "taskRunners[0].namespace=elsewhere", "taskRunners[0].spec.workerGroup=wg",
             "taskRunners[0].spec.jobTemplate.image=busybox"],
            'TaskRunner "etl" is in namespace "elsewhere", which the operator does not serve',
        ),
        (
            ["metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"],
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        (
            ["operator.serviceAccount.create=false"],
            "operator.serviceAccount.name is required when operator.serviceAccount.create is false",
        ),
    ],
)  # fmt: skip
def test_template_rejects(helm: Helm, sets: list[str], message: str) -> None:
    proc = helm.template(sets=sets)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_defaults_serve_the_release_namespace_with_roles(helm: Helm) -> None:
    docs = helm.render(namespace="dptr-system")
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")
    role = _one(docs, "Role", "dptr")
    assert role["metadata"]["namespace"] == "dptr-system"
    # The single source: files/operator-rules.yaml, nothing added (no Secret is readable).
    assert role["rules"] == rules_file("operator-rules.yaml")
    assert _one(docs, "Role", "dptr-leader-election")["rules"] == rules_file(
        "operator-leader-election-rules.yaml"
    )
    assert _one(docs, "Role", "dptr-sidecar")["rules"] == rules_file("sidecar-role.yaml")
    binding = _one(docs, "RoleBinding", "dptr")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dptr", "namespace": "dptr-system"}]
    sidecar_sa = _one(docs, "ServiceAccount", "dptr-sidecar")
    assert sidecar_sa["automountServiceAccountToken"] is False
    args = _container(docs)["args"]
    assert "--namespace=dptr-system" in args
    assert "--sidecar-image=ghcr.io/dptr-dev/dptr-sidecar:0.1.0" in args
    assert "--activity-image=ghcr.io/dptr-dev/dptr-activity:0.1.0" in args
    assert "--sidecar-service-account=dptr-sidecar" in args
    assert "--lease-namespace=dptr-system" in args


def test_no_rule_grants_more_than_documented(helm: Helm) -> None:
    """No wildcard, no exec/attach/port-forward, no Secret read but by name, nothing cluster-scoped."""
    docs = helm.render(values=VALUE_SETS["everything"]("dptr-system", NS_A, NS_B))
    docs += helm.render(values=VALUE_SETS["all-namespaces"]("dptr-system", NS_A, NS_B))
    for doc in _by_kind(docs, "Role") + _by_kind(docs, "ClusterRole"):
        for rule in doc["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"pods/exec", "pods/attach", "pods/portforward", "nodes", "namespaces"} & set(
                rule["resources"]
            ), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            if "secrets" in rule["resources"]:
                # Read only by name (credentials); written only as create (a SqlActivity's
                # plan): never list, watch, update or delete.
                assert (rule["verbs"] == ["get"] and rule.get("resourceNames")) or rule["verbs"] == [
                    "create"
                ], rule
            assert rule["apiGroups"] != ["rbac.authorization.k8s.io"], rule


def test_watched_namespaces_and_credentials_secret(helm: Helm) -> None:
    docs = helm.render(release="rel", values=VALUE_SETS["namespaced"]("dptr-system", NS_A, NS_B))
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in _by_kind(docs, "Role")}
    assert roles == {
        (NS_A, "rel-dptr"), (NS_B, "rel-dptr"), (NS_A, "rel-dptr-sidecar"), (NS_B, "rel-dptr-sidecar"),
        ("dptr-system", "rel-dptr-leader-election"),
    }  # fmt: skip
    secret_rule = {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["dp-creds"],
        "verbs": ["get"],
    }
    role = _one([d for d in docs if d["metadata"].get("namespace") == NS_A], "Role", "rel-dptr")
    assert role["rules"] == [*rules_file("operator-rules.yaml"), secret_rule]
    args = _container(docs)["args"]
    assert f"--namespace={NS_A}" in args and f"--namespace={NS_B}" in args
    assert "--all-namespaces" not in args
    sas = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in _by_kind(docs, "ServiceAccount")}
    assert set(sas) == {("dptr-system", "rel-dptr"), (NS_A, "dptr-sidecar"), (NS_B, "dptr-sidecar")}
    assert sas[("dptr-system", "rel-dptr")]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/dptr-operator"
    }
    assert sas[(NS_A, "dptr-sidecar")]["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/dptr-sidecar"
    }


def test_all_namespaces_uses_a_cluster_role(helm: Helm) -> None:
    docs = helm.render(release="rel", values=VALUE_SETS["all-namespaces"]("dptr-system", NS_A, NS_B))
    cluster_role = _one(docs, "ClusterRole", "rel-dptr")
    assert cluster_role["rules"][:-1] == rules_file("operator-rules.yaml")
    assert cluster_role["rules"][-1]["resourceNames"] == ["dp-creds", "other-creds"]
    assert _one(docs, "ClusterRoleBinding", "rel-dptr")["roleRef"]["name"] == "rel-dptr"
    assert {r["metadata"]["name"] for r in _by_kind(docs, "Role")} == {
        "rel-dptr-leader-election",
        "rel-dptr-sidecar",
    }
    assert {r["metadata"]["namespace"] for r in _by_kind(docs, "Role") if r["metadata"]["name"] == "rel-dptr-sidecar"} == {
        NS_A, NS_B
    }  # fmt: skip
    args = _container(docs)["args"]
    assert "--all-namespaces" in args
    assert not [a for a in args if a.startswith("--namespace=")]


def test_deployment_never_runs_two_pollers(helm: Helm) -> None:
    with_lease = _one(helm.render(), "Deployment")
    assert with_lease["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    without = helm.render(sets=["operator.leaderElection.enabled=false"])
    assert _one(without, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert "--no-leader-election" in _container(without)["args"]
    assert not [r for r in _by_kind(without, "Role") if r["metadata"]["name"].endswith("leader-election")]


def test_deployment_security_and_probes(helm: Helm) -> None:
    docs = helm.render()
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_everything(helm: Helm) -> None:
    docs = helm.render(release="rel", namespace="ops", values=VALUE_SETS["everything"]("ops", NS_A, NS_B))
    container = _container(docs)
    assert container["image"] == "registry.example.com/dptr/operator@sha256:" + "ab" * 32
    assert "--sidecar-image=registry.example.com/dptr/sidecar:0.1.0-rc1" in container["args"]
    assert "--heartbeat-workers=32" in container["args"]
    assert _one(docs, "Deployment")["spec"]["replicas"] == 2
    assert _one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert _one(docs, "Service")["spec"]["ports"][0]["name"] == "http-metrics"
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    runners = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in _by_kind(docs, "TaskRunner")}
    assert set(runners) == {(NS_A, "etl"), (NS_A, "reports")}
    assert runners[(NS_A, "etl")]["spec"]["credentials"]["secretRef"] == {"name": "dp-creds"}
    for doc in docs:
        assert doc["metadata"]["labels"]["team"] in {"data", "reports"}


def test_pdb_max_unavailable_replaces_min_available(helm: Helm) -> None:
    docs = helm.render(sets=["podDisruptionBudget.enabled=true", "podDisruptionBudget.maxUnavailable=1"])
    assert _one(docs, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]},
    }


def test_manifests_match_the_chart(helm: Helm) -> None:
    """manifests/ is what scripts/generate-manifests.py makes from the chart, byte for byte."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "generate-manifests.py"),
            "--check",
            "--helm",
            str(helm.binary),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, (
        "manifests/ drifted from the chart; run scripts/generate-manifests.py\n" + proc.stdout[-4000:]
    )


def test_sidecar_admission_policy(helm: Helm) -> None:
    docs = helm.render(release="rel", values=VALUE_SETS["namespaced"]("dptr-system", NS_A, NS_B))
    policy = _one(docs, "ValidatingAdmissionPolicy", "rel-dptr-sidecar-own-task")
    binding = _one(docs, "ValidatingAdmissionPolicyBinding", "rel-dptr-sidecar-own-task")
    assert binding["spec"] == {"policyName": "rel-dptr-sidecar-own-task", "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (condition,) = policy["spec"]["matchConditions"]
    assert "['dptr-sidecar']" in condition["expression"]
    more = helm.render(
        release="rel",
        values={"sidecar": {"admissionPolicy": {"extraServiceAccountNames": ["etl-tasks"]}}},
    )
    (condition,) = _one(more, "ValidatingAdmissionPolicy", "rel-dptr-sidecar-own-task")["spec"][
        "matchConditions"
    ]
    assert "['dptr-sidecar','etl-tasks']" in condition["expression"]
    off = helm.render(release="rel", values={"sidecar": {"admissionPolicy": {"enabled": False}}})
    assert not _by_kind(off, "ValidatingAdmissionPolicy") and not _by_kind(
        off, "ValidatingAdmissionPolicyBinding"
    )


def test_tenancy_values_become_the_operators_flags(helm: Helm) -> None:
    values = {
        "tenancy": {
            "workerGroups": {"team-a": ["team-a-*", "etl"], "*": ["shared"]},
            "roleArns": {"team-a": ["arn:aws:iam::111122223333:role/team-a"]},
            "allowedOverrides": ["s3EndpointUrl"],
            "defaultEndpointUrl": "https://datapipeline.vpce.example",
        },
        "sidecar": {"extraEnv": {"AWS_ENDPOINT_URL_STS": "https://sts.vpce.example"}},
        "operator": {"watch": {"namespaces": ["team-a", "team-b"]}},
        "taskRunners": [
            {
                "name": "ops",
                "namespace": "team-b",
                "spec": {"workerGroup": "ops-wg", "jobTemplate": {"image": "x"}},
            }
        ],
    }
    args = _container(helm.render(release="rel", values=values))["args"]
    assert "--worker-group-grant=team-a=team-a-*,etl" in args
    assert "--worker-group-grant=*=shared" in args
    assert "--worker-group-grant=team-b=ops-wg" in args  # declared by the administrator
    assert "--role-grant=team-a=arn:aws:iam::111122223333:role/team-a" in args
    assert "--allow-override=s3EndpointUrl" in args
    assert "--default-endpoint-url=https://datapipeline.vpce.example" in args
    assert "--sidecar-env=AWS_ENDPOINT_URL_STS=https://sts.vpce.example" in args
    assert "--allow-any-worker-group" not in args
    defaults = _container(helm.render(release="rel", values={}))["args"]
    assert not [a for a in defaults if a.startswith(("--worker-group-grant", "--allow-", "--role-grant"))]


def test_task_pod_egress_policy(helm: Helm) -> None:
    assert not [
        d
        for d in _by_kind(helm.render(release="rel", values={}), "NetworkPolicy")
        if "task-egress" in d["metadata"]["name"]
    ]
    values = {
        "taskPods": {"networkPolicy": {"enabled": True, "denyCIDRs": ["10.0.0.0/8", "fd00::/8"]}},
        "operator": {"watch": {"namespaces": ["a", "b"]}},
    }
    policies = [
        d
        for d in _by_kind(helm.render(release="rel", values=values), "NetworkPolicy")
        if "task-egress" in d["metadata"]["name"]
    ]
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["a", "b"]
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert spec["podSelector"]["matchLabels"]["dptr.dev/role"] == "task"
    v4, v6 = (rule["ipBlock"] for rule in spec["egress"][0]["to"])
    assert v4 == {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "10.0.0.0/8"]}
    assert v6 == {"cidr": "::/0", "except": ["fd00:ec2::254/128", "fd00::/8"]}


def test_the_install_check_may_read_only_what_it_checks(helm: Helm) -> None:
    runners = [
        {"name": "etl", "namespace": NS_A, "spec": {"workerGroup": "wg", "jobTemplate": {"image": "x"}}},
        {"name": "nightly", "namespace": NS_A, "spec": {"workerGroup": "wg2", "jobTemplate": {"image": "x"}}},
        # In the release namespace: its rule joins the Deployment's in one Role (two hooks
        # of one name would replace each other).
        {"name": "local", "spec": {"workerGroup": "wg3", "jobTemplate": {"image": "x"}}},
    ]
    docs = helm.render(
        release="rel",
        values={
            "operator": {"watch": {"namespaces": [NS_A, "dptr-system"]}, "nodeSelector": {"pool": "system"}},
            "taskRunners": runners,
        },
    )
    hooks = [d for d in docs if _is_test_hook(d)]
    kinds = [(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in hooks]
    assert len(kinds) == len(set(kinds)), kinds
    assert {(k, ns) for k, ns, _ in kinds} == {
        ("ServiceAccount", "dptr-system"), ("Role", "dptr-system"), ("RoleBinding", "dptr-system"),
        ("Role", NS_A), ("RoleBinding", NS_A), ("Pod", "dptr-system"),
    }  # fmt: skip
    rules = {d["metadata"]["namespace"]: d["rules"] for d in hooks if d["kind"] == "Role"}
    assert rules["dptr-system"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["rel-dptr"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["dptr.dev"],
            "resources": ["taskrunners"],
            "resourceNames": ["local"],
            "verbs": ["get"],
        },
    ]
    assert rules[NS_A] == [
        {
            "apiGroups": ["dptr.dev"],
            "resources": ["taskrunners"],
            "resourceNames": ["etl", "nightly"],
            "verbs": ["get"],
        }
    ]
    pod = next(d for d in hooks if d["kind"] == "Pod")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["dptr-install-check"]
    assert {
        f"--taskrunner={NS_A}/etl",
        f"--taskrunner={NS_A}/nightly",
        "--taskrunner=dptr-system/local",
    } <= set(container["args"])
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["nodeSelector"] == {"pool": "system"}
    # Without TaskRunners: the Deployment's rule only (never an empty resourceNames).
    alone = [d for d in helm.render(release="rel") if _is_test_hook(d) and d["kind"] == "Role"]
    assert [r["resources"] for r in alone[0]["rules"]] == [["deployments"]] and len(alone) == 1
    assert not [d for d in helm.render(values={"installCheck": {"enabled": False}}) if _is_test_hook(d)]


_RUNNER = [
    "taskRunners[0].name=etl",
    "taskRunners[0].spec.workerGroup=wg",
    "taskRunners[0].spec.jobTemplate.image=x",
]


@pytest.mark.parametrize(
    ("typo", "path", "field"),
    [
        ("taskRunners[0].spec.workerGrop=wg", "/taskRunners/0/spec", "workerGrop"),
        ("taskRunners[0].spec.jobTemplate.affinty.nodeAffinity=null", "/taskRunners/0/spec/jobTemplate", "affinty"),
        (
            "taskRunners[0].spec.jobTemplate.affinity.nodeAffinity.requiredDuringScheduling=x",
            "/taskRunners/0/spec/jobTemplate/affinity/nodeAffinity",
            "requiredDuringScheduling",
        ),
        ("taskRunners[0].spec.jobTemplate.imagePullSecrets[0].nmae=regcred", "/taskRunners/0/spec/jobTemplate/imagePullSecrets/0", "nmae"),
        ("taskRunners[0].spec.heartbeat.budget=5", "/taskRunners/0/spec/heartbeat", "budget"),
        ("taskRunners[0].spec.credentials.secretRef.nam=x", "/taskRunners/0/spec/credentials/secretRef", "nam"),
    ],
)  # fmt: skip
def test_a_typo_in_a_declared_task_runner_is_refused_with_its_path(
    helm: Helm, typo: str, path: str, field: str
) -> None:
    """values.schema.json describes taskRunners[].spec as the CRD does: an unknown field is
    an error at `helm install`, where the API server would have pruned it."""
    proc = helm.template(sets=[*_RUNNER, typo])
    assert proc.returncode != 0, proc.stdout[:2000]
    assert f"at '{path}': additional properties '{field}' not allowed" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("sets", "path"),
    [
        (["taskRunners[0].spec.jobTemplate.priorityClassName=Not_A_Name"], "/taskRunners/0/spec/jobTemplate/priorityClassName"),
        (["taskRunners[0].spec.maxConcurrentTasks=0"], "/taskRunners/0/spec/maxConcurrentTasks"),
        (["taskRunners[0].spec.heartbeat.budgetPerSecond=0"], "/taskRunners/0/spec/heartbeat/budgetPerSecond"),
        (["taskRunners[0].spec.credentials.mode=Keys"], "/taskRunners/0/spec/credentials/mode"),
        (["taskRunners[0].spec.jobTemplate.topologySpreadConstraints[0].maxSkew=1"], "/taskRunners/0/spec/jobTemplate/topologySpreadConstraints/0"),
    ],
)  # fmt: skip
def test_a_declared_task_runners_values_are_checked_as_the_crd_does(
    helm: Helm, sets: list[str], path: str
) -> None:
    proc = helm.template(sets=[*_RUNNER, *sets])
    assert proc.returncode != 0, proc.stdout[:2000]
    assert f"at '{path}'" in proc.stderr, proc.stderr


def test_a_task_runner_with_scheduling_fields_renders_as_given(helm: Helm) -> None:
    job_template = {
        "image": "registry.example.com/etl/base:1.0",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["batch"]}]}
                    ]
                }
            },
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 50,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"dptr.dev/task-runner": "etl"}},
                        },
                    }
                ]
            },
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"dptr.dev/task-runner": "etl"}},
            }
        ],
        "priorityClassName": "batch-low",
        "imagePullSecrets": [{"name": "regcred"}],
        "volumes": [{"name": "logs", "persistentVolumeClaim": {"claimName": "etl-logs"}}],
        "volumeMounts": [{"name": "logs", "mountPath": "/var/log/etl"}],
    }
    values = {
        "tenancy": {"allowedPriorityClasses": ["batch-low"]},
        "taskRunners": [{"name": "etl", "spec": {"workerGroup": "wg-etl", "jobTemplate": job_template}}],
    }
    docs = helm.render(values=values)
    (runner,) = _by_kind(docs, "TaskRunner")
    assert runner["spec"]["jobTemplate"] == job_template
    assert "--allow-priority-class=batch-low" in _container(docs)["args"]


def test_sidecar_values_become_the_operators_flags(helm: Helm) -> None:
    from dptr_operator.config import parse_args

    args = _container(helm.render())["args"]
    (resources,) = [a for a in args if a.startswith("--sidecar-resources=")]
    assert "--sidecar-log-level=INFO" in args
    # The chart's defaults are the operator's own: task pods are as they were.
    assert (
        parse_args(["-n", "x", resources], env={}).sidecar_resources
        == parse_args(["-n", "x"], env={}).sidecar_resources
    )
    values = {
        "sidecar": {
            "resources": {"requests": {"cpu": "50m"}, "limits": {"memory": None}},
            "logLevel": "DEBUG",
        }
    }
    args = _container(helm.render(values=values))["args"]
    (resources,) = [a for a in args if a.startswith("--sidecar-resources=")]
    config = parse_args(["-n", "x", resources, "--sidecar-log-level=DEBUG"], env={})
    assert config.sidecar_resources.to_k8s() == {"requests": {"cpu": "50m", "memory": "64Mi"}}
    assert "--sidecar-log-level=DEBUG" in args
    assert config.sidecar_container_env["DPTR_LOG_LEVEL"] == "DEBUG"


def test_the_values_schema_describes_task_runners_as_the_crd_does() -> None:
    """charts/dptr/values.schema.json's taskRunners[].spec is generated from the CRD."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate-values-schema.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, (
        proc.stderr + "\nrun: .venv/bin/python scripts/generate-values-schema.py\n" + proc.stdout[-4000:]
    )


def _dashboard(helm: Helm, **kw: Any) -> dict[str, Any]:
    docs = helm.render(sets=["metrics.dashboard.enabled=true"], **kw)
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert len(maps) == 1, [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    return maps[0]


def test_the_dashboard_configmap_is_opt_in_labelled_and_the_files_json(helm: Helm) -> None:
    assert not [d for d in helm.render() if d["metadata"]["name"].endswith("-dashboard")]
    cm = _dashboard(helm)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "dptr-system"
    rendered = json.loads(cm["data"]["dptr.json"])
    source = json.loads((CHART / "dashboards" / "dptr.json").read_text())
    assert rendered["uid"] != source["uid"]
    assert {**rendered, "uid": source["uid"]} == source


def test_each_release_has_a_dashboard_uid_of_its_own(helm: Helm) -> None:
    uids = {
        json.loads(_dashboard(helm, release=release, namespace=ns)["data"]["dptr.json"])["uid"]
        for release, ns in (("dptr", "dptr-system"), ("dptr", "team-b"), ("etl", "dptr-system"))
    }
    assert len(uids) == 3
    # The same release renders the same uid: an upgrade keeps Grafana's links and stars.
    assert json.loads(_dashboard(helm)["data"]["dptr.json"])["uid"] in uids
