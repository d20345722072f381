"""What every layer of the operator shares: the leaves, built once by ``runtime``.

The operator is a stack (each module imports only those below it; tests/unit/
test_imports.py checks the order):

1. leaves: config, index, metrics, events, status writer, health, history, tenancy,
   the work pool, pure assessments (outcomes), and this bundle of them;
2. polling: one RunnerWorker per TaskRunner, given the leaves and plain callables;
3. runners: the workers by key, their heartbeat plans and status requests;
4. reporter: reports, cancels and task completion;
5. heartbeats (the operator's own ReportTaskProgress scheduler), pods (what pods and
   Jobs say, and the reports of problems past their grace), endings (what follows an
   attempt's end and a TaskRunner's deletion: the finalizers);
6. dispatch: a polled task to a PipelineTask and a Job;
7. runtime: builds them, routes watch events, sweeps, finalizers; then main and cli.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from dptr_common.kube import KubeClient
from dptr_operator.config import OperatorConfig
from dptr_operator.events import EventRecorder
from dptr_operator.index import TaskIndex
from dptr_operator.metrics import Metrics
from dptr_operator.statuswriter import StatusWriter
from dptr_operator.workpool import WorkPool

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    config: OperatorConfig
    kube: KubeClient
    index: TaskIndex
    metrics: Metrics
    events: EventRecorder
    status_writer: StatusWriter
    work: WorkPool
    #: Set while this process holds the lease: only the leader polls and heartbeats.
    leading: threading.Event = field(default_factory=threading.Event)
