"""``dptr-install-check``: what ``helm test`` runs (the chart's test hook).

It checks, in this order, that an install works:

1. the CRDs are served (API discovery lists ``taskrunners`` and ``pipelinetasks``);
2. the operator's Deployment has rolled out (as ``kubectl rollout status`` waits for);
3. each TaskRunner named is Ready, or Degraded with a reason (a TaskRunner that is
   Degraded answers the question "is dptr installed": yes, and here is what is wrong
   with this runner, which the operator's condition says).

Each check is retried until ``--timeout``; it exits 0 when every check passes and 1 with
one line per failure otherwise.  It needs only ``get`` on the Deployment and on the
TaskRunners (the chart's test Role), and discovery, which every account has.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dptr_common.kube import ApiError, KubeClient, NotFound, taskrunner_path

__all__ = ["Check", "check_crds", "check_deployment", "check_taskrunner", "main"]

GROUP_VERSION = "dptr.dev/v1alpha1"
RESOURCES = ("taskrunners", "pipelinetasks")


@dataclass(frozen=True)
class Check:
    ok: bool
    message: str


def check_crds(kube: KubeClient) -> Check:
    try:
        served = {r.get("name") for r in kube.get(f"/apis/{GROUP_VERSION}").get("resources") or []}
    except NotFound:
        return Check(False, f"the API server does not serve {GROUP_VERSION}: the CRDs are not installed")
    missing = [r for r in RESOURCES if r not in served]
    if missing:
        return Check(False, f"{GROUP_VERSION} does not serve {', '.join(missing)}: a CRD is missing")
    return Check(True, f"the CRDs are served ({', '.join(RESOURCES)}.dptr.dev)")


def check_deployment(kube: KubeClient, namespace: str, name: str) -> Check:
    try:
        deployment = kube.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
    except NotFound:
        return Check(False, f"the operator Deployment {namespace}/{name} does not exist")
    status = deployment.get("status") or {}
    spec_replicas = int((deployment.get("spec") or {}).get("replicas", 1))
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    total, updated = int(status.get("replicas") or 0), int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    where = f"the operator Deployment {namespace}/{name}"
    if spec_replicas < 1:
        return Check(False, f"{where} is scaled to 0 replicas")
    # What `kubectl rollout status` waits for: the controller has seen this generation,
    # every replica is of it, no old one is left, and the new ones are available. A
    # ready pod of the old ReplicaSet beside a crash-looping new one (maxUnavailable 0
    # keeps the old pod) is a broken upgrade, not a working install.
    if observed < generation:
        problem = f"the controller has not seen generation {generation} yet (observed {observed})"
    elif updated < spec_replicas:
        problem = f"{updated}/{spec_replicas} replicas are of the current spec"
    elif total > updated:
        problem = f"pods of an older spec still run ({total - updated} of {total})"
    elif available < updated:
        problem = f"{available}/{updated} replicas of the current spec are available"
    else:
        return Check(True, f"{where} has {available}/{spec_replicas} available replicas of its current spec")
    why = "; ".join(
        f"{c.get('type')}={c.get('status')} {c.get('reason', '')}: {c.get('message', '')}".strip()
        for c in status.get("conditions") or []
    )
    return Check(False, f"{where}: {problem}" + (f" ({why})" if why else ""))


def check_taskrunner(kube: KubeClient, namespace: str, name: str) -> Check:
    try:
        runner = kube.get(taskrunner_path(namespace, name))
    except NotFound:
        return Check(False, f"TaskRunner {namespace}/{name} does not exist")
    status = runner.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready, degraded = conditions.get("Ready") or {}, conditions.get("Degraded") or {}
    if degraded.get("status") == "True":
        reason = f"{degraded.get('reason')}: {degraded.get('message', '')}".rstrip(": ")
        return Check(True, f"TaskRunner {namespace}/{name} is Degraded: {reason}")
    if not conditions:
        return Check(
            False, f"TaskRunner {namespace}/{name} has no conditions: the operator has not served it"
        )
    generation = int((runner.get("metadata") or {}).get("generation") or 0)
    if int(status.get("observedGeneration") or 0) < generation:
        return Check(
            False, f"TaskRunner {namespace}/{name}: the operator has not seen generation {generation} yet"
        )
    if ready.get("status") == "True":
        # Ready is True before the first poll too: only an answered poll shows the
        # credentials, the endpoint and the worker group work.
        if not status.get("lastPollTime"):
            return Check(
                False, f"TaskRunner {namespace}/{name} is Ready but has not polled Data Pipeline yet"
            )
        return Check(True, f"TaskRunner {namespace}/{name} is Ready (last poll {status['lastPollTime']})")
    return Check(
        False,
        f"TaskRunner {namespace}/{name} is neither Ready nor Degraded: {ready.get('reason')}: {ready.get('message', '')}",
    )


def _until(check: Callable[[], Check], deadline: float, interval: float) -> Check:
    while True:
        try:
            result = check()
        except ApiError as exc:
            result = Check(False, f"the API answered {exc.status} {exc.reason}: {exc}")
        if result.ok or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dptr-install-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", required=True, help="the operator's (the release's) namespace")
    parser.add_argument("--deployment", required=True, help="the operator Deployment's name")
    parser.add_argument(
        "--taskrunner",
        action="append",
        default=[],
        metavar="NAMESPACE/NAME",
        help="a TaskRunner to check (repeat)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds each check may take to pass")
    parser.add_argument("--kubeconfig", help="out of cluster (the test pod uses its own account)")
    args = parser.parse_args(argv)
    for item in args.taskrunner:
        if item.count("/") != 1 or not all(item.split("/")):
            parser.error(f"--taskrunner {item!r}: expected NAMESPACE/NAME")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kube = KubeClient.from_kubeconfig(args.kubeconfig) if args.kubeconfig else KubeClient.from_env()
    checks: list[Callable[[], Check]] = [
        lambda: check_crds(kube),
        lambda: check_deployment(kube, args.namespace, args.deployment),
    ]
    for item in args.taskrunner:
        namespace, name = item.split("/")
        checks.append(functools.partial(check_taskrunner, kube, namespace, name))
    failed = 0
    for check in checks:
        result = _until(check, time.monotonic() + args.timeout, interval=2.0)
        print(("ok    " if result.ok else "FAIL  ") + result.message, flush=True)
        failed += not result.ok
    print(f"dptr-install-check: {len(checks) - failed}/{len(checks)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
