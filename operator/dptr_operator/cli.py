"""``dptr-operator``: start the HTTP probes, win the Lease, rebuild, then run kopf."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from dptr_common import logformat
from dptr_common.kube import KubeClient
from dptr_operator.config import OperatorConfig, parse_args
from dptr_operator.health import HealthServer, HealthState
from dptr_operator.leader import LeaderElector
from dptr_operator.metrics import Metrics

__all__ = ["main"]

log = logging.getLogger("dptr_operator")


def _kube(config: OperatorConfig) -> KubeClient:
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # for kopf's own login too
        return KubeClient.from_kubeconfig(config.kubeconfig)
    return KubeClient.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logformat.configure(config.log_level, config.log_format)
    for noisy in ("botocore", "urllib3", "aiohttp", "kubernetes", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kube = _kube(config)
    metrics = Metrics()
    health = HealthState()
    server = HealthServer(config.http_host, config.http_port, health, metrics)
    server.start()
    print(f"dptr-operator: http port {server.port}", flush=True)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    elector: LeaderElector | None = None
    if config.leader_election:

        def lost() -> None:
            log.critical("lost the leader Lease: exiting so that only one replica polls")
            os._exit(3)

        elector = LeaderElector(
            kube,
            config.effective_lease_namespace,
            config.lease_name,
            config.identity,
            duration=config.lease_duration_seconds,
            renew=config.lease_renew_seconds,
            on_lost=lost,
        )
        leader = elector
        metrics.lease_transitions.set_function(lambda: float(leader.transitions))
        if not elector.acquire(stop):
            return 0
        elector.start_renewing()

    # Imported after the Lease: a standby replica stays small.
    import kopf
    from kopf._core.engines.peering import Identity  # kopf.operator's type; not re-exported

    from dptr_operator.main import build_registry
    from dptr_operator.runtime import Operator

    op = Operator(config, kube, metrics=metrics, health=health)
    op.start()
    registry = build_registry(op, config)

    async def run() -> None:
        stop_flag: asyncio.Event = asyncio.Event()
        ready_flag: asyncio.Event = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop_flag.set)
        loop.add_signal_handler(signal.SIGINT, stop_flag.set)
        if stop.is_set():
            stop_flag.set()

        async def mark_ready() -> None:
            await ready_flag.wait()
            health.watching = True

        ready_task = asyncio.create_task(mark_ready())
        try:
            await kopf.operator(
                registry=registry,
                standalone=True,
                clusterwide=config.all_namespaces,
                namespaces=config.namespaces,
                stop_flag=stop_flag,
                ready_flag=ready_flag,
                # kopf would derive one from the process' user name, and a uid without a
                # passwd entry (OpenShift's arbitrary uids, runAsUser in a distroless
                # image) crashes getpass.getuser(); dptr already has one per replica.
                identity=Identity(config.identity),
            )
        finally:
            ready_task.cancel()

    try:
        asyncio.run(run())
    finally:
        op.stop()
        if elector is not None:
            elector.release()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
