"""End to end with pods that run: the kubelet stand-in runs the real sidecar and the task.

Runs on the suite's shared bed, whose kubelet stand-ins run the pods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from op_helpers import QUIET_GRACES, Cluster, OperatorProcess

from dptr_datapipeline import LocalDataPipeline
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.installs import sidecar_rbac
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def node_cluster(crds: RunningTestbed, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    name = "s-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    crds.kubectl("create", "namespace", name)
    cluster = Cluster(crds, name)
    # The sidecar's RBAC in the task namespace, from the chart's single source.
    for obj in sidecar_rbac(name):
        cluster.apply(obj)
    yield cluster
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_outcomes_through_the_sidecar(
    node_cluster: Cluster, datapipeline: LocalDataPipeline, tmp_path: Path
) -> None:
    # 60 s (scaled) for the sidecar to report before the operator's fallback would: a
    # loaded CI machine has taken more than 10 s between a task's exit and its sidecar's
    # report, and this test is about who reports, not how fast.
    extra = [*QUIET_GRACES, "--sidecar-report-grace-seconds", "6000"]
    op = OperatorProcess(node_cluster.testbed, node_cluster.namespace, tmp_path, extra).start()
    try:
        node_cluster.create_runner(datapipeline, "wg-e2e", jobTemplate={"image": "debian:bookworm"})
        datapipeline.run_pipeline(
            {
                "Ok": {"type": "ShellCommandActivity", "command": "echo hello"},
                "Fails": {"type": "ShellCommandActivity", "command": "exit 3", "maximumRetries": "0"},
                "Check": {
                    "type": "ShellCommandPrecondition",
                    # No preconditionTimeout: the runner checks once.
                    "command": "exit 1",
                },
                "Guarded": {
                    "type": "ShellCommandActivity",
                    "command": "true",
                    "precondition": {"ref": "Check"},
                },
            },
            worker_group="wg-e2e",
        )
        wait_for(
            lambda: (
                {r.object_id: r.outcome for r in datapipeline.ledger.attempts.values()}.keys()
                >= {"Ok", "Fails", "Check"}
                and all(
                    r.outcome
                    for r in datapipeline.ledger.attempts.values()
                    if r.object_id in ("Ok", "Fails", "Check")
                )
            ),
            timeout=120,
            what="outcomes",
        )
        by_object = {r.object_id: r for r in datapipeline.ledger.attempts.values()}
        assert by_object["Ok"].outcome == "FINISHED"
        assert (by_object["Fails"].outcome, by_object["Fails"].error_id) == ("FAILED", "dptr.ExitCode.3")
        # A precondition that does not hold is FALSE, never FAILED; the activity it guards never runs.
        checks = [r.outcome for r in datapipeline.ledger.attempts.values() if r.object_id == "Check"]
        assert checks == ["FALSE"], checks
        assert "Guarded" not in by_object

        def reporters() -> dict[str, str] | None:
            found = {
                t["spec"]["attemptId"]: t["status"]["report"]["reportedBy"]
                for t in node_cluster.tasks()
                if t["status"].get("report", {}).get("reportedBy")
            }
            return found if len(found) >= 3 else None

        # Who reported is recorded after SetTaskStatus returns: wait for all three.
        reported = wait_for(
            reporters,
            timeout=30,
            what="each PipelineTask recorded who reported",
        )
        # The sidecar in each pod reported; the operator's fallback stayed idle.
        assert all(who.startswith("sidecar/") for who in reported.values()), reported
        datapipeline.assert_clean()
    finally:
        op.stop()
        print(json.dumps(datapipeline.ledger.to_json(include_calls=False), default=str)[:3000])
        print(op.logs()[-8000:])
