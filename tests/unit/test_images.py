"""The real node's image recipe: mirrors, local build arguments, and the Dockerfiles' shape."""

from __future__ import annotations

import re
from pathlib import Path

from dptr_testbed import images, realnode

REPO = Path(__file__).resolve().parents[2]


def test_debian_mirrors_from_deb822(tmp_path: Path) -> None:
    src = tmp_path / "debian.sources"
    src.write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://other.example/debian\nSuites: bookworm\n"
    )
    assert images.debian_mirrors([src]) == (
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
    )


def test_debian_mirrors_from_one_line_format(tmp_path: Path) -> None:
    src = tmp_path / "sources.list"
    src.write_text(
        "# comment\ndeb https://apt.example/x nodistro main\n"
        "deb [signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert images.debian_mirrors([src]) == ("http://m.example/debian", None)


def test_debian_mirror_defaults_when_none_configured(tmp_path: Path) -> None:
    assert images.debian_mirrors([tmp_path / "missing.list"])[0] == "http://deb.debian.org/debian"


def test_local_build_swaps_the_base_and_mounts_the_ca_only_when_given() -> None:
    args = images.build_args(Path("/etc/ssl/certs/ca-certificates.crt"))
    assert f"BASE_IMAGE={images.BASE_IMAGE}" in args
    assert f"/etc/ssl/certs/ca-certificates.crt:{images.BUILD_CA_PATH}:ro" in args
    assert f"PIP_CERT={images.BUILD_CA_PATH}" in args
    bare = images.build_args(None)
    assert not any("PIP_CERT" in a or a == "-v" for a in bare)


def test_dockerfiles_are_standard_non_root_and_pinned() -> None:
    for image in images.PROJECT_IMAGES:
        text = (REPO / image.dockerfile).read_text()
        base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
        assert base and "@sha256:" in base.group(1), image.dockerfile
        assert "USER 65532:65532" in text
        # Nothing of the local build path leaks into the Dockerfile itself.
        assert "localhost/" not in text.replace("localhost/debian-base:bookworm", "")
        assert "ca-certificates.crt" not in text


def test_sidecar_dockerfile_installs_no_extras_and_no_operator_code() -> None:
    text = (REPO / "sidecar" / "Dockerfile").read_text()
    assert "[operator]" not in text and "optional-dependencies" not in text
    assert "COPY operator" not in text
    assert "import kopf" in text  # the build itself proves kopf is absent


def test_gateway_is_the_first_address_of_the_pod_subnet() -> None:
    assert realnode.gateway_address("10.244.0.0/24") == "10.244.0.1"
