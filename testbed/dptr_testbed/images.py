"""Container images for the real node, built here from Debian packages.

No container registry is reachable from the test machines, so every image the
real node runs is assembled locally:

1. a Debian base (``localhost/debian-base:bookworm``): ``debootstrap
   --variant=minbase`` into a directory, then ``podman import``;
2. the pause image (``localhost/dptr-pause:3.10``): a small static Go program
   in a ``FROM scratch`` image, the CRI sandbox image;
3. the project's own images, the ``operator`` and ``sidecar`` targets of the
   repository's Dockerfile, built with ``podman build`` on that base (the
   ``BASE_IMAGE`` build arg), with the OCI labels and annotations the release
   images carry (``ImageMetadata``);
4. each image saved once to an archive that ``ctr -n k8s.io images import``
   loads into the node's containerd.

What can be cached is, under ``<cache>/images`` (``~/.cache/dptr/images``),
keyed by its inputs: the base's root filesystem tarball (suite, mirror,
recipe), the pause binary (source, Go version) and the saved archives (image
id). Podman's own layer cache makes a warm ``podman build`` take seconds.

``build_release_images`` (``dptr-testbed images --release``, ``make images``) builds
all three targets the same way, tagged as the release workflow pushes them
(``ghcr.io/dptr-dev/dptr-<target>:<version>``); it pushes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dptr_common.version import REGISTRY, VERSION

from . import binaries

DEBIAN_SUITE = "bookworm"
BASE_IMAGE = f"localhost/debian-base:{DEBIAN_SUITE}"
PAUSE_IMAGE = "localhost/dptr-pause:3.10"
OPERATOR_IMAGE = "localhost/dptr-operator:dev"
SIDECAR_IMAGE = "localhost/dptr-sidecar:dev"
# Bump when the way the base is assembled changes, to invalidate the cache.
BASE_RECIPE = "2"
# Where the host's CA bundle is mounted inside a build: not the image's own
# /etc/ssl/certs path, which the ca-certificates package writes to.
BUILD_CA_PATH = "/tmp/dptr-build-ca.pem"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

PAUSE_SOURCE = """\
// pause: the sandbox ("infra") container of every pod on the dptr test bed's
// real node. It holds the pod's namespaces and does nothing else: it sleeps
// until SIGINT or SIGTERM, reaps orphaned children (it may be PID 1) and exits 0.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	reap := make(chan os.Signal, 1)
	signal.Notify(reap, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-reap:
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}
"""

PAUSE_CONTAINERFILE = """\
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
"""


class ImageBuildError(RuntimeError):
    """An image could not be assembled; the message says which step failed."""


#: Both project images come from this one Dockerfile (a target each), relative to the
#: repository root, which is the build context.
DOCKERFILE = "Dockerfile"


@dataclass(frozen=True)
class ProjectImage:
    """One of the project's own images and the Dockerfile target it is built from."""

    tag: str
    target: str  # a stage of DOCKERFILE
    dockerfile: str = DOCKERFILE


PROJECT_IMAGES = (
    ProjectImage(OPERATOR_IMAGE, "operator"),
    ProjectImage(SIDECAR_IMAGE, "sidecar"),
)
#: Every image target of DOCKERFILE: what release.yml pushes and `make images` builds.
RELEASE_TARGETS = ("operator", "sidecar", "activity")


def release_images(version: str = VERSION) -> tuple[ProjectImage, ...]:
    """The images as the release workflow tags them: ``ghcr.io/dptr-dev/dptr-<target>:<version>``."""
    return tuple(ProjectImage(f"{REGISTRY}/dptr-{target}:{version}", target) for target in RELEASE_TARGETS)


def images_cache() -> Path:
    return binaries.cache_dir() / "images"


