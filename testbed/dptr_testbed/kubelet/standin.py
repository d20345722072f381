"""The stand-in process: one fake node, its pods, its log endpoint."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

from .api import Api, ApiError
from .logs import LogServer, self_signed
from .node import NodeAgent, register_until_done
from .pods import PodRunner

JSON = dict[str, Any]
log = logging.getLogger("dptr_testbed.kubelet")

WATCH_SECONDS = 60
WATCH_READ_TIMEOUT = 90.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


class StandIn:
    def __init__(self, kubeconfig: str, node: str, root: Path) -> None:
        self.api = Api(kubeconfig)
        self.node = node
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = Path(kubeconfig).resolve()
        self.lock = threading.Lock()
        self.runners: dict[str, PodRunner] = {}
        self.finished: set[str] = set()
        self.deleting: set[str] = set()
        self.by_name: dict[tuple[str, str], str] = {}
        self.stop_event = threading.Event()
        server = urlparse(self.api.server)
        host, port = server.hostname or "127.0.0.1", server.port or 443
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": str(port),
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        }
        # Images are ignored, so a container's commands are the host's plus
        # this Python environment's console scripts (dptr-sidecar and co.).
        host_path = os.environ.get("PATH") or DEFAULT_PATH
        venv_bin = os.path.dirname(sys.executable)
        self.default_path = host_path if venv_bin in host_path.split(":") else f"{venv_bin}:{host_path}"
        # What stands for every image: this Python environment and the project's
        # code (an editable install points into the checkout).
        self.image_paths = [Path(sys.prefix).resolve(), Path(__file__).resolve().parents[3]]
        cert, key = self_signed(self.root / "pki", node)
        self.log_server = LogServer(self._resolve_log, cert, key, self.api.ca_file)
        self.agent = NodeAgent(self.api, node, self.log_server.port)

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    # ---- what containers must not see -----------------------------------------------
    def hidden_paths(self, targets: Sequence[str]) -> list[Path]:
        """Directories covered by an empty tmpfs in each container: the bed's
        state (keys, admin kubeconfig) and the node's scratch space. Skipped
        when a mount or the working directory lies inside one."""
        state = self.kubeconfig.parent
        candidates = [state] if _under(self.root, state) else [state, self.root]
        keep = [Path(sys.executable).parent, Path(__file__).resolve().parent, Path("/")]
        out = []
        for cand in candidates:
            if any(_under(k, cand) for k in keep):
                continue
            if any(_under(Path(t), cand) or _under(cand, Path(t)) for t in targets if t not in ("", "/")):
                continue
            out.append(cand)
        return out

    # ---- logs -----------------------------------------------------------------------
    def _resolve_log(
        self, namespace: str, pod: str, container: str, previous: bool
    ) -> tuple[Path, Callable[[], bool]] | None:
        with self.lock:
            uid = self.by_name.get((namespace, pod))
            runner = self.runners.get(uid) if uid else None
        if uid is None:
            return None
        name = f"{container}.previous.log" if previous else f"{container}.log"
        path = self.root / "pods" / uid / name
        if not path.exists():
            return None

        def running() -> bool:
            if runner is None or not runner.is_alive():
                return False
            c = runner.container(container)
            return c is not None and c.running

        return path, running

    # ---- pods -------------------------------------------------------------------------
    def sync(self, pod: JSON) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            self.by_name[(meta["namespace"], meta["name"])] = uid
            runner = self.runners.get(uid)
            if runner is not None:
                runner.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if uid not in self.finished and phase not in ("Succeeded", "Failed"):
                try:
                    runner = PodRunner(self, pod)
                except Exception:
                    log.exception("pod %s/%s: cannot run it", meta["namespace"], meta["name"])
                    return
                self.runners[uid] = runner
                runner.start()
                return
            self.finished.add(uid)
        if meta.get("deletionTimestamp"):
            self._finalize(pod)

    def forget(self, pod: JSON) -> None:
        """The pod object is gone from the API: stop its containers at once."""
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.get(uid)
            self.finished.add(uid)
        if runner is not None:
            runner.mark_gone()

    def runner_done(self, runner: PodRunner) -> None:
        with self.lock:
            self.runners.pop(runner.uid, None)
            self.finished.add(runner.uid)
            pod = runner.pod
        if not runner.gone and not self.stopping and pod["metadata"].get("deletionTimestamp"):
            self._finalize(pod)

    def _finalize(self, pod: JSON) -> None:
        """Delete a terminated pod that is being deleted, with grace 0, as kubelet does."""
        meta = pod["metadata"]
        uid = meta["uid"]
        with self.lock:
            if uid in self.deleting:
                return
            self.deleting.add(uid)

        def delete() -> None:
            delay = 0.5
            for _ in range(30):
                try:
                    self.api.request(
                        "DELETE",
                        f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                        body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                    )
                    return
                except ApiError as err:
                    if err.status in (404, 409):
                        return
                    log.warning(
                        "pod %s/%s: delete failed (will retry): %s", meta["namespace"], meta["name"], err
                    )
                if self.stop_event.wait(delay):
                    return
                delay = min(5.0, delay * 2)
            with self.lock:
                self.deleting.discard(uid)

        threading.Thread(target=delete, name=f"delete-{meta['name']}", daemon=True).start()

    def watch_pods(self) -> None:
        path = "/api/v1/pods"
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        version: str | None = None
        while not self.stopping:
            try:
                if version is None:
                    listing = self.api.get(path, selector)
                    version = listing["metadata"]["resourceVersion"]
                    present = set()
                    for pod in listing.get("items") or []:
                        present.add(pod["metadata"]["uid"])
                        self.sync(pod)
                    with self.lock:
                        missing = [r for uid, r in self.runners.items() if uid not in present]
                    for runner in missing:
                        runner.mark_gone()
                query = dict(
                    selector,
                    resourceVersion=version,
                    allowWatchBookmarks="true",
                    timeoutSeconds=str(WATCH_SECONDS),
                )
                for event in self.api.watch(path, query, WATCH_READ_TIMEOUT):
                    if self.stopping:
                        return
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            version = None
                        else:
                            log.warning("pod watch error: %s", obj.get("message"))
                        break
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if kind == "BOOKMARK":
                        continue
                    if kind == "DELETED":
                        self.forget(obj)
                    else:
                        self.sync(obj)
            except ApiError as err:
                if err.status == 410:
                    version = None
                log.warning("pod watch failed (will retry): %s", err)
                self.stop_event.wait(1)
            except Exception:
                log.exception("pod watch failed (will retry)")
                self.stop_event.wait(1)

    # ---- process ------------------------------------------------------------------------
    def run(self) -> None:
        self.log_server.serve_in_thread()
        register_until_done(self.agent, self.stop_event)
        threading.Thread(
            target=self.agent.heartbeat, args=(self.stop_event,), name="heartbeat", daemon=True
        ).start()
        log.info("node %s ready; kubelet endpoint on 127.0.0.1:%d", self.node, self.log_server.port)
        self.watch_pods()

    def shutdown(self) -> None:
        """Stop: kill every container (the node goes away with its pods)."""
        self.stop_event.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.kill_all()
        deadline = time.monotonic() + 5
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dptr_testbed.kubelet",
        description="The dptr test bed's kubelet stand-in: runs the pods of one fake node as local processes.",
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--root", required=True, help="the node's scratch directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s",
    )
    standin = StandIn(args.kubeconfig, args.node, Path(args.root))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        standin.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    standin.run()
