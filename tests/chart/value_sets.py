"""Value sets the chart is rendered with (and applied with --dry-run=server to the bed).

Each is a function of the release namespace and two other existing namespaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ValueSet = Callable[[str, str, str], dict[str, Any]]

DIGEST = "sha256:" + "ab" * 32


def defaults(release_ns: str, a: str, b: str) -> dict[str, Any]:
    return {}


def namespaced(release_ns: str, a: str, b: str) -> dict[str, Any]:
    return {
        "operator": {
            "watch": {"namespaces": [a, b]},
            "credentialsSecretNames": ["dp-creds"],
            "serviceAccount": {
                "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/dptr-operator"}
            },
        },
        "sidecar": {
            "serviceAccount": {
                "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/dptr-sidecar"}
            }
        },
    }


def all_namespaces(release_ns: str, a: str, b: str) -> dict[str, Any]:
    return {
        "operator": {"watch": {"allNamespaces": True}, "credentialsSecretNames": ["dp-creds", "other-creds"]},
        "sidecar": {"namespaces": [a, b]},
    }


def everything(release_ns: str, a: str, b: str) -> dict[str, Any]:
    return {
        "commonLabels": {"team": "data"},
        "imagePullSecrets": ["regcred"],
        "operator": {
            "image": {"repository": "registry.example.com/dptr/operator", "digest": DIGEST},
            "replicaCount": 2,
            "watch": {"namespaces": [a]},
            "credentialsSecretNames": ["dp-creds"],
            "logLevel": "DEBUG",
            "extraArgs": ["--heartbeat-workers=32"],
            "extraEnv": [{"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"}],
            "podAnnotations": {"example.com/owner": "data"},
            "podLabels": {"tier": "control"},
            "priorityClassName": "",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "dptr", "effect": "NoSchedule"}
            ],
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
                }
            ],
        },
        "sidecar": {
            "image": {"repository": "registry.example.com/dptr/sidecar", "tag": "0.1.0-rc1"},
            "namespaces": [a, b],
            "resources": {"requests": {"cpu": "20m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
            "logLevel": "DEBUG",
        },
        "tenancy": {"allowedPriorityClasses": ["batch-low"]},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
            "egress": {"enabled": True, "ports": [443, 6443]},
        },
        "taskRunners": [
            {
                "name": "etl",
                "namespace": a,
                "spec": {
                    "workerGroup": "wg-etl",
                    "region": "eu-west-1",
                    "credentials": {"mode": "Secret", "secretRef": {"name": "dp-creds"}},
                    "maxConcurrentTasks": 20,
                    "jobTemplate": {
                        "image": "registry.example.com/etl/base:1.0",
                        "affinity": {
                            "nodeAffinity": {
                                "preferredDuringSchedulingIgnoredDuringExecution": [
                                    {
                                        "weight": 10,
                                        "preference": {
                                            "matchExpressions": [
                                                {"key": "pool", "operator": "In", "values": ["batch"]}
                                            ]
                                        },
                                    }
                                ]
                            }
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
                    },
                },
            },
            {
                "name": "reports",
                "namespace": a,
                "labels": {"team": "reports"},
                "spec": {
                    "workerGroup": "wg-reports",
                    "credentials": {"mode": "PodIdentity"},
                    "jobTemplate": {"image": "registry.example.com/reports/base:2.3"},
                },
            },
        ],
    }


def minimal(release_ns: str, a: str, b: str) -> dict[str, Any]:
    """No leader election, no RBAC, no metrics Service, an existing ServiceAccount."""
    return {
        "operator": {
            "leaderElection": {"enabled": False},
            "serviceAccount": {"create": False, "name": "default"},
            "watch": {"namespaces": [release_ns]},
        },
        "sidecar": {"serviceAccount": {"create": False}},
        "rbac": {"create": False},
        "metrics": {"service": {"enabled": False}},
    }


VALUE_SETS: dict[str, ValueSet] = {
    "defaults": defaults,
    "namespaced": namespaced,
    "all-namespaces": all_namespaces,
    "everything": everything,
    "minimal": minimal,
}