def _log(msg: str) -> None:
    print(f"[dptr-testbed images] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    _log("$ " + " ".join(cmd))
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    result: subprocess.CompletedProcess[str] = proc
    return result


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageBuildError(
            f"{tool} is not installed (Debian package {package}); run `dptr-testbed node-prereqs --install`"
        )
    return path


def repo_root() -> Path:
    """The repository root: the build context of the project's Dockerfiles."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / DOCKERFILE).exists():
            return parent
    raise ImageBuildError(f"cannot find the repository root (with {DOCKERFILE}) above {here}")


# ---- Debian mirror ---------------------------------------------------------
def debian_mirrors(sources: Sequence[Path] | None = None) -> tuple[str, str | None]:
    """The Debian archive and security mirrors apt is configured with.

    ``$DPTR_DEBIAN_MIRROR`` overrides the archive. Reads both the one-line
    (``deb URI SUITE ...``) and the deb822 (``URIs:``/``Suites:``) formats.
    """
    if sources is None:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
        sources += sorted((apt / "sources.list.d").glob("*.sources"))
    pairs: list[tuple[str, str]] = []  # (uri, suite)
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).split())
                    for m in re.finditer(r"^([\w-]+):\s*(.*)$", stanza, re.M)
                )
                if "deb" not in fields.get("types", []):
                    continue
                pairs += [(u, s) for u in fields.get("uris", []) for s in fields.get("suites", [])]
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    pairs.append((m.group(1), m.group(2)))
    archive = os.environ.get("DPTR_DEBIAN_MIRROR")
    security = None
    for uri, suite in pairs:
        if suite == DEBIAN_SUITE and archive is None:
            archive = uri
        if suite == f"{DEBIAN_SUITE}-security" and security is None:
            security = uri
    return (archive or "http://deb.debian.org/debian").rstrip("/"), security.rstrip("/") if security else None


# ---- the base image --------------------------------------------------------
# As Debian's own -slim images do: no documentation, manual pages or
# translations, now or from packages installed later.
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
"""


def _slim(root: Path) -> None:
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/dptr-slim").write_text(DPKG_EXCLUDES)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/apt.conf.d/dptr-slim").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
    )
    for sub in (
        "usr/share/man",
        "usr/share/groff",
        "usr/share/info",
        "usr/share/locale",
        "usr/share/lintian",
    ):
        shutil.rmtree(root / sub, ignore_errors=True)
    for doc in (root / "usr/share/doc").glob("*"):
        if doc.is_dir():
            for child in doc.iterdir():
                if child.name != "copyright":
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()
    # What debootstrap leaves behind that no image needs.
    for sub in ("var/cache/apt/archives", "var/cache/apt", "var/lib/apt/lists", "var/log"):
        for child in (root / sub).glob("*"):
            if child.is_file() and child.name != "lock":
                child.unlink()


def _podman_label(image: str, label: str) -> str | None:
    proc = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{index .Labels " + f'"{label}"' + "}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def ensure_base() -> str:
    """Make ``localhost/debian-base:bookworm`` from Debian packages (cached)."""
    podman = _need("podman", "podman")
    archive, security = debian_mirrors()
    key = _key(DEBIAN_SUITE, archive, security or "", BASE_RECIPE)
    if _podman_label(BASE_IMAGE, "dptr.base-key") == key:
        return BASE_IMAGE
    cache = images_cache()
    cache.mkdir(parents=True, exist_ok=True)
    rootfs_tar = cache / f"debian-base-{DEBIAN_SUITE}-{key}.tar"
    if not rootfs_tar.exists():
        debootstrap = _need("debootstrap", "debootstrap")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="dptr-debootstrap-", dir=cache) as tmp:
            root = Path(tmp) / "root"
            _run(
                [debootstrap, "--variant=minbase", DEBIAN_SUITE, str(root), archive],
                "debootstrap",
            )
            lines = [f"deb {archive} {DEBIAN_SUITE} main", f"deb {archive} {DEBIAN_SUITE}-updates main"]
            if security:
                lines.append(f"deb {security} {DEBIAN_SUITE}-security main")
            (root / "etc/apt/sources.list").write_text("\n".join(lines) + "\n")
            _slim(root)
            partial = rootfs_tar.with_suffix(".partial")
            _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], "tar the base root")
            partial.rename(rootfs_tar)
        _log(f"debootstrap {DEBIAN_SUITE} from {archive}: {time.monotonic() - started:.0f}s")
    _run(
        [
            podman,
            "import",
            "--change",
            f"LABEL dptr.base-key={key}",
            "--change",
            'CMD ["/bin/bash"]',
            str(rootfs_tar),
            BASE_IMAGE,
        ],
        "podman import of the base",
    )
    return BASE_IMAGE


