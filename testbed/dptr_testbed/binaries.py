"""Build the test bed's Go binaries from upstream Go modules, cached by version.

Nothing here downloads a prebuilt binary: every binary is compiled from its Go
module, fetched through the Go module proxy. Results are cached outside the
repository (``$DPTR_CACHE_DIR`` or ``~/.cache/dptr``) in a directory keyed by
the pinned versions, so only a fresh machine pays for the build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# One pinned release for every Kubernetes component. 1.34 keeps native sidecars
# (GA since 1.33) and a kubelet that still runs on cgroup v1 hosts.
KUBERNETES_VERSION = "v1.34.4"
# etcd 3.6 is the series Kubernetes 1.34 is tested with.
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
# The GitHub Actions workflow linter (tests/unit/test_workflows.py). It is not part of
# bin_dir()'s key, so bumping it does not rebuild Kubernetes: ensure() rebuilds it when
# the cached binary reports another version.
ACTIONLINT_VERSION = "v1.7.12"

CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
NODE = ("kubelet", "kube-proxy")


@dataclass(frozen=True)
class Binaries:
    """Where the cached binaries live."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def kube_apiserver(self) -> Path:
        return self.path("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self.path("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        return self.path("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        return self.path("kubectl")

    @property
    def etcd(self) -> Path:
        return self.path("etcd")

    @property
    def helm(self) -> Path:
        return self.path("helm")

    @property
    def actionlint(self) -> Path:
        return self.path("actionlint")


def cache_dir() -> Path:
    base = os.environ.get("DPTR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dptr"
    )
    return Path(base)


def bin_dir() -> Path:
    key = f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_helm-{HELM_VERSION}"
    return cache_dir() / "bin" / key


def _log(msg: str) -> None:
    print(f"[dptr-testbed build] {msg}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env["CGO_ENABLED"] = "0"
    # Two cores on the reference machine: let go use them all, nothing more.
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    _log("$ " + " ".join(cmd))
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    _log(f"done in {time.monotonic() - started:.0f}s")


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go toolchain is required to build the test bed (go not on PATH)")
    return go


def staging_modules(kubernetes_version: str, workdir: Path, env: dict[str, str]) -> list[str]:
    """Read the staging modules from k8s.io/kubernetes' own go.mod.

    k8s.io/kubernetes replaces each staging module (k8s.io/api, ...) with a
    directory inside its own tree. Those replace directives are ignored when
    it is used as a dependency, so a wrapper module must replace each with the
    published v0.X.Y. Deriving the list from the go.mod keeps it right across
    releases.
    """
    out = subprocess.run(
        [_go(), "mod", "download", "-json", f"k8s.io/kubernetes@{kubernetes_version}"],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    gomod = Path(json.loads(out)["GoMod"]).read_text()
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s*=>\s*\./staging/", gomod, re.M)))


def kubernetes_ldflags(version: str) -> str:
    match = re.match(r"v(\d+)\.(\d+)\.\d+", version)
    if not match:
        raise ValueError(f"not a Kubernetes release version: {version}")
    values = {
        "gitVersion": version,
        "gitMajor": match.group(1),
        "gitMinor": match.group(2),
        "gitTreeState": "clean",
        # Built from the module zip, which carries no commit; say so honestly.
        "gitCommit": "module-" + version,
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        flags += [f"-X {pkg}.{key}={val}" for key, val in values.items()]
    return " ".join(flags)


def _build_kubernetes(names: tuple[str, ...], out: Path, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="dptr-k8s-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text("module dptr.invalid/k8sbuild\n\ngo 1.24.0\n")
        staging = staging_modules(KUBERNETES_VERSION, work, env)
        minor = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
        lines = [
            "module dptr.invalid/k8sbuild",
            "",
            "go 1.24.0",
            "",
            f"require k8s.io/kubernetes {KUBERNETES_VERSION}",
            "",
            "replace (",
        ]
        lines += [f"\t{mod} => {mod} {minor}" for mod in staging]
        lines += [")", ""]
        (work / "go.mod").write_text("\n".join(lines))
        _log(f"wrapper go.mod replaces {len(staging)} staging modules with {minor}")
        pkgs = [f"k8s.io/kubernetes/cmd/{name}" for name in names]
        _run(
            [
                _go(),
                "build",
                "-mod=mod",
                "-trimpath",
                "-ldflags",
                kubernetes_ldflags(KUBERNETES_VERSION),
                "-o",
                str(out) + "/",
                *pkgs,
            ],
            work,
            env,
        )


def _build_etcd(out: Path, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="dptr-etcd-build-") as tmp:
        work = Path(tmp)
        (work / "go.mod").write_text(
            f"module dptr.invalid/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
        )
        (work / "main.go").write_text(
            "package main\n\n"
            'import (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )
        _run(
            [_go(), "build", "-mod=mod", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), "."],
            work,
            env,
        )


def _go_install(package: str, version_var: str, version: str, out: Path, env: dict[str, str]) -> None:
    """``go install package`` into ``out``, stamping ``version`` into ``version_var`` as
    the tool's own release builds do (its ``version`` command prints it)."""
    with tempfile.TemporaryDirectory(prefix="dptr-go-install-") as tmp:
        ldflags = f"-s -w -X {version_var}={version}"
        _run(
            [_go(), "install", "-trimpath", "-ldflags", ldflags, package],
            Path(tmp),
            dict(env, GOBIN=str(out)),
        )


def _build_helm(out: Path, env: dict[str, str]) -> None:
    _go_install(
        f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
        "helm.sh/helm/v3/internal/version.version",
        HELM_VERSION,
        out,
        env,
    )


def _build_actionlint(out: Path, env: dict[str, str]) -> None:
    # actionlint's release builds set the version without its "v".
    _go_install(
        f"github.com/rhysd/actionlint/cmd/actionlint@{ACTIONLINT_VERSION}",
        "github.com/rhysd/actionlint.version",
        ACTIONLINT_VERSION.removeprefix("v"),
        out,
        env,
    )


def actionlint_is_current(path: Path) -> bool:
    """Whether ``path`` is an actionlint of the pinned version (``-version``'s first line)."""
    if not path.exists():
        return False
    try:
        proc = subprocess.run(
            [str(path), "-version"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    lines = proc.stdout.splitlines()
    return proc.returncode == 0 and bool(lines) and lines[0].strip() == ACTIONLINT_VERSION.removeprefix("v")


def ensure(node: bool = False) -> Binaries:
    """Return the cached binaries, building whatever is missing."""
    out = bin_dir()
    out.mkdir(parents=True, exist_ok=True)
    env = _go_env()
    wanted = CONTROL_PLANE + (NODE if node else ())
    missing_k8s = tuple(name for name in wanted if not (out / name).exists())
    started = time.monotonic()
    built = False
    if missing_k8s:
        _log(f"building Kubernetes {KUBERNETES_VERSION}: {', '.join(missing_k8s)} (cold builds take a while)")
        _build_kubernetes(missing_k8s, out, env)
        built = True
    if not (out / "etcd").exists():
        _log(f"building etcd {ETCD_VERSION}")
        _build_etcd(out, env)
        built = True
    if not (out / "helm").exists():
        _log(f"building helm {HELM_VERSION}")
        _build_helm(out, env)
        built = True
    if not actionlint_is_current(out / "actionlint"):
        _log(f"building actionlint {ACTIONLINT_VERSION}")
        _build_actionlint(out, env)
        built = True
    if built:
        _log(f"binaries ready in {out} after {time.monotonic() - started:.0f}s")
    return Binaries(out)
