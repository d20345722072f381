"""``dptr-testbed``: build, start and stop the local test bed."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import binaries


def _cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    bins = binaries.ensure(node=args.node)
    print(f"binaries ready in {bins.root} ({time.monotonic() - started:.0f}s)")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .controlplane import StartupError, Testbed

    nodes = [f"node-{i + 1}" for i in range(args.nodes)]
    if args.real_node and (args.nodes != 1 or args.no_kubelet):
        print(
            "dptr-testbed: --real-node runs exactly one node (no --nodes, no --no-kubelet)", file=sys.stderr
        )
        return 2
    bed = Testbed(Path(args.state_dir), nodes=nodes, kubelet=not args.no_kubelet, real_node=args.real_node)
    started = time.monotonic()
    stop = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        bed.start()
    except StartupError as err:
        print(f"dptr-testbed: startup failed: {err}", file=sys.stderr)
        return 1
    print(f"test bed up: {bed.server} ({time.monotonic() - started:.0f}s)")
    if bed.node_handle is not None:
        print(
            f"  real node {bed.node_handle.name} at {bed.node_handle.address}: images {bed.images_seconds:.0f}s, "
            f"containerd {bed.node_handle.containerd_socket}"
        )
    print(f"  export KUBECONFIG={bed.kubeconfig}")
    print(f"  nodes: {', '.join(nodes) if not args.no_kubelet else '(none)'}")
    print("  Ctrl-C or `dptr-testbed down --state-dir " + str(args.state_dir) + "` stops it", flush=True)
    try:
        while not stop:
            for name, comp in bed.components.items():
                if not comp.alive() and not name.startswith("kubelet-"):
                    print(f"dptr-testbed: {name} exited; see {comp.log}", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
    finally:
        bed.stop()
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    info_file = Path(args.state_dir) / "testbed.json"
    if not info_file.exists():
        print(f"dptr-testbed: no running test bed in {args.state_dir}", file=sys.stderr)
        return 1
    pid = int(json.loads(info_file.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        info_file.unlink(missing_ok=True)
        print("dptr-testbed: the test bed was not running (stale state removed)")
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and info_file.exists():
        time.sleep(0.2)
    if info_file.exists():
        print("dptr-testbed: the test bed did not stop within 60s", file=sys.stderr)
        return 1
    print("test bed stopped")
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from . import images

    started = time.monotonic()
    if args.release:
        return _release_images(started, verify=args.verify)
    try:
        built = images.ensure_all()
    except images.ImageBuildError as err:
        print(f"dptr-testbed images: {err}", file=sys.stderr)
        return 1
    for tag, archive in built.archives.items():
        print(f"{tag}\t{images.image_size(tag) / 1e6:.0f} MB\t{archive}")
    print(f"images ready in {time.monotonic() - started:.0f}s")
    if args.verify:
        failures = images.verify(built)
        if failures:
            print("dptr-testbed images: verification failed:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print("verified under containerd: non-root, no kopf in the sidecar, exit codes pass through")
    return 0


def _release_images(started: float, *, verify: bool) -> int:
    from . import images

    if verify:
        print("dptr-testbed images: --verify checks the real node's images, not --release", file=sys.stderr)
        return 2
    try:
        meta, tags = images.build_release_images()
    except images.ImageBuildError as err:
        print(f"dptr-testbed images: {err}", file=sys.stderr)
        return 1
    for tag in tags:
        print(f"{tag}\t{images.image_size(tag) / 1e6:.0f} MB\t{images.image_id(tag)[:12]}")
    print(f"version {meta.version}, revision {meta.revision}, source {meta.source}")
    print(f"images built in {time.monotonic() - started:.0f}s (on {images.BASE_IMAGE}; not pushed)")
    return 0


class ChartError(RuntimeError):
    """The chart could not be packaged; the message says why."""


def package_chart(destination: Path) -> Path:
    """``helm lint`` and ``helm package`` charts/dptr into ``destination`` with the bed's
    helm (``make binaries``); returns ``<destination>/dptr-<version>.tgz``.

    Refuses a chart whose ``version`` or ``appVersion`` is not pyproject.toml's version,
    as release.yml does (scripts/set-version.py sets all three).
    """
    import tomllib

    import yaml

    from .images import repo_root

    root = repo_root()
    chart_dir = root / "charts" / "dptr"
    helm = binaries.Binaries(binaries.bin_dir()).helm
    if not helm.exists():
        raise ChartError(f"helm is not built ({helm}); run `make binaries`")
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    if not str(chart["version"]) == str(chart["appVersion"]) == project:
        raise ChartError(
            f"Chart.yaml has version {chart['version']} and appVersion {chart['appVersion']}, "
            f"pyproject.toml {project}; run scripts/set-version.py {project}"
        )
    destination.mkdir(parents=True, exist_ok=True)
    for cmd in (
        [str(helm), "lint", str(chart_dir)],
        [str(helm), "package", str(chart_dir), "--destination", str(destination)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ChartError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    package = destination / f"{chart['name']}-{chart['version']}.tgz"
    if not package.exists():
        raise ChartError(f"helm package did not write {package}: {proc.stdout.strip()}")
    return package


def _cmd_chart(args: argparse.Namespace) -> int:
    try:
        package = package_chart(Path(args.destination).resolve())
    except ChartError as err:
        print(f"dptr-testbed chart: {err}", file=sys.stderr)
        return 1
    print(package)
    return 0


def _cmd_node_prereqs(args: argparse.Namespace) -> int:
    from . import realnode

    if args.install:
        realnode.install_prerequisites()
    if args.build:
        binaries.ensure(node=True)
    missing = realnode.missing_prerequisites(with_kube_binaries=args.build)
    if missing:
        print("dptr-testbed: the real node needs:\n  - " + "\n  - ".join(missing), file=sys.stderr)
        return 1
    print(f"real-node prerequisites present (cgroups: {realnode.cgroup_mode()})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(keep=args.keep, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dptr-testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build the Go binaries into the cache (only what is missing)")
    build.add_argument("--node", action="store_true", help="also build kubelet and kube-proxy")
    build.set_defaults(func=_cmd_build)

    up = sub.add_parser("up", help="start a control plane and kubelet stand-ins in the foreground")
    up.add_argument("--state-dir", required=True)
    up.add_argument("--nodes", type=int, default=1, help="number of fake nodes (default 1)")
    up.add_argument("--no-kubelet", action="store_true", help="start the control plane only")
    up.add_argument(
        "--real-node",
        action="store_true",
        help="run one real node (containerd, kubelet, CNI, kube-proxy; needs root) instead of stand-ins",
    )
    up.set_defaults(func=_cmd_up)

    down = sub.add_parser("down", help="stop the test bed running in --state-dir")
    down.add_argument("--state-dir", required=True)
    down.set_defaults(func=_cmd_down)

    imgs = sub.add_parser("images", help="build the real node's images (base, pause, operator, sidecar)")
    imgs.add_argument("--verify", action="store_true", help="then check them under a scratch containerd")
    imgs.add_argument(
        "--release",
        action="store_true",
        help="instead build every Dockerfile target (operator, sidecar, activity) tagged "
        "ghcr.io/dptr-dev/dptr-<target>:<version>, with OCI labels (`make images`; pushes nothing)",
    )
    imgs.set_defaults(func=_cmd_images)

    chart = sub.add_parser("chart", help="helm lint and helm package charts/dptr (`make chart`)")
    chart.add_argument("--destination", default="dist", help="where the .tgz goes (default dist/)")
    chart.set_defaults(func=_cmd_chart)

    prereqs = sub.add_parser("node-prereqs", help="check (and install) what the real node needs")
    prereqs.add_argument("--install", action="store_true", help="apt-get install the Debian packages")
    prereqs.add_argument("--build", action="store_true", help="also build kubelet and kube-proxy")
    prereqs.set_defaults(func=_cmd_node_prereqs)

    demo = sub.add_parser("demo", help="run the local end-to-end demo (no cluster, no AWS account)")
    demo.add_argument("--keep", action="store_true", help="stay up after the demo until Ctrl-C")
    demo.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    demo.set_defaults(func=_cmd_demo)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