# ---- the pause image -------------------------------------------------------
def _go_version(go: str) -> str:
    return subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout.strip()


def ensure_pause() -> str:
    """Build the sandbox image from a static Go binary, ``FROM scratch`` (cached)."""
    podman = _need("podman", "podman")
    go = shutil.which("go")
    if go is None:
        raise ImageBuildError("the Go toolchain is required to build the pause image (go not on PATH)")
    key = _key(PAUSE_SOURCE, PAUSE_CONTAINERFILE, _go_version(go))
    if _podman_label(PAUSE_IMAGE, "dptr.pause-key") == key:
        return PAUSE_IMAGE
    cache = images_cache() / f"pause-{key}"
    binary = cache / "pause"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="dptr-pause-") as tmp:
            work = Path(tmp)
            (work / "go.mod").write_text("module dptr.invalid/pause\n\ngo 1.22\n")
            (work / "main.go").write_text(PAUSE_SOURCE)
            env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
            _run(
                [go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(binary) + ".partial", "."],
                "go build of pause",
                cwd=work,
                env=env,
            )
            Path(str(binary) + ".partial").rename(binary)
    with tempfile.TemporaryDirectory(prefix="dptr-pause-ctx-") as tmp:
        ctx = Path(tmp)
        shutil.copy2(binary, ctx / "pause")
        (ctx / "Containerfile").write_text(PAUSE_CONTAINERFILE)
        _run(
            [
                podman,
                "build",
                "--label",
                f"dptr.pause-key={key}",
                "-t",
                PAUSE_IMAGE,
                "-f",
                "Containerfile",
                ".",
            ],
            "podman build of the pause image",
            cwd=ctx,
        )
    return PAUSE_IMAGE


# ---- the project's images --------------------------------------------------
#: org.opencontainers.image.source and .licenses of every image (release.yml sets the same).
SOURCE = "https://github.com/dptr-dev/dptr"
LICENSES = "Apache-2.0"
OCI = "org.opencontainers.image"


@dataclass(frozen=True)
class ImageMetadata:
    """The OCI metadata of a project image: the Dockerfile's build args, which set its
    labels (in the image config, what ``podman image inspect`` shows as Labels), and the
    same keys as manifest annotations. ``.github/workflows/release.yml`` sets the same
    labels (and annotations) on the images it pushes."""

    version: str
    revision: str
    source: str = SOURCE

    def labels(self, target: str) -> dict[str, str]:
        return {
            f"{OCI}.title": f"dptr-{target}",
            f"{OCI}.description": f"dptr {target}: a Kubernetes-native task runner for AWS Data Pipeline",
            f"{OCI}.source": self.source,
            f"{OCI}.version": self.version,
            f"{OCI}.revision": self.revision,
            f"{OCI}.licenses": LICENSES,
        }

    def build_args(self, target: str) -> list[str]:
        args = [
            *("--build-arg", f"VERSION={self.version}"),
            *("--build-arg", f"REVISION={self.revision}"),
            *("--build-arg", f"SOURCE={self.source}"),
        ]
        for key, value in self.labels(target).items():
            args += ["--annotation", f"{key}={value}"]
        return args


