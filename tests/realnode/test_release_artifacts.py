"""The release artifacts as built here: `make chart`'s package and the images' OCI labels.

`make chart` is ``dptr-testbed chart`` (``cli.package_chart``), `make images` is
``dptr-testbed images --release`` (``images.build_release_images``), which builds through
``images.build_project_image``: the function that builds the real node's images. So the
labels are checked on the images the real-node bed has already built (no extra build),
and the release workflow's labels and the Dockerfile's are checked against the same
``images.ImageMetadata`` as text.

Only the image test needs the real node (root, podman...); like every real-node test it
fails, never skips, when the machine lacks them. The others need the bed's helm and git.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from dptr_common.version import REGISTRY, VERSION
from dptr_testbed import cli, images

from .conftest import RealBed

REPO = Path(__file__).resolve().parents[2]
OCI_KEYS = {f"org.opencontainers.image.{key}" for key in ("source", "version", "revision", "licenses")}


def _project_version() -> str:
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_make_chart_packages_the_version(tmp_path: Path) -> None:
    package = cli.package_chart(tmp_path / "dist")
    version = _project_version()
    assert version == VERSION, "the installed dptr is stale; run `make setup`"
    assert package == tmp_path / "dist" / f"dptr-{version}.tgz"
    with tarfile.open(package) as tar:
        member = tar.extractfile("dptr/Chart.yaml")
        assert member is not None
        chart = yaml.safe_load(member.read())
        names = tar.getnames()
    assert chart["name"] == "dptr"
    assert str(chart["version"]) == str(chart["appVersion"]) == version
    assert "dptr/values.yaml" in names
    assert any(name.startswith("dptr/crds/") for name in names), names


def test_the_chart_command_prints_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["chart", "--destination", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / f"dptr-{_project_version()}.tgz")


def _release_step() -> tuple[list[str], dict[str, str]]:
    """release.yml's image matrix and its build-push-action's ``with:``."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    job = workflow["jobs"]["images"]
    step = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action"))
    with_: dict[str, str] = step["with"]
    return job["strategy"]["matrix"]["target"], with_


def _pairs(block: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in block.strip().splitlines())


def _expand(text: str, args: dict[str, str]) -> str:
    """A Dockerfile ``${ARG}`` substitution."""
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_the_labels_are_the_release_workflows_and_the_dockerfiles() -> None:
    targets, with_ = _release_step()
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM runtime AS (\w+)$", dockerfile, re.M)
    assert sorted(targets) == sorted(stages) == sorted(images.RELEASE_TARGETS)
    assert [i.tag for i in images.release_images("1.2.3")] == [
        f"{REGISTRY}/dptr-{t}:1.2.3" for t in images.RELEASE_TARGETS
    ]
    meta = images.ImageMetadata(version="1.2.3", revision="abc123", source="https://example.com/x")
    for target in targets:
        want = meta.labels(target)
        assert set(want) >= OCI_KEYS
        # release.yml, its expressions given this metadata's values.
        subst = {
            "${{ matrix.target }}": target,
            "${{ env.VERSION }}": meta.version,
            "${{ github.sha }}": meta.revision,
            "${{ github.server_url }}/${{ github.repository }}": meta.source,
        }

        def fill(text: str, subst: dict[str, str] = subst) -> str:
            for expr, value in subst.items():
                text = text.replace(expr, value)
            return text

        assert _pairs(fill(with_["labels"])) == want
        annotations = _pairs(fill(with_["annotations"]))
        assert {k.removeprefix("index:"): v for k, v in annotations.items()}.items() <= want.items()
        # The Dockerfile: the stage's ARG defaults, then its LABEL with the build args.
        stage = dockerfile.split(f"FROM runtime AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        args = dict(re.findall(r"^ARG (\w+)=(.*)$", stage, re.M))
        assert args == {"VERSION": "unknown", "REVISION": "unknown", "SOURCE": images.SOURCE}
        label = re.search(r"^LABEL ((?:.*\\\n)*.*)$", stage, re.M)
        assert label is not None, f"no LABEL in the {target} stage"
        given = {"SOURCE": meta.source, "VERSION": meta.version, "REVISION": meta.revision}
        assert {
            key: _expand(value, given) for key, value in re.findall(r'([\w.]+)="([^"]*)"', label.group(1))
        } == want
        # And podman is given the build args and the same keys as annotations.
        argv = meta.build_args(target)
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--build-arg"] == [
            "VERSION=1.2.3",
            "REVISION=abc123",
            "SOURCE=https://example.com/x",
        ]
        assert _pairs("\n".join(argv[i + 1] for i, a in enumerate(argv) if a == "--annotation")) == want


def test_the_revision_is_the_commit_and_says_dirty(tmp_path: Path) -> None:
    assert images.git_revision(tmp_path) == "unknown"
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    git("init", "-q")
    assert images.git_revision(repo) == "unknown"  # no commit yet
    (repo / "a").write_text("1")
    git("add", "a")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert images.git_revision(repo) == head
    (repo / "a").write_text("2")
    assert images.git_revision(repo) == f"{head}-dirty"
    git("commit", "-qam", "two")
    (repo / "new").write_text("untracked")
    assert images.git_revision(repo) == git("rev-parse", "HEAD") + "-dirty"
    # A directory inside a checkout is not that checkout.
    (repo / "sub").mkdir()
    assert images.git_revision(repo / "sub") == "unknown"


@pytest.mark.realnode
@pytest.mark.timeout(2400)  # a cold machine builds every image first
def test_the_real_nodes_images_carry_the_oci_labels(real_bed: RealBed) -> None:
    meta = images.image_metadata()
    assert meta.version == _project_version()
    for image in images.PROJECT_IMAGES:
        want = meta.labels(image.target)
        labels = images.image_labels(image.tag)
        assert {k: labels.get(k) for k in want} == want, image.tag
        annotations = images.image_annotations(image.tag)
        assert {k: annotations.get(k) for k in want} == want, image.tag
    assert {k: v for k, v in want.items() if k in OCI_KEYS} == {
        "org.opencontainers.image.source": "https://github.com/dptr-dev/dptr",
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.revision": images.git_revision(),
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    if (REPO / ".git").exists():  # a checkout's revision is never "unknown"
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", meta.revision), meta.revision


@pytest.mark.realnode
@pytest.mark.timeout(600)
def test_a_rebuild_with_nothing_changed_takes_the_new_revision(real_bed: RealBed) -> None:
    """Two commits that change nothing the image copies (a doc, a test): podman's layer
    cache has the whole image, LABEL step included, from the first; the second must still
    say its own revision. The real node's images are built already, so the builds here
    come from the cache (a few seconds each), under a tag of this test's own."""
    image = images.ProjectImage("localhost/dptr-relabel-test:dev", "sidecar")
    ca = images.default_ca_bundle()
    try:
        ids = []
        for revision in ("1" * 40, "2" * 40, "1" * 40):
            meta = images.ImageMetadata(VERSION, revision)
            images.build_project_image(image, ca, meta)
            want = meta.labels(image.target)
            labels = images.image_labels(image.tag)
            assert {k: labels.get(k) for k in want} == want, revision
            annotations = images.image_annotations(image.tag)
            assert {k: annotations.get(k) for k in want} == want, revision
            ids.append(images.image_id(image.tag))
        # The same labels on the same layers make the same image: archives stay cached.
        assert ids[0] == ids[2] != ids[1]
    finally:
        subprocess.run(["podman", "rmi", "--force", image.tag], capture_output=True, check=False)
