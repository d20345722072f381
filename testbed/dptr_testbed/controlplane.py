"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, plus kubelet stand-ins.

Everything runs as child processes of the :class:`Testbed`; state (PKI, etcd
data, logs, kubeconfigs) lives under one state directory, so two beds can run
side by side on free ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import binaries
from .pki import CertPair, Pki

if TYPE_CHECKING:
    from .images import BuiltImages
    from .realnode import RealNode

SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


def run_kubectl(kubeconfig: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """Run the bed's own kubectl against ``kubeconfig`` and return stdout."""
    bins = binaries.Binaries(binaries.bin_dir())
    proc = subprocess.run(
        [str(bins.kubectl), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        input=input,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


class StartupError(RuntimeError):
    """A component did not come up; the message carries its log tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def kubeconfig_yaml(server: str, ca: Path, client: CertPair, user: str) -> str:
    # JSON is valid YAML, and keeps this free of a YAML dependency.
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "dptr-testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [
                {
                    "name": user,
                    "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
                }
            ],
            "contexts": [{"name": "dptr-testbed", "context": {"cluster": "dptr-testbed", "user": user}}],
            "current-context": "dptr-testbed",
        },
        indent=2,
    )


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        # A new session per component, so a Ctrl-C at the terminal reaches
        # only the bed, which then stops its children in order.
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        out.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def failure(self, why: str) -> StartupError:
        return StartupError(f"{self.name} {why}; last lines of {self.log}:\n{_tail(self.log)}")


@dataclass
class Testbed:
    """One control plane and its fake nodes under ``state_dir``."""

    state_dir: Path
    nodes: Sequence[str] = ("node-1",)
    kubelet: bool = True
    # Node lifecycle timing: the defaults (40 s grace) make node-loss tests slow.
    node_monitor_grace_period: str = "20s"
    components: dict[str, Component] = field(default_factory=dict)
    apiserver_port: int = 0
    etcd_port: int = 0
    # --real-node: the first node is a real kubelet with containerd, CNI and
    # kube-proxy (see realnode.py) instead of a stand-in.
    real_node: bool = False
    node_handle: RealNode | None = None
    built_images: BuiltImages | None = None
    images_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.pki = Pki(self.state_dir / "pki")
        self.logs = self.state_dir / "logs"

    # ---- paths -------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "testbed.json"

    # ---- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        bins = binaries.ensure(node=self.real_node)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.etcd_port = free_port()
        self.apiserver_port = free_port()
        try:
            if self.real_node:
                self._prepare_real_node()
            self._start_etcd(bins, timeout)
            self._start_apiserver(bins, timeout)
            self._start_controllers(bins)
            if self.real_node:
                self._start_real_node(timeout)
            elif self.kubelet:
                for node in self.nodes:
                    self.start_node(node)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.info_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "server": self.server,
                    "kubeconfig": str(self.kubeconfig),
                    "nodes": list(self.nodes),
                    "components": {n: c.proc.pid for n, c in self.components.items() if c.proc},
                    "realNode": self._real_node_info(),
                },
                indent=2,
            )
        )

    def stop(self) -> None:
        if self.node_handle is not None:
            # First drain the real node's pods while the API server still runs,
            # then stop its processes and undo its host changes.
            self.node_handle.stop(drain=self._drain_pods)
            self.node_handle = None
        # Reverse start order: nodes, controllers, apiserver, etcd.
        for comp in reversed(list(self.components.values())):
            comp.stop()
        self.info_file.unlink(missing_ok=True)

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- components --------------------------------------------------------
    def _start_etcd(self, bins: binaries.Binaries, timeout: float) -> None:
        peer = free_port()
        url = f"http://127.0.0.1:{self.etcd_port}"
        comp = Component(
            "etcd",
            [
                str(bins.etcd),
                "--name=testbed",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
                # A test bed trades durability for speed.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.logs / "etcd.log",
        )
        self.components["etcd"] = comp
        comp.start()
        self._wait_http(comp, f"{url}/health", timeout)

    def _start_apiserver(self, bins: binaries.Binaries, timeout: float) -> None:
        node_ips = (self.node_handle.address,) if self.node_handle is not None else ()
        serving = self.pki.issue(
            "apiserver",
            cn="kube-apiserver",
            server=True,
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ips=("127.0.0.1", "10.96.0.1", *node_ips),
        )
        kubelet_client = self.pki.issue(
            "apiserver-kubelet-client", cn="kube-apiserver-kubelet-client", org="system:masters", client=True
        )
        sa = self.pki.service_account_keys()
        admin = self.pki.issue("admin", cn="dptr-testbed-admin", org="system:masters", client=True)
        self.kubeconfig.write_text(kubeconfig_yaml(self.server, self.pki.ca.cert, admin, "admin"))
        comp = Component(
            "kube-apiserver",
            [
                str(bins.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                *self._apiserver_network_flags(),
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.pki.ca.cert}",
                # A real kubelet authenticates as system:node:<name>: the Node
                # authorizer and NodeRestriction admission serve it.
                "--authorization-mode=" + ("Node,RBAC" if self.real_node else "RBAC"),
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,"
                "DefaultTolerationSeconds,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
                "ValidatingAdmissionPolicy" + (",NodeRestriction" if self.real_node else ""),
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            self.logs / "kube-apiserver.log",
        )
        self.components["kube-apiserver"] = comp
        comp.start()
        self._wait_http(comp, f"{self.server}/readyz", timeout, tls=(admin, self.pki.ca.cert))

    def _apiserver_network_flags(self) -> list[str]:
        if self.node_handle is None:
            # Loopback cannot be a Service endpoint; the bed has no
            # pod network, so the kubernetes Service keeps no endpoints.
            return [
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
            ]
        # With a real node, pods reach the API server through the kubernetes
        # Service, whose endpoint is the advertised address: the pod bridge's
        # gateway on this host. The host itself keeps using 127.0.0.1.
        return [
            "--bind-address=0.0.0.0",
            f"--advertise-address={self.node_handle.address}",
            # The node's name does not resolve; logs and exec go to its InternalIP.
            "--kubelet-preferred-address-types=InternalIP",
        ]

    # ---- the real node (--real-node) -----------------------------------------
    def _prepare_real_node(self) -> None:
        from . import images, realnode

        if len(self.nodes) != 1:
            raise StartupError("--real-node runs exactly one node")
        handle = realnode.RealNode(self.state_dir / "node", self.nodes[0], self.pki, self.server)
        try:
            handle.prepare()
            started = time.monotonic()
            self.built_images = images.ensure_all()
            self.images_seconds = time.monotonic() - started
        except (realnode.RealNodeError, images.ImageBuildError) as err:
            handle.stop()
            raise StartupError(str(err)) from err
        self.node_handle = handle

    def _start_real_node(self, timeout: float) -> None:
        from . import realnode

        assert self.node_handle is not None and self.built_images is not None
        try:
            self.components.update(self.node_handle.start(self.built_images, timeout))
        except realnode.RealNodeError as err:
            raise StartupError(str(err)) from err

    def _drain_pods(self) -> None:
        self.kubectl(
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=0",
            "--force",
            "--wait=false",
            check=False,
        )

    def _real_node_info(self) -> dict[str, object] | None:
        if self.node_handle is None:
            return None
        return {
            "name": self.node_handle.name,
            "address": self.node_handle.address,
            "containerdSocket": str(self.node_handle.containerd_socket),
            "imagesSeconds": round(self.images_seconds, 1),
            "importSeconds": round(self.node_handle.import_seconds, 1),
        }

    def _component_kubeconfig(self, name: str, cn: str) -> Path:
        pair = self.pki.issue(name, cn=cn, client=True)
        path = self.state_dir / f"{name}.kubeconfig"
        path.write_text(kubeconfig_yaml(self.server, self.pki.ca.cert, pair, cn))
        return path

    def _start_controllers(self, bins: binaries.Binaries) -> None:
        kcm_kc = self._component_kubeconfig("kube-controller-manager", "system:kube-controller-manager")
        sched_kc = self._component_kubeconfig("kube-scheduler", "system:kube-scheduler")
        sa = self.pki.service_account_keys()
        kcm = Component(
            "kube-controller-manager",
            [
                str(bins.kube_controller_manager),
                f"--kubeconfig={kcm_kc}",
                f"--authentication-kubeconfig={kcm_kc}",
                f"--authorization-kubeconfig={kcm_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={self.pki.ca.cert}",
                f"--cluster-signing-cert-file={self.pki.ca.cert}",
                f"--cluster-signing-key-file={self.pki.ca.key}",
                f"--node-monitor-grace-period={self.node_monitor_grace_period}",
                "--controllers=*",
                "--v=1",
            ],
            self.logs / "kube-controller-manager.log",
        )
        sched = Component(
            "kube-scheduler",
            [
                str(bins.kube_scheduler),
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
            self.logs / "kube-scheduler.log",
        )
        for comp in (kcm, sched):
            self.components[comp.name] = comp
            comp.start()

    def start_node(self, node: str) -> Component:
        """Start (or restart) the kubelet stand-in for ``node``."""
        name = f"kubelet-{node}"
        comp = Component(
            name,
            [
                sys.executable,
                "-m",
                "dptr_testbed.kubelet",
                f"--kubeconfig={self.kubeconfig}",
                f"--node={node}",
                f"--root={self.state_dir / 'nodes' / node}",
            ],
            self.logs / f"{name}.log",
        )
        self.components[name] = comp
        comp.start()
        return comp

    def stop_node(self, node: str, *, kill: bool = True) -> None:
        """Stop a node's stand-in; with ``kill`` it dies like a lost node."""
        comp = self.components.get(f"kubelet-{node}")
        if comp is None:
            return
        if kill:
            comp.kill()
        else:
            comp.stop()

    def restart_apiserver(self, timeout: float = 60.0) -> None:
        comp = self.components["kube-apiserver"]
        comp.stop()
        comp.start()
        admin = self.pki.issue("admin", cn="dptr-testbed-admin", org="system:masters", client=True)
        self._wait_http(comp, f"{self.server}/readyz", timeout, tls=(admin, self.pki.ca.cert))

    # ---- readiness ---------------------------------------------------------
    def _wait_http(
        self,
        comp: Component,
        url: str,
        timeout: float,
        tls: tuple[CertPair, Path] | None = None,
    ) -> None:
        ctx = None
        if tls is not None:
            ctx = ssl.create_default_context(cafile=str(tls[1]))
            ctx.load_cert_chain(str(tls[0].cert), str(tls[0].key))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not comp.alive():
                raise comp.failure("exited during startup")
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as err:
                last = str(err)
            time.sleep(0.3)
        raise comp.failure(f"was not healthy at {url} within {timeout:.0f}s ({last})")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return run_kubectl(self.kubeconfig, *args, check=check, input=input)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for comp in self.components.values():
                if not comp.alive():
                    raise comp.failure("exited during startup")
            # The default ServiceAccount appears once the controllers run;
            # nodes appear once the stand-ins registered and report Ready.
            sa = self.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name", check=False)
            ready = True
            if self.kubelet:
                out = self.kubectl(
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
                    check=False,
                )
                states = dict(line.split("=", 1) for line in out.split() if "=" in line)
                ready = all(states.get(n) == "True" for n in self.nodes)
            if sa.strip() and ready:
                return
            time.sleep(0.5)
        raise StartupError(
            "the control plane did not become ready in time; logs are in "
            f"{self.logs}:\n" + "\n".join(f"--- {n}\n{_tail(c.log, 10)}" for n, c in self.components.items())
        )


@dataclass(frozen=True)
class RunningTestbed:
    """A handle on a bed started by another process (``dptr-testbed up``)."""

    state_dir: Path
    server: str
    kubeconfig: Path

    @classmethod
    def attach(cls, state_dir: Path) -> RunningTestbed:
        info = json.loads((Path(state_dir) / "testbed.json").read_text())
        return cls(Path(state_dir), info["server"], Path(info["kubeconfig"]))

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return run_kubectl(self.kubeconfig, *args, check=check, input=input)