def git_revision(root: Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository, ``-dirty`` when ``git status`` lists
    anything (untracked files too, as Go's ``vcs.modified``), ``unknown`` outside git."""
    root = repo_root() if root is None else root
    git = shutil.which("git")
    if git is None:
        return "unknown"
    # safe.directory: the builds run as root, in a checkout that may be someone else's;
    # --no-optional-locks: `git status` must not rewrite (and re-own) that checkout's index.
    base = [git, "-c", f"safe.directory={root}", "--no-optional-locks", "-C", str(root)]

    def git_out(*args: str) -> str | None:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git_out("rev-parse", "--show-toplevel")
    head = git_out("rev-parse", "--verify", "HEAD")
    status = git_out("status", "--porcelain")
    if top is None or Path(top).resolve() != root.resolve() or head is None or status is None:
        return "unknown"
    return f"{head}-dirty" if status else head


def image_metadata() -> ImageMetadata:
    """This checkout's: the installed dptr version and the git revision."""
    return ImageMetadata(VERSION, git_revision())


def build_args(ca_bundle: Path | None) -> list[str]:
    """podman build arguments for the local build path (base swap, proxy CA)."""
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--ulimit", "nofile=1024:1024", "--layers"]
    if ca_bundle is not None:
        args += ["-v", f"{ca_bundle}:{BUILD_CA_PATH}:ro", "--build-arg", f"PIP_CERT={BUILD_CA_PATH}"]
    return args


def build_project_image(
    image: ProjectImage, ca_bundle: Path | None, metadata: ImageMetadata | None = None
) -> str:
    """``podman build`` one target on the local base, with its OCI labels and annotations."""
    podman = _need("podman", "podman")
    root = repo_root()
    meta = image_metadata() if metadata is None else metadata
    started = time.monotonic()
    _run(
        [
            podman,
            "build",
            *build_args(ca_bundle),
            *meta.build_args(image.target),
            "-f",
            image.dockerfile,
            "--target",
            image.target,
            "-t",
            image.tag,
            ".",
        ],
        f"podman build of {image.tag}",
        cwd=root,
    )
    want = meta.labels(image.target)
    if not _labelled(image.tag, want):
        _restamp(podman, image.tag, want)
    _log(f"{image.tag} built in {time.monotonic() - started:.0f}s")
    return image.tag


def _restamp(podman: str, tag: str, labels: dict[str, str]) -> None:
    """Give ``tag`` its own labels and annotations in a last, uncached step.

    With ``--layers``, buildah keys a LABEL step's cache on the instruction's text before
    its ``${ARG}`` is expanded, and reuses the last build's step (``--label`` included)
    when nothing the image copies has changed: a new commit would carry the previous
    commit's ``org.opencontainers.image.revision``. Docker's BuildKit, which release.yml
    uses, writes the config anew. The step is a ``FROM`` and a ``LABEL`` (no layer), at
    the built image's own timestamp so that the same labels make the same image id
    (``save``'s cache and the real node's imports stay warm).
    """
    source = image_id(tag)
    created = _inspect(source, "{{.Created.Unix}}")
    containerfile = f"FROM {source}\nLABEL " + " \\\n      ".join(
        f"{key}={json.dumps(value)}" for key, value in labels.items()
    )
    annotations = [arg for key, value in labels.items() for arg in ("--annotation", f"{key}={value}")]
    with tempfile.TemporaryDirectory(prefix="dptr-restamp-") as tmp:
        (Path(tmp) / "Containerfile").write_text(containerfile + "\n")
        _run(
            [
                podman,
                "build",
                "--no-cache",
                "--pull=never",
                "--timestamp",
                created,
                *annotations,
                "-t",
                tag,
                "-f",
                "Containerfile",
                ".",
            ],
            f"podman build (labels) of {tag}",
            cwd=tmp,
        )
    if not _labelled(tag, labels):
        raise ImageBuildError(f"{tag} was labelled {image_labels(tag)}, not {labels}")


def _labelled(tag: str, labels: dict[str, str]) -> bool:
    """Whether ``tag`` carries ``labels`` (buildah adds io.buildah.version of its own)."""
    return image_labels(tag).items() >= labels.items()


def _inspect(tag: str, template: str) -> str:
    """``podman image inspect --format template tag``, stripped."""
    return _run(["podman", "image", "inspect", "--format", template, tag], f"inspect {tag}").stdout.strip()


def image_id(tag: str) -> str:
    return _inspect(tag, "{{.Id}}")


def image_size(tag: str) -> int:
    return int(_inspect(tag, "{{.Size}}"))


def save(tag: str) -> Path:
    """An archive of ``tag`` that ``ctr images import`` takes, cached by image id."""
    out = images_cache() / "archives"
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", tag)
    archive = out / f"{stem}-{image_id(tag)[:16]}.tar"
    if archive.exists():
        return archive
    for old in out.glob(f"{stem}-*.tar"):
        old.unlink()
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    _run(["podman", "save", "--format", "docker-archive", "-o", str(partial), tag], f"podman save {tag}")
    partial.rename(archive)
    return archive


def default_ca_bundle() -> Path | None:
    """The CA bundle to trust in builds: ``$DPTR_BUILD_CA_BUNDLE``, else the host's."""
    env = os.environ.get("DPTR_BUILD_CA_BUNDLE")
    if env is not None:
        return Path(env) if env else None
    return HOST_CA_BUNDLE if HOST_CA_BUNDLE.exists() else None


@dataclass(frozen=True)
class BuiltImages:
    """Tag -> archive for every image the real node needs."""

    archives: dict[str, Path]

    @property
    def pause(self) -> str:
        return PAUSE_IMAGE


def ensure_all(project: bool = True, ca_bundle: Path | None = None) -> BuiltImages:
    """Build (or find cached) every image, and save each for containerd."""
    if os.geteuid() != 0:
        raise ImageBuildError("building the real node's images needs root (debootstrap, podman)")
    ca = ca_bundle if ca_bundle is not None else default_ca_bundle()
    tags = [ensure_base(), ensure_pause()]
    if project:
        meta = image_metadata()
        tags += [build_project_image(image, ca, meta) for image in PROJECT_IMAGES]
    archives = {tag: save(tag) for tag in tags if tag != BASE_IMAGE}
    return BuiltImages(archives)


def build_release_images(
    ca_bundle: Path | None = None, metadata: ImageMetadata | None = None
) -> tuple[ImageMetadata, list[str]]:
    """Build every Dockerfile target as ``release_images`` tags it (``make images``).

    The build path of the real node's images: the local Debian base in place of the
    Dockerfile's pinned ``debian:bookworm-slim`` (no registry is reachable here), the
    host's CA bundle for pip, the OCI labels and annotations. Nothing is pushed.
    """
    if os.geteuid() != 0:
        raise ImageBuildError("building the images needs root here (debootstrap of the local base, podman)")
    ca = ca_bundle if ca_bundle is not None else default_ca_bundle()
    meta = image_metadata() if metadata is None else metadata
    ensure_base()
    return meta, [build_project_image(image, ca, meta) for image in release_images(meta.version)]


def image_labels(tag: str) -> dict[str, str]:
    """The labels in ``tag``'s config, as ``podman image inspect`` shows them."""
    out = _inspect(tag, "{{json .Labels}}")
    labels: dict[str, str] = json.loads(out) or {}
    return labels


def image_annotations(tag: str) -> dict[str, str]:
    """The annotations of ``tag``'s manifest, as ``podman image inspect`` shows them."""
    out = _inspect(tag, "{{json .Annotations}}")
    annotations: dict[str, str] = json.loads(out) or {}
    return annotations


def build_image(context: Path, tag: str, containerfile: str = "Containerfile") -> Path:
    """Build a small extra image (e.g. a test's) and return its archive."""
    podman = _need("podman", "podman")
    _run(
        [podman, "build", *build_args(default_ca_bundle()), "-t", tag, "-f", containerfile, "."],
        f"podman build of {tag}",
        cwd=context,
    )
    return save(tag)


# ---- verification under containerd -----------------------------------------
@dataclass(frozen=True)
class Check:
    """One command run in an image under containerd, and what must come of it."""

    image: str
    argv: tuple[str, ...]
    want_exit: int
    want_output: str = ""

    def describe(self) -> str:
        return f"{self.image} {' '.join(self.argv)} -> exit {self.want_exit}"


CHECKS = (
    # Non-root: uid/gid 65532, from the image's own USER.
    Check(SIDECAR_IMAGE, ("id", "-u"), 0, "65532"),
    Check(OPERATOR_IMAGE, ("id", "-u"), 0, "65532"),
    # The sidecar has its code and no kopf (nor the Kubernetes client).
    Check(
        SIDECAR_IMAGE,
        ("python", "-c", "import dptr_sidecar, dptr_common, boto3, pydantic; print('ok')"),
        0,
        "ok",
    ),
    Check(SIDECAR_IMAGE, ("python", "-c", "import kopf"), 1, "No module named 'kopf'"),
    Check(SIDECAR_IMAGE, ("python", "-c", "import kubernetes"), 1, "No module named 'kubernetes'"),
    # The operator has its code, kopf and prometheus_client, and no Kubernetes client
    # (kopf logs in with dptr's own client config; the package is the test bed's).
    Check(
        OPERATOR_IMAGE,
        ("python", "-c", "import dptr_operator, dptr_common, kopf, prometheus_client; print('ok')"),
        0,
        "ok",
    ),
    Check(OPERATOR_IMAGE, ("python", "-c", "import kubernetes"), 1, "No module named 'kubernetes'"),
    # Exit codes pass through.
    Check(SIDECAR_IMAGE, ("python", "-c", "raise SystemExit(7)"), 7),
    # The entry points run (with nothing but the image's own packages).
    Check(SIDECAR_IMAGE, ("dptr-sidecar", "--help"), 0, "usage: dptr-sidecar"),
    Check(OPERATOR_IMAGE, ("dptr-operator", "--help"), 0, "usage: dptr-operator"),
    # The pause image runs and stops on SIGTERM (checked by running it with a timeout).
)


def run_in_containerd(address: Path, image: str, argv: Sequence[str]) -> tuple[int, str]:
    """``ctr run --rm`` one command; returns (exit code, combined output).

    The root filesystem is read-only, as the chart runs these images.
    """
    name = f"dptr-check-{os.getpid()}-{time.monotonic_ns()}"
    cmd = ["ctr", f"--address={address}", "-n", "k8s.io", "run", "--rm", "--read-only", image, name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


class ScratchContainerd:
    """A throwaway containerd (no CRI) under ``root``, to check images outside a bed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = root / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ScratchContainerd:
        _need("containerd", "containerd")
        for sub in ("root", "state"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        conf = self.root / "config.toml"
        conf.write_text(
            f'version = 2\nroot = "{self.root / "root"}"\nstate = "{self.root / "state"}"\n'
            f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[metrics]\n  address = ""\n'
        )
        log = (self.root / "containerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["containerd", f"--config={conf}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run(
                ["ctr", f"--address={self.address}", "version"], capture_output=True, check=False
            ).returncode
            if ok == 0:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise ImageBuildError(f"the scratch containerd did not start; see {self.root / 'containerd.log'}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root) + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)

    def import_archive(self, archive: Path) -> None:
        _run(
            ["ctr", f"--address={self.address}", "-n", "k8s.io", "images", "import", str(archive)],
            "ctr import",
        )


def verify(built: BuiltImages, checks: Sequence[Check] = CHECKS) -> list[str]:
    """Run every check under a scratch containerd; return the failures (empty when all pass)."""
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="dptr-ctrd-", dir="/tmp") as tmp,
        ScratchContainerd(Path(tmp)) as ctrd,
    ):
        for archive in built.archives.values():
            ctrd.import_archive(archive)
        for check in checks:
            code, out = run_in_containerd(ctrd.address, check.image, check.argv)
            ok = code == check.want_exit and check.want_output in out
            _log(f"{'ok  ' if ok else 'FAIL'} {check.describe()} (got exit {code})")
            if not ok:
                failures.append(f"{check.describe()}: got exit {code}, output {out.strip()[-300:]!r}")
        # The pause image: runs, and a SIGTERM ends it with exit 0.
        name = f"dptr-check-pause-{os.getpid()}"
        base = ["ctr", f"--address={ctrd.address}", "-n", "k8s.io"]
        runner = subprocess.Popen(
            [*base, "run", "--rm", PAUSE_IMAGE, name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        time.sleep(1.0)
        subprocess.run([*base, "tasks", "kill", "--signal=SIGTERM", name], capture_output=True, check=False)
        try:
            code = runner.wait(20)
        except subprocess.TimeoutExpired:
            runner.kill()
            code = -1
        _log(f"{'ok  ' if code == 0 else 'FAIL'} {PAUSE_IMAGE} stops on SIGTERM with exit 0 (got {code})")
        if code != 0:
            failures.append(f"{PAUSE_IMAGE} did not stop cleanly on SIGTERM (exit {code})")
    return failures
