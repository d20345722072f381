"""A real node for the test bed: containerd (CRI), kubelet, CNI and kube-proxy.

The default bed runs pods with a kubelet stand-in; this module runs them for
real, the way a user's cluster does:

- containerd 1.6 from Debian with its CRI plugin, its root, state, socket and
  config under ``<state>/node``, and the locally built pause image as the
  sandbox image (no registry is reachable);
- kubelet v1.34 (built from the same Go modules as the control plane), with
  ``cgroupDriver: cgroupfs`` and ``failCgroupV1: false``: these machines mount
  cgroups as a v1/v2 hybrid, where the v1 hierarchies hold the controllers, and
  1.34 still runs there when told to;
- CNI from Debian's containernetworking-plugins: a ``bridge`` (``dptr0``,
  gateway 10.244.0.1) with ``host-local`` IPAM;
- kube-proxy in iptables mode, so pods reach the API server through the
  ``kubernetes`` Service (10.96.0.1:443), whose endpoint is the API server on
  the bridge's gateway address.

It changes the host (a bridge, sysctls, iptables chains, cgroups, network
namespaces), so it needs root, runs at most once per machine (a lock in /run)
and undoes what it did on stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import binaries, images
from .controlplane import SERVICE_CIDR, Component, free_port, kubeconfig_yaml
from .pki import Pki

BRIDGE = "dptr0"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
LOCK_FILE = Path("/run/dptr-realnode.lock")
NETNS_DIR = Path("/var/run/netns")

# Debian packages the real node and the image builds need, by the command each provides.
PACKAGES = {
    "runc": "runc",
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "podman": "podman",
    "buildah": "buildah",
    "debootstrap": "debootstrap",
    "iptables": "iptables",
    "ip": "iproute2",
    # Not the node's: the proxy server tests/parity/test_parity_proxy.py runs on loopback.
    "tinyproxy": "tinyproxy",
    # Not the node's: the database servers tests/conftest.py (dptr_testbed.databases) runs on
    # loopback.  The server binaries are off PATH in /usr/lib/postgresql/<version>/bin;
    # pg_ctlcluster (postgresql-common, which every server version depends on) stands for them.
    "pg_ctlcluster": "postgresql",
    "mariadbd": "mariadb-server",
    # Not the node's: the Prometheus and promtool the alert and dashboard tests run
    # (dptr_testbed.prometheus).
    "prometheus": "prometheus",
    "promtool": "prometheus",
}
CNI_PACKAGE = "containernetworking-plugins"
CGROUP_V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer")


class RealNodeError(RuntimeError):
    """The machine lacks something the real node needs, or a component failed."""


def gateway_address(subnet: str = POD_SUBNET) -> str:
    """The bridge's own address: the pods' gateway, the node IP and the API server's advertised address."""
    return str(next(ipaddress.ip_network(subnet).hosts()))


# ---- prerequisites ---------------------------------------------------------
def missing_prerequisites(*, with_kube_binaries: bool = True) -> list[str]:
    """Everything this machine lacks for a real node, each as a readable line."""
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root: the real node changes the host (bridge, iptables, cgroups); run as root")
    for tool, package in PACKAGES.items():
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            missing.append(f"{tool} (Debian package {package})")
    for plugin in CNI_PLUGINS:
        if not (CNI_BIN_DIR / plugin).exists():
            missing.append(f"CNI plugin {CNI_BIN_DIR / plugin} (Debian package {CNI_PACKAGE})")
    if shutil.which("go") is None:
        missing.append("the Go toolchain (go on PATH), to build kubelet, kube-proxy and the pause image")
    for ctl in ("cpu", "memory", "pids"):
        if not Path("/sys/fs/cgroup", ctl).is_dir() and not _cgroup2_has(ctl):
            missing.append(f"the {ctl} cgroup controller (neither a v1 hierarchy nor in cgroup2)")
    if not Path("/dev/kmsg").exists():
        missing.append("/dev/kmsg (kubelet's OOM watcher reads it)")
    if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        missing.append(
            "bridge netfilter (/proc/sys/net/bridge/bridge-nf-call-iptables; modprobe br_netfilter)"
        )
    if with_kube_binaries:
        bins = binaries.bin_dir()
        missing += [
            f"{bins / name} (`dptr-testbed build --node`)"
            for name in binaries.NODE
            if not (bins / name).exists()
        ]
    return missing


def _cgroup2_has(ctl: str) -> bool:
    for path in (
        Path("/sys/fs/cgroup/cgroup.controllers"),
        Path("/sys/fs/cgroup/unified/cgroup.controllers"),
    ):
        try:
            if ctl in path.read_text().split():
                return True
        except OSError:
            continue
    return False


