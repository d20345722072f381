"""A repeated poll of the same attempt creates nothing new (dispatch run in-process)."""

from __future__ import annotations

import pytest
from op_helpers import Cluster

from dptr_common.kube import KubeClient
from dptr_common.models import TaskRunner
from dptr_datapipeline import LocalDataPipeline
from dptr_operator.config import OperatorConfig
from dptr_operator.runtime import Operator
from dptr_testbed.waiting import wait_for

pytestmark = pytest.mark.cluster


def test_same_attempt_dispatched_twice_makes_one_pipelinetask_and_one_job(cluster: Cluster) -> None:
    # Time at 1/10 here, not the fixture's 1/100: the 2-minute ack window (12 s, not
    # 1.2 s) must outlast two dispatches on a busy machine, or Data Pipeline takes the
    # attempt back before the Job is made (a CI run under load made none).
    with LocalDataPipeline(time_scale=0.1) as datapipeline:
        cluster.create_runner(datapipeline, "wg-repeat")
        pipeline = datapipeline.run_pipeline(
            {"Echo": {"type": "ShellCommandActivity", "command": "echo hi"}}, worker_group="wg-repeat"
        )
        # Everything is ready before the poll: an operator acks at once, so the test must
        # not be slower than the ack window.
        op = Operator(
            OperatorConfig(namespaces=[cluster.namespace], time_scale=0.1, identity="in-process"),
            KubeClient.from_kubeconfig(cluster.testbed.kubeconfig),
        )
        op.services.leading.set()
        client = datapipeline.client()
        try:
            worker, _ = op.runners.upsert(TaskRunner.from_k8s(cluster.runner()))
            raw = wait_for(
                lambda: client.poll_for_task(workerGroup="wg-repeat", hostname="test").get("taskObject"),
                timeout=20,
                what="a task",
            )
            op.dispatcher.dispatch(worker, raw)
            op.dispatcher.dispatch(worker, raw)
            assert len(cluster.tasks()) == 1
            assert len(cluster.jobs()) == 1
            assert cluster.tasks()[0]["status"]["jobName"] == cluster.jobs()[0]["metadata"]["name"]
            assert op.index.active_count((cluster.namespace, "runner")) == 1
            client.deactivate_pipeline(pipelineId=pipeline, cancelActive=True)
            datapipeline.assert_clean()
        finally:
            op.stop()
