"""Harness for the real-node tests: a bed with a real kubelet, containerd, CNI and kube-proxy.

One bed (``dptr-testbed up --real-node``) serves every test here, and every
xdist worker: only one real node can run on a machine. As with the shared
control plane in tests/conftest.py, the first worker to ask starts it as a
detached process (under a file lock) and the others attach; the pid file
``<basetemp>/realnode/testbed.pid`` lets tests/conftest.py's
``pytest_sessionfinish`` stop it when the session ends. (xdist's
``--dist loadgroup`` cannot be relied on to keep these tests on one worker:
pytest-xdist 3.8 sets ``item._nodeid``, which pytest 9 no longer reads.)

These tests never skip: when the machine lacks something (root, the Debian
packages, the Go toolchain, cgroup controllers...), they FAIL and say what is
missing and how to install it (``dptr-testbed node-prereqs --install``).

To extend (test_e2e.py does: helm install + a pipeline's outcomes): take the
``real_bed`` fixture, load more images with ``real_bed.load_image(...)`` (or use
the operator/sidecar images the bed already loaded: ``images.OPERATOR_IMAGE``,
``images.SIDECAR_IMAGE``), install with ``real_bed.helm(...)``, and reach host
services from pods at ``real_bed.node_address`` (the pod network's gateway), e.g.
``LocalDataPipeline(host=real_bed.node_address)``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dptr_testbed import binaries, images, realnode
from dptr_testbed.controlplane import RunningTestbed
from dptr_testbed.waiting import wait_for

HERE = Path(__file__).resolve().parent
PROBE_IMAGE = "localhost/dptr-realnode-probe:dev"
# A cold machine builds kubelet/kube-proxy, the base and every image first.
START_TIMEOUT = float(os.environ.get("DPTR_REALNODE_START_TIMEOUT", "1500"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "realnode: needs a real node (root, containerd, kubelet, CNI, kube-proxy)"
    )


@dataclass(frozen=True)
class PodResult:
    phase: str
    exit_code: int | None
    logs: str
    pod: dict[str, Any]

    def json_line(self) -> dict[str, Any]:
        """The last JSON object the pod printed."""
        for line in reversed(self.logs.splitlines()):
            if line.startswith("{"):
                parsed: dict[str, Any] = json.loads(line)
                return parsed
        raise AssertionError(f"the pod printed no JSON line; logs:\n{self.logs}")


@dataclass(frozen=True)
class RealBed:
    bed: RunningTestbed
    node_name: str
    node_address: str
    containerd_socket: Path

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.bed.kubectl(*args, check=check, input=input)

    def ctr(self, *args: str) -> str:
        proc = subprocess.run(
            ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"ctr {' '.join(args)} failed: {proc.stderr}"
        return proc.stdout

    def load_image(self, context: Path, tag: str) -> None:
        """Build ``context``'s Containerfile with podman and load it into the node's containerd."""
        self.ctr("images", "import", str(images.build_image(context, tag)))

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        helm = binaries.Binaries(binaries.bin_dir()).helm
        env = dict(os.environ, KUBECONFIG=str(self.bed.kubeconfig))
        return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, check=False)

    def namespace(self, prefix: str, *, restricted: bool = True) -> str:
        name = f"{prefix}-{os.urandom(3).hex()}"
        self.kubectl("create", "namespace", name)
        if restricted:
            self.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
        return name

    def run_pod(self, manifest: Mapping[str, Any], timeout: float = 120.0) -> PodResult:
        """Create a pod (restartPolicy Never), wait until it ends, return its phase, exit code and logs."""
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        pod: dict[str, Any] = {}

        def ended() -> bool:
            nonlocal pod
            pod = json.loads(self.kubectl("get", "pod", "-n", namespace, name, "-o", "json"))
            return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")

        try:
            wait_for(ended, timeout=timeout, interval=0.5, what=f"pod {namespace}/{name} to finish")
        except AssertionError as err:
            events = self.kubectl("get", "events", "-n", namespace, check=False)
            raise AssertionError(
                f"{err}: {json.dumps(pod.get('status'), indent=1)}\nevents:\n{events}"
            ) from None
        statuses = pod["status"].get("containerStatuses") or []
        terminated = statuses[0].get("state", {}).get("terminated", {}) if statuses else {}
        logs = self.kubectl("logs", "-n", namespace, name, check=False)
        return PodResult(pod["status"]["phase"], terminated.get("exitCode"), logs, pod)


def restricted_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _shared_root(factory: pytest.TempPathFactory, config: pytest.Config) -> Path:
    base = factory.getbasetemp()
    # Workers get per-worker base temps below one per-run directory.
    return base.parent if hasattr(config, "workerinput") else base


def _start_bed(home: Path, state: Path) -> None:
    """Start ``dptr-testbed up --real-node`` detached; fail the test with its log if it does not come up."""
    log_path = home / "up.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dptr_testbed.cli", "up", "--real-node", "--state-dir", str(state)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (home / "testbed.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT
    while not (state / "testbed.json").exists():
        why = None
        if proc.poll() is not None:
            why = "`dptr-testbed up --real-node` failed:\n" + log_path.read_text(errors="replace")[-6000:]
        elif time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            why = f"the real node did not start within {START_TIMEOUT:.0f}s; see {log_path}"
        if why is not None:
            # The other workers fail with the same message instead of retrying.
            (home / "failed").write_text(why)
            pytest.fail(why, pytrace=False)
        time.sleep(1)


@pytest.fixture(scope="session")
def real_bed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> RealBed:
    missing = realnode.missing_prerequisites(with_kube_binaries=False)
    if missing:
        pytest.fail(
            "this machine cannot run the real-node tests; missing:\n  - "
            + "\n  - ".join(missing)
            + "\nInstall with `dptr-testbed node-prereqs --install --build` (as root).",
            pytrace=False,
        )
    home = _shared_root(tmp_path_factory, pytestconfig) / "realnode"
    home.mkdir(parents=True, exist_ok=True)
    state = home / "bed"  # short: containerd's socket lives under it
    with (home / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / "failed").exists():
            pytest.fail((home / "failed").read_text(), pytrace=False)
        if not (state / "testbed.json").exists():
            _start_bed(home, state)
        info = json.loads((state / "testbed.json").read_text())["realNode"]
        bed = RealBed(
            RunningTestbed.attach(state), info["name"], info["address"], Path(info["containerdSocket"])
        )
        if not (home / "probe-loaded").exists():
            bed.load_image(HERE / "probe", PROBE_IMAGE)
            (home / "probe-loaded").touch()
    return bed