def install_prerequisites() -> None:
    """apt-get install the Debian packages the real node needs (as root)."""
    packages = sorted({*PACKAGES.values(), CNI_PACKAGE})
    absent = [line for line in missing_prerequisites(with_kube_binaries=False) if "Debian package" in line]
    if not absent:
        return  # all there: spare CI an apt-get update
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], check=True, env=env
    )


def cgroup_mode() -> str:
    """``v1``, ``hybrid`` or ``v2``: how this machine mounts cgroups."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/unified").is_dir():
        return "hybrid"
    return "v1"


# ---- helpers ---------------------------------------------------------------
def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _read_sysctl(name: str) -> str:
    return (Path("/proc/sys") / name.replace(".", "/")).read_text().strip()


def _write_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as err:
        raise RealNodeError(f"cannot set sysctl {name}={value}: {err}") from err


def _json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# ---- the node --------------------------------------------------------------
@dataclass
class RealNode:
    """containerd + kubelet + CNI + kube-proxy for one node of a bed.

    ``prepare()`` takes the machine-wide lock and brings up the bridge (before
    the API server starts, as it advertises the bridge's address);
    ``start()`` runs the node's processes once the control plane is up;
    ``stop()`` drains the pods and undoes everything.
    """

    root: Path  # <state>/node
    name: str
    pki: Pki
    server: str  # how host processes reach the API server, e.g. https://127.0.0.1:PORT
    subnet: str = POD_SUBNET
    components: dict[str, Component] = field(default_factory=dict)
    import_seconds: float = 0.0
    kubelet_healthz: str = ""
    _lock: IO[str] | None = None
    _netns_before: set[str] = field(default_factory=set)
    _bridge_created: bool = False
    _sysctls_before: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return gateway_address(self.subnet)

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def runtime_endpoint(self) -> str:
        return f"unix://{self.containerd_socket}"

    # ---- host setup ----------------------------------------------------------
    def prepare(self) -> None:
        missing = missing_prerequisites()
        if missing:
            raise RealNodeError(
                "this machine cannot run the real node; missing:\n  - "
                + "\n  - ".join(missing)
                + "\n(`dptr-testbed node-prereqs --install` installs the Debian packages, "
                "`dptr-testbed build --node` builds kubelet and kube-proxy)"
            )
        if len(str(self.containerd_socket)) > 100:
            raise RealNodeError(f"the state dir path is too long for a unix socket: {self.containerd_socket}")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        lock = LOCK_FILE.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock.seek(0)
            lock.close()
            raise RealNodeError(
                f"another real node runs on this machine (lock {LOCK_FILE} is held); only one at a time"
            ) from err
        lock.truncate(0)
        lock.write(str(self.root))
        lock.flush()
        self._lock = lock
        self.root.mkdir(parents=True, exist_ok=True)
        self._netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
        self._setup_bridge()
        for name, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.bridge.bridge-nf-call-ip6tables", "1"),
        ):
            self._sysctls_before.setdefault(name, _read_sysctl(name))
            _write_sysctl(name, value)

    def _setup_bridge(self) -> None:
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
            self._bridge_created = True
        addrs = _sh("ip", "-4", "-o", "addr", "show", "dev", BRIDGE).stdout
        if f" {self.address}/{prefix} " not in addrs:
            _sh("ip", "addr", "add", f"{self.address}/{prefix}", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")

    # ---- processes ------------------------------------------------------------
    def start(self, images_to_load: images.BuiltImages, timeout: float = 120.0) -> dict[str, Component]:
        """Start containerd, load the images, then kubelet and kube-proxy; return the processes."""
        bins = binaries.ensure(node=True)
        self._start_containerd(timeout)
        started = time.monotonic()
        for archive in images_to_load.archives.values():
            self.import_image(archive)
        self.import_seconds = time.monotonic() - started
        self._start_kubelet(bins)
        self._start_kube_proxy(bins)
        return dict(self.components)

    def _launch(self, key: str, name: str, argv: list[str], log: str) -> Component:
        comp = Component(name, argv, self.logs / log)
        self.components[key] = comp
        comp.start()
        return comp

    def _start_containerd(self, timeout: float) -> None:
        base = self.root / "containerd"
        cni_conf = self.root / "cni" / "net.d"
        for sub in ("root", "state", "opt"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.containerd_socket.unlink(missing_ok=True)
        _json(
            cni_conf / "10-dptr.conflist",
            {
                "cniVersion": "1.0.0",
                "name": "dptr",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": True,
                        # Pods only talk to the node (API server, local services):
                        # no masquerading out of the machine.
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": self.subnet, "gateway": self.address}]],
                            # The node is on-link; Services go through it. No
                            # default route: pods have no business elsewhere.
                            "routes": [{"dst": SERVICE_CIDR, "gw": self.address}],
                            "dataDir": str(self.root / "cni" / "ipam"),
                        },
                    }
                ],
            },
        )
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"

[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  enable_selinux = false
  # Root here lacks CAP_SYS_RESOURCE, so nothing may lower oom_score_adj
  # (runc fails with "can't get final child's PID from pipe"): keep every
  # container's at or above containerd's own.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""
        conf = base / "config.toml"
        conf.write_text(config)
        comp = self._launch(
            "containerd",
            "containerd",
            ["containerd", f"--config={conf}", "--log-level=warn"],
            "containerd.log",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not comp.alive():
                raise RealNodeError(
                    f"containerd exited during startup:\n{_tail(self.logs / 'containerd.log')}"
                )
            if self.containerd_socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RealNodeError(
            f"containerd did not answer within {timeout:.0f}s:\n{_tail(self.logs / 'containerd.log')}"
        )

    @property
    def logs(self) -> Path:
        return self.root.parent / "logs"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _sh("ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args, check=check)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _kubeconfig(self, name: str, cn: str, org: str | None) -> Path:
        pair = self.pki.issue(f"{name}-{self.name}", cn=cn, org=org, client=True)
        path = self.root / f"{name}.kubeconfig"
        path.write_text(kubeconfig_yaml(self.server, self.pki.ca.cert, pair, cn))
        return path

    def _start_kubelet(self, bins: binaries.Binaries) -> None:
        kubeconfig = self._kubeconfig("kubelet", f"system:node:{self.name}", "system:nodes")
        serving = self.pki.issue(
            f"kubelet-serving-{self.name}",
            cn=f"system:node:{self.name}",
            org="system:nodes",
            server=True,
            dns=(self.name, "localhost"),
            ips=(self.address, "127.0.0.1"),
        )
        config = _json(
            self.root / "kubelet" / "config.json",
            {
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "KubeletConfiguration",
                # These machines mount cgroups as a v1/v2 hybrid (controllers on
                # the v1 hierarchies). 1.34 kubelet runs on v1 only when asked.
                "cgroupDriver": "cgroupfs",
                "failCgroupV1": False,
                "containerRuntimeEndpoint": self.runtime_endpoint,
                "address": self.address,
                "port": free_port(),
                "readOnlyPort": 0,
                "healthzBindAddress": "127.0.0.1",
                "healthzPort": free_port(),
                "tlsCertFile": str(serving.cert),
                "tlsPrivateKeyFile": str(serving.key),
                "authentication": {
                    "anonymous": {"enabled": False},
                    "webhook": {"enabled": True},
                    "x509": {"clientCAFile": str(self.pki.ca.cert)},
                },
                "authorization": {"mode": "Webhook"},
                "clusterDomain": "cluster.local",
                "resolvConf": "/etc/resolv.conf",
                "failSwapOn": False,
                # A shared test machine: never evict or collect images because
                # the disk is fuller than a real node's would be.
                "evictionHard": {
                    "memory.available": "100Mi",
                    "nodefs.available": "1%",
                    "nodefs.inodesFree": "1%",
                    "imagefs.available": "1%",
                },
                "imageGCHighThresholdPercent": 100,
                "imageGCLowThresholdPercent": 99,
                "serializeImagePulls": False,
                "maxPods": 50,
                "registerNode": True,
                "protectKernelDefaults": False,
                "makeIPTablesUtilChains": False,
                "localStorageCapacityIsolation": True,
                "syncFrequency": "10s",
                "fileCheckFrequency": "10s",
                "nodeStatusUpdateFrequency": "5s",
                "shutdownGracePeriod": "0s",
            },
        )
        self.kubelet_healthz = f"http://127.0.0.1:{json.loads(config.read_text())['healthzPort']}/healthz"
        self._launch(
            "kubelet",
            f"kubelet-{self.name}",
            [
                str(bins.path("kubelet")),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.root / 'kubelet' / 'root'}",
                f"--cert-dir={self.root / 'kubelet' / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.address}",
                "--v=1",
            ],
            f"kubelet-{self.name}.log",
        )

    def _start_kube_proxy(self, bins: binaries.Binaries) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "system:kube-proxy", None)
        config = _json(
            self.root / "kube-proxy" / "config.json",
            {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "iptables",
                "clientConnection": {"kubeconfig": str(kubeconfig)},
                "hostnameOverride": self.name,
                "clusterCIDR": CLUSTER_CIDR,
                "bindAddress": self.address,
                "healthzBindAddress": f"127.0.0.1:{free_port()}",
                "metricsBindAddress": f"127.0.0.1:{free_port()}",
                # Leave the host's conntrack sysctls alone.
                "conntrack": {
                    "maxPerCore": 0,
                    "min": 0,
                    "tcpEstablishedTimeout": "0s",
                    "tcpCloseWaitTimeout": "0s",
                },
                "iptables": {"localhostNodePorts": False, "syncPeriod": "10s", "minSyncPeriod": "0s"},
                "nodePortAddresses": [f"{self.address}/32"],
            },
        )
        self._launch(
            "kube-proxy",
            "kube-proxy",
            [str(bins.path("kube-proxy")), f"--config={config}", "--v=1"],
            "kube-proxy.log",
        )

    # ---- teardown -------------------------------------------------------------
    def stop(self, drain: Callable[[], None] | None = None, timeout: float = 30.0) -> None:
        """Drain pods (``drain`` deletes them through the API), then undo everything.

        Safe to call after a failed or partial start; a node that never took
        the machine's lock has changed nothing and does nothing here.
        """
        if self._lock is None:
            return
        if drain is not None and "kubelet" in self.components and self.components["kubelet"].alive():
            try:
                drain()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and self._running_tasks():
                    time.sleep(0.5)
            except Exception:
                pass
        for name in ("kube-proxy", "kubelet"):
            comp = self.components.get(name)
            if comp is not None:
                comp.stop()
        if "containerd" in self.components and self.components["containerd"].alive():
            self._kill_tasks()
        comp = self.components.get("containerd")
        if comp is not None:
            comp.stop()
        self._cleanup_host()

    def _running_tasks(self) -> list[str]:
        out = self.ctr("tasks", "ls", "-q", check=False).stdout
        return [line for line in out.split() if line]

    def _kill_tasks(self) -> None:
        # Whatever the kubelet left running (it was stopped, or the drain timed
        # out): kill every task, then remove containers so shims unmount.
        for task in self._running_tasks():
            self.ctr("tasks", "kill", "--signal=SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listing = self.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]
            if all("RUNNING" not in line for line in listing):
                break
            time.sleep(0.2)
        for task in self._running_tasks():
            self.ctr("tasks", "delete", "--force", task, check=False)

    def _cleanup_host(self) -> None:
        bins = binaries.Binaries(binaries.bin_dir())
        kube_proxy = bins.path("kube-proxy")
        if kube_proxy.exists():
            # Removes the KUBE-* chains kube-proxy installed.
            subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True, check=False)
        _remove_kube_chains()
        # Network namespaces the CRI made and no kubelet tore down.
        if NETNS_DIR.is_dir():
            for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
                if name.startswith("cni-"):
                    subprocess.run(["umount", "-l", str(NETNS_DIR / name)], capture_output=True, check=False)
                    (NETNS_DIR / name).unlink(missing_ok=True)
        # Mounts left under the node's root (container rootfs, kubelet volumes).
        root = str(self.root) + "/"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(root)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        _remove_empty_cgroups()
        if self._bridge_created or _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            _sh("ip", "link", "delete", BRIDGE, check=False)
        for name, value in self._sysctls_before.items():
            with contextlib.suppress(RealNodeError):
                _write_sysctl(name, value)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _remove_kube_chains() -> None:
    """Remove every KUBE-* chain (and the jumps to them) that kubelet or kube-proxy left.

    kube-proxy --cleanup leaves kubelet's own (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...).
    Only one real node runs per machine, so these are all ours.
    """
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            rules = _sh(tool, "-t", table, "-S", check=False).stdout.splitlines()
            chains = [line.split()[1] for line in rules if line.startswith("-N KUBE-")]
            for line in rules:
                parts = line.split()
                if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and "KUBE-" in line:
                    _sh(tool, "-t", table, "-D", *parts[1:], check=False)
            for chain in chains:
                _sh(tool, "-t", table, "-F", chain, check=False)
            for chain in chains:
                _sh(tool, "-t", table, "-X", chain, check=False)


def _remove_empty_cgroups() -> None:
    """rmdir the pod cgroups kubelet and containerd made, where empty (bottom-up)."""
    for top in Path("/sys/fs/cgroup").glob("*/*"):
        if top.name not in ("kubepods", "k8s.io") or not top.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
